//! The daemon end to end: token-rooted dispatch, lookalike tenants that never see each
//! other, bad input, rotation, freeze/delete, per-tenant host uids, audit, crash safety.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::daemon::{Daemon, exec, temp_state};
use common::*;
use hyper::Method;

const DENTAL: &str = "northstar-dental";
const DESIGN: &str = "northstar-design";

/// Both lookalike tenants with their account notes, written through the API.
async fn lookalikes(d: &Daemon) -> (String, String) {
    let dental = d.create(DENTAL).await;
    let design = d.create(DESIGN).await;
    let notes = [
        (
            &dental,
            "renewal: March 12\nnote: considering churn because support was slow\n",
        ),
        (
            &design,
            "renewal: April 18\nnote: expanding to three new seats\n",
        ),
    ];
    for (token, text) in notes {
        let r = d
            .tenant(token)
            .request(
                Method::PUT,
                "/v1/files/account/notes.txt",
                text.as_bytes().to_vec(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{:?}", r.json());
    }
    (dental, design)
}

fn leaks(body: &[u8], other: &str) -> bool {
    let s = String::from_utf8_lossy(body);
    let secret = if other == DENTAL {
        ["March 12", "churn"]
    } else {
        ["April 18", "three new seats"]
    };
    secret.iter().any(|x| s.contains(x))
}

#[tokio::test]
async fn lookalike_tenants_never_see_each_other() {
    for who in BOTH {
        let d = Daemon::start(who);
        let (dental, design) = lookalikes(&d).await;
        for (token, me, other) in [(&dental, DENTAL, DESIGN), (&design, DESIGN, DENTAL)] {
            let c = d.tenant(token);
            // Own data is there.
            let r = c
                .request(Method::GET, "/v1/files/account/notes.txt", vec![])
                .await
                .unwrap();
            assert_eq!(r.status, 200);
            assert!(!leaks(&r.body, other), "{who:?} {me}: {:?}", r.body);
            let r = exec(&c, &["cat", "/work/account/notes.txt"]).await;
            assert_eq!(r.json()["exit_code"], 0, "{:?}", r.json());
            assert!(!leaks(&r.body, other));
            let r = c.request(Method::GET, "/v1/files/", vec![]).await.unwrap();
            assert_eq!(r.json()["entries"][0]["name"], "account", "{:?}", r.json());
            // Everything pointed at the other tenant fails, for the fitting reason.
            let other_rel = format!("../{other}/work/account/notes.txt");
            let attempts: Vec<(String, &str)> = vec![
                (format!("/v1/files/{other_rel}"), "path_escape"),
                (
                    format!("/v1/files/..%2f{other}%2fwork%2faccount%2fnotes.txt"),
                    "path_escape",
                ),
                (
                    format!("/v1/files/%2e%2e/%2E%2E/tenants/{other}/work/account/notes.txt"),
                    "path_escape",
                ),
                (
                    format!(
                        "/v1/files/{}/tenants/{other}/work/account/notes.txt",
                        d.state.display()
                    ),
                    "not_found",
                ),
                ("/v1/files//etc/passwd".into(), "not_found"),
            ];
            for (path, code) in attempts {
                let r = c.request(Method::GET, &path, vec![]).await.unwrap();
                assert_eq!(
                    r.reason_code().as_deref(),
                    Some(code),
                    "{who:?} {me} GET {path}: {} {:?}",
                    r.status,
                    r.json()
                );
                assert!(!leaks(&r.body, other));
            }
            // A symlink planted in work/ (by the sandbox itself) towards the neighbour.
            let target = d
                .state
                .join("tenants")
                .join(other)
                .join("work/account/notes.txt");
            let r = exec(&c, &["ln", "-sf", target.to_str().unwrap(), "/work/link"]).await;
            assert_eq!(r.json()["exit_code"], 0);
            let r = exec(
                &c,
                &[
                    "ln",
                    "-sf",
                    &format!("../../{other}/work/account/notes.txt"),
                    "/work/rel-link",
                ],
            )
            .await;
            assert_eq!(r.json()["exit_code"], 0);
            // exec reading sibling paths, through planted links too.
            for p in [
                format!("/work/../{other}/work/account/notes.txt"),
                target.display().to_string(),
                "/work/link".into(),
                "/work/rel-link".into(),
            ] {
                let r = exec(&c, &["cat", &p]).await;
                assert_ne!(r.json()["exit_code"], 0);
                assert!(
                    r.json()["stderr"]
                        .as_str()
                        .unwrap()
                        .contains("No such file or directory"),
                    "{p}: {:?}",
                    r.json()
                );
                assert!(!leaks(&r.body, other));
            }
            for p in ["/v1/files/link", "/v1/files/rel-link"] {
                let r = c.request(Method::GET, p, vec![]).await.unwrap();
                assert_eq!(
                    r.reason_code().as_deref(),
                    Some("path_escape"),
                    "{p}: {:?}",
                    r.json()
                );
                let r = c
                    .request(Method::PUT, p, b"overwrite".to_vec())
                    .await
                    .unwrap();
                assert_eq!(
                    r.status,
                    200,
                    "a PUT replaces the link itself: {:?}",
                    r.json()
                );
            }
            // A tenant field in a body is an unknown field.
            let r = c
                .json(
                    Method::POST,
                    "/v1/exec",
                    &serde_json::json!({"argv": ["true"], "tenant": other}),
                )
                .await
                .unwrap();
            assert_eq!(
                (r.status.as_u16(), r.reason_code().as_deref()),
                (400, Some("bad_request"))
            );
            // The admin API does not exist on the tenant socket.
            for (m, p) in [
                (Method::GET, "/admin/tenants"),
                (Method::POST, "/admin/tenants"),
                (Method::DELETE, &*format!("/admin/tenants/{other}")),
            ] {
                let r = c.request(m, p, b"{\"name\":\"x\"}".to_vec()).await.unwrap();
                assert_eq!(r.reason_code().as_deref(), Some("not_found"), "{p}");
            }
            // The admin socket refuses a tenant token.
            let r = bulkhead::client::SocketClient::new(&d.state.join("admin.sock"), token)
                .request(Method::GET, "/admin/tenants", vec![])
                .await
                .unwrap();
            assert_eq!(r.reason_code().as_deref(), Some("invalid_token"));
        }
        // Other's data still intact after all of that.
        let r = d
            .tenant(&dental)
            .request(Method::GET, "/v1/files/account/notes.txt", vec![])
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&r.body).contains("March 12"));
        let r = d
            .tenant(&design)
            .request(Method::GET, "/v1/files/account/notes.txt", vec![])
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&r.body).contains("April 18"));
    }
}

#[tokio::test]
async fn as_root_each_tenant_has_its_own_unprivileged_uid() {
    let d = Daemon::start(As::Root);
    let (dental, design) = lookalikes(&d).await;
    use std::os::unix::fs::MetadataExt;
    let uid = |t: &str| {
        std::fs::metadata(d.state.join("tenants").join(t).join("work"))
            .unwrap()
            .uid()
    };
    let (u1, u2) = (uid(DENTAL), uid(DESIGN));
    assert!(u1 != u2 && u1 != 0 && u2 != 0, "{u1} {u2}");
    // The sandbox's processes run as the tenant's uid on the host.
    for (token, want) in [(&dental, u1), (&design, u2)] {
        let tagv = tag();
        let c = d.tenant(token);
        let arg = tagv.clone();
        let run = tokio::spawn(async move { exec(&c, &["sleep", &arg]).await });
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = loop {
            let found = pids_with_cmdline(&format!("sleep {tagv}"))
                .into_iter()
                .next();
            if let Some(p) = found {
                break p;
            }
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert_eq!(
            uid_line.split_whitespace().nth(1).unwrap(),
            want.to_string(),
            "{uid_line}"
        );
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let _ = run.await;
    }
    // Without any namespace, one tenant's uid cannot open the other's files.
    use std::os::unix::process::CommandExt;
    let other_file = d
        .state
        .join("tenants")
        .join(DESIGN)
        .join("work/account/notes.txt");
    let out = std::process::Command::new("cat")
        .arg(&other_file)
        .uid(u1)
        .gid(u1)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );
}

#[tokio::test]
async fn rotation_revocation_freeze_and_delete() {
    let d = Daemon::start(As::Nobody);
    let old = d.create("acme").await;
    assert_eq!(exec(&d.tenant(&old), &["true"]).await.status, 200);
    let r = d
        .admin()
        .request(Method::POST, "/admin/tenants/acme/tokens/rotate", vec![])
        .await
        .unwrap();
    let new = r.json()["token"].as_str().unwrap().to_string();
    // The very next request with the old token fails.
    let r = exec(&d.tenant(&old), &["true"]).await;
    assert_eq!(
        (r.status.as_u16(), r.reason_code().as_deref()),
        (401, Some("invalid_token"))
    );
    assert_eq!(exec(&d.tenant(&new), &["true"]).await.status, 200);
    // A second actor, then revoked.
    let r = d
        .admin()
        .json(
            Method::POST,
            "/admin/tenants/acme/tokens",
            &serde_json::json!({"role": "viewer", "workspace": "research"}),
        )
        .await
        .unwrap();
    let (second, id) = (
        r.json()["token"].as_str().unwrap().to_string(),
        r.json()["token_id"].as_str().unwrap().to_string(),
    );
    assert_eq!(
        d.tenant(&second)
            .request(Method::GET, "/v1/files/", vec![])
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        exec(&d.tenant(&second), &["true"])
            .await
            .reason_code()
            .as_deref(),
        Some("policy_denied"),
        "a viewer only reads"
    );
    assert_eq!(
        d.admin()
            .request(Method::DELETE, &format!("/admin/tokens/{id}"), vec![])
            .await
            .unwrap()
            .status,
        204
    );
    assert_eq!(
        d.tenant(&second)
            .request(Method::GET, "/v1/files/", vec![])
            .await
            .unwrap()
            .status,
        401
    );
    // Frozen: 423 on everything, and a running sandbox is killed.
    let c = d.tenant(&new);
    let running = tokio::spawn(async move { exec(&c, &["sleep", "30"]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        d.admin()
            .request(Method::POST, "/admin/tenants/acme/freeze", vec![])
            .await
            .unwrap()
            .status,
        204
    );
    let r = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.json()["signal"], 9, "{:?}", r.json());
    for (m, p) in [
        (Method::POST, "/v1/exec"),
        (Method::GET, "/v1/files/"),
        (Method::GET, "/v1/config"),
    ] {
        let r = d
            .tenant(&new)
            .request(m, p, b"{\"argv\":[\"true\"]}".to_vec())
            .await
            .unwrap();
        assert_eq!(
            (r.status.as_u16(), r.reason_code().as_deref()),
            (423, Some("tenant_frozen")),
            "{p}"
        );
    }
    assert_eq!(
        d.admin()
            .request(Method::POST, "/admin/tenants/acme/unfreeze", vec![])
            .await
            .unwrap()
            .status,
        204
    );
    assert_eq!(exec(&d.tenant(&new), &["true"]).await.status, 200);
    // Delete: tokens fail, the root is gone.
    assert_eq!(
        d.admin()
            .request(Method::DELETE, "/admin/tenants/acme", vec![])
            .await
            .unwrap()
            .status,
        204
    );
    assert_eq!(exec(&d.tenant(&new), &["true"]).await.status, 401);
    assert!(!d.state.join("tenants/acme").exists());
    let r = d
        .admin()
        .request(Method::DELETE, "/admin/tenants/acme", vec![])
        .await
        .unwrap();
    assert_eq!(r.reason_code().as_deref(), Some("tenant_missing"));
}

fn snapshot(d: &Daemon) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for e in walk(&d.state.join("tenants")) {
        let m = std::fs::symlink_metadata(&e).unwrap();
        out.push((e.display().to_string(), m.len()));
    }
    out.push((
        "audit".into(),
        std::fs::read(d.state.join("audit.jsonl")).unwrap().len() as u64,
    ));
    out.sort();
    out
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v = vec![p.to_path_buf()];
    if std::fs::symlink_metadata(p)
        .map(|m| m.is_dir())
        .unwrap_or(false)
    {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            v.extend(walk(&e.path()));
        }
    }
    v
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let d = Daemon::start_with(
        As::Nobody,
        temp_state("bad"),
        Some("[server]\nheader_read_timeout_ms = 500\nmax_body_bytes = 65536\n"),
    );
    let token = d.create("acme").await;
    let c = d.tenant(&token);
    let before = snapshot(&d);
    let cases: Vec<(Method, String, Vec<u8>, u16, &str)> = vec![
        (
            Method::POST,
            "/v1/exec".into(),
            b"{not json".to_vec(),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/exec".into(),
            br#"{"argv":["true"],"shell":true}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/exec".into(),
            br#"{"argv":[]}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/exec".into(),
            br#"{"argv":["true"],"timeout_ms":999999999}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/exec".into(),
            br#"{"argv":["true"],"env":{"A=B":"x"}}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/exec".into(),
            vec![b' '; 200_000],
            413,
            "too_large",
        ),
        (
            Method::PUT,
            "/v1/files/big.bin".into(),
            vec![0; 200_000],
            413,
            "too_large",
        ),
        (
            Method::PUT,
            "/v1/files/%ff%fe".into(),
            b"x".to_vec(),
            400,
            "bad_request",
        ),
        (
            Method::PUT,
            "/v1/files/a%00b".into(),
            b"x".to_vec(),
            400,
            "bad_request",
        ),
        (
            Method::PUT,
            "/v1/files/%zz".into(),
            b"x".to_vec(),
            400,
            "bad_request",
        ),
        (Method::GET, "/v1/nothing".into(), vec![], 404, "not_found"),
        (
            Method::PATCH,
            "/v1/exec".into(),
            vec![],
            405,
            "method_not_allowed",
        ),
        (
            Method::PUT,
            "/v1/config".into(),
            br#"{"rate_card":{"x":1}}"#.to_vec(),
            403,
            "admin_only_key",
        ),
        (
            Method::PUT,
            "/v1/config".into(),
            br#"{"colour":"red"}"#.to_vec(),
            400,
            "unknown_key",
        ),
    ];
    for (m, p, body, status, code) in cases {
        let r = c.request(m.clone(), &p, body).await.unwrap();
        assert_eq!(
            (r.status.as_u16(), r.reason_code().as_deref()),
            (status, Some(code)),
            "{m} {p}: {:?}",
            r.json()
        );
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
        );
    }
    // Config changes refused above are audited as denials; the tenant tree is unchanged.
    let after = snapshot(&d);
    assert_eq!(
        before
            .iter()
            .filter(|(p, _)| p != "audit")
            .collect::<Vec<_>>(),
        after
            .iter()
            .filter(|(p, _)| p != "audit")
            .collect::<Vec<_>>()
    );
    // Missing and malformed tokens.
    for bearer in [
        "",
        "tk_acme_123",
        "tk_acme_0123456789abcdef0123456789abcdef",
        "Basic xyz",
        "tk_other_0123456789abcdef0123456789abcdef",
    ] {
        let r = d
            .tenant(bearer)
            .request(Method::GET, "/v1/files/", vec![])
            .await
            .unwrap();
        assert_eq!(
            (r.status.as_u16(), r.reason_code().as_deref()),
            (401, Some("invalid_token")),
            "{bearer:?}"
        );
    }
    // A slow client sending half a request head is cut off at the header timeout.
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(d.state.join("bulkhead.sock")).unwrap();
    s.write_all(b"GET /v1/files/ HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t = Instant::now();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "slow client held the connection for {:?}",
        t.elapsed()
    );
    // Huge headers are refused.
    let mut s = std::os::unix::net::UnixStream::connect(d.state.join("bulkhead.sock")).unwrap();
    let _ = s.write_all(
        format!(
            "GET /v1/files/ HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(200_000)
        )
        .as_bytes(),
    );
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(
        buf.is_empty() || String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&buf[..buf.len().min(100)])
    );
}

#[tokio::test]
async fn config_overlays_are_tenant_keys_only() {
    let d = Daemon::start(As::Nobody);
    let token = d.create("acme").await;
    let c = d.tenant(&token);
    let r = c
        .json(
            Method::PUT,
            "/v1/config",
            &serde_json::json!({"model": "fast", "max_tokens": 512}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
    let r = c
        .json(
            Method::PUT,
            "/v1/config",
            &serde_json::json!({"model": "slow", "providers": {"x": {"api_key_env": "K"}}}),
        )
        .await
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), r.reason_code().as_deref()),
        (403, Some("admin_only_key"))
    );
    let r = c.request(Method::GET, "/v1/config", vec![]).await.unwrap();
    assert_eq!(
        r.json()["model"],
        "fast",
        "the refused change changed nothing"
    );
    // An overlay file with an admin-only key stops the daemon at load, naming it all.
    let state = d.state.clone();
    let mut d = d;
    d.kill9();
    std::fs::write(
        state.join("tenants/acme/config.toml"),
        "model = \"x\"\n[quotas]\ndisk = 1\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .arg("serve")
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tenant acme")
            && err.contains("tenants/acme/config.toml")
            && err.contains("`quotas`")
            && err.contains("admin-only"),
        "{err}"
    );
    std::fs::write(
        state.join("tenants/acme/config.toml"),
        "favourite_colour = \"red\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .arg("serve")
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown key `favourite_colour`"));
}

#[tokio::test]
async fn audit_records_changes_without_content_and_verifies() {
    let d = Daemon::start(As::Nobody);
    let token = d.create("acme").await;
    let c = d.tenant(&token);
    let secret_arg = format!("very-secret-argument-{}", tag());
    let r = c
        .json(
            Method::POST,
            "/v1/exec",
            &serde_json::json!({"argv": ["echo", secret_arg], "stdin": "secret-stdin"}),
        )
        .await
        .unwrap();
    assert_eq!(r.json()["stdout"], format!("{secret_arg}\n"));
    c.request(
        Method::PUT,
        "/v1/files/secret-name.txt",
        b"secret-file-content".to_vec(),
    )
    .await
    .unwrap();
    d.admin()
        .request(Method::POST, "/admin/tenants/acme/tokens/rotate", vec![])
        .await
        .unwrap();
    let log = std::fs::read_to_string(d.state.join("audit.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let actions: Vec<&str> = lines
        .iter()
        .map(|l| l["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "daemon.start",
            "tenant.create",
            "exec",
            "files.put",
            "token.rotate"
        ]
    );
    let exec_line = &lines[2];
    assert_eq!(exec_line["exec"]["program"], "echo");
    assert_eq!(exec_line["exec"]["exit_code"], 0);
    assert_eq!(exec_line["exec"]["argv_sha256"].as_str().unwrap().len(), 64);
    assert!(exec_line["actor"].as_str().unwrap().starts_with("tk_acme_"));
    assert!(
        !log.contains(&secret_arg)
            && !log.contains("secret-stdin")
            && !log.contains("secret-file-content")
            && !log.contains(&token)
    );
    let out = std::process::Command::new(bin())
        .args(["audit", "verify"])
        .arg(d.state.join("audit.jsonl"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // Editing line 3 (the exec) is caught at the first line whose chain no longer holds.
    let mut edited: Vec<String> = log.lines().map(String::from).collect();
    edited[2] = edited[2].replace("\"exit_code\":0", "\"exit_code\":1");
    std::fs::write(
        d.state.join("audit.jsonl"),
        edited.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["audit", "verify"])
        .arg(d.state.join("audit.jsonl"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 4: chain broken"),
        "{out:?}"
    );
}

#[tokio::test]
async fn no_plaintext_token_in_state_or_logs() {
    let d = Daemon::start(As::Root);
    let t1 = d.create("acme").await;
    let t2 = d
        .admin()
        .request(Method::POST, "/admin/tenants/acme/tokens/rotate", vec![])
        .await
        .unwrap()
        .json()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let t3 = d
        .admin()
        .json(
            Method::POST,
            "/admin/tenants/acme/tokens",
            &serde_json::json!({}),
        )
        .await
        .unwrap()
        .json()["token"]
        .as_str()
        .unwrap()
        .to_string();
    exec(&d.tenant(&t2), &["true"]).await;
    exec(&d.tenant(&t1), &["true"]).await;
    for f in walk(&d.state) {
        if std::fs::symlink_metadata(&f)
            .map(|m| m.is_file())
            .unwrap_or(false)
        {
            let bytes = std::fs::read(&f).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            for t in [&t1, &t2, &t3] {
                assert!(!text.contains(t.as_str()), "token found in {}", f.display());
                assert!(
                    !text.contains(&t[t.len() - 32..]),
                    "token secret found in {}",
                    f.display()
                );
            }
        }
    }
    let log = d.log_text();
    assert!(log.contains("request"), "the daemon logs requests");
    for t in [&t1, &t2, &t3] {
        assert!(!log.contains(&t[t.len() - 32..]), "token in the daemon log");
    }
}

#[tokio::test]
async fn spawner_death_fails_the_run_clearly_and_recovers() {
    let d = Daemon::start(As::Nobody);
    let token = d.create("acme").await;
    let c = d.tenant(&token);
    let running = tokio::spawn(async move { exec(&c, &["sleep", "30.017"]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The daemon runs several spawners; the one to kill is the run's: walk up from it.
    let spawners: Vec<i32> = pids_with_cmdline_incl("__spawner")
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status"))
                .unwrap_or_default()
                .contains(&format!("PPid:\t{}", d.pid()))
        })
        .collect();
    let ppid = |p: i32| -> Option<i32> {
        std::fs::read_to_string(format!("/proc/{p}/status"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("PPid:\t"))?
            .trim()
            .parse()
            .ok()
    };
    let sleeper = *pids_with_cmdline_incl("sleep 30.017")
        .first()
        .expect("the run");
    let mut spawner = sleeper;
    while !spawners.contains(&spawner) {
        spawner = ppid(spawner).filter(|p| *p > 1).expect("the run's spawner");
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(spawner),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), r.reason_code().as_deref()),
        (500, Some("sandbox_error")),
        "{:?}",
        r.json()
    );
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("spawner died")
    );
    // The sandbox died with its spawner, and the next run works on a new spawner.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = exec(&d.tenant(&token), &["echo", "again"]).await;
        if r.status == 200 {
            assert_eq!(r.json()["stdout"], "again\n");
            break;
        }
        assert!(Instant::now() < deadline, "{:?}", r.json());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = d
        .admin()
        .request(Method::GET, "/admin/status", vec![])
        .await
        .unwrap()
        .json();
    assert_eq!(status["spawner_restarts"], 1, "{status}");
}

#[tokio::test]
async fn sigterm_lets_running_requests_finish() {
    let mut d = Daemon::start(As::Nobody);
    let token = d.create("acme").await;
    let c = d.tenant(&token);
    let running =
        tokio::spawn(async move { exec(&c, &["sh", "-c", "sleep 1; echo finished"]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = tokio::task::spawn_blocking(move || {
        let s = d.terminate();
        (s, d)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "{:?}", status.0);
    let r = running.await.unwrap();
    assert_eq!(r.json()["stdout"], "finished\n", "{:?}", r.json());
}

#[tokio::test]
async fn crash_during_changes_leaves_whole_tenants_and_a_valid_audit() {
    let state = temp_state("crash");
    let mut d = Daemon::start_with(As::Root, state.clone(), None);
    for round in 0..3 {
        let admin = d.admin();
        let tenant_sock = d.state.join("bulkhead.sock");
        let tasks = tokio::spawn(async move {
            let mut made = Vec::new();
            for i in 0..50 {
                let name = format!("t{round}-{i}");
                match admin
                    .json(
                        Method::POST,
                        "/admin/tenants",
                        &serde_json::json!({"name": name}),
                    )
                    .await
                {
                    Ok(r) if r.status == 201 => {
                        let token = r.json()["token"].as_str().unwrap().to_string();
                        let c = bulkhead::client::SocketClient::new(&tenant_sock, &token);
                        let _ = c
                            .request(Method::PUT, "/v1/files/data.txt", vec![b'x'; 4096])
                            .await;
                        let _ = admin
                            .request(
                                Method::POST,
                                &format!("/admin/tenants/{name}/tokens/rotate"),
                                vec![],
                            )
                            .await;
                        made.push(name);
                    }
                    _ => break,
                }
            }
            made
        });
        tokio::time::sleep(Duration::from_millis(150 + 100 * round)).await;
        // kill -9 in the middle of it all, with a sandbox running.
        let long = d.create(&format!("long{round}")).await;
        let c = d.tenant(&long);
        let _bg = tokio::spawn(async move { exec(&c, &["sleep", "77.5"]).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        d.kill9();
        let _ = tasks.await;
        // No process of the old daemon's sandboxes is left.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pids_with_cmdline("sleep 77.5").is_empty() {
            assert!(
                Instant::now() < deadline,
                "a sandbox outlived the killed daemon"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d.spawn();
        // Every tenant is whole: a record, a work dir owned by its uid, a working token.
        let list = d
            .admin()
            .request(Method::GET, "/admin/tenants", vec![])
            .await
            .unwrap()
            .json();
        for t in list["tenants"].as_array().unwrap() {
            let name = t["name"].as_str().unwrap();
            let dir = state.join("tenants").join(name);
            assert!(
                dir.join("tenant.json").is_file() && dir.join("work").is_dir(),
                "{name} is partial"
            );
            use std::os::unix::fs::MetadataExt;
            assert_eq!(
                std::fs::metadata(dir.join("work")).unwrap().uid() as u64,
                t["host_uid"].as_u64().unwrap()
            );
        }
        for e in std::fs::read_dir(state.join("tenants")).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            assert!(!n.starts_with('.') || n == ".next-host-id", "leftover {n}");
        }
        let out = std::process::Command::new(bin())
            .args(["audit", "verify"])
            .arg(state.join("audit.jsonl"))
            .output()
            .unwrap();
        assert!(out.status.success(), "round {round}: {out:?}");
    }
}

#[tokio::test]
async fn sigterm_to_the_whole_tree_still_finishes_running_requests() {
    let mut d = Daemon::start(As::Nobody);
    let token = d.create("acme").await;
    let c = d.tenant(&token);
    let running =
        tokio::spawn(async move { exec(&c, &["sh", "-c", "sleep 1; echo finished"]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // As `kill -TERM -<pgid>` or an init system without KillMode=mixed would: the spawner
    // gets SIGTERM too, and must not take the run with it.
    for p in pids_with_cmdline_incl("__spawner") {
        if std::fs::read_to_string(format!("/proc/{p}/status"))
            .unwrap_or_default()
            .contains(&format!("PPid:\t{}", d.pid()))
        {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGTERM,
            )
            .unwrap();
        }
    }
    let status = tokio::task::spawn_blocking(move || (d.terminate(), d))
        .await
        .unwrap();
    assert!(status.0.success(), "{:?}", status.0);
    let r = running.await.unwrap();
    assert_eq!(r.json()["stdout"], "finished\n", "{:?}", r.json());
}

#[tokio::test]
async fn a_strict_umask_does_not_lock_sandboxes_out() {
    let state = temp_state("umask");
    let log = std::fs::File::create(state.with_extension("log")).unwrap();
    let mut child = std::process::Command::new("sh")
        .args([
            "-c",
            "umask 077; exec \"$0\" serve --state-dir \"$1\"",
            bin(),
            state.to_str().unwrap(),
        ])
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(state.join("admin.sock")).is_err() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let key = std::fs::read_to_string(state.join("admin.key")).unwrap();
    let admin = bulkhead::client::SocketClient::new(&state.join("admin.sock"), &key);
    let r = admin
        .json(
            Method::POST,
            "/admin/tenants",
            &serde_json::json!({"name": "acme"}),
        )
        .await
        .unwrap();
    let token = r.json()["token"].as_str().unwrap().to_string();
    let r = exec(
        &bulkhead::client::SocketClient::new(&state.join("bulkhead.sock"), &token),
        &["echo", "ok"],
    )
    .await;
    assert_eq!(r.json()["stdout"], "ok\n", "{:?}", r.json());
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(state.parent().unwrap());
}

#[tokio::test]
async fn systemd_layout_socket_activation_and_state_dir_only_clients() {
    let base = temp_state("sd");
    let (state, run) = (base.clone(), base.with_extension("run"));
    std::fs::create_dir_all(&run).unwrap();
    let tenant_sock = run.join("bulkhead.sock");
    // systemd-socket-activate passes the listening tenant socket as fd 3 named "tenant";
    // the daemon binds the admin socket itself in $RUNTIME_DIRECTORY.
    let mut child = std::process::Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&tenant_sock)
        .arg("--fdname=tenant")
        .arg("-E")
        .arg(format!("STATE_DIRECTORY={}", state.display()))
        .arg("-E")
        .arg(format!("RUNTIME_DIRECTORY={}", run.display()))
        .arg(bin())
        .arg("serve")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("systemd-socket-activate (package systemd)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tenant_sock.exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first connection starts the daemon; it then binds admin.sock next to it.
    let first = std::os::unix::net::UnixStream::connect(&tenant_sock).unwrap();
    while std::os::unix::net::UnixStream::connect(run.join("admin.sock")).is_err() {
        assert!(Instant::now() < deadline, "daemon did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(first);
    // A client given only the state dir finds both sockets.
    let out = std::process::Command::new(bin())
        .args(["tenants", "--state-dir"])
        .arg(&state)
        .args(["create", "acme"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let out = std::process::Command::new(bin())
        .args(["exec", "--state-dir"])
        .arg(&state)
        .args(["--token", &token, "--", "echo", "activated"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "activated\n",
        "{out:?}"
    );
    // On SIGTERM the daemon removes only the socket it bound itself.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let _ = child.wait();
    assert!(
        tenant_sock.exists(),
        "the socket-activated socket belongs to systemd"
    );
    assert!(!run.join("admin.sock").exists());
    let _ = std::fs::remove_dir_all(state.parent().unwrap());
}

#[tokio::test]
async fn output_is_capped_and_delete_kills_running_sandboxes() {
    let d = Daemon::start_with(
        As::Nobody,
        temp_state("cap"),
        Some("[exec]\nmax_output_bytes = 1000\n"),
    );
    let token = d.create("acme").await;
    let r = exec(
        &d.tenant(&token),
        &[
            "sh",
            "-c",
            "head -c 5000 /dev/zero | tr '\\0' a; echo done >&2",
        ],
    )
    .await;
    let v = r.json();
    assert_eq!(
        (
            v["stdout"].as_str().unwrap().len(),
            v["stdout_truncated"].as_bool(),
            v["output_cap_bytes"].as_u64()
        ),
        (1000, Some(true), Some(1000)),
        "{v}"
    );
    assert_eq!(
        (v["stderr"].as_str(), v["stderr_truncated"].as_bool()),
        (Some("done\n"), Some(false))
    );
    // Delete while a sandbox runs: it is killed, and nothing of it is left.
    let t = tag();
    let c = d.tenant(&token);
    let arg = t.clone();
    let running = tokio::spawn(async move { exec(&c, &["sleep", &arg]).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids_with_cmdline(&format!("sleep {t}")).is_empty() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        d.admin()
            .request(Method::DELETE, "/admin/tenants/acme", vec![])
            .await
            .unwrap()
            .status,
        204
    );
    let r = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.json()["signal"], 9, "{:?}", r.json());
    assert!(pids_with_cmdline(&format!("sleep {t}")).is_empty());
}

fn raw_request(method: &str, path: &str, token: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    r.extend_from_slice(body);
    r
}

#[tokio::test]
async fn a_client_hanging_up_ends_its_run_and_the_change_is_still_audited() {
    let d = Daemon::start(As::Root);
    let token = d.create("acme").await;
    let sock = d.state.join("bulkhead.sock");
    let t = tag();
    // An exec whose client goes away: the sandbox is killed and the run audited.
    let body = serde_json::to_vec(&serde_json::json!({"argv": ["sh", "-c", format!("echo started > /work/m; exec sleep {t}")], "timeout_ms": 60000})).unwrap();
    {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.write_all(&raw_request("POST", "/v1/exec", &token, &body))
            .unwrap();
        // Hang up only once the run is under way.
        let marker = d.state.join("tenants/acme/work/m");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !marker.exists() {
            assert!(Instant::now() < deadline, "the run never started");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let audit = std::fs::read_to_string(d.state.join("audit.jsonl")).unwrap();
        let done = audit
            .lines()
            .any(|l| l.contains("\"action\":\"exec\"") && l.contains("\"signal\":9"));
        if done && pids_with_cmdline(&format!("sleep {t}")).is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "run not killed or not audited after the client left: {audit}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A file PUT whose client hangs up without reading the answer: once the write has
    // happened, its audit line follows regardless.
    {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.write_all(&raw_request("PUT", "/v1/files/left.txt", &token, b"data"))
            .unwrap();
        let written = d.state.join("tenants/acme/work/left.txt");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !written.exists() {
            assert!(Instant::now() < deadline, "the write never happened");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(d.state.join("audit.jsonl"))
        .unwrap()
        .contains("\"target\":\"left.txt\"")
    {
        assert!(Instant::now() < deadline, "unaudited write");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        std::process::Command::new(bin())
            .args(["audit", "verify"])
            .arg(d.state.join("audit.jsonl"))
            .status()
            .unwrap()
            .success()
    );
}

#[tokio::test]
async fn freeze_kills_runs_whatever_their_client_did() {
    let d = Daemon::start(As::Nobody);
    let token = d.create("acme").await;
    // Two run, the third waits in acme's queue.
    let r = d
        .admin()
        .json(
            Method::PUT,
            "/admin/tenants/acme/limits",
            &serde_json::json!({"max_concurrent": 2}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let sock = d.state.join("bulkhead.sock");
    let t = tag();
    // Runs started by clients that keep their connections open and idle.
    let body = serde_json::to_vec(&serde_json::json!({"argv": ["sleep", t]})).unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.write_all(&raw_request("POST", "/v1/exec", &token, &body))
            .unwrap();
        held.push(s);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids_with_cmdline(&format!("sleep {t}")).len() < 2 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        d.admin()
            .request(Method::POST, "/admin/tenants/acme/freeze", vec![])
            .await
            .unwrap()
            .status,
        204
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = d
            .admin()
            .request(Method::GET, "/admin/status", vec![])
            .await
            .unwrap()
            .json();
        // The queued run is refused when its turn comes instead of starting.
        if pids_with_cmdline(&format!("sleep {t}")).is_empty()
            && status["running_sandboxes"] == 0
            && status["slots"]["queued"] == 0
            && status["slots"]["in_use"] == 0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a run survived the freeze: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn slow_or_greedy_clients_cannot_starve_others() {
    let d = Daemon::start_with(
        As::Nobody,
        temp_state("greedy"),
        Some("[server]\nmax_connections = 4\nbody_read_timeout_ms = 500\nmax_body_bytes = 65536\n"),
    );
    let token = d.create("acme").await;
    let sock = d.state.join("bulkhead.sock");
    // Every tenant connection slot taken by a body that never finishes...
    let mut held = Vec::new();
    for _ in 0..4 {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.write_all(format!("PUT /v1/files/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 1000\r\n\r\nabc").as_bytes()).unwrap();
        held.push(s);
    }
    // ...does not stop the admin.
    let t = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        d.admin().request(Method::GET, "/admin/status", vec![]),
    )
    .await
    .expect("admin starved")
    .unwrap();
    assert_eq!(r.status, 200);
    assert!(t.elapsed() < Duration::from_secs(2));
    // The slow bodies are cut off at the body timeout with 408.
    use std::io::Read;
    let mut buf = String::new();
    held[0]
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = held[0].read_to_string(&mut buf);
    assert!(buf.starts_with("HTTP/1.1 408"), "{buf}");
    // A declared length over the limit is refused before any body is read.
    let r = d
        .tenant(&token)
        .request(Method::PUT, "/v1/files/big", vec![0u8; 70_000])
        .await
        .unwrap();
    assert_eq!(r.reason_code().as_deref(), Some("too_large"));
    // Oversized argv after encoding, sockets in work/: client errors, not 500s.
    let r = d
        .tenant(&token)
        .json(
            Method::POST,
            "/v1/exec",
            &serde_json::json!({"argv": ["echo", "\u{1}".repeat(60_000)]}),
        )
        .await
        .unwrap();
    assert!(r.status.is_client_error(), "{:?}", r.json());
    let r = exec(
        &d.tenant(&token),
        &[
            "python3",
            "-c",
            "import socket; socket.socket(socket.AF_UNIX).bind('/work/sock')",
        ],
    )
    .await;
    assert_eq!(r.json()["exit_code"], 0, "{:?}", r.json());
    let r = d
        .tenant(&token)
        .request(Method::GET, "/v1/files/sock", vec![])
        .await
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), r.reason_code().as_deref()),
        (400, Some("bad_request")),
        "{:?}",
        r.json()
    );
}

/// Runs `bulkhead serve` on `state` as uid 65534 in the foreground, for a start that is
/// expected to be refused.
fn serve_as_nobody(state: &std::path::Path) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    std::process::Command::new(bin())
        .arg("serve")
        .arg("--state-dir")
        .arg(state)
        .env_remove("STATE_DIRECTORY")
        .env_remove("RUNTIME_DIRECTORY")
        .stdin(std::process::Stdio::null())
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap()
}

/// A second daemon on a state dir in use is refused before it touches anything: it exits
/// at once saying why, and the first keeps serving with its audit log intact.
#[tokio::test]
async fn a_second_daemon_on_the_same_state_dir_is_refused() {
    let d = Daemon::start(As::Nobody);
    d.create("acme").await;
    let before = std::fs::read(d.state.join("audit.jsonl")).unwrap();
    let out = serve_as_nobody(&d.state);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("another bulkhead daemon is using this state dir"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(d.state.join("audit.jsonl")).unwrap(), before);
    let r = d
        .admin()
        .request(Method::GET, "/admin/tenants", vec![])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
    bulkhead::audit::verify_file(&d.state.join("audit.jsonl")).unwrap();
}

/// A power loss can cut or garble what `audit.jsonl` was last appended (it is synced only
/// in the ring, `audit.wal`): simulated on a killed daemon's log, `audit verify` finds
/// the cut lines in the ring, and the next start writes them back, byte for byte. A ring
/// that does not fit the log (the log moved away after the crash, an empty one in its
/// place, too short for the ring's offset) stops the start, naming both files, with
/// neither changed; after a clean stop the log may be moved.
#[tokio::test]
async fn a_crash_that_garbles_the_logs_tail_loses_no_acknowledged_line() {
    let mut d = Daemon::start(As::Nobody);
    let token = d.create("acme").await;
    let c = d.tenant(&token);
    for i in 0..3 {
        let r = c
            .request(Method::PUT, &format!("/v1/files/f{i}"), vec![b'x'; 10])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{:?}", r.json());
    }
    d.kill9();
    let log = d.state.join("audit.jsonl");
    let whole = std::fs::read(&log).unwrap();
    let text = String::from_utf8(whole.clone()).unwrap();
    let lines = text.lines().count();
    assert!(lines >= 4, "{text}");
    // The last three lines lost, and half of the one before them zeroed.
    let keep: usize = text
        .split_inclusive('\n')
        .take(lines - 3)
        .map(str::len)
        .sum();
    let last = text.split_inclusive('\n').nth(lines - 4).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&log).unwrap();
    f.set_len(keep as u64).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&vec![0u8; last / 2], (keep - last / 2) as u64)
        .unwrap();
    drop(f);
    let verify = || {
        std::process::Command::new(bin())
            .args(["audit", "verify"])
            .arg(&log)
            .output()
            .unwrap()
    };
    // verify checks the log as the next start will leave it, and counts the lines that
    // only the ring holds (the three cut off and the one half zeroed).
    let out = verify();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("4 more committed in audit.wal"), "{stdout}");
    d.spawn();
    let restored = std::fs::read(&log).unwrap();
    assert_eq!(
        &restored[..whole.len()],
        &whole[..],
        "not restored byte for byte"
    );
    let out = verify();
    assert!(out.status.success(), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("audit.wal"));

    // Lines cut off cleanly are counted in the ring until the start writes them back.
    let r = d
        .tenant(&token)
        .request(Method::PUT, "/v1/files/g", vec![b'y'; 10])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    d.kill9();
    let before = std::fs::read(&log).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&log).unwrap();
    f.set_len(restored.len() as u64).unwrap();
    drop(f);
    let out = verify();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("more committed in audit.wal"), "{stdout}");

    // Moved away after the crash: the start is refused and changes nothing.
    let moved = d.state.join("archived.jsonl");
    std::fs::rename(&log, &moved).unwrap();
    std::fs::write(&log, b"").unwrap();
    std::os::unix::fs::chown(&log, Some(NOBODY), Some(NOBODY)).unwrap();
    let ring = std::fs::read(d.state.join("audit.wal")).unwrap();
    let out = serve_as_nobody(&d.state);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("audit.wal holds committed audit lines that do not continue"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&log).unwrap(), b"");
    assert_eq!(std::fs::read(d.state.join("audit.wal")).unwrap(), ring);

    // Put back, it is restored; after a clean stop it may be moved.
    std::fs::rename(&moved, &log).unwrap();
    d.spawn();
    assert_eq!(&std::fs::read(&log).unwrap()[..before.len()], &before[..]);
    assert!(d.terminate().success());
    std::fs::rename(&log, &moved).unwrap();
    d.spawn();
    d.create("beta").await;
    let out = verify();
    assert!(out.status.success(), "{out:?}");
    assert!(std::fs::read_to_string(&log).unwrap().contains("beta"));
}
