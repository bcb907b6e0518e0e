//! Per-run cgroups, when the daemon has a delegated cgroup v2 subtree.
//!
//! Layout under the daemon's own cgroup `<base>` (prepared once by
//! [`crate::policy::cgroups::prepare_tree`]):
//! `<base>/daemon` holds the daemon and the spawner; `<base>/runs/<tenant>` groups one
//! tenant's runs (equal `cpu.weight`, so CPU is shared per tenant, not per run);
//! `<base>/runs/<tenant>/<run id>` is one sandbox with `memory.max` and `pids.max`.
//!
//! A new run is placed by moving the (single-threaded) spawner into the run's cgroup just
//! for the clone and back to `<base>/daemon` after it, so the sandbox starts inside its
//! cgroup before it runs a single instruction of its own.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where a run goes, sent with the run request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// `<base>/runs/<tenant>`.
    pub tenant_dir: String,
    /// `<base>/daemon`, where the spawner returns after the clone.
    pub home: String,
}

/// One run's cgroup.
#[derive(Debug)]
pub struct RunCgroup {
    dir: PathBuf,
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| format!("cgroup {}: {e}", path.display()))
}

fn mkdir(path: &Path) -> Result<bool, String> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(format!("cgroup mkdir {}: {e}", path.display())),
    }
}

impl RunCgroup {
    /// Makes `<tenant_dir>/<id>` with the run's limits (fails closed: a limit that cannot
    /// be written fails the run).
    pub fn create(
        at: &Placement,
        id: u64,
        memory_bytes: u64,
        pids: u64,
    ) -> Result<RunCgroup, String> {
        let tenant = Path::new(&at.tenant_dir);
        if mkdir(tenant)? {
            write(&tenant.join("cgroup.subtree_control"), "+memory +pids")?;
        }
        let dir = tenant.join(id.to_string());
        mkdir(&dir)?;
        let run = RunCgroup { dir };
        write(&run.dir.join("memory.max"), &memory_bytes.to_string())?;
        write(&run.dir.join("pids.max"), &pids.to_string())?;
        // Without swap accounting the file is absent; then there is no swap to limit.
        let swap = run.dir.join("memory.swap.max");
        if swap.exists() {
            write(&swap, "0")?;
        }
        Ok(run)
    }

    /// Moves the calling process into this cgroup (the next clone starts there).
    pub fn enter(&self) -> Result<(), String> {
        write(&self.dir.join("cgroup.procs"), "0")
    }

    /// Moves the calling process back to `home`.
    pub fn leave(at: &Placement) -> Result<(), String> {
        write(&Path::new(&at.home).join("cgroup.procs"), "0")
    }

    /// CPU time of everything that ran in this cgroup, in microseconds.
    pub fn cpu_us(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.dir.join("cpu.stat")).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Removes the (empty) cgroup after its run was reaped.
    pub fn remove(self) {
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            eprintln!("bulkhead spawner: rmdir {}: {e}", self.dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_cgroup_gets_its_limits_and_placement_writes() {
        let base = std::env::temp_dir().join(format!("bulkhead-cgrun-{}", crate::auth::trace_id()));
        std::fs::create_dir_all(base.join("runs")).unwrap();
        std::fs::create_dir_all(base.join("daemon")).unwrap();
        std::fs::write(base.join("daemon/cgroup.procs"), "").unwrap();
        let at = Placement {
            tenant_dir: base.join("runs/acme").display().to_string(),
            home: base.join("daemon").display().to_string(),
        };
        // A plain directory stands in for cgroupfs: the files are created by the writes.
        std::fs::create_dir_all(&at.tenant_dir).unwrap();
        std::fs::write(base.join("runs/acme/cgroup.subtree_control"), "").unwrap();
        std::fs::create_dir_all(base.join("runs/acme/7")).unwrap();
        for f in ["memory.max", "pids.max", "cgroup.procs"] {
            std::fs::write(base.join("runs/acme/7").join(f), "").unwrap();
        }
        std::fs::write(
            base.join("runs/acme/7/cpu.stat"),
            "usage_usec 1234\nuser_usec 1000\n",
        )
        .unwrap();
        let run = RunCgroup::create(&at, 7, 1 << 30, 64).unwrap();
        run.enter().unwrap();
        RunCgroup::leave(&at).unwrap();
        let read = |f: &str| std::fs::read_to_string(base.join(f)).unwrap();
        assert_eq!(read("runs/acme/7/memory.max"), "1073741824");
        assert_eq!(read("runs/acme/7/pids.max"), "64");
        assert_eq!(read("runs/acme/7/cgroup.procs"), "0");
        assert_eq!(read("daemon/cgroup.procs"), "0");
        assert_eq!(run.cpu_us(), Some(1234));
        // A limit that cannot be written fails the run.
        let bad = Placement {
            tenant_dir: "/proc/bulkhead-no-such/runs/x".into(),
            home: at.home.clone(),
        };
        assert!(RunCgroup::create(&bad, 1, 1 << 30, 64).is_err());
        std::fs::remove_dir_all(base).unwrap();
    }
}
