//! Messages between the daemon and the spawner.

use serde::{Deserialize, Serialize};

/// Limits of one run (the daemon has already applied the admin maxima).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RunLimits {
    /// Wall-clock limit; the spawner kills the sandbox when it passes.
    pub timeout_ms: u64,
    /// RLIMIT_NPROC.
    pub pids: u64,
    /// RLIMIT_AS.
    pub memory_bytes: u64,
    /// RLIMIT_CPU in seconds (what is left of the tenant's daily CPU).
    #[serde(default)]
    pub cpu_s: Option<u64>,
    /// The run's cgroup, when the daemon has a delegated cgroup v2 subtree: memory and
    /// pids are then limited there instead of by RLIMIT_AS.
    #[serde(default)]
    pub cgroup: Option<super::cgroup::Placement>,
    /// Run in the tenant's cell (made on first use, kept this many milliseconds after its
    /// last run ends); `None`: a sandbox with fresh user and network namespaces.
    #[serde(default)]
    pub cell_idle_ms: Option<u64>,
    /// Nice value of the run's processes and autogroup (0: unchanged).
    #[serde(default)]
    pub nice: u8,
    /// The tenant has egress: its cell gets a proxy listening on this port, and runs may
    /// connect to it (cells only).
    #[serde(default)]
    pub egress_proxy_port: Option<u16>,
}

/// One held cell, for `GET /admin/status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CellInfo {
    /// The tenant's work dir (the daemon maps it back to the tenant).
    pub work_dir: String,
    /// The holder's pid.
    pub holder_pid: i32,
    /// Since it was made.
    pub age_ms: u64,
    /// Since its last run started or ended.
    pub idle_ms: u64,
    /// Runs it has served.
    pub runs: u64,
    /// Runs in it now.
    pub running: usize,
    /// The holder's resident set (pages shared with the spawner count in full), KiB.
    #[serde(default)]
    pub rss_kib: u64,
    /// The holder's proportional share of memory, KiB.
    #[serde(default)]
    pub pss_kib: u64,
    /// Memory only the holder uses (what dropping the cell frees), KiB.
    #[serde(default)]
    pub uss_kib: u64,
}

/// Daemon → spawner.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "type")]
pub enum Request {
    /// Start a sandbox; the message carries three descriptors: stdin (read end), stdout
    /// and stderr (write ends).
    Run {
        /// Daemon-chosen id, unique per spawner.
        id: u64,
        /// Command.
        argv: Vec<String>,
        /// Extra environment.
        env: Vec<(String, String)>,
        /// Working directory inside the sandbox.
        cwd: Option<String>,
        /// Host work dir.
        work_dir: String,
        /// Host uid/gid (used when the spawner runs as root).
        host_uid: u32,
        /// Host gid.
        host_gid: u32,
        /// Limits.
        limits: RunLimits,
    },
    /// Kill a running sandbox now.
    Kill {
        /// Its id.
        id: u64,
    },
    /// Kill every running sandbox and every cell (daemon-wide halt).
    KillAll,
    /// List the held cells; answered with `Cells` under this id.
    Cells {
        /// Daemon-chosen id, from the same sequence as runs.
        id: u64,
    },
    /// Kill every running sandbox of one tenant (identified by its work dir), including
    /// runs the daemon no longer tracks, and its cell.
    KillTenant {
        /// The tenant's host work dir, as sent in `Run`.
        work_dir: String,
    },
}

/// Spawner → daemon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, tag = "type")]
pub enum Reply {
    /// The command was executed.
    Started {
        /// Run id.
        id: u64,
    },
    /// The sandbox could not be started.
    Failed {
        /// Run id.
        id: u64,
        /// Human-readable cause, e.g. "landlock_restrict_self: EINVAL".
        message: String,
        /// The command itself could not be executed (not found / not executable).
        exec_failure: bool,
        /// The spec was invalid (a client error).
        invalid: bool,
    },
    /// The sandbox ended.
    Exited {
        /// Run id.
        id: u64,
        /// Exit status, when it exited.
        exit_code: Option<i32>,
        /// Signal that ended it.
        signal: Option<i32>,
        /// It was killed at its deadline.
        timed_out: bool,
        /// It was killed on request.
        killed: bool,
        /// Wall time from clone to exit, in milliseconds.
        duration_ms: u64,
        /// CPU time of all the sandbox's processes, in microseconds.
        cpu_us: u64,
    },
    /// The held cells.
    Cells {
        /// The request's id.
        id: u64,
        /// One entry per cell.
        cells: Vec<CellInfo>,
    },
}

impl Reply {
    /// The run this reply is about.
    pub fn id(&self) -> u64 {
        match self {
            Reply::Started { id }
            | Reply::Failed { id, .. }
            | Reply::Exited { id, .. }
            | Reply::Cells { id, .. } => *id,
        }
    }
}
