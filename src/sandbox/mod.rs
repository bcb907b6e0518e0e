//! The isolation core: a rootless sandbox built directly from kernel primitives.
//!
//! It knows nothing of tenants, tokens or HTTP: it takes a [`SandboxSpec`] and returns an
//! [`Outcome`]. The sequence (see `child.rs`) is: clone into fresh user, mount, pid, ipc,
//! uts, cgroup and network namespaces; map one host uid/gid to the sandbox user; build a
//! read-only tmpfs root with read-only system binds, a synthesized `/etc`, `/work`,
//! a size-limited `/tmp`, its own `/proc` and a minimal `/dev`; `pivot_root` and detach the
//! host root; Landlock; rlimits; new session; drop every capability; no_new_privs;
//! default-deny seccomp; exec. A run in a cell (`cell.rs`) joins the cell's user and
//! network namespaces instead and starts from a copy of the cell's prebuilt root, adding
//! only `/work`, `/tmp` and `/proc`. All `unsafe` in the crate lives in this module, the one
//! place that lifts the crate-wide `unsafe_code = "deny"`.
#![allow(unsafe_code)]

pub mod cell;
pub mod channel;
mod child;
pub mod error;
pub mod landlock;
mod plan;
pub mod seccomp;
mod seccomp_tree;
mod spawn;
pub mod spec;
mod sys;

pub use cell::Cell;
pub use error::{SandboxError, Step};
pub use spawn::{Exit, Outcome, Running, Teardown, resolve_host_ids, run, spawn};
pub use spec::{HostIds, Limits, OutputMode, SandboxSpec, StdinSource};
