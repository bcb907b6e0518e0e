//! Tenant policy: scopes (roles × per-token tool allowlists) and the kill switch, each
//! with two tenants so that one tenant's limits never touch the other.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::daemon::{Daemon, exec};
use common::*;
use hyper::Method;

/// (method, path, body) of one request per tool.
fn probe(tool: &str) -> (Method, &'static str, Vec<u8>) {
    match tool {
        "exec" => (Method::POST, "/v1/exec", br#"{"argv":["true"]}"#.to_vec()),
        "files.read" => (Method::GET, "/v1/files/", vec![]),
        "files.write" => (Method::PUT, "/v1/files/probe.txt", b"x".to_vec()),
        "config.read" => (Method::GET, "/v1/config", vec![]),
        "config.write" => (Method::PUT, "/v1/config", br#"{"model":"m"}"#.to_vec()),
        other => panic!("{other}"),
    }
}

const TOOLS: [&str; 5] = ["exec", "files.read", "files.write", "config.read", "config.write"];

#[tokio::test]
async fn scopes_deny_exactly_what_they_should() {
    let d = Daemon::start(As::Nobody);
    d.create("acme").await;
    let other = d.create("beta").await;
    // (role, allowlist) -> tools that must be allowed.
    type Row<'a> = (&'a str, Option<Vec<&'a str>>, Vec<&'a str>);
    let table: Vec<Row> = vec![
        ("owner", None, TOOLS.to_vec()),
        ("admin", None, TOOLS.to_vec()),
        ("member", None, TOOLS.to_vec()),
        ("viewer", None, vec!["files.read", "config.read"]),
        ("member", Some(vec!["exec"]), vec!["exec"]),
        ("member", Some(vec!["files.read", "files.write"]), vec!["files.read", "files.write"]),
        ("viewer", Some(vec!["exec", "files.read"]), vec!["files.read"]),
        ("owner", Some(vec![]), vec![]),
    ];
    for (role, tools, allowed) in table {
        let mut body = serde_json::json!({"role": role});
        if let Some(t) = &tools {
            body["tools"] = serde_json::json!(t);
        }
        let r = d.admin().json(Method::POST, "/admin/tenants/acme/tokens", &body).await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        let token = r.json()["token"].as_str().unwrap().to_string();
        for tool in TOOLS {
            let (m, p, b) = probe(tool);
            let r = d.tenant(&token).request(m, p, b).await.unwrap();
            if allowed.contains(&tool) {
                assert!(r.status.is_success(), "{role} {tools:?} {tool}: {} {:?}", r.status, r.json());
            } else {
                assert_eq!((r.status.as_u16(), r.reason_code().as_deref()), (403, Some("policy_denied")), "{role} {tools:?} {tool}");
                assert!(r.json()["error"]["message"].as_str().unwrap().contains(tool), "the denial names the scope");
            }
        }
    }
    // The other tenant's owner token was never affected.
    for tool in TOOLS {
        let (m, p, b) = probe(tool);
        assert!(d.tenant(&other).request(m, p, b).await.unwrap().status.is_success(), "beta {tool}");
    }
    // Denials are audited; unknown tool names are refused and change nothing.
    let audit = std::fs::read_to_string(d.state.join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"outcome\":\"denied\"") && audit.contains("\"reason_code\":\"policy_denied\""));
    let before = d.admin().request(Method::GET, "/admin/tenants", vec![]).await.unwrap().json();
    let r = d.admin().json(Method::POST, "/admin/tenants/acme/tokens", &serde_json::json!({"tools": ["exec", "rm -rf"]})).await.unwrap();
    assert_eq!((r.status.as_u16(), r.reason_code().as_deref()), (400, Some("bad_request")));
    let r = d.admin().json(Method::POST, "/admin/tenants/acme/tokens", &serde_json::json!({"role": "superuser"})).await.unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(d.admin().request(Method::GET, "/admin/tenants", vec![]).await.unwrap().json(), before);
}

async fn wait_gone(needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pids_with_cmdline(needle).is_empty() {
        assert!(Instant::now() < deadline, "{needle} survived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start_sleep(d: &Daemon, token: &str) -> (String, tokio::task::JoinHandle<bulkhead::client::Reply>) {
    let t = tag();
    let c = d.tenant(token);
    let arg = t.clone();
    let h = tokio::spawn(async move { exec(&c, &["sleep", &arg]).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids_with_cmdline(&format!("sleep {t}")).is_empty() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (format!("sleep {t}"), h)
}

#[tokio::test]
async fn kill_switch_stops_one_tenant_or_everything() {
    let d = Daemon::start(As::Root);
    let a = d.create("acme").await;
    let b = d.create("beta").await;
    // `tenants stop` kills acme's runs now; beta's keep running; acme stays usable.
    let (sa, ha) = start_sleep(&d, &a).await;
    let (sb, hb) = start_sleep(&d, &b).await;
    let out = std::process::Command::new(bin()).args(["tenants", "--state-dir"]).arg(&d.state).args(["stop", "acme"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_gone(&sa).await;
    assert_eq!(ha.await.unwrap().json()["signal"], 9);
    assert!(!pids_with_cmdline(&sb).is_empty(), "beta's run was touched");
    assert_eq!(exec(&d.tenant(&a), &["true"]).await.status, 200);
    // `halt`: every run stops, all new work gets 503 halted, until `resume`.
    let out = std::process::Command::new(bin()).args(["halt", "--state-dir"]).arg(&d.state).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_gone(&sb).await;
    assert_eq!(hb.await.unwrap().json()["signal"], 9);
    for t in [&a, &b] {
        let r = exec(&d.tenant(t), &["true"]).await;
        assert_eq!((r.status.as_u16(), r.reason_code().as_deref()), (503, Some("halted")));
    }
    assert_eq!(d.admin().request(Method::GET, "/admin/status", vec![]).await.unwrap().json()["halted"], true);
    let out = std::process::Command::new(bin()).args(["resume", "--state-dir"]).arg(&d.state).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(exec(&d.tenant(&b), &["true"]).await.status, 200);
    // Audited with the admin actor.
    let audit = std::fs::read_to_string(d.state.join("audit.jsonl")).unwrap();
    for action in ["tenant.stop", "daemon.halt", "daemon.resume"] {
        let line = audit.lines().find(|l| l.contains(&format!("\"action\":\"{action}\""))).unwrap_or_else(|| panic!("{action} not audited"));
        assert!(line.contains("\"actor\":\"ak_"), "{line}");
    }
}

#[tokio::test]
async fn halt_survives_a_restart() {
    let mut d = Daemon::start(As::Nobody);
    let a = d.create("acme").await;
    assert_eq!(d.admin().request(Method::POST, "/admin/halt", vec![]).await.unwrap().status, 204);
    d.kill9();
    d.spawn();
    assert_eq!(exec(&d.tenant(&a), &["true"]).await.reason_code().as_deref(), Some("halted"));
    assert_eq!(d.admin().request(Method::POST, "/admin/resume", vec![]).await.unwrap().status, 204);
    assert_eq!(exec(&d.tenant(&a), &["true"]).await.status, 200);
}
