//! The library API the daemon will use, called in-process. The test process is root, so
//! these runs also exercise the root path: the sandbox maps to the work dir's owner
//! (65534) through the intermediate child, never to host uid 0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use bulkhead::sandbox::{self, HostIds, OutputMode, SandboxError, SandboxSpec, StdinSource, Step};
use common::*;

fn spec(fx: &Fixture, argv: &[&str]) -> SandboxSpec {
    SandboxSpec::new(&fx.work, argv.iter().map(|s| s.to_string()).collect())
}

#[test]
fn captures_output_feeds_stdin_and_reports_status() {
    let fx = Fixture::new();
    let mut s = spec(
        &fx,
        &[
            "/bin/sh",
            "-c",
            "tr a-z A-Z; echo err >&2; cat /proc/self/uid_map | tr -s ' '; exit 7",
        ],
    );
    s.stdin = StdinSource::Bytes(b"from stdin\n".to_vec());
    let out = sandbox::run(s).unwrap();
    assert_eq!(out.exit_code, Some(7));
    assert_eq!(out.signal, None);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "FROM STDIN\n 1000 65534 1\n"
    );
    assert_eq!(out.stderr, b"err\n");
    assert!(!out.stdout_truncated && !out.stderr_truncated && !out.timed_out && !out.cancelled);
    assert!(out.duration > Duration::ZERO);
}

#[test]
fn large_stdin_is_streamed() {
    let fx = Fixture::new();
    let input: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut s = spec(&fx, &["/bin/sh", "-c", "wc -c"]);
    s.stdin = StdinSource::Bytes(input);
    let out = sandbox::run(s).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "4000000");
}

#[test]
fn output_flood_is_truncated_at_the_cap() {
    let fx = Fixture::new();
    let mut s = spec(
        &fx,
        &[
            "/bin/sh",
            "-c",
            "head -c 50000000 /dev/zero; head -c 300000 /dev/zero >&2; echo done >&2",
        ],
    );
    s.limits.max_output_bytes = 64 * 1024;
    let out = sandbox::run(s).unwrap();
    assert_eq!(
        out.exit_code,
        Some(0),
        "the command ran to completion: the rest was drained"
    );
    assert_eq!(out.stdout.len(), 64 * 1024);
    assert!(out.stdout_truncated);
    assert_eq!(out.stderr.len(), 64 * 1024);
    assert!(out.stderr_truncated);
}

#[test]
fn endless_output_is_truncated_and_timed_out() {
    let fx = Fixture::new();
    let mut s = spec(&fx, &["yes"]);
    s.limits.max_output_bytes = 1000;
    s.limits.wall_timeout = Some(Duration::from_millis(300));
    let t = Instant::now();
    let out = sandbox::run(s).unwrap();
    assert!(out.timed_out && out.stdout_truncated);
    assert_eq!(out.signal, Some(libc::SIGKILL));
    assert_eq!(out.stdout.len(), 1000);
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn timeout_kills_the_whole_pid_namespace() {
    let fx = Fixture::new();
    let t = tag();
    let mut s = spec(
        &fx,
        &["/bin/sh", "-c", &format!("(sleep {t} &) ; sleep {t}")],
    );
    s.limits.wall_timeout = Some(Duration::from_millis(300));
    let out = sandbox::run(s).unwrap();
    assert!(out.timed_out);
    assert_eq!(out.shell_status(), 137);
    assert!(
        pids_with_cmdline(&format!("sleep {t}")).is_empty(),
        "a detached sleep survived the timeout"
    );
}

#[test]
fn setup_failure_is_the_step_and_errno() {
    let fx = Fixture::new();
    let mut s = spec(&fx, &["true"]);
    s.cwd = Some("missing".into());
    match sandbox::run(s) {
        Err(SandboxError::Setup {
            step: Step::ChdirCwd,
            errno,
            ..
        }) => assert_eq!(errno, nix::errno::Errno::ENOENT),
        other => panic!("{other:?}"),
    }
    let e = sandbox::run(spec(&fx, &["definitely-not-a-command"])).unwrap_err();
    assert!(e.is_exec_failure(), "{e}");
    assert_eq!(e.to_string(), "execve (definitely-not-a-command): ENOENT");
}

#[test]
fn bad_specs_are_refused_before_anything_runs() {
    let fx = Fixture::new();
    let marker = fx.work.join("ran");
    let cmd = "touch /work/ran".to_string();
    type Mutation = Box<dyn Fn(&mut SandboxSpec)>;
    let cases: Vec<Mutation> = vec![
        Box::new(|s| s.argv.clear()),
        Box::new(|s| s.env.push(("A=B".into(), "x".into()))),
        Box::new(|s| s.env.push(("K".into(), "nul\0".into()))),
        Box::new(|s| s.cwd = Some("/etc".into())),
        Box::new(|s| s.cwd = Some("../x".into())),
        Box::new(|s| s.limits.nofile = 0),
        Box::new(|s| s.host_ids = Some(HostIds { uid: 0, gid: 0 })),
        Box::new(|s| s.work_dir = "/nonexistent/dir".into()),
    ];
    for (i, mutate) in cases.iter().enumerate() {
        let mut s = spec(&fx, &["/bin/sh", "-c", &cmd]);
        mutate(&mut s);
        let e = sandbox::run(s).unwrap_err();
        assert!(
            matches!(
                e,
                SandboxError::InvalidSpec(_)
                    | SandboxError::HostIdentity(_)
                    | SandboxError::WorkDir { .. }
            ),
            "case {i}: {e:?}"
        );
        assert!(!marker.exists(), "case {i} ran the command");
    }
}

#[test]
fn concurrent_spawns_from_many_threads() {
    let fx = Fixture::new();
    let work = fx.work.clone();
    let handles: Vec<_> = (0..6)
        .map(|t| {
            let work = work.clone();
            std::thread::spawn(move || {
                for i in 0..5 {
                    let mut s = SandboxSpec::new(
                        &work,
                        vec!["/bin/sh".into(), "-c".into(), format!("echo {t}-{i}")],
                    );
                    s.stderr = OutputMode::Null;
                    let out = sandbox::run(s).unwrap();
                    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{t}-{i}\n"));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn each_run_gets_fresh_namespaces() {
    let fx = Fixture::new();
    let ns = || {
        let out = sandbox::run(spec(
            &fx,
            &[
                "/bin/sh",
                "-c",
                "readlink /proc/self/ns/user /proc/self/ns/net /proc/self/ns/mnt /proc/self/ns/pid",
            ],
        ))
        .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let (a, b) = (ns(), ns());
    let host: Vec<String> = ["user", "net", "mnt", "pid"]
        .iter()
        .map(|n| {
            std::fs::read_link(format!("/proc/self/ns/{n}"))
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    for line in a.lines().chain(b.lines()) {
        assert!(!host.contains(&line.to_string()), "{line} is the host's");
    }
    for (x, y) in a.lines().zip(b.lines()) {
        assert_ne!(x, y, "two runs shared a namespace");
    }
}

#[cfg(target_arch = "x86_64")]
mod foreign_abi {
    use super::*;

    /// Machine code that makes one syscall through a foreign ABI and returns its result.
    fn program(code: &str) -> String {
        format!(
            r#"
import ctypes, mmap
code = bytes.fromhex("{code}")
m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
m.write(code)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
f = ctypes.CFUNCTYPE(ctypes.c_long)(addr)
print("returned", f())
"#
        )
    }

    // mov eax, 20 (i386 getpid); int 0x80; ret
    const I386_GETPID: &str = "b814000000cd80c3";
    // mov eax, 0x40000027 (x32 getpid); syscall; ret
    const X32_GETPID: &str = "b8270000400f05c3";

    #[test]
    fn i386_syscalls_kill_the_process() {
        let fx = Fixture::new();
        // Outside the sandbox first: without IA-32 emulation there is nothing to test.
        let host = std::process::Command::new("python3")
            .args(["-c", &program(I386_GETPID)])
            .output()
            .unwrap();
        if !String::from_utf8_lossy(&host.stdout).starts_with("returned") {
            eprintln!(
                "SKIP: this kernel has no IA-32 emulation (int 0x80 fails outside the sandbox too)"
            );
            return;
        }
        let out = sandbox::run(spec(&fx, &["python3", "-c", &program(I386_GETPID)])).unwrap();
        assert_eq!(out.signal, Some(libc::SIGSYS), "{out:?}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("returned"));
    }

    #[test]
    fn x32_syscalls_kill_the_process() {
        let fx = Fixture::new();
        let out = sandbox::run(spec(&fx, &["python3", "-c", &program(X32_GETPID)])).unwrap();
        assert_eq!(out.signal, Some(libc::SIGSYS), "{out:?}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("returned"));
    }
}

/// A root caller never shares its memory with a task that holds a tenant's uid: another
/// process of that uid racing every new pid cannot read the caller's memory through
/// `/proc/<pid>/mem` during sandbox setup (the escalation a review found in an earlier
/// design, which set a CLONE_VM child dumpable after switching uid). A calibration run
/// first shows the attacker is fast enough to open short-lived processes of its own uid.
#[test]
fn tenant_uid_cannot_read_the_root_callers_memory_during_setup() {
    use std::os::unix::process::CommandExt;
    let fx = Fixture::new();
    let secret = format!("bulkhead-root-secret-{}", tag());
    let addr = secret.as_ptr() as usize;
    let attacker = r#"
import os, sys
addr, secret, stop = int(sys.argv[1]), sys.argv[2].encode(), sys.argv[3]
me = os.getpid(); opened = leaks = 0
while not os.path.exists(stop):
    last = int(open('/proc/sys/kernel/ns_last_pid').read())
    for pid in range(last - 3, last + 4):
        if pid == me: continue
        try: fd = os.open('/proc/%d/mem' % pid, os.O_RDONLY)
        except OSError: continue
        opened += 1
        try:
            if os.pread(fd, len(secret), addr) == secret: leaks += 1
        except OSError: pass
        os.close(fd)
print(opened, leaks)
"#;
    let race = |name: &str, work: &mut dyn FnMut()| -> (u64, u64) {
        let stop = fx.base.join(name);
        let child = std::process::Command::new("/usr/bin/python3")
            .args([
                "-c",
                attacker,
                &addr.to_string(),
                &secret,
                stop.to_str().unwrap(),
            ])
            .uid(NOBODY)
            .gid(NOBODY)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        work();
        std::fs::write(&stop, "").unwrap();
        let out = child.wait_with_output().unwrap();
        let report = String::from_utf8_lossy(&out.stdout).to_string();
        let n: Vec<u64> = report
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
            .collect();
        assert_eq!(n.len(), 2, "attacker report: {report:?}");
        (n[0], n[1])
    };
    // Calibration: short-lived processes of the attacker's own uid can be opened.
    let (opened, _) = race("stop-1", &mut || {
        for _ in 0..60 {
            let _ = std::process::Command::new("sleep")
                .arg("0.01")
                .uid(NOBODY)
                .gid(NOBODY)
                .status()
                .unwrap();
        }
    });
    assert!(
        opened > 0,
        "the attacker never opened a process of its own uid; the test would prove nothing"
    );
    let (_, leaks) = race("stop-2", &mut || {
        for _ in 0..150 {
            let out = sandbox::run(spec(&fx, &["/bin/true"])).unwrap();
            assert_eq!(out.exit_code, Some(0));
        }
    });
    assert_eq!(leaks, 0, "the tenant uid read the root caller's memory");
}
