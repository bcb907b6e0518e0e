//! Governed egress: servers the test starts on the host's loopback, allowlisted for one
//! tenant through the admin API, reached from inside its sandboxes only through the
//! proxy the daemon serves in the tenant's cell.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::As;
use common::daemon::{Daemon, exec};
use hyper::Method;

/// A host-side HTTP server on 127.0.0.1: `/big` answers `big` bytes, anything else
/// `hello from the host`. Counts the requests it got.
struct Upstream {
    port: u16,
    hits: Arc<AtomicUsize>,
}

const HELLO: &str = "hello from the host";

impl Upstream {
    fn start(big: usize) -> Upstream {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let h = h.clone();
                std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match s.read(&mut b) {
                            Ok(1) => head.push(b[0]),
                            _ => return,
                        }
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    let line = String::from_utf8_lossy(&head);
                    let body: Vec<u8> = if line.starts_with("GET /big") {
                        vec![b'x'; big]
                    } else {
                        HELLO.as_bytes().to_vec()
                    };
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(&body);
                });
            }
        });
        Upstream { port, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn set_limits(d: &Daemon, tenant: &str, v: serde_json::Value) {
    let r = d
        .admin()
        .json(Method::PUT, &format!("/admin/tenants/{tenant}/limits"), &v)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
}

fn sh(script: &str) -> [&str; 3] {
    ["sh", "-c", script]
}

fn audit_lines(d: &Daemon) -> Vec<serde_json::Value> {
    std::fs::read_to_string(d.state.join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["action"] == "egress")
        .collect()
}

#[tokio::test]
async fn allowlisted_destinations_work_through_the_proxy_and_nothing_else_does() {
    let d = Daemon::start(As::Nobody);
    let a = d.create("acme").await;
    let b = d.create("beta").await;
    let up = Upstream::start(0);
    let other = Upstream::start(0);
    let allowed = format!("127.0.0.1:{}", up.port);
    set_limits(&d, "acme", serde_json::json!({"egress": [allowed]})).await;
    let (ta, tb) = (d.tenant(&a), d.tenant(&b));

    // The proxy is named in the environment, in both cases.
    let v = exec(&ta, &sh("echo $http_proxy $HTTPS_PROXY $ALL_PROXY"))
        .await
        .json();
    assert_eq!(
        v["stdout"], "http://127.0.0.1:3128 http://127.0.0.1:3128 http://127.0.0.1:3128\n",
        "{v}"
    );

    // curl (plain HTTP through the proxy, and through a CONNECT tunnel) and urllib.
    let url = format!("http://{allowed}/x");
    let v = exec(&ta, &["curl", "-sS", "--max-time", "10", &url])
        .await
        .json();
    assert_eq!(
        (v["exit_code"].as_i64(), v["stdout"].as_str()),
        (Some(0), Some(HELLO)),
        "{v}"
    );
    let v = exec(&ta, &["curl", "-sS", "-p", "--max-time", "10", &url])
        .await
        .json();
    assert_eq!(
        (v["exit_code"].as_i64(), v["stdout"].as_str()),
        (Some(0), Some(HELLO)),
        "{v}"
    );
    let program = format!(
        "import urllib.request\nprint(urllib.request.urlopen('http://{allowed}/y', timeout=10).read().decode())"
    );
    let v = exec(&ta, &["python3", "-c", &program]).await.json();
    assert_eq!(v["stdout"], format!("{HELLO}\n"), "{v}");
    assert_eq!(up.hits(), 3);

    // Not listed: a clear refusal from the proxy, and nothing reaches the server.
    let url = format!("http://127.0.0.1:{}/", other.port);
    let v = exec(
        &ta,
        &[
            "curl",
            "-sS",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--max-time",
            "10",
            &url,
        ],
    )
    .await
    .json();
    let head = v["stdout"].as_str().unwrap();
    assert!(head.starts_with("HTTP/1.1 403"), "{v}");
    assert!(head.contains("X-Bulkhead-Reason: egress_denied"), "{v}");
    let v = exec(&ta, &["curl", "-sS", "-p", "--max-time", "10", &url])
        .await
        .json();
    assert_eq!(v["exit_code"], 56, "{v}");
    assert!(v["stderr"].as_str().unwrap().contains("403"), "{v}");
    assert_eq!(other.hits(), 0);

    // Bypassing the proxy: Landlock refuses every TCP connect but the proxy's port
    // (EACCES), whether to the listed server's own port or anywhere else.
    let probe = "import socket, errno\nfor host, port in [('127.0.0.1', PORT), ('10.0.0.1', 80), ('1.1.1.1', 443)]:\n    s = socket.socket()\n    try:\n        s.connect((host, port)); print('connected')\n    except OSError as e:\n        print(errno.errorcode[e.errno])\n";
    let probe = probe.replace("PORT", &up.port.to_string());
    let v = exec(&ta, &["python3", "-c", &probe]).await.json();
    assert_eq!(v["stdout"], "EACCES\nEACCES\nEACCES\n", "{v}");

    // A tenant without an allowlist: no proxy variables, nothing on 3128, no route.
    let v = exec(&tb, &sh("echo \"[$http_proxy$HTTPS_PROXY]\""))
        .await
        .json();
    assert_eq!(v["stdout"], "[]\n", "{v}");
    let probe = "import socket, errno\ns = socket.socket()\ntry:\n    s.connect(('127.0.0.1', 3128)); print('connected')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])\nu = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ntry:\n    u.sendto(b'x', ('8.8.8.8', 53)); print('sent')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])\nprint(open('/proc/net/route').read().count('\\n'))\n";
    let v = exec(&tb, &["python3", "-c", probe]).await.json();
    assert_eq!(v["stdout"], "EACCES\nENETUNREACH\n1\n", "{v}");
    let v = exec(
        &tb,
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            &format!("http://{allowed}/"),
        ],
    )
    .await
    .json();
    assert_ne!(v["exit_code"], 0, "{v}");
    assert_eq!(up.hits(), 3);

    // Every connection is audited, without payload.
    let lines = audit_lines(&d);
    let ok: Vec<_> = lines.iter().filter(|l| l["outcome"] == "ok").collect();
    assert_eq!(ok.len(), 3, "{lines:?}");
    for l in &ok {
        assert_eq!(l["tenant"], "acme");
        assert_eq!(l["egress"]["destination"], allowed);
        assert!(l["egress"]["bytes_down"].as_u64().unwrap() >= HELLO.len() as u64);
        assert!(l["egress"]["bytes_up"].as_u64().unwrap() > 0);
    }
    let denied = lines.iter().filter(|l| l["outcome"] == "denied").count();
    assert_eq!(denied, 2, "{lines:?}");
    let raw = std::fs::read_to_string(d.state.join("audit.jsonl")).unwrap();
    assert!(!raw.contains(HELLO));
}

#[tokio::test]
async fn a_listed_name_resolving_to_a_private_address_is_refused() {
    let d = Daemon::start(As::Nobody);
    let a = d.create("acme").await;
    let up = Upstream::start(0);
    // `localhost` is listed by name; it resolves to 127.0.0.1, which only a rule naming
    // that address may reach (a rebinding name looks just like this).
    set_limits(
        &d,
        "acme",
        serde_json::json!({"egress": [format!("localhost:{}", up.port)]}),
    )
    .await;
    let url = format!("http://localhost:{}/", up.port);
    let v = exec(
        &d.tenant(&a),
        &["curl", "-sS", "-D", "-", "--max-time", "10", &url],
    )
    .await
    .json();
    let out = v["stdout"].as_str().unwrap();
    assert!(out.starts_with("HTTP/1.1 403"), "{v}");
    assert!(
        out.contains("X-Bulkhead-Reason: egress_private_address"),
        "{v}"
    );
    assert!(out.contains("resolves to 127.0.0.1"), "{v}");
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn the_byte_limit_cuts_a_large_download_and_refuses_more() {
    let d = Daemon::start(As::Nobody);
    let a = d.create("acme").await;
    let up = Upstream::start(8 << 20);
    let dest = format!("127.0.0.1:{}", up.port);
    set_limits(
        &d,
        "acme",
        serde_json::json!({"egress": [dest], "egress_bytes_per_day": 1_000_000}),
    )
    .await;
    let ta = d.tenant(&a);
    let v = exec(
        &ta,
        &sh(&format!(
            "curl -sS -p --max-time 20 http://{dest}/big | wc -c; echo \"curl ${{PIPESTATUS:-}}\""
        )),
    )
    .await
    .json();
    let got: u64 = v["stdout"]
        .as_str()
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(got < 1_000_000, "{v}");
    assert!(got > 0, "{v}");
    let v = exec(
        &ta,
        &[
            "curl",
            "-sS",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--max-time",
            "10",
            &format!("http://{dest}/"),
        ],
    )
    .await
    .json();
    assert!(
        v["stdout"]
            .as_str()
            .unwrap()
            .contains("X-Bulkhead-Reason: egress_quota_exceeded"),
        "{v}"
    );
    let lines = audit_lines(&d);
    let cut = lines
        .iter()
        .find(|l| l["outcome"] == "cut")
        .unwrap_or_else(|| panic!("{lines:?}"));
    let total =
        cut["egress"]["bytes_up"].as_u64().unwrap() + cut["egress"]["bytes_down"].as_u64().unwrap();
    assert!(total <= 1_000_000, "{cut}");
    let usage = ta
        .request(Method::GET, "/v1/usage", vec![])
        .await
        .unwrap()
        .json();
    assert_eq!(usage["usage"]["egress_bytes_today"], 1_000_000, "{usage}");
}

#[tokio::test]
async fn bad_egress_limits_are_refused_and_change_nothing() {
    let d = Daemon::start(As::Nobody);
    d.create("acme").await;
    for bad in [
        serde_json::json!({"egress": ["pypi.org"]}),
        serde_json::json!({"egress": ["*.com:443"]}),
        serde_json::json!({"egress": ["pypi.org:99999"]}),
        serde_json::json!({"egress": "pypi.org:443"}),
        serde_json::json!({"egress_bytes_per_day": -1}),
    ] {
        let r = d
            .admin()
            .json(Method::PUT, "/admin/tenants/acme/limits", &bad)
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{bad}: {:?}", r.json());
    }
    let v = d
        .admin()
        .request(Method::GET, "/admin/tenants/acme/limits", vec![])
        .await
        .unwrap()
        .json();
    assert!(v["tenant"].as_object().is_some_and(|o| o.is_empty()), "{v}");
    assert!(v["effective"].get("egress").is_none(), "{v}");
}

/// An echo server on the host's loopback: what a long-lived tunnel talks to.
fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn removing_egress_cuts_open_tunnels() {
    let d = Daemon::start(As::Nobody);
    let a = d.create("acme").await;
    let port = echo_server();
    set_limits(
        &d,
        "acme",
        serde_json::json!({"egress": [format!("127.0.0.1:{port}")]}),
    )
    .await;
    let program = format!(
        "import socket, time\ns = socket.create_connection(('127.0.0.1', 3128))\ns.sendall(b'CONNECT 127.0.0.1:{port} HTTP/1.1\\r\\n\\r\\n')\nassert b' 200 ' in s.recv(200)\nok, t = 0, time.time()\nwhile time.time() - t < 8:\n    try:\n        s.sendall(b'ping')\n        if s.recv(4) != b'ping':\n            break\n        ok += 1\n    except OSError:\n        break\n    time.sleep(0.1)\nprint(ok, round(time.time() - t, 1))\n"
    );
    let c = d.tenant(&a);
    let run = tokio::spawn(async move { exec(&c, &["python3", "-c", &program]).await });
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    set_limits(&d, "acme", serde_json::json!({"egress": null})).await;
    let v = run.await.unwrap().json();
    let out = v["stdout"].as_str().unwrap();
    let mut parts = out.split_whitespace();
    let ok: u32 = parts.next().unwrap().parse().unwrap();
    let secs: f64 = parts.next().unwrap().parse().unwrap();
    // It worked until the removal, and stopped within about a second of it.
    assert!(ok > 5, "{v}");
    assert!(secs < 4.0, "{v}");
    let lines = audit_lines(&d);
    assert!(
        lines.iter().any(|l| l["reason_code"] == "egress_revoked"),
        "{lines:?}"
    );
}

#[tokio::test]
async fn a_flood_of_connections_is_rate_limited_and_not_audited_line_by_line() {
    let d = Daemon::start(As::Nobody);
    let a = d.create("acme").await;
    let up = Upstream::start(0);
    set_limits(
        &d,
        "acme",
        serde_json::json!({"egress": [format!("127.0.0.1:{}", up.port)]}),
    )
    .await;
    let program = "import socket\ncodes = {}\nfor i in range(300):\n    s = socket.create_connection(('127.0.0.1', 3128))\n    s.sendall(b'CONNECT 127.0.0.1:1 HTTP/1.1\\r\\n\\r\\n')\n    code = s.recv(100).split(b' ')[1].decode()\n    codes[code] = codes.get(code, 0) + 1\n    s.close()\nprint(sorted(codes.items()))\n";
    let v = exec(&d.tenant(&a), &["python3", "-c", program])
        .await
        .json();
    let out = v["stdout"].as_str().unwrap();
    assert!(out.contains("('429',"), "{v}");
    assert!(out.contains("('403',"), "{v}");
    let lines = audit_lines(&d);
    assert!(lines.len() < 300, "{}", lines.len());
    // MPTCP, which Landlock's TCP rules do not cover, is refused outright.
    let probe = "import socket, errno\ntry:\n    socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)\n    print('made')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])\n";
    let v = exec(&d.tenant(&a), &["python3", "-c", probe]).await.json();
    assert_eq!(v["stdout"], "EPERM\n", "{v}");
}
