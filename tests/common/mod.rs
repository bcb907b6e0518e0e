//! Shared fixtures: a state-dir-like tree with two tenants' work dirs, and ways to run the
//! sandbox as uid 65534 (unprivileged) and as root.
#![allow(dead_code)]

use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// When set, every `bulkhead sandbox` the tests start runs in a cell (`--cell`).
pub const IN_CELL_ENV: &str = "BULKHEAD_TEST_IN_CELL";

/// When set, every sandbox the tests start is run by `bulkhead-sandbox`, the lone binary,
/// instead of `bulkhead sandbox`.
pub const LONE_ENV: &str = "BULKHEAD_TEST_LONE_BINARY";

/// The unprivileged uid/gid the tests run the sandbox as (and that owns the work dirs).
pub const NOBODY: u32 = 65534;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_bulkhead")
}

/// Two tenants' roots side by side, like `<state>/tenants/{acme,beta}/work`.
pub struct Fixture {
    pub base: PathBuf,
    pub work: PathBuf,
    pub other_work: PathBuf,
    pub secret: PathBuf,
}

impl Fixture {
    pub fn new() -> Fixture {
        static N: AtomicUsize = AtomicUsize::new(0);
        let base = std::env::temp_dir().join(format!(
            "bulkhead-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let work = base.join("tenants/acme/work");
        let other_work = base.join("tenants/beta/work");
        std::fs::create_dir_all(&work).unwrap();
        std::fs::create_dir_all(&other_work).unwrap();
        for p in [
            &base,
            &base.join("tenants"),
            &base.join("tenants/acme"),
            &base.join("tenants/beta"),
        ] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        chown(&work, Some(NOBODY), Some(NOBODY)).unwrap();
        let secret = other_work.join("secret.txt");
        std::fs::write(&secret, "beta-secret-7f3a\n").unwrap();
        // World-readable on purpose: only the sandbox may stand between acme and this file.
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&other_work, std::fs::Permissions::from_mode(0o755)).unwrap();
        Fixture {
            base,
            work,
            other_work,
            secret,
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// Who runs `bulkhead sandbox`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum As {
    /// uid/gid 65534, no supplementary groups: the rootless path.
    Nobody,
    /// root: bulkhead maps the sandbox to the work dir's owner (65534).
    Root,
}

pub const BOTH: [As; 2] = [As::Nobody, As::Root];

pub fn sandbox_cmd(who: As, work: &Path, extra: &[&str], argv: &[&str]) -> Command {
    // Set by the escape suite's re-run through the lone binary (see tests/escapes.rs).
    let mut c = if std::env::var_os(LONE_ENV).is_some() {
        Command::new(env!("CARGO_BIN_EXE_bulkhead-sandbox"))
    } else {
        let mut c = Command::new(bin());
        c.arg("sandbox");
        c
    };
    c.arg("--work").arg(work).args(extra);
    // Set by the escape suite's re-run against cells (see tests/escapes.rs).
    if std::env::var_os(IN_CELL_ENV).is_some() {
        c.arg("--cell");
    }
    c.arg("--").args(argv);
    c.stdin(Stdio::null());
    if who == As::Nobody {
        c.uid(NOBODY).gid(NOBODY);
    }
    c
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

pub fn output(mut c: Command) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = c.output().expect("spawn bulkhead");
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Run {
        code,
        stdout: String::from_utf8_lossy(&stdout).into(),
        stderr: String::from_utf8_lossy(&stderr).into(),
    }
}

/// Runs `script` with `/bin/sh -c` in a sandbox.
pub fn sh(who: As, work: &Path, script: &str) -> Run {
    output(sandbox_cmd(who, work, &[], &["/bin/sh", "-c", script]))
}

pub fn sh_with(who: As, work: &Path, extra: &[&str], script: &str) -> Run {
    output(sandbox_cmd(who, work, extra, &["/bin/sh", "-c", script]))
}

/// Runs a python3 program in a sandbox.
pub fn py(who: As, work: &Path, program: &str) -> Run {
    output(sandbox_cmd(who, work, &[], &["python3", "-c", program]))
}

/// Pids of processes whose command line contains `needle` (NUL-separated argv joined
/// with spaces).
pub fn pids_with_cmdline(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            let s = String::from_utf8_lossy(&c).replace('\0', " ");
            if s.contains(needle) && !s.contains("bulkhead") {
                out.push(pid);
            }
        }
    }
    out
}

/// A number unique to this test run, to tag processes.
pub fn tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{}.{}", 900 + (nanos % 97), nanos % 100_000)
}

pub mod daemon;

/// Like [`pids_with_cmdline`] but including bulkhead's own processes.
pub fn pids_with_cmdline_incl(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
            String::from_utf8_lossy(&c)
                .replace('\0', " ")
                .contains(needle)
        }) {
            out.push(pid);
        }
    }
    out
}
