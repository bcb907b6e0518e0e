//! Agent frameworks call the daemon from Python: `tests/python/client_test.py` drives
//! exec and files for two tenants with `httpx` over the Unix socket.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::daemon::Daemon;

fn ensure_httpx() {
    let has = |py: &str| {
        std::process::Command::new(py)
            .args(["-c", "import httpx"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !has("python3") {
        let st = std::process::Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "httpx"])
            .status()
            .unwrap();
        assert!(
            st.success() && has("python3"),
            "httpx could not be installed for python3"
        );
    }
}

#[tokio::test]
async fn httpx_client_runs_exec_and_files_for_two_tenants() {
    ensure_httpx();
    for who in common::BOTH {
        let d = Daemon::start(who);
        let a = d.create("acme").await;
        let b = d.create("beta").await;
        let out = std::process::Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/python/client_test.py"
            ))
            .arg(d.state.join("bulkhead.sock"))
            .args([&a, &b])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{who:?}: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.trim_end().ends_with("passed, 0 failed"), "{text}");
    }
}
