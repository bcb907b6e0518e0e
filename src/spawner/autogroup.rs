//! Lowering the CPU priority of runs that last.
//!
//! Without a cgroup CPU controller, a kernel with autogroups shares the CPU between
//! sessions, not processes, and every sandbox is a session of its own (it may not start
//! another: seccomp refuses `setsid`). A tenant's fork bomb therefore weighs as much as
//! the daemon's own spawner, and starting another tenant's run waits behind it. Setting
//! the autogroup's nice value puts the bomb behind the daemon; the kernel lets an
//! unprivileged caller do it only once per 100 ms host-wide, so the spawner does it for
//! runs that have lasted [`GRACE`], oldest first, one per try. Short runs never need it.

use std::time::Duration;

/// How long a run goes before its autogroup is lowered.
pub const GRACE: Duration = Duration::from_millis(10);

/// The kernel's minimum spacing of unprivileged autogroup changes.
pub const SPACING: Duration = Duration::from_millis(100);

/// What one try did.
#[derive(Debug, PartialEq, Eq)]
pub enum Lowered {
    /// The run's autogroup now has the nice value, or never will (gone, no autogroups).
    Done,
    /// The host-wide rate limit: try again after [`SPACING`].
    Later,
}

/// The pid whose session is the run's: the sandbox's pid 1, which is the spawned process
/// itself or, for a run in a cell, the only child of the shim that joined the cell.
pub fn session_pid(spawned: i32, in_cell: bool) -> Option<i32> {
    if !in_cell {
        return Some(spawned);
    }
    let children =
        std::fs::read_to_string(format!("/proc/{spawned}/task/{spawned}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

/// Sets `nice` on the autogroup of `pid`'s session.
pub fn lower(pid: i32, nice: u8) -> Lowered {
    match std::fs::write(format!("/proc/{pid}/autogroup"), nice.to_string()) {
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Lowered::Later,
        Ok(()) => Lowered::Done,
        // ENOENT/ESRCH: the run ended or the kernel has no autogroups; either way there is
        // nothing left to lower. Anything else is reported once and not retried.
        Err(e) => {
            if !matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH)) {
                eprintln!("bulkhead spawner: /proc/{pid}/autogroup: {e}");
            }
            Lowered::Done
        }
    }
}
