//! Per-tenant cells: a user and a network namespace made once and held by a holder
//! process, which runs of one tenant then join (each still getting fresh mount, pid, ipc,
//! uts and cgroup namespaces; see `child::cell_shim_main`). Creating the user and network
//! namespaces is most of a cold start, and a tenant's own network namespace is where its
//! governed egress lives.
//!
//! A cell also holds two mount namespaces owned by its user namespace: a copy of the
//! host's mounts, where a run's shim finds and clones the work dir, and the cell's root,
//! the read-only system view (`/usr`, `/etc`, `/dev`, mount points for `/work`, `/tmp`
//! and `/proc`) built once by the holder and made private. Each run starts in its own
//! copy of that root and adds only its work dir, a fresh `/tmp` and its own `/proc`, so
//! the system view is shared read-only by the runs of one tenant and by no one else.
//!
//! The holder (`child::holder_main`) is pid 1 of a pid namespace of its own, mapped like
//! a sandbox (sandbox uid 1000 = the tenant's host uid), has no capabilities, and runs
//! under its own filter that allows nothing but waiting, dropping its copy of the
//! spawner's memory (`madvise(MADV_DONTNEED)`) and exiting. It dies with the
//! thread that created it. Dropping a [`Cell`] kills and reaps it; the namespaces then
//! go away with the last run in them.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::wait::{Id, WaitPidFlag, waitid};

use super::child::{CellEntry, HOST_VIEW_READY, HolderArgs, REPORT_BYTES, Report, holder_main};
use super::error::{SandboxError, Step};
use super::plan::SystemLayout;
use super::spawn::{SignalsBlocked, Stacks, pipe_high};
use super::spec::{HostIds, SANDBOX_GID, SANDBOX_UID};
use super::{seccomp, sys};

/// How long a holder may take to get ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A held user + network namespace pair for one tenant.
#[derive(Debug)]
pub struct Cell {
    pid: i32,
    pidfd: OwnedFd,
    userns: OwnedFd,
    netns: OwnedFd,
    host_view: OwnedFd,
    template: OwnedFd,
    entry: CellEntry,
    ids: HostIds,
    proxy: Option<(u16, OwnedFd)>,
}

impl Cell {
    /// Makes a cell whose sandbox user maps to `host` (required for a root caller, and
    /// never uid/gid 0; an unprivileged caller can only map its own ids). With
    /// `proxy_port`, the cell's network namespace gets a TCP socket listening on
    /// 127.0.0.1:`proxy_port`, made by the holder in that namespace and handed to the
    /// caller ([`Cell::proxy_listener`]), who serves it; runs in the cell may connect to
    /// that port and no other.
    pub fn create(host: Option<HostIds>, proxy_port: Option<u16>) -> Result<Cell, SandboxError> {
        let root = nix::unistd::geteuid().is_root();
        let ids = if root {
            let ids = host.ok_or_else(|| {
                SandboxError::HostIdentity("a root caller must name the cell's host ids".into())
            })?;
            if ids.uid == 0 || ids.gid == 0 {
                return Err(SandboxError::HostIdentity(
                    "a cell must not map to host uid or gid 0".into(),
                ));
            }
            ids
        } else {
            super::resolve_host_ids(host, HostIds { uid: 0, gid: 0 })?.0
        };
        let layout = SystemLayout::get()?;
        let (sync_r, sync_w) = pipe_high()?;
        let (rep_r, rep_w) = pipe_high()?;
        let stacks = Stacks::new()?;
        // The holder closes everything but its two pipes, so the number after theirs is
        // free there for the listener.
        let proxy_fd = sync_r.as_raw_fd().max(rep_w.as_raw_fd()) + 1;
        let mut args = HolderArgs {
            sync_fd: sync_r.as_raw_fd(),
            report_fd: rep_w.as_raw_fd(),
            seccomp: seccomp::holder_program(),
            proxy_fd: if proxy_port.is_some() { proxy_fd } else { -1 },
            proxy_port: proxy_port.unwrap_or(0),
            layout,
        };
        let mut pidfd: libc::c_int = -1;
        let pid = {
            let _blocked = SignalsBlocked::new()?;
            let args_ptr: *mut HolderArgs = &mut args;
            // SAFETY: without CLONE_VM the holder runs on its own copy of our memory
            // (stack region and `args` included); it only makes raw syscalls.
            unsafe {
                libc::clone(
                    holder_main,
                    stacks.top(0),
                    libc::CLONE_NEWUSER
                        | libc::CLONE_NEWNET
                        | libc::CLONE_NEWPID
                        | libc::CLONE_PIDFD
                        | libc::SIGCHLD,
                    args_ptr.cast(),
                    &mut pidfd as *mut libc::c_int,
                )
            }
        };
        if pid < 0 {
            return Err(SandboxError::parent("clone(cell holder)", Errno::last()));
        }
        drop(sync_r);
        drop(rep_w);
        // SAFETY: clone stored a fresh pidfd that only we own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        let abort = |op: &'static str, e: Errno| {
            let _killed = sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL);
            let _reaped = waitid(Id::PIDFd(pidfd.as_fd()), WaitPidFlag::WEXITED);
            SandboxError::parent(op, e)
        };
        let write = |file: &str, data: &str| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(format!("/proc/{pid}/{file}"))
                .and_then(|mut f| std::io::Write::write_all(&mut f, data.as_bytes()))
                .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
        };
        // An unprivileged gid_map needs setgroups denied first; a root caller keeps
        // setgroups so that runs can drop root's supplementary groups.
        if !root && let Err(e) = write("setgroups", "deny") {
            return Err(abort("write(/proc/<holder>/setgroups)", e));
        }
        if let Err(e) = write("gid_map", &format!("{SANDBOX_GID} {} 1\n", ids.gid)) {
            return Err(abort("write(/proc/<holder>/gid_map)", e));
        }
        if let Err(e) = write("uid_map", &format!("{SANDBOX_UID} {} 1\n", ids.uid)) {
            return Err(abort("write(/proc/<holder>/uid_map)", e));
        }
        if let Err(e) = nix::unistd::write(&sync_w, &[1u8]) {
            return Err(abort("write(sync)", e));
        }
        // Our unreaped child cannot have been replaced by another process under the same
        // pid, so these are the holder's namespaces while it is alive.
        let open_ns = |name: &str| {
            nix::fcntl::open(
                format!("/proc/{pid}/ns/{name}").as_str(),
                nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
        };
        let mut host_view = None;
        let mut buf = [0u8; REPORT_BYTES];
        let mut got = 0usize;
        let timeout = PollTimeout::try_from(READY_TIMEOUT).unwrap_or(PollTimeout::MAX);
        loop {
            let mut fds = [PollFd::new(rep_r.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(0) => return Err(abort("cell holder setup", Errno::ETIMEDOUT)),
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(abort("poll(report)", e)),
            }
            match nix::unistd::read(&rep_r, &mut buf[got..]) {
                Ok(0) => break,
                Ok(1) if got == 0 && buf[0] == HOST_VIEW_READY && host_view.is_none() => {
                    // The holder sits in the cell's copy of the host's mounts: take it,
                    // then let the holder go on to build the cell's root.
                    match open_ns("mnt") {
                        Ok(fd) => host_view = Some(fd),
                        Err(e) => return Err(abort("open(/proc/<holder>/ns/mnt)", e)),
                    }
                    if let Err(e) = nix::unistd::write(&sync_w, &[1u8]) {
                        return Err(abort("write(sync)", e));
                    }
                }
                Ok(n) => {
                    got += n;
                    if got == REPORT_BYTES {
                        break;
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(abort("read(report)", e)),
            }
        }
        drop(stacks);
        if got == REPORT_BYTES {
            let report = Report::from_bytes(&buf);
            let _reaped = waitid(Id::PIDFd(pidfd.as_fd()), WaitPidFlag::WEXITED);
            let step = Step::from_raw(report.step)
                .ok_or(SandboxError::SilentSetupExit(report.step as i32))?;
            return Err(SandboxError::Setup {
                step,
                detail: Some("cell holder".into()),
                errno: Errno::from_raw(report.errno),
            });
        }
        // The pipe closed: ready, unless the holder died instead (checked below).
        let (userns, netns, template) = match (open_ns("user"), open_ns("net"), open_ns("mnt")) {
            (Ok(u), Ok(n), Ok(m)) => (u, n, m),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                return Err(abort("open(/proc/<holder>/ns)", e));
            }
        };
        let Some(host_view) = host_view else {
            return Err(abort("cell holder setup", Errno::ESRCH));
        };
        let proxy = match proxy_port {
            Some(port) => match sys::pidfd_getfd(pidfd.as_fd(), proxy_fd) {
                Ok(fd) => Some((port, fd)),
                Err(e) => return Err(abort("pidfd_getfd(egress proxy listener)", e)),
            },
            None => None,
        };
        let cell = Cell {
            pid,
            pidfd,
            userns,
            netns,
            host_view,
            template,
            entry: if root {
                CellEntry::DropGroups
            } else {
                CellEntry::KeepGroups
            },
            ids,
            proxy,
        };
        if !cell.is_alive() {
            return Err(SandboxError::parent("cell holder", Errno::ESRCH));
        }
        Ok(cell)
    }

    /// Whether the holder still runs (a dead cell must be made again).
    pub fn is_alive(&self) -> bool {
        let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0))
    }

    /// The egress proxy's port in the cell, if it has one.
    pub fn proxy_port(&self) -> Option<u16> {
        self.proxy.as_ref().map(|(port, _)| *port)
    }

    /// The listening socket of the egress proxy (in the cell's network namespace), for
    /// the caller to serve.
    pub fn proxy_listener(&self) -> Option<BorrowedFd<'_>> {
        self.proxy.as_ref().map(|(_, fd)| fd.as_fd())
    }

    /// The holder's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The host ids the cell's sandbox user maps to.
    pub fn host_ids(&self) -> HostIds {
        self.ids
    }

    /// Inode numbers of the cell's user and network namespaces (what `/proc/self/ns/*`
    /// shows inside its runs).
    pub fn namespace_inodes(&self) -> Result<(u64, u64), SandboxError> {
        let ino = |fd: &OwnedFd| {
            nix::sys::stat::fstat(fd)
                .map(|st| st.st_ino)
                .map_err(|e| SandboxError::parent("fstat(namespace)", e))
        };
        Ok((ino(&self.userns)?, ino(&self.netns)?))
    }

    /// Kills the holder now (runs in the cell keep running until they end or are killed;
    /// no new run can join).
    pub fn kill(&self) {
        let _killed = sys::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGKILL);
    }

    /// What a run's shim joins: the user and network namespaces, the host view, the
    /// cell's root, and how to become the sandbox user there.
    pub(crate) fn join_fds(&self) -> (RawFd, RawFd, RawFd, RawFd, CellEntry) {
        (
            self.userns.as_raw_fd(),
            self.netns.as_raw_fd(),
            self.host_view.as_raw_fd(),
            self.template.as_raw_fd(),
            self.entry,
        )
    }
}

impl Drop for Cell {
    fn drop(&mut self) {
        self.kill();
        let _reaped = waitid(Id::PIDFd(self.pidfd.as_fd()), WaitPidFlag::WEXITED);
    }
}
