//! Adversarial tests: each tries an escape from inside the sandbox and asserts that it
//! fails, and fails for the reason the design says (errno from the layer that stops it),
//! not because a tool was missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::*;

/// The other tenant's secret is readable by the host uid the sandbox runs as: whatever
/// stops the reads below is the sandbox, not file permissions.
fn assert_secret_readable_outside(fx: &Fixture) {
    let r = output({
        use std::os::unix::process::CommandExt;
        let mut c = std::process::Command::new("cat");
        c.arg(&fx.secret).uid(NOBODY).gid(NOBODY);
        c
    });
    assert_eq!(r.stdout, "beta-secret-7f3a\n", "precondition: {r:?}");
}

#[test]
fn other_tenant_dir_is_unreachable_by_path() {
    let fx = Fixture::new();
    assert_secret_readable_outside(&fx);
    let host_path = fx.secret.display().to_string();
    // A symlink planted in /work (by the tenant, or by anyone) pointing at the neighbour,
    // absolute and relative.
    std::os::unix::fs::symlink(&fx.secret, fx.work.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("../../beta/work/secret.txt", fx.work.join("rel-link")).unwrap();
    let attempts = [
        "/work/../beta/work/secret.txt".to_string(),
        "/work/../../beta/work/secret.txt".to_string(),
        "/work/../../../tenants/beta/work/secret.txt".to_string(),
        host_path.clone(),
        "/work/abs-link".into(),
        "/work/rel-link".into(),
        format!("/proc/self/root{host_path}"),
        format!("/proc/1/root{host_path}"),
        "/proc/self/cwd/../../beta/work/secret.txt".to_string(),
    ];
    for who in BOTH {
        for p in &attempts {
            let r = py(
                who,
                &fx.work,
                &format!(
                    "import os\ntry:\n  print(open({p:?}).read())\nexcept OSError as e: print('errno', e.errno)"
                ),
            );
            // ENOENT: the path does not exist in the sandbox's root at all.
            assert_eq!(r.stdout, "errno 2\n", "{who:?} {p}: {r:?}");
        }
    }
}

#[test]
fn no_descriptor_leaks_in_and_handles_are_refused() {
    let fx = Fixture::new();
    // A descriptor open in the caller (the test's own) must not be inherited.
    let r = py(
        As::Nobody,
        &fx.work,
        r#"
import os, ctypes
print(sorted(int(x) for x in os.listdir('/proc/self/fd')))
libc = ctypes.CDLL(None, use_errno=True)
buf = ctypes.create_string_buffer(128)
mount_id = ctypes.c_int()
# name_to_handle_at(AT_FDCWD, "/work", buf, &mount_id, 0) and open_by_handle_at(...)
r1 = libc.syscall(303, -100, b"/work", buf, ctypes.byref(mount_id), 0); e1 = ctypes.get_errno()
r2 = libc.syscall(304, -100, buf, 0); e2 = ctypes.get_errno()
print(r1, e1, r2, e2)
"#,
    );
    // fd 3 is listdir's own; EPERM (1) from seccomp for both handle calls.
    assert_eq!(r.stdout, "[0, 1, 2, 3]\n-1 1 -1 1\n", "{r:?}");
}

#[test]
fn writes_outside_work_and_tmp_fail() {
    let fx = Fixture::new();
    for who in BOTH {
        let r = py(
            who,
            &fx.work,
            r#"
import os
for p in ["/usr/x", "/etc/passwd", "/x", "/proc/sys/kernel/hostname", "/dev/x", "/etc/ssl/certs/x", "/usr/bin/sh"]:
    try:
        open(p, "a").write("x"); print(p, "WROTE")
    except OSError as e:
        print(p, e.errno)
try:
    os.mkdir("/newdir"); print("mkdir ok")
except OSError as e:
    print("mkdir", e.errno)
open("/work/ok", "w").write("ok"); open("/tmp/ok", "w").write("ok"); print("work+tmp ok")
"#,
        );
        for line in r.stdout.lines().filter(|l| !l.ends_with("ok")) {
            let errno: i32 = line
                .rsplit(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap_or_else(|_| panic!("{who:?}: {r:?}"));
            // EROFS (30) from the read-only mounts, or EACCES (13) from Landlock.
            assert!(errno == 30 || errno == 13, "{who:?}: {line}: {r:?}");
        }
        assert!(r.stdout.ends_with("work+tmp ok\n"), "{who:?}: {r:?}");
    }
}

#[test]
fn landlock_stops_reads_the_mounts_would_allow() {
    let fx = Fixture::new();
    // The root tmpfs is world-readable, but Landlock grants nothing on "/" itself: if a
    // mount bug ever put a foreign directory there, Landlock would still refuse it.
    let r = py(
        As::Nobody,
        &fx.work,
        "import os\ntry:\n  os.listdir('/')\nexcept OSError as e: print(e.errno)\nprint(len(os.listdir('/usr')) > 0)",
    );
    assert_eq!(r.stdout, "13\nTrue\n", "{r:?}");
}

#[test]
fn tcp_to_the_hosts_loopback_is_refused() {
    let fx = Fixture::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    for who in BOTH {
        let r = py(
            who,
            &fx.work,
            &format!(
                "import socket\nfor fam, host in ((socket.AF_INET, '127.0.0.1'), (socket.AF_INET6, '::1')):\n  s = socket.socket(fam)\n  try:\n    s.connect((host, {port})); print('connected')\n  except OSError as e: print(e.errno)\ns = socket.socket()\ntry:\n  s.bind(('127.0.0.1', 0)); print('bound')\nexcept OSError as e: print(e.errno)"
            ),
        );
        // EACCES from Landlock's TCP rules (connect and bind), before any routing.
        assert_eq!(r.stdout, "13\n13\n13\n", "{who:?}: {r:?}");
    }
    listener.set_nonblocking(true).unwrap();
    assert!(
        listener.accept().is_err(),
        "nothing reached the host listener"
    );
}

#[test]
fn udp_never_reaches_the_host() {
    let fx = Fixture::new();
    let host = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = host.local_addr().unwrap().port();
    let r = py(
        As::Nobody,
        &fx.work,
        &format!(
            "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nprint(s.sendto(b'leak', ('127.0.0.1', {port})))"
        ),
    );
    // The datagram goes to the sandbox's own loopback, where nobody listens.
    assert_eq!(r.stdout, "4\n", "{r:?}");
    host.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert!(
        host.recv_from(&mut buf).is_err(),
        "datagram crossed into the host namespace"
    );
}

#[test]
fn host_abstract_unix_socket_is_unreachable() {
    let fx = Fixture::new();
    let name = format!("bulkhead-test-{}", tag());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    for who in BOTH {
        let r = py(
            who,
            &fx.work,
            &format!(
                "import socket\ns = socket.socket(socket.AF_UNIX)\ntry:\n  s.connect('\\0{name}'); print('connected')\nexcept OSError as e: print(e.errno)"
            ),
        );
        // ECONNREFUSED: abstract names live in the network namespace, and the sandbox has
        // its own (Landlock's abstract-socket scope would refuse with EPERM as well).
        assert_eq!(r.stdout, "111\n", "{who:?}: {r:?}");
    }
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err());
}

#[test]
fn dangerous_syscalls_fail_with_eperm() {
    let fx = Fixture::new();
    let program = r#"
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    r = libc.syscall(*args)
    print(name, r, ctypes.get_errno(), flush=True)
child = os.fork()
if child == 0:
    time.sleep(30); os._exit(0)
call("ptrace_attach_sibling", 101, 16, child, 0, 0)
call("mount", 165, b"none", b"/tmp", b"tmpfs", 0, None)
call("umount2", 166, b"/work", 2)
call("unshare_user", 272, 0x10000000)
call("unshare_mount", 272, 0x00020000)
call("clone_newuser", 56, 0x10000000 | 17, 0, 0, 0, 0)
call("clone3", 435, 0, 0)
call("setns", 308, 0, 0)
call("keyctl", 250, 0, 0, 0, 0, 0)
call("add_key", 248, b"user", b"k", b"v", 1, -4)
call("bpf", 321, 0, 0, 0)
call("io_uring_setup", 425, 8, ctypes.create_string_buffer(120))
call("perf_event_open", 298, 0, 0, -1, -1, 0)
call("userfaultfd", 323, 0)
call("pivot_root", 155, b".", b".")
call("open_tree", 428, -100, b"/work", 1)
call("fsopen", 430, b"tmpfs", 0)
call("process_vm_readv", 310, child, 0, 0, 0, 0, 0)
call("personality_no_aslr", 135, 0x0040000)
call("socket_packet", 41, 17, 3, 0)
call("socket_alg", 41, 38, 5, 0)
call("chroot", 161, b"/tmp")
call("prctl_clear_pdeathsig", 157, 1, 0, 0, 0, 0)
# setsid from a process that is not a session leader (which fails anyway): a new session
# would be a new CPU-scheduling autogroup outside the one the daemon lowers.
leaf = os.fork()
if leaf == 0:
    call("setsid_from_child", 112)
    os._exit(0)
os.waitpid(leaf, 0)
os.kill(child, 9)
"#;
    for who in BOTH {
        let r = py(who, &fx.work, program);
        assert_eq!(r.code, 0, "{who:?}: {r:?}");
        let mut seen = 0;
        for line in r.stdout.lines() {
            let parts: Vec<&str> = line.split(' ').collect();
            let want_errno = if parts[0] == "clone3" { "38" } else { "1" };
            assert_eq!((parts[1], parts[2]), ("-1", want_errno), "{who:?}: {line}");
            seen += 1;
        }
        assert_eq!(seen, 24, "{who:?}: {r:?}");
    }
}

#[test]
fn nested_unshare_tool_fails_with_eperm() {
    let fx = Fixture::new();
    let r = sh(As::Nobody, &fx.work, "unshare -U -r id");
    assert_ne!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("Operation not permitted"), "{r:?}");
}

#[test]
fn tiocsti_is_refused_even_with_high_bits_set() {
    let fx = Fixture::new();
    let program = r#"
import ctypes, os, pty
libc = ctypes.CDLL(None, use_errno=True)
c = ctypes.c_char(b"x")
for req in (0x5412, 0x1_0000_5412, 0xffffffff_00005412, 0x541C):
    r = libc.syscall(16, 0, ctypes.c_ulong(req), ctypes.byref(c))
    print(hex(req), r, ctypes.get_errno())
# An allowed ioctl still works: FIONREAD on a pipe.
rd, wr = os.pipe(); os.write(wr, b"abc")
n = ctypes.c_int()
print("fionread", libc.ioctl(rd, 0x541B, ctypes.byref(n)), n.value)
"#;
    let r = py(As::Nobody, &fx.work, program);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{r:?}");
    for l in &lines[..4] {
        assert!(l.ends_with(" -1 1"), "EPERM expected: {l} {r:?}");
    }
    assert_eq!(lines[4], "fionread 0 3", "{r:?}");
}

#[test]
fn setuid_binary_gains_nothing() {
    let fx = Fixture::new();
    // A setuid-root copy of `id`, planted in the tenant's /work by the host's root.
    let suid = fx.work.join("suid-id");
    std::fs::copy("/usr/bin/id", &suid).unwrap();
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    assert_eq!(
        std::fs::metadata(&suid).unwrap().permissions().mode() & 0o4000,
        0o4000
    );
    for who in BOTH {
        let r = sh(
            who,
            &fx.work,
            "/work/suid-id -u; /work/suid-id -ru; /usr/bin/passwd -S root 2>&1; echo rc=$?",
        );
        assert_eq!(
            r.stdout.lines().take(2).collect::<Vec<_>>(),
            ["1000", "1000"],
            "{who:?}: {r:?}"
        );
        assert!(
            r.stdout
                .contains("You may not view or modify password information for root"),
            "{who:?}: {r:?}"
        );
        assert!(!r.stdout.contains("rc=0"), "{who:?}: {r:?}");
    }
}

#[test]
fn fork_bomb_is_contained_by_the_pid_limit() {
    let fx = Fixture::new();
    let program = r#"
import os, time, errno
n = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(60); os._exit(0)
        n += 1
except OSError as e:
    print(n, e.errno)
"#;
    for who in BOTH {
        let t = Instant::now();
        let r = output(sandbox_cmd(
            who,
            &fx.work,
            &["--pids", "24", "--timeout-ms", "20000"],
            &["python3", "-c", program],
        ));
        let fields: Vec<&str> = r.stdout.split_whitespace().collect();
        assert_eq!(fields.len(), 2, "{who:?}: {r:?}");
        let forked: u32 = fields[0].parse().unwrap();
        // EAGAIN (11) from RLIMIT_NPROC; python itself is one of the 24.
        assert_eq!(fields[1], "11", "{who:?}: {r:?}");
        assert!(forked < 24, "{who:?}: {r:?}");
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{who:?}: the children died with pid 1"
        );
    }
}

#[test]
fn memory_hog_is_stopped_by_the_limit() {
    let fx = Fixture::new();
    let r = output(sandbox_cmd(
        As::Nobody,
        &fx.work,
        &["--memory-bytes", "268435456"],
        &[
            "python3",
            "-c",
            "x = bytearray(1 << 30); print('allocated', len(x))",
        ],
    ));
    assert_ne!(r.code, 0, "{r:?}");
    assert!(!r.stdout.contains("allocated"), "{r:?}");
    assert!(r.stderr.contains("MemoryError"), "{r:?}");
}

#[test]
fn sleeping_forever_is_killed_at_the_timeout_with_nothing_left() {
    let fx = Fixture::new();
    let t1 = tag();
    let t2 = tag();
    for who in BOTH {
        let start = Instant::now();
        let r = sh_with(
            who,
            &fx.work,
            &["--timeout-ms", "400"],
            &format!("sleep {t1} & sleep {t2}"),
        );
        assert_eq!(r.code, 137, "{who:?}: {r:?}");
        assert!(start.elapsed() < Duration::from_secs(5), "{who:?}");
        assert!(r.stderr.contains("timed out"), "{who:?}: {r:?}");
        assert!(
            pids_with_cmdline(&format!("sleep {t1}")).is_empty(),
            "{who:?}: background sleep survived"
        );
        assert!(
            pids_with_cmdline(&format!("sleep {t2}")).is_empty(),
            "{who:?}: sleep survived"
        );
    }
}

#[test]
fn killing_the_spawner_kills_the_sandbox() {
    let fx = Fixture::new();
    for who in BOTH {
        let t1 = tag();
        let t2 = tag();
        // pid 1 first tries to clear its parent-death signal (refused by seccomp).
        let script = format!(
            "import ctypes, subprocess\nctypes.CDLL(None).prctl(1, 0, 0, 0, 0)\nsubprocess.Popen(['sleep', '{t1}'])\nsubprocess.run(['sleep', '{t2}'])"
        );
        let mut child = sandbox_cmd(who, &fx.work, &[], &["python3", "-c", &script])
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids_with_cmdline(&format!("sleep {t1}")).is_empty()
            || pids_with_cmdline(&format!("sleep {t2}")).is_empty()
        {
            assert!(Instant::now() < deadline, "{who:?}: sandbox never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = [
                pids_with_cmdline(&format!("sleep {t1}")),
                pids_with_cmdline(&format!("sleep {t2}")),
            ]
            .concat();
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{who:?}: sandbox processes {left:?} outlived the spawner"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn signals_cannot_reach_outside_processes() {
    let fx = Fixture::new();
    let mut victim = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let pid = victim.id();
    let r = py(
        As::Nobody,
        &fx.work,
        &format!(
            "import os\ntry:\n  os.kill({pid}, 9); print('sent')\nexcept OSError as e: print(e.errno)"
        ),
    );
    // ESRCH: the host pid does not exist in the sandbox's pid namespace.
    assert_eq!(r.stdout, "3\n", "{r:?}");
    assert!(victim.try_wait().unwrap().is_none(), "victim died");
    victim.kill().unwrap();
    let _ = victim.wait();
}

#[test]
fn stdin_file_must_be_a_plain_regular_file() {
    let fx = Fixture::new();
    // A link planted in the tenant's work dir towards a file only root may read.
    let root_only = fx.base.join("root-only.txt");
    std::fs::write(&root_only, "root-only-content\n").unwrap();
    std::fs::set_permissions(&root_only, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(&root_only, fx.work.join("input.txt")).unwrap();
    let r = sh_with(
        As::Root,
        &fx.work,
        &["--stdin", fx.work.join("input.txt").to_str().unwrap()],
        "cat",
    );
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("symlink"), "{r:?}");
    assert!(!r.stdout.contains("root-only"), "{r:?}");
    // A hard link made by the tenant's uid (where the kernel allows it) is refused as root.
    let hard = fx.work.join("hard.txt");
    if std::fs::hard_link(&root_only, &hard).is_ok() {
        let r = sh_with(
            As::Root,
            &fx.work,
            &["--stdin", hard.to_str().unwrap()],
            "cat",
        );
        assert_eq!(r.code, 2, "{r:?}");
        assert!(!r.stdout.contains("root-only"), "{r:?}");
    }
    // A FIFO would block the caller forever; a directory would hand over a host dir fd.
    let fifo = fx.work.join("fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    for p in [fifo.clone(), fx.other_work.clone()] {
        let t = Instant::now();
        let r = sh_with(
            As::Nobody,
            &fx.work,
            &["--stdin", p.to_str().unwrap()],
            "cat",
        );
        assert_eq!(r.code, 2, "{p:?}: {r:?}");
        assert!(r.stderr.contains("not a regular file"), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
    // `-` passes the caller's own stdin.
    let mut c = sandbox_cmd(
        As::Nobody,
        &fx.work,
        &["--stdin", "-"],
        &["tr", "a-z", "A-Z"],
    );
    c.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"piped in\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "PIPED IN\n");
}

#[test]
fn a_terminal_is_relayed_never_handed_to_the_sandbox() {
    let fx = Fixture::new();
    // Under a pseudo-terminal (script), the sandbox's stdout/stderr are pipes: it can
    // neither read what is typed nor change terminal settings.
    let inner = format!(
        "{} sandbox --work {} -- python3 -c \"import os,sys; print('tty', os.isatty(1), os.isatty(2))\ntry:\n  os.read(1, 10); print('READ')\nexcept OSError as e: print('read errno', e.errno)\"",
        bin(),
        fx.work.display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("tty False False"), "{text}");
    // EBADF: fd 1 is the write end of a pipe.
    assert!(text.contains("read errno 9"), "{text}");
}

#[test]
fn created_work_dirs_never_follow_links() {
    let fx = Fixture::new();
    let victim = fx.base.join("victim-dir");
    std::fs::create_dir(&victim).unwrap();
    // The requested work dir is a symlink planted where it would be created.
    let planted = fx.work.join("job1");
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    let r = sh_with(As::Root, &planted, &["--host-uid", "65534"], "true");
    assert_eq!(r.code, 125, "{r:?}");
    // A symlinked parent is not followed either.
    std::os::unix::fs::symlink(&fx.base, fx.work.join("up")).unwrap();
    let r = sh_with(
        As::Root,
        &fx.work.join("up/created-through-link"),
        &["--host-uid", "65534"],
        "true",
    );
    assert_eq!(r.code, 125, "{r:?}");
    assert!(!fx.base.join("created-through-link").exists());
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(&victim).unwrap().uid(),
        0,
        "the link target was chowned"
    );
}

#[test]
fn pseudo_filesystems_and_system_dirs_are_not_work_dirs() {
    let victim = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    for work in [
        format!("/proc/{}", victim.id()),
        "/sys/kernel".into(),
        "/".into(),
        "/usr".into(),
        "/etc".into(),
    ] {
        let r = sh_with(
            As::Root,
            std::path::Path::new(&work),
            &["--host-uid", "65534"],
            "ls /work",
        );
        assert_eq!(r.code, 125, "{work}: {r:?}");
        assert!(r.stderr.contains("work dir"), "{work}: {r:?}");
    }
    let mut victim = victim;
    victim.kill().unwrap();
    let _ = victim.wait();
}

/// Re-runs this test binary, but for the re-running tests, with `env` set to `1`.
fn rerun_suite_with(env: &str) {
    if std::env::var_os(IN_CELL_ENV).is_some() || std::env::var_os(LONE_ENV).is_some() {
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--test-threads",
            "2",
            "--skip",
            "every_escape_also_fails_inside_a_cell",
            "--skip",
            "every_escape_also_fails_through_the_lone_binary",
        ])
        .env(env, "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The re-run really ran the suite.
    assert!(text.contains("test result: ok. 2"), "{text}");
}

/// Every escape above again, with each sandbox run in a cell the way the daemon runs
/// them: `--cell` is added to every sandbox.
#[test]
fn every_escape_also_fails_inside_a_cell() {
    rerun_suite_with(IN_CELL_ENV);
}

/// Every escape above again, through `bulkhead-sandbox` (the lone binary) instead of
/// `bulkhead sandbox`.
#[test]
fn every_escape_also_fails_through_the_lone_binary() {
    rerun_suite_with(LONE_ENV);
}
