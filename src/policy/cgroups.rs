//! Detects, once at start, whether cgroup v2 limits could be used: a cgroup2 mount, our
//! own cgroup in it, the memory, pids and cpu controllers available there, and a subtree
//! we may write (systemd `Delegate=yes`). Limits are rlimits until then; the daemon logs
//! and reports which, and why.

use std::path::{Path, PathBuf};

/// What the detection found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Cgroups {
    /// A delegated cgroup v2 subtree with the needed controllers.
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

/// Looks at `/proc/self/cgroup` and `/proc/self/mountinfo`.
pub fn detect() -> Cgroups {
    match find() {
        Ok(path) => Cgroups::Delegated {
            path: path.display().to_string(),
        },
        Err(reason) => Cgroups::Unavailable { reason },
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
            find_in("0::/\n", "1 2 0:1 / /proc rw - proc proc rw\n")
                .unwrap_err()
                .contains("no cgroup2")
        );
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
