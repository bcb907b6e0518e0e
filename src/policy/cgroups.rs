//! Detects, once at start, whether cgroup v2 limits can be used: a cgroup2 mount, our
//! own cgroup in it, the memory, pids and cpu controllers available there, and a subtree
//! we may write (systemd `Delegate=yes`). If so, [`setup`] lays out the tree the spawner
//! places runs in (see `spawner::cgroup`): memory and pids are then limited per run, and
//! CPU is shared per tenant. Otherwise limits are rlimits. The daemon logs and reports
//! which, and why.

use std::path::{Path, PathBuf};

/// What the detection found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Cgroups {
    /// A delegated cgroup v2 subtree with the needed controllers, set up and in use.
    Delegated {
        /// Our cgroup directory.
        path: String,
    },
    /// Not usable; limits are rlimits.
    Unavailable {
        /// Why.
        reason: String,
    },
}

const NEEDED: [&str; 3] = ["memory", "pids", "cpu"];

/// Detects a delegated subtree and lays out the tree in it. Call while the process is
/// single-threaded and before the spawner starts, so that both live in `<path>/daemon`.
pub fn setup() -> Cgroups {
    match find().and_then(|p| layout(&p).map(|()| p)) {
        Ok(path) => Cgroups::Delegated {
            path: path.display().to_string(),
        },
        Err(reason) => Cgroups::Unavailable { reason },
    }
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("{}: {e}", path.display()))
}

fn mkdir(path: &Path) -> Result<(), String> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// `<path>/daemon` takes this process (a cgroup with children may hold no processes),
/// then the controllers are enabled for `<path>`'s children and for `<path>/runs`'s.
fn layout(path: &Path) -> Result<(), String> {
    // Only a cgroup of our own: never the root cgroup, never one shared with others
    // (moving them or enabling controllers there would change processes not ours).
    let procs = std::fs::read_to_string(path.join("cgroup.procs"))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let me = std::process::id().to_string();
    if procs.lines().any(|p| p.trim() != me) {
        return Err(format!(
            "{} holds other processes; give the daemon a cgroup of its own (systemd Delegate=yes)",
            path.display()
        ));
    }
    let home = path.join("daemon");
    mkdir(&home)?;
    write(&home.join("cgroup.procs"), "0")?;
    write(&path.join("cgroup.subtree_control"), "+cpu +memory +pids")?;
    let runs = path.join("runs");
    mkdir(&runs)?;
    write(&runs.join("cgroup.subtree_control"), "+cpu +memory +pids")
}

/// Where a tenant's runs go, when cgroups are in use.
pub fn placement(c: &Cgroups, tenant: &str) -> Option<crate::spawner::cgroup::Placement> {
    match c {
        Cgroups::Delegated { path } => {
            let base = Path::new(path);
            Some(crate::spawner::cgroup::Placement {
                tenant_dir: base.join("runs").join(tenant).display().to_string(),
                home: base.join("daemon").display().to_string(),
            })
        }
        Cgroups::Unavailable { .. } => None,
    }
}

fn find() -> Result<PathBuf, String> {
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    find_in(&own, &mounts)
}

/// The decision, from the texts of `/proc/self/cgroup` and `/proc/self/mountinfo`.
fn find_in(own: &str, mounts: &str) -> Result<PathBuf, String> {
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("this process is in no cgroup v2 hierarchy")?;
    if rel.trim() == "/" {
        return Err("this process is in the root cgroup, not a delegated one".into());
    }
    let mount = mounts
        .lines()
        .find(|l| {
            l.split(" - ")
                .nth(1)
                .is_some_and(|t| t.starts_with("cgroup2 "))
        })
        .and_then(|l| l.split_whitespace().nth(4))
        .ok_or("no cgroup2 filesystem is mounted")?;
    let dir = Path::new(mount).join(rel.trim_start_matches('/'));
    let controllers = std::fs::read_to_string(dir.join("cgroup.controllers"))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let have: Vec<&str> = controllers.split_whitespace().collect();
    let missing: Vec<&str> = NEEDED
        .iter()
        .copied()
        .filter(|c| !have.contains(c))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "cgroup v2 at {} lacks the {} controller(s) (on this host they are bound to cgroup v1)",
            dir.display(),
            missing.join(", ")
        ));
    }
    nix::unistd::access(
        &dir.join("cgroup.subtree_control"),
        nix::unistd::AccessFlags::W_OK,
    )
    .map_err(|e| {
        format!(
            "{}: not delegated to us ({e}); run under systemd with Delegate=yes",
            dir.display()
        )
    })?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(controllers: &str, writable: bool) -> (PathBuf, String) {
        let root = std::env::temp_dir().join(format!("bulkhead-cg-{}", crate::auth::trace_id()));
        let dir = root.join("svc");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.controllers"), controllers).unwrap();
        if writable {
            std::fs::write(dir.join("cgroup.subtree_control"), "").unwrap();
        }
        let mountinfo = format!(
            "41 31 0:38 / {} rw,relatime - cgroup2 cgroup2 rw\n",
            root.display()
        );
        (root, mountinfo)
    }

    #[test]
    fn each_missing_piece_is_named() {
        assert!(
            find_in("1:cpu:/\n", "")
                .unwrap_err()
                .contains("no cgroup v2")
        );
        assert!(
            find_in("0::/svc\n", "1 2 0:1 / /proc rw - proc proc rw\n")
                .unwrap_err()
                .contains("no cgroup2")
        );
        assert!(find_in("0::/\n", "").unwrap_err().contains("root cgroup"));
        let (root, mi) = fake("hugetlb io", true);
        let e = find_in("0::/svc\n", &mi).unwrap_err();
        assert!(e.contains("memory, pids, cpu"), "{e}");
        let (root2, mi2) = fake("cpu io memory pids", false);
        let e = find_in("0::/svc\n", &mi2).unwrap_err();
        assert!(e.contains("Delegate=yes"), "{e}");
        let (root3, mi3) = fake("cpu io memory pids", true);
        assert_eq!(find_in("0::/svc\n", &mi3).unwrap(), root3.join("svc"));
        for r in [root, root2, root3] {
            std::fs::remove_dir_all(r).unwrap();
        }
    }
}
