//! Thin wrappers over syscalls that libc or nix do not cover, used by the parent side.
//! The child side calls these too: none of them allocates.

use std::ffi::{CStr, c_int, c_long};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

use super::landlock;

pub(crate) const OPEN_TREE_CLONE: u32 = 1;
pub(crate) const OPEN_TREE_CLOEXEC: u32 = libc::O_CLOEXEC as u32;
pub(crate) const AT_RECURSIVE: u32 = 0x8000;
pub(crate) const AT_EMPTY_PATH: u32 = libc::AT_EMPTY_PATH as u32;
pub(crate) const MOVE_MOUNT_F_EMPTY_PATH: u32 = 0x4;
pub(crate) const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub(crate) const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub(crate) const MOUNT_ATTR_NODEV: u64 = 0x4;
pub(crate) const MOUNT_ATTR_NOEXEC: u64 = 0x8;
pub(crate) const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
pub(crate) const RESOLVE_NO_SYMLINKS: u64 = 0x04;

/// `struct mount_attr`.
#[repr(C)]
pub(crate) struct MountAttr {
    pub attr_set: u64,
    pub attr_clr: u64,
    pub propagation: u64,
    pub userns_fd: u64,
}

/// `struct open_how`.
#[repr(C)]
pub(crate) struct OpenHow {
    pub flags: u64,
    pub mode: u64,
    pub resolve: u64,
}

fn ret(r: c_long) -> Result<c_long, Errno> {
    if r < 0 { Err(Errno::last()) } else { Ok(r) }
}

/// The Landlock ABI version, or why there is none.
pub(crate) fn landlock_abi() -> Result<u32, Errno> {
    // SAFETY: with a null attr and size 0 the VERSION flag only queries; no memory is read.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<landlock::RulesetAttr>(),
            0usize,
            landlock::CREATE_RULESET_VERSION,
        )
    };
    ret(r).map(|v| v as u32)
}

/// `openat2(dirfd, path, how)`.
pub(crate) fn openat2(
    dirfd: RawFd,
    path: &CStr,
    flags: c_int,
    resolve: u64,
) -> Result<OwnedFd, Errno> {
    let how = OpenHow {
        flags: flags as u64,
        mode: 0,
        resolve,
    };
    // SAFETY: `path` is NUL-terminated and `how` lives across the call with its exact size.
    let r = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd,
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    let fd = ret(r)? as RawFd;
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `pidfd_getfd(pidfd, fd, 0)`: a duplicate (close-on-exec) of descriptor `fd` of the
/// process behind `pidfd`.
pub(crate) fn pidfd_getfd(pidfd: BorrowedFd<'_>, fd: RawFd) -> Result<OwnedFd, Errno> {
    // SAFETY: plain integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0u32) };
    let fd = ret(r)? as RawFd;
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `ioctl(pidfd, PIDFD_GET_MNT_NAMESPACE)` (Linux 6.11), or on older kernels
/// `/proc/<pid>/ns/mnt`: a reference to the mount namespace of the process behind `pidfd`.
pub(crate) fn mount_namespace_of(
    pidfd: BorrowedFd<'_>,
    pid: libc::pid_t,
) -> Result<OwnedFd, Errno> {
    const PIDFD_GET_MNT_NAMESPACE: libc::c_ulong = 0xFF03;
    // SAFETY: an argument-less ioctl on a descriptor we hold.
    let r = unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_MNT_NAMESPACE as _, 0) };
    match ret(c_long::from(r)) {
        // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }),
        Err(Errno::ENOTTY | Errno::EINVAL) => {
            let path = format!("/proc/{pid}/ns/mnt");
            nix::fcntl::open(
                path.as_str(),
                nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
        }
        Err(e) => Err(e),
    }
}

/// `pidfd_send_signal(pidfd, sig, NULL, 0)`.
pub(crate) fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: c_int) -> Result<(), Errno> {
    // SAFETY: plain integer arguments; a null siginfo means "as if by kill(2)".
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<u8>(),
            0u32,
        )
    };
    ret(r).map(|_| ())
}

/// How a reaped child ended, and the CPU time it and its reaped descendants used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reaped {
    /// Exit status, when it exited.
    pub code: Option<i32>,
    /// The signal that ended it.
    pub signal: Option<i32>,
    /// User plus system CPU time, in microseconds. A pid namespace's init reaps every
    /// process of the namespace (the kernel reaps the rest when init dies), so for a
    /// sandbox this is the CPU time of all its processes.
    pub cpu_us: u64,
}

/// `waitid(P_PIDFD, pidfd, WEXITED | flags)` with the raw syscall's fifth argument, the
/// rusage that libc's wrapper drops. `Ok(None)`: still running (with `WNOHANG`).
pub(crate) fn waitid_pidfd(pidfd: BorrowedFd<'_>, nohang: bool) -> Result<Option<Reaped>, Errno> {
    const P_PIDFD: c_int = 3;
    let flags = libc::WEXITED | if nohang { libc::WNOHANG } else { 0 };
    // SAFETY: both are plain C structs for which all-zero bytes are a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `info` and `usage` are live, writable and of the sizes the kernel expects.
    let r = unsafe {
        libc::syscall(
            libc::SYS_waitid,
            P_PIDFD,
            pidfd.as_raw_fd(),
            &mut info as *mut libc::siginfo_t,
            flags,
            &mut usage as *mut libc::rusage,
        )
    };
    ret(r)?;
    // SAFETY: after a successful waitid the kernel filled the SIGCHLD fields of `info`
    // (or left si_pid zero when nothing was reaped with WNOHANG).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    let micros = |t: libc::timeval| (t.tv_sec.max(0) as u64) * 1_000_000 + t.tv_usec.max(0) as u64;
    let cpu_us = micros(usage.ru_utime) + micros(usage.ru_stime);
    let (code, signal) = match info.si_code {
        libc::CLD_EXITED => (Some(status), None),
        _ => (None, Some(status)),
    };
    Ok(Some(Reaped {
        code,
        signal,
        cpu_us,
    }))
}
