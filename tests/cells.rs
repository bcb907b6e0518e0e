//! Per-tenant cells through the library (the test process is root, so this is the root
//! path: cells map to an unprivileged host uid, never to 0; the unprivileged path runs in
//! `bench coldstart`, which drops to uid 65534, see `bench_cli`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bulkhead::sandbox::{self, Cell, HostIds, SandboxSpec};
use common::*;

fn nobody() -> HostIds {
    HostIds {
        uid: 65534,
        gid: 65534,
    }
}

fn run_in(cell: &Arc<Cell>, fx: &Fixture, script: &str) -> sandbox::Outcome {
    let mut s = SandboxSpec::new(&fx.work, vec!["/bin/sh".into(), "-c".into(), script.into()]);
    s.cell = Some(cell.clone());
    sandbox::run(s).unwrap()
}

fn out(o: &sandbox::Outcome) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ns_ino(link: &str) -> u64 {
    // "net:[4026532281]"
    link.trim()
        .rsplit('[')
        .next()
        .unwrap()
        .trim_end_matches(']')
        .parse()
        .unwrap()
}

#[test]
fn runs_of_one_tenant_share_its_cell_and_never_another() {
    let fx = Fixture::new();
    let a = Arc::new(Cell::create(Some(nobody()), None).unwrap());
    let b = Arc::new(Cell::create(Some(nobody()), None).unwrap());
    // Alive at the same time, so that no namespace inode number can be reused between them.
    let probe = "readlink /proc/self/ns/user /proc/self/ns/net /proc/self/ns/pid /proc/self/ns/mnt; sleep 0.5";
    let start = |cell: &Arc<Cell>| {
        let mut s = SandboxSpec::new(&fx.work, vec!["/bin/sh".into(), "-c".into(), probe.into()]);
        s.cell = Some(cell.clone());
        sandbox::spawn(s).unwrap()
    };
    let (r1, r2, r3) = (start(&a), start(&a), start(&b));
    let (a1, a2, b1) = (
        out(&r1.wait().unwrap()),
        out(&r2.wait().unwrap()),
        out(&r3.wait().unwrap()),
    );
    let lines = |s: &str| s.lines().map(ns_ino).collect::<Vec<u64>>();
    let (a1, a2, b1) = (lines(&a1), lines(&a2), lines(&b1));
    let (a_user, a_net) = a.namespace_inodes().unwrap();
    assert_eq!((a1[0], a1[1]), (a_user, a_net));
    assert_eq!(
        (a2[0], a2[1]),
        (a_user, a_net),
        "same cell, same user and net ns"
    );
    assert_ne!(a1[2], a2[2], "each run has its own pid namespace");
    assert_ne!(a1[3], a2[3], "each run has its own mount namespace");
    assert_ne!(b1[0], a_user, "tenants never share a user namespace");
    assert_ne!(b1[1], a_net, "tenants never share a network namespace");
}

/// Runs start in a copy of the cell's prebuilt root: they see the system view and their
/// own three mounts, nothing of the host's mount tree, and cannot change what the next
/// run starts from.
#[test]
fn a_run_in_a_cell_sees_the_cells_root_and_its_own_mounts_only() {
    let fx = Fixture::new();
    let cell = Arc::new(Cell::create(Some(nobody()), None).unwrap());
    let o = run_in(&cell, &fx, "cut -d' ' -f5 /proc/self/mountinfo");
    let text = out(&o);
    assert_eq!(o.exit_code, Some(0), "{text}");
    let points: Vec<&str> = text.lines().collect();
    for p in &points {
        let allowed = ["/", "/work", "/tmp", "/proc", "/dev"].contains(p)
            || ["/usr", "/bin", "/sbin", "/lib", "/etc/", "/dev/"]
                .iter()
                .any(|pre| p.starts_with(pre));
        assert!(allowed, "unexpected mount point {p:?} in\n{text}");
    }
    for own in ["/work", "/tmp"] {
        assert_eq!(points.iter().filter(|p| **p == own).count(), 1, "{text}");
    }
    // Its own /proc over the cell's (which shows only the holder): pid 1 is the run.
    let o = run_in(
        &cell,
        &fx,
        "ls /proc | grep -E '^[0-9]+$' | sort -n | head -1; cat /proc/1/comm",
    );
    assert_eq!(out(&o), "1\nsh\n");
    // The shared root is read-only to every run, whatever it tries.
    let o = run_in(
        &cell,
        &fx,
        "for f in /etc/passwd /etc/newfile /usr/x /x /dev/x; do (echo x > $f) 2>&1; done; \
         mkdir /y 2>&1; cat /etc/hostname",
    );
    let text = out(&o);
    assert_eq!(text.matches("Read-only file system").count(), 6, "{text}");
    assert!(text.ends_with("sandbox\n"), "{text}");
}

#[test]
fn every_per_run_guarantee_holds_in_a_cell() {
    let fx = Fixture::new();
    let cell = Arc::new(Cell::create(Some(nobody()), None).unwrap());
    let o = run_in(
        &cell,
        &fx,
        "echo pid=$$; id -u; grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status | tr -s '\\t' ' '; \
         cat /proc/self/uid_map | tr -s ' '; hostname; echo hi > /tmp/x; ls /tmp; ip -o link 2>/dev/null | wc -l; exit 7",
    );
    let text = out(&o);
    assert_eq!(
        o.exit_code,
        Some(7),
        "{text} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    for want in [
        "pid=1\n",
        "1000\n",
        "CapEff: 0000000000000000",
        "CapBnd: 0000000000000000",
        "NoNewPrivs: 1",
        "Seccomp: 2",
        " 1000 65534 1\n",
        "sandbox\n",
        "x\n",
    ] {
        assert!(text.contains(want), "missing {want:?} in {text}");
    }
    // A fresh /tmp for every run.
    let o = run_in(&cell, &fx, "ls -A /tmp | wc -l");
    assert_eq!(out(&o).trim(), "0");
    // Nothing of another tenant is reachable.
    let o = run_in(
        &cell,
        &fx,
        "cat /tmp/../../tenants/beta/work/secret.txt; ls / | wc -l",
    );
    assert!(!out(&o).contains("beta-secret"));
    // Seccomp still refuses namespace games inside a cell: unshare fails with EPERM.
    let o = run_in(
        &cell,
        &fx,
        "python3 -c 'import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.unshare(0x10000000), ctypes.get_errno())'",
    );
    assert_eq!(
        out(&o).trim(),
        "-1 1",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Exit statuses and CPU time come through the shim.
    let o = run_in(
        &cell,
        &fx,
        "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; exit 3",
    );
    assert_eq!(o.exit_code, Some(3));
    assert!(o.cpu_us > 10_000, "{}", o.cpu_us);
}

#[test]
fn a_timeout_kills_the_runs_namespace_and_leaves_the_cell() {
    let fx = Fixture::new();
    let cell = Arc::new(Cell::create(Some(nobody()), None).unwrap());
    let t = tag();
    let mut s = SandboxSpec::new(
        &fx.work,
        vec![
            "/bin/sh".into(),
            "-c".into(),
            format!("sleep 1{t} & sleep 2{t}; wait"),
        ],
    );
    s.cell = Some(cell.clone());
    s.limits.wall_timeout = Some(Duration::from_millis(300));
    let o = sandbox::run(s).unwrap();
    assert!(o.timed_out);
    assert_eq!(o.signal, Some(9));
    std::thread::sleep(Duration::from_millis(100));
    assert!(pids_with_cmdline(&format!("sleep 1{t}")).is_empty());
    assert!(pids_with_cmdline(&format!("sleep 2{t}")).is_empty());
    assert!(cell.is_alive(), "a run's end is not the cell's");
    assert_eq!(out(&run_in(&cell, &fx, "echo again")), "again\n");
}

#[test]
fn the_holder_is_confined_and_its_death_is_seen() {
    let cell = Arc::new(Cell::create(Some(nobody()), None).unwrap());
    let status = std::fs::read_to_string(format!("/proc/{}/status", cell.pid())).unwrap();
    for want in ["Seccomp:\t2", "CapEff:\t0000000000000000", "NoNewPrivs:\t1"] {
        assert!(status.contains(want), "holder: missing {want:?}\n{status}");
    }
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == "65534"),
        "{uid_line}"
    );
    // Its only descriptors are none at all (the caller's are closed).
    let fds = std::fs::read_dir(format!("/proc/{}/fd", cell.pid()))
        .unwrap()
        .count();
    assert_eq!(fds, 0);
    assert!(cell.is_alive());
    cell.kill();
    std::thread::sleep(Duration::from_millis(50));
    assert!(!cell.is_alive());
}

#[test]
fn a_root_caller_must_give_unprivileged_host_ids() {
    assert!(Cell::create(None, None).is_err());
    assert!(
        Cell::create(Some(HostIds { uid: 0, gid: 0 }), None)
            .unwrap_err()
            .to_string()
            .contains("uid or gid 0")
    );
}

mod through_the_daemon {
    use super::*;
    use common::daemon::{Daemon, exec};
    use hyper::Method;

    async fn ns(d: &Daemon, token: &str) -> (u64, u64) {
        let v = exec(
            &d.tenant(token),
            &["readlink", "/proc/self/ns/user", "/proc/self/ns/net"],
        )
        .await
        .json();
        let text = v["stdout"].as_str().unwrap().to_string();
        let mut it = text.lines().map(ns_ino);
        (it.next().unwrap(), it.next().unwrap())
    }

    async fn cells(d: &Daemon) -> Vec<serde_json::Value> {
        d.admin()
            .request(Method::GET, "/admin/status", vec![])
            .await
            .unwrap()
            .json()["cells"]
            .as_array()
            .unwrap()
            .clone()
    }

    fn holder_of(cells: &[serde_json::Value], tenant: &str) -> Option<i32> {
        cells
            .iter()
            .find(|c| c["tenant"] == tenant)
            .map(|c| c["holder_pid"].as_i64().unwrap() as i32)
    }

    fn alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
    }

    #[tokio::test]
    async fn each_tenant_has_one_cell_which_freeze_delete_and_kill_end() {
        for who in [As::Nobody, As::Root] {
            let mut d = Daemon::start(who);
            let a = d.create("acme").await;
            let b = d.create("beta").await;
            let a1 = ns(&d, &a).await;
            let a2 = ns(&d, &a).await;
            let b1 = ns(&d, &b).await;
            assert_eq!(a1, a2, "{who:?}: one tenant's runs share its cell");
            assert_ne!(a1.0, b1.0, "{who:?}: tenants never share a user namespace");
            assert_ne!(
                a1.1, b1.1,
                "{who:?}: tenants never share a network namespace"
            );
            let list = cells(&d).await;
            let acme = list.iter().find(|c| c["tenant"] == "acme").unwrap();
            assert_eq!(acme["runs"], 2, "{list:?}");
            assert!(acme["age_ms"].as_u64().is_some(), "{list:?}");
            // A holder killed from outside is replaced on the next run.
            let holder = holder_of(&list, "acme").unwrap();
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(holder),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
            std::thread::sleep(Duration::from_millis(50));
            // (Namespace inode numbers may be reused once the old cell is gone, so the new
            // cell is told by its holder.)
            let r = exec(&d.tenant(&a), &["true"]).await;
            assert_eq!(r.status, 200, "{who:?}: {:?}", r.json());
            let new_holder = holder_of(&cells(&d).await, "acme").unwrap();
            assert_ne!(new_holder, holder);
            assert!(alive(new_holder));
            // Freeze ends the cell at once.
            let r = d
                .admin()
                .request(Method::POST, "/admin/tenants/acme/freeze", vec![])
                .await
                .unwrap();
            assert_eq!(r.status, 204);
            std::thread::sleep(Duration::from_millis(100));
            assert!(!alive(new_holder), "{who:?}: freeze killed the cell");
            assert_eq!(holder_of(&cells(&d).await, "acme"), None);
            // Delete too.
            let beta_holder = holder_of(&cells(&d).await, "beta").unwrap();
            let r = d
                .admin()
                .request(Method::DELETE, "/admin/tenants/beta", vec![])
                .await
                .unwrap();
            assert!(r.status.is_success(), "{:?}", r.json());
            std::thread::sleep(Duration::from_millis(100));
            assert!(!alive(beta_holder), "{who:?}: delete killed the cell");
            // And SIGKILL of the daemon leaves no cell behind.
            let c = d.create("gamma").await;
            assert_eq!(exec(&d.tenant(&c), &["true"]).await.status, 200);
            let gamma_holder = holder_of(&cells(&d).await, "gamma").unwrap();
            d.kill9();
            std::thread::sleep(Duration::from_millis(200));
            assert!(
                !alive(gamma_holder),
                "{who:?}: the cell died with the daemon"
            );
        }
    }

    #[tokio::test]
    async fn idle_cells_are_reaped() {
        let state = common::daemon::temp_state("idle");
        let d = Daemon::start_with(As::Nobody, state, Some("[exec]\ncell_idle_ms = 300\n"));
        let a = d.create("acme").await;
        assert_eq!(exec(&d.tenant(&a), &["true"]).await.status, 200);
        let holder = holder_of(&cells(&d).await, "acme").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while alive(holder) {
            assert!(std::time::Instant::now() < deadline, "idle cell kept");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(holder_of(&cells(&d).await, "acme"), None);
        // The next run makes a new one.
        assert_eq!(exec(&d.tenant(&a), &["true"]).await.status, 200);
        assert!(holder_of(&cells(&d).await, "acme").is_some());
    }
}
