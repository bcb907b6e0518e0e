//! The sandbox runs real workloads, as uid 65534 and as root, and presents the view
//! DESIGN.md promises.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

#[test]
fn shell_pipeline_and_coreutils() {
    let fx = Fixture::new();
    for who in BOTH {
        let r = sh(
            who,
            &fx.work,
            "echo hello sandbox world | tr a-z A-Z | sed 's/ /_/g' | wc -c; printf '3\\n1\\n2\\n' | sort -n | tr -d '\\n'; echo; seq 1 5 | awk '{s+=$1} END {print s}'; echo abc | sha256sum | cut -c1-8",
        );
        assert_eq!(r.code, 0, "{who:?}: {r:?}");
        assert_eq!(r.stdout, "20\n123\n15\nedeaaff3\n", "{who:?}: {r:?}");
    }
}

#[test]
fn python_with_threads_and_a_subprocess() {
    let fx = Fixture::new();
    let program = r#"
import threading, subprocess
out = []
ts = [threading.Thread(target=lambda i=i: out.append(i * i)) for i in range(8)]
[t.start() for t in ts]
[t.join() for t in ts]
r = subprocess.run(["sh", "-c", "echo from-child; exit 3"], capture_output=True, text=True)
print(sum(out), r.stdout.strip(), r.returncode)
"#;
    for who in BOTH {
        let r = py(who, &fx.work, program);
        assert_eq!(r.code, 0, "{who:?}: {r:?}");
        assert_eq!(r.stdout, "140 from-child 3\n", "{who:?}: {r:?}");
    }
}

#[test]
fn work_persists_and_tmp_does_not() {
    let fx = Fixture::new();
    for who in BOTH {
        let r = sh(
            who,
            &fx.work,
            "echo kept > /work/kept.txt && echo gone > /tmp/gone.txt && cat /tmp/gone.txt",
        );
        assert_eq!((r.code, r.stdout.as_str()), (0, "gone\n"), "{who:?}: {r:?}");
        assert_eq!(
            std::fs::read_to_string(fx.work.join("kept.txt")).unwrap(),
            "kept\n"
        );
        let r = sh(
            who,
            &fx.work,
            "cat /work/kept.txt; ls -A /tmp | wc -l; cat /tmp/gone.txt",
        );
        assert_eq!(r.stdout, "kept\n0\n", "{who:?}: {r:?}");
        assert!(
            r.stderr.contains("No such file or directory"),
            "{who:?}: {r:?}"
        );
        // Files the sandbox makes belong to the mapped unprivileged host uid.
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(fx.work.join("kept.txt")).unwrap().uid(),
            NOBODY
        );
        std::fs::remove_file(fx.work.join("kept.txt")).unwrap();
    }
}

#[test]
fn identity_hostname_network_and_hardening_state() {
    let fx = Fixture::new();
    for who in BOTH {
        let r = sh(
            who,
            &fx.work,
            "id -u; id -g; id -un; hostname; pwd; echo $HOME; grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status | tr -s '\\t ' ' '; ls /sys/class/net 2>&1 | head -1; cat /sys/class/net/lo/operstate 2>&1 | head -1; cut -d: -f1 /proc/net/dev | tail -n +3 | tr -d ' '",
        );
        assert_eq!(r.code, 0, "{who:?}: {r:?}");
        let lines: Vec<&str> = r.stdout.lines().collect();
        assert_eq!(
            &lines[..6],
            ["1000", "1000", "sandbox", "sandbox", "/work", "/work"],
            "{who:?}: {r:?}"
        );
        for want in [
            "CapInh: 0000000000000000",
            "CapPrm: 0000000000000000",
            "CapEff: 0000000000000000",
            "CapBnd: 0000000000000000",
            "CapAmb: 0000000000000000",
            "NoNewPrivs: 1",
            "Seccomp: 2",
        ] {
            assert!(lines.contains(&want), "{who:?}: missing {want}: {r:?}");
        }
        // Only the loopback interface exists in the sandbox's network namespace.
        assert_eq!(lines.last(), Some(&"lo"), "{who:?}: {r:?}");
        assert_eq!(r.stdout.matches('\n').count(), lines.len());
    }
}

#[test]
fn only_lo_is_up_and_no_route_leaves() {
    let fx = Fixture::new();
    let r = py(
        As::Nobody,
        &fx.work,
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ntry:\n  s.connect(('10.0.0.1',53)); print('connected')\nexcept OSError as e: print('errno', e.errno)\nprint(open('/proc/net/route').read().count('\\n'))",
    );
    // ENETUNREACH (101): the namespace has no route besides loopback.
    assert_eq!(r.stdout, "errno 101\n1\n", "{r:?}");
}

#[test]
fn filesystem_view_is_minimal() {
    let fx = Fixture::new();
    let r = sh(
        As::Nobody,
        &fx.work,
        "cat /etc/passwd | cut -d: -f1 | tr '\\n' ' '; echo; test -e /etc/shadow && echo shadow-visible; test -e /home && echo home-visible; test -e /root && echo root-visible; test -e /var && echo var-visible; test -e /sys/fs && echo sys-visible; for n in null zero full random urandom; do test -c /dev/$n || echo missing-$n; done; test -e /dev/sda && echo dev-sda; test -e /dev/pts && echo pts; ps -e -o pid= | wc -l",
    );
    assert_eq!(r.code, 0, "{r:?}");
    // ps, sh and wc: nothing outside the sandbox's pid namespace is visible.
    assert_eq!(r.stdout, "root sandbox nobody \n3\n", "{r:?}");
}

#[test]
fn mounts_are_nosuid_nodev_and_system_paths_read_only() {
    let fx = Fixture::new();
    let r = sh(
        As::Nobody,
        &fx.work,
        "awk '{print $5, $6}' /proc/self/mountinfo",
    );
    assert_eq!(r.code, 0, "{r:?}");
    for line in r.stdout.lines() {
        let (point, opts) = line.split_once(' ').unwrap();
        let opts: Vec<&str> = opts.split(',').collect();
        assert!(opts.contains(&"nosuid"), "{line}");
        if !point.starts_with("/dev/") {
            assert!(opts.contains(&"nodev"), "{line}");
        }
        if point == "/" || point.starts_with("/usr") || point.starts_with("/etc") || point == "/dev"
        {
            assert!(opts.contains(&"ro"), "{line}");
        }
        if point == "/work" || point == "/tmp" {
            assert!(opts.contains(&"rw"), "{line}");
        }
    }
    assert!(r.stdout.lines().any(|l| l.starts_with("/work ")), "{r:?}");
}

#[test]
fn exit_status_env_cwd_and_stdin_pass_through() {
    let fx = Fixture::new();
    std::fs::create_dir_all(fx.work.join("sub")).unwrap();
    let input = fx.base.join("input.txt");
    std::fs::write(&input, "line-from-stdin\n").unwrap();
    for who in BOTH {
        let r = sh_with(
            who,
            &fx.work,
            &[
                "--env",
                "GREETING=hi there",
                "--cwd",
                "sub",
                "--stdin",
                input.to_str().unwrap(),
            ],
            "echo \"$GREETING\"; pwd; cat; exit 42",
        );
        assert_eq!(r.code, 42, "{who:?}: {r:?}");
        assert_eq!(
            r.stdout, "hi there\n/work/sub\nline-from-stdin\n",
            "{who:?}: {r:?}"
        );
        let r = sh(who, &fx.work, "env | sort | cut -d= -f1 | tr '\\n' ' '");
        assert_eq!(
            r.stdout, "HOME LANG PATH PWD ",
            "{who:?}: the environment is cleared: {r:?}"
        );
    }
}

#[test]
fn setup_failures_name_the_step_and_errno() {
    let fx = Fixture::new();
    let r = sh_with(As::Nobody, &fx.work, &["--cwd", "does/not/exist"], "true");
    assert_eq!(r.code, 125, "{r:?}");
    assert!(
        r.stderr
            .contains("chdir(cwd) (/work/does/not/exist): ENOENT"),
        "{r:?}"
    );
    let r = output(sandbox_cmd(
        As::Nobody,
        &fx.work,
        &[],
        &["no-such-command-xyz"],
    ));
    assert_eq!(r.code, 127, "{r:?}");
    assert!(
        r.stderr.contains("execve (no-such-command-xyz): ENOENT"),
        "{r:?}"
    );
    let r = output(sandbox_cmd(As::Nobody, &fx.work, &[], &["/etc/passwd"]));
    assert_eq!(r.code, 126, "{r:?}");
    assert!(r.stderr.contains("execve (/etc/passwd): EACCES"), "{r:?}");
}

#[test]
fn work_dir_symlinks_and_dotdot_are_refused() {
    let fx = Fixture::new();
    let link = fx.base.join("tenants/acme/link-to-beta");
    std::os::unix::fs::symlink(&fx.other_work, &link).unwrap();
    let r = sh(As::Nobody, &link, "cat /work/secret.txt");
    assert_eq!(r.code, 125, "{r:?}");
    assert!(r.stderr.contains("symlink"), "{r:?}");
    assert!(!r.stdout.contains("beta-secret"), "{r:?}");
    let dotdot = fx.work.join("../../beta/work");
    let r = sh(As::Nobody, &dotdot, "cat /work/secret.txt");
    assert_eq!(r.code, 125, "{r:?}");
    assert!(r.stderr.contains("'..'"), "{r:?}");
    assert!(!r.stdout.contains("beta-secret"), "{r:?}");
}

#[test]
fn root_never_runs_the_sandbox_as_root() {
    let fx = Fixture::new();
    let root_owned = fx.base.join("root-owned");
    std::fs::create_dir(&root_owned).unwrap();
    let r = sh(As::Root, &root_owned, "id");
    assert_eq!(r.code, 125, "{r:?}");
    assert!(r.stderr.contains("--host-uid"), "{r:?}");
    let r = sh_with(As::Root, &root_owned, &["--host-uid", "0"], "id");
    assert_eq!(r.code, 125, "{r:?}");
    assert!(
        r.stderr.contains("must not map to host uid or gid 0"),
        "{r:?}"
    );
    // With an explicit unprivileged id, the sandbox's processes hold that host uid.
    let r = sh_with(
        As::Root,
        &root_owned,
        &["--host-uid", "65533", "--host-gid", "65533"],
        "cat /proc/self/uid_map /proc/self/gid_map | tr -s ' '",
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, " 1000 65533 1\n 1000 65533 1\n", "{r:?}");
    // An unprivileged caller cannot pick someone else's uid.
    let r = sh_with(As::Nobody, &fx.work, &["--host-uid", "1234"], "id");
    assert_eq!(r.code, 125, "{r:?}");
    assert!(r.stderr.contains("only map its own ids"), "{r:?}");
}

#[test]
fn missing_work_dir_is_created_for_the_sandbox_identity() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let fx = Fixture::new();
    let fresh = fx.base.join("tenants/acme/fresh-root");
    let r = sh_with(
        As::Root,
        &fresh,
        &["--host-uid", "65534"],
        "echo ok > /work/f && cat /work/f",
    );
    assert_eq!((r.code, r.stdout.as_str()), (0, "ok\n"), "{r:?}");
    let m = std::fs::metadata(&fresh).unwrap();
    assert_eq!(
        (m.uid(), m.gid(), m.permissions().mode() & 0o777),
        (NOBODY, NOBODY, 0o700)
    );
    // As root without an owner there is nothing safe to create it as.
    let r = sh(As::Root, &fx.base.join("tenants/acme/fresh-2"), "true");
    assert_eq!(r.code, 125, "{r:?}");
    assert!(r.stderr.contains("--host-uid"), "{r:?}");
    assert!(!fx.base.join("tenants/acme/fresh-2").exists());
    // Unprivileged: created as the caller (the tenant dir must be writable by it).
    let parent = fx.base.join("tenants/acme/nobody-owned");
    std::fs::create_dir(&parent).unwrap();
    std::os::unix::fs::chown(&parent, Some(NOBODY), Some(NOBODY)).unwrap();
    let r = sh(As::Nobody, &parent.join("work"), "id -u");
    assert_eq!((r.code, r.stdout.as_str()), (0, "1000\n"), "{r:?}");
    assert_eq!(
        std::fs::metadata(parent.join("work")).unwrap().uid(),
        NOBODY
    );
}

#[test]
fn own_session_no_tty_and_rlimits_applied() {
    let fx = Fixture::new();
    for who in BOTH {
        let r = output(sandbox_cmd(
            who,
            &fx.work,
            &["--pids", "77", "--memory-bytes", "1073741824"],
            &[
                "python3",
                "-c",
                r#"
import os, resource
stat = open('/proc/self/stat').read().rsplit(')', 1)[1].split()
# fields after the command: state ppid pgrp session tty_nr
print(os.getpid(), os.getsid(0), stat[4])
for name in ('NOFILE', 'NPROC', 'FSIZE', 'CORE', 'AS'):
    print(name, *resource.getrlimit(getattr(resource, 'RLIMIT_' + name)))
"#,
            ],
        ));
        assert_eq!(r.code, 0, "{who:?}: {r:?}");
        // pid 1 of its namespace, leader of its own session, no controlling terminal.
        assert_eq!(
            r.stdout,
            "1 1 0\nNOFILE 1024 1024\nNPROC 77 77\nFSIZE 1073741824 1073741824\nCORE 0 0\nAS 1073741824 1073741824\n",
            "{who:?}: {r:?}"
        );
    }
}
