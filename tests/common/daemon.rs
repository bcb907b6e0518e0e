//! A daemon under test: `bulkhead serve` on a temp state dir, as root or as uid 65534.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead::client::{Reply, SocketClient};
use hyper::Method;

use super::{As, NOBODY, bin};

pub struct Daemon {
    pub state: PathBuf,
    pub child: Option<Child>,
    pub who: As,
    pub log: PathBuf,
}

pub fn temp_state(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "bulkhead-d-{}-{}-{}",
        tag,
        std::process::id(),
        super::tag()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    dir.join("state")
}

impl Daemon {
    pub fn start(who: As) -> Daemon {
        Self::start_with(who, temp_state("s"), None)
    }

    pub fn start_with(who: As, state: PathBuf, config: Option<&str>) -> Daemon {
        if who == As::Nobody {
            std::fs::create_dir_all(&state).unwrap();
            std::os::unix::fs::chown(&state, Some(NOBODY), Some(NOBODY)).unwrap();
        }
        if let Some(cfg) = config {
            std::fs::create_dir_all(&state).unwrap();
            std::fs::write(state.join("config.toml"), cfg).unwrap();
        }
        let mut d = Daemon {
            log: state.with_extension("log"),
            state,
            child: None,
            who,
        };
        d.spawn();
        d
    }

    pub fn spawn(&mut self) {
        let log = std::fs::File::create(&self.log).unwrap();
        let mut c = Command::new(bin());
        c.arg("serve")
            .arg("--state-dir")
            .arg(&self.state)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        c.env_remove("STATE_DIRECTORY")
            .env_remove("RUNTIME_DIRECTORY")
            .env("RUST_LOG", "info");
        if self.who == As::Nobody {
            c.uid(NOBODY).gid(NOBODY);
        }
        self.child = Some(c.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        // Socket files may be left by a killed daemon: wait until both accept connections.
        let up = |p: &Path| std::os::unix::net::UnixStream::connect(p).is_ok();
        while !(up(&self.state.join("admin.sock"))
            && up(&self.state.join("bulkhead.sock"))
            && self.state.join("admin.key").exists())
        {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "daemon exited at start ({status}): {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not start: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn admin(&self) -> SocketClient {
        let key = std::fs::read_to_string(self.state.join("admin.key")).unwrap();
        SocketClient::new(&self.state.join("admin.sock"), &key)
    }

    pub fn tenant(&self, token: &str) -> SocketClient {
        SocketClient::new(&self.state.join("bulkhead.sock"), token)
    }

    pub async fn create(&self, name: &str) -> String {
        let r = self
            .admin()
            .json(
                Method::POST,
                "/admin/tenants",
                &serde_json::json!({"name": name}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        r.json()["token"].as_str().unwrap().to_string()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        c.wait().unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn base(&self) -> &Path {
        self.state.parent().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_dir_all(self.base());
    }
}

pub async fn exec(c: &SocketClient, argv: &[&str]) -> Reply {
    c.json(
        Method::POST,
        "/v1/exec",
        &serde_json::json!({ "argv": argv }),
    )
    .await
    .unwrap()
}
