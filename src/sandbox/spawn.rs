//! The parent side: validate, plan, clone, and supervise until the command is gone.

use std::ffi::{CString, c_int, c_void};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::{Pid, pipe2};

use super::cell::Cell;
use super::child::{
    CellEntry, ChildArgs, REPORT_BYTES, Report, ShimArgs, cell_shim_main, sandbox_main,
};
use super::error::{SandboxError, Step};
use super::landlock;
use super::plan::{ChildCtx, SystemLayout, landlock_plan};
use super::seccomp;
use super::spec::{self, HostIds, OutputMode, SANDBOX_GID, SANDBOX_UID, SandboxSpec, StdinSource};
use super::sys;

/// How a finished sandbox ended.
#[derive(Debug)]
pub struct Outcome {
    /// Exit status when the command exited normally.
    pub exit_code: Option<i32>,
    /// The signal that ended the command, if one did.
    pub signal: Option<i32>,
    /// Captured stdout (empty unless captured).
    pub stdout: Vec<u8>,
    /// Captured stderr (empty unless captured).
    pub stderr: Vec<u8>,
    /// More stdout was produced than the cap kept.
    pub stdout_truncated: bool,
    /// More stderr was produced than the cap kept.
    pub stderr_truncated: bool,
    /// The wall-clock limit was hit and the sandbox killed.
    pub timed_out: bool,
    /// The caller cancelled the run (see [`Running::wait_cancellable`]).
    pub cancelled: bool,
    /// From just before the clone to the command's end.
    pub duration: Duration,
    /// CPU time (user + system) of all the sandbox's processes, in microseconds.
    pub cpu_us: u64,
    /// The Landlock ABI the sandbox was restricted with; `None` only for a degraded
    /// sandbox the caller explicitly allowed on a kernel without Landlock.
    pub landlock_abi: Option<u32>,
    /// The run's mount namespace, released when this outcome is dropped.
    pub teardown: Teardown,
}

/// A reference to a finished run's mount namespace. Every process of the run is gone;
/// what is left is the kernel unmounting the run's tree, which waits for an RCU grace
/// period. Holding this reference moves that wait from the run's end (where it would
/// delay the outcome) to wherever the caller drops it.
#[derive(Debug, Default)]
pub struct Teardown {
    _mount_ns: Option<OwnedFd>,
}

impl Outcome {
    /// The status a shell would report: the exit code, or 128 + signal.
    pub fn shell_status(&self) -> i32 {
        match (self.exit_code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 128,
        }
    }
}

/// How a reaped sandbox ended (see [`Running::try_wait`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit status when it exited normally.
    pub code: Option<i32>,
    /// The signal that ended it.
    pub signal: Option<i32>,
    /// CPU time (user + system) of all the sandbox's processes, in microseconds.
    pub cpu_us: u64,
}

/// A started sandbox. Dropping it without waiting kills the sandbox.
#[derive(Debug)]
pub struct Running {
    pid: Pid,
    pidfd: OwnedFd,
    stdin: Option<(OwnedFd, Vec<u8>)>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    relays: [Option<OwnedFd>; 2],
    max_output: usize,
    deadline: Option<Instant>,
    started: Instant,
    reaped: bool,
    landlock_abi: Option<u32>,
    /// The run's mount namespace (see [`Teardown`]); `None` if the run ended before we
    /// could take it, in which case its exit did the teardown.
    mount_ns: Option<OwnedFd>,
    /// The stacks of a cell shim that shares our memory: unmapped only after `Drop` has
    /// reaped it (fields drop after `drop` runs).
    _stacks: Option<Stacks>,
}

/// Runs `spec` to completion.
pub fn run(spec: SandboxSpec) -> Result<Outcome, SandboxError> {
    spawn(spec)?.wait()
}

/// Resolves which unprivileged host ids the sandbox maps to.
///
/// An unprivileged caller can only map itself. A root caller must never run a sandbox as
/// host uid 0 (the kernel exempts uid 0 from RLIMIT_NPROC and an escape must not land as
/// root): it uses `requested`, or else the work dir's owner when that is not root.
pub fn resolve_host_ids(
    requested: Option<HostIds>,
    work_owner: HostIds,
) -> Result<(HostIds, bool), SandboxError> {
    let euid = nix::unistd::geteuid().as_raw();
    let egid = nix::unistd::getegid().as_raw();
    if euid != 0 {
        return match requested {
            Some(r) if r.uid != euid || r.gid != egid => Err(SandboxError::HostIdentity(format!(
                "an unprivileged caller can only map its own ids ({euid}:{egid}), not {}:{}",
                r.uid, r.gid
            ))),
            _ => Ok((
                HostIds {
                    uid: euid,
                    gid: egid,
                },
                false,
            )),
        };
    }
    let ids = match requested {
        Some(r) => r,
        None if work_owner.uid != 0 && work_owner.gid != 0 => work_owner,
        None => {
            return Err(SandboxError::HostIdentity(
                "running as root and the work dir is owned by root: give an unprivileged host uid/gid (--host-uid/--host-gid) or chown the work dir to one"
                    .into(),
            ));
        }
    };
    if ids.uid == 0 || ids.gid == 0 {
        return Err(SandboxError::HostIdentity(
            "the sandbox must not map to host uid or gid 0".into(),
        ));
    }
    Ok((ids, true))
}

/// Opens the work dir refusing `..` components and any symlink on the way.
fn open_work_dir(
    path: &Path,
) -> Result<(PathBuf, OwnedFd, nix::sys::stat::FileStat), SandboxError> {
    let shown = path.display().to_string();
    let refuse = |reason: String| SandboxError::WorkDir {
        path: shown.clone(),
        reason,
    };
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(refuse("'..' components are refused".into()));
    }
    let abs = std::path::absolute(path).map_err(|e| refuse(e.to_string()))?;
    let c =
        CString::new(abs.as_os_str().as_bytes()).map_err(|_| refuse("path holds NUL".into()))?;
    let fd = sys::openat2(
        libc::AT_FDCWD,
        &c,
        libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        sys::RESOLVE_NO_SYMLINKS | sys::RESOLVE_NO_MAGICLINKS,
    )
    .map_err(|e| {
        refuse(match e {
            Errno::ELOOP => "a component is a symlink (refused: it could lead outside)".into(),
            Errno::ENOTDIR => "not a directory".into(),
            other => format!("{other:?}: {}", other.desc()),
        })
    })?;
    let st = nix::sys::stat::fstat(&fd).map_err(|e| refuse(format!("fstat: {e:?}")))?;
    let fs = nix::sys::statfs::fstatfs(&fd).map_err(|e| refuse(format!("fstatfs: {e:?}")))?;
    let fs_type = fs.filesystem_type().0 as i64;
    if let Some((_, name)) = PSEUDO_FS.iter().find(|(magic, _)| *magic == fs_type) {
        return Err(refuse(format!(
            "is on {name}; a work dir must be an ordinary directory"
        )));
    }
    if let Some((_, system)) = system_dir_ids()
        .iter()
        .find(|(id, _)| *id == (st.st_dev, st.st_ino))
    {
        return Err(refuse(format!(
            "is the host's {system}; give a dedicated directory"
        )));
    }
    Ok((abs, fd, st))
}

/// (device, inode) of host directories that must never become a work dir, read once.
fn system_dir_ids() -> &'static [((u64, u64), &'static str)] {
    static IDS: std::sync::OnceLock<Vec<((u64, u64), &'static str)>> = std::sync::OnceLock::new();
    IDS.get_or_init(|| {
        [
            "/", "/usr", "/etc", "/bin", "/sbin", "/lib", "/lib64", "/var", "/boot", "/root",
            "/home", "/opt", "/srv",
        ]
        .iter()
        .filter_map(|p| {
            nix::sys::stat::stat(*p)
                .ok()
                .map(|s| ((s.st_dev, s.st_ino), *p))
        })
        .collect()
    })
}

/// Kernel and pseudo filesystems a work dir must never be on.
const PSEUDO_FS: [(i64, &str); 14] = [
    (0x9fa0, "procfs"),
    (0x6265_6572, "sysfs"),
    (0x1cd1, "devpts"),
    (0x0027_e0eb, "cgroupfs"),
    (0x6367_7270, "cgroup2"),
    (0x7363_6673, "securityfs"),
    (0x6462_6720, "debugfs"),
    (0x7472_6163, "tracefs"),
    (0xcafe_4a11, "bpffs"),
    (0x6e73_6673, "nsfs"),
    (0x6165_676c, "pstore"),
    (0x6265_6570, "configfs"),
    (0xde5e_81e4, "efivarfs"),
    (0xf97c_ff8c, "selinuxfs"),
];

/// A pipe whose both ends are at fd >= 3 and close-on-exec, so the child's dup2 onto
/// 0/1/2 can never clobber a source.
pub(super) fn pipe_high() -> Result<(OwnedFd, OwnedFd), SandboxError> {
    let (r, w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| SandboxError::parent("pipe2", e))?;
    Ok((high(r)?, high(w)?))
}

fn high(fd: OwnedFd) -> Result<OwnedFd, SandboxError> {
    if fd.as_raw_fd() >= 3 {
        return Ok(fd);
    }
    let dup = fcntl(&fd, FcntlArg::F_DUPFD_CLOEXEC(3))
        .map_err(|e| SandboxError::parent("fcntl(F_DUPFD_CLOEXEC)", e))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

fn dev_null() -> Result<OwnedFd, SandboxError> {
    let fd = nix::fcntl::open(
        "/dev/null",
        OFlag::O_RDWR | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| SandboxError::parent("open(/dev/null)", e))?;
    high(fd)
}

/// A private stack region for the clone children, with a guard page below each stack.
#[derive(Debug)]
pub(super) struct Stacks {
    base: *mut c_void,
    len: usize,
}

const STACK_SIZE: usize = 256 * 1024;
const GUARD: usize = 4096;
/// Stack regions kept for reuse once no child runs on them: mapping, guarding and
/// faulting in fresh ones is a measurable part of each start. What a previous run's
/// setup left on them is never read (each clone starts a fresh frame) and never reaches
/// a sandbox (its exec replaces the address space).
static SPARE: std::sync::Mutex<Vec<Stacks>> = std::sync::Mutex::new(Vec::new());
const SPARES: usize = 8;

impl Stacks {
    pub(super) fn new() -> Result<Stacks, SandboxError> {
        if let Some(spare) = SPARE.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(spare);
        }
        let len = 2 * (STACK_SIZE + GUARD);
        // SAFETY: anonymous private mapping with no address hint; checked for MAP_FAILED.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(SandboxError::parent("mmap(stack)", Errno::last()));
        }
        let stacks = Stacks { base, len };
        for i in 0..2 {
            // SAFETY: the guard page lies inside the mapping we just made.
            let r = unsafe {
                libc::mprotect(
                    stacks
                        .base
                        .cast::<u8>()
                        .add(i * (STACK_SIZE + GUARD))
                        .cast(),
                    GUARD,
                    libc::PROT_NONE,
                )
            };
            if r != 0 {
                return Err(SandboxError::parent("mprotect(guard)", Errno::last()));
            }
        }
        Ok(stacks)
    }

    /// Top of stack `i` (stacks grow down on every supported architecture).
    pub(super) fn top(&self, i: usize) -> *mut c_void {
        // SAFETY: the offset is the end of stack i, inside the mapping; 16-byte aligned since
        // the mapping is page aligned and the sizes are multiples of 4096.
        unsafe {
            self.base
                .cast::<u8>()
                .add((i + 1) * (STACK_SIZE + GUARD))
                .cast()
        }
    }
}

// SAFETY: the region is owned by this value alone (children run on it only while the
// owner waits for them or, for a shared-memory cell shim, until the owner reaps it); moving
// the owner to another thread changes none of that.
unsafe impl Send for Stacks {}

impl Drop for Stacks {
    fn drop(&mut self) {
        // No child runs on it any more: both clones have exec'd or exited before clone
        // returned, or (a cell shim sharing our memory) the Running that holds these
        // stacks has reaped it.
        if self.base.is_null() {
            return;
        }
        let mut spare = SPARE.lock().unwrap_or_else(|p| p.into_inner());
        if spare.len() < SPARES {
            spare.push(Stacks {
                base: std::mem::replace(&mut self.base, std::ptr::null_mut()),
                len: self.len,
            });
            return;
        }
        drop(spare);
        // SAFETY: unmaps exactly the region mmap returned, which nothing uses any more.
        unsafe {
            libc::munmap(self.base, self.len);
        }
    }
}

/// Blocks every signal for the calling thread while alive, so no handler of ours runs on
/// the child's stack between clone and exec; restores the old mask on drop.
pub(super) struct SignalsBlocked(SigSet);

impl SignalsBlocked {
    pub(super) fn new() -> Result<SignalsBlocked, SandboxError> {
        let mut old = SigSet::empty();
        pthread_sigmask(
            SigmaskHow::SIG_SETMASK,
            Some(&SigSet::all()),
            Some(&mut old),
        )
        .map_err(|e| SandboxError::parent("pthread_sigmask", e))?;
        Ok(SignalsBlocked(old))
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // Restoring a mask we read ourselves cannot fail; there is nothing to do if it did.
        let _restored = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&self.0), None);
    }
}

const NS_FLAGS: c_int = libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP;

/// Landlock fails closed: without it the sandbox runs only when the caller explicitly
/// accepted a degraded sandbox (`Ok(None)`).
fn landlock_decision(
    abi: Result<u32, Errno>,
    allow_degraded: bool,
) -> Result<Option<u32>, SandboxError> {
    match abi {
        Ok(abi) => Ok(Some(abi)),
        Err(_) if allow_degraded => Ok(None),
        Err(e) => Err(SandboxError::LandlockUnavailable(e)),
    }
}

fn exec_candidates(argv0: &str, env: &[(String, String)]) -> Result<Vec<CString>, SandboxError> {
    let to_c = |s: String| CString::new(s).map_err(|_| spec::invalid("argv[0] holds NUL"));
    if argv0.contains('/') {
        return Ok(vec![to_c(argv0.to_string())?]);
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("/usr/bin:/bin");
    path.split(':')
        .map(|dir| {
            to_c(if dir.is_empty() {
                format!("./{argv0}")
            } else {
                format!("{}/{argv0}", dir.trim_end_matches('/'))
            })
        })
        .collect()
}

/// How long a root caller waits for the child to finish its setup.
const ROOT_SETUP_TIMEOUT_MS: u16 = 30_000;

/// The root path: clone without sharing memory, write the child's id maps from here
/// (only a privileged writer may map a uid other than its own), release the child, and
/// wait for its exec (the report pipe closes) or its report.
fn clone_as_root(ctx: &ChildCtx, stacks: &Stacks) -> Result<(c_int, c_int, Report), SandboxError> {
    let (sync_r, sync_w) = pipe_high()?;
    let (rep_r, rep_w) = pipe_high()?;
    let mut unused = Report::default();
    let mut args = ChildArgs {
        ctx,
        report: &mut unused,
        report_fd: rep_w.as_raw_fd(),
        sync_fd: sync_r.as_raw_fd(),
        cell: CellEntry::No,
        work_mount: -1,
    };
    let mut pidfd: c_int = -1;
    let pid = {
        let _blocked = SignalsBlocked::new()?;
        let args_ptr: *mut ChildArgs = &mut args;
        // SAFETY: without CLONE_VM the child runs on its own copy of our memory (including
        // the stack region and `args`), so nothing it does can touch ours.
        unsafe {
            libc::clone(
                sandbox_main,
                stacks.top(0),
                NS_FLAGS | libc::CLONE_PIDFD | libc::SIGCHLD,
                args_ptr.cast(),
                &mut pidfd as *mut c_int,
            )
        }
    };
    if pid < 0 {
        return Err(SandboxError::parent("clone", Errno::last()));
    }
    drop(sync_r);
    drop(rep_w);
    // SAFETY: clone stored a fresh pidfd that only we own.
    let owned_pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let abort = |op: &'static str, e: Errno| {
        let _killed = sys::pidfd_send_signal(owned_pidfd.as_fd(), libc::SIGKILL);
        let _reaped = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
        SandboxError::parent(op, e)
    };
    let to_errno = |e: std::io::Error| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
    let write_map = |file: &str, data: &[u8]| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/{pid}/{file}"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, data))
            .map_err(to_errno)
    };
    if let Err(e) = write_map("uid_map", &ctx.uid_map) {
        return Err(abort("write(/proc/<child>/uid_map)", e));
    }
    if let Err(e) = write_map("gid_map", &ctx.gid_map) {
        return Err(abort("write(/proc/<child>/gid_map)", e));
    }
    if let Err(e) = nix::unistd::write(&sync_w, &[1u8]) {
        return Err(abort("write(sync)", e));
    }
    let mut buf = [0u8; REPORT_BYTES];
    let mut got = 0usize;
    loop {
        let mut fds = [PollFd::new(rep_r.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ROOT_SETUP_TIMEOUT_MS)) {
            Ok(0) => return Err(abort("sandbox setup", Errno::ETIMEDOUT)),
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(abort("poll(report)", e)),
        }
        match nix::unistd::read(&rep_r, &mut buf[got..]) {
            Ok(0) => break,
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
    // Held open until here: the child reads a hang-up as "the parent died".
    drop(sync_w);
    let report = if got == REPORT_BYTES {
        Report::from_bytes(&buf)
    } else {
        Report::default()
    };
    use std::os::fd::IntoRawFd;
    Ok((pid, owned_pidfd.into_raw_fd(), report))
}

/// Starts a run in `cell` through a shim (see `child::cell_shim_main`): the shim is our
/// direct child and the run's pid 1 is its child, so the run's status, CPU time and
/// lifetime all go through the shim. Failures come back through a close-on-exec pipe; its
/// closing without a report means the command was executed.
///
/// For an unprivileged caller the shim shares our memory (`CLONE_VM`, which spares
/// copying our page tables on every run): it and the run's child have the same uid as
/// we do, so nothing is exposed that was not already, and the shim only ever touches its
/// own stack once the child has exec'd. The caller must then keep `stacks` mapped until
/// the shim has been reaped (`true` in the result). A root caller's shim gets its own
/// copy instead, so that no task holding a tenant uid shares a root process's memory.
/// Setup failures written to `errno` by the shim or child land in our thread's `errno`
/// too (same TLS), so this loop never trusts an error code while they run: any failed
/// poll or read is retried until the deadline.
fn clone_into_cell(
    ctx: &ChildCtx,
    stacks: &Stacks,
    cell: &Cell,
) -> Result<(c_int, c_int, Report, bool), SandboxError> {
    let (rep_r, rep_w) = pipe_high()?;
    let (userns, netns, host_view, template, entry) = cell.join_fds();
    let shared = entry == CellEntry::KeepGroups;
    let mut unused = Report::default();
    let mut args = ShimArgs {
        child: ChildArgs {
            ctx,
            report: &mut unused,
            report_fd: rep_w.as_raw_fd(),
            sync_fd: -1,
            cell: entry,
            work_mount: -1,
        },
        userns,
        netns,
        host_view,
        template,
        child_stack: stacks.top(1),
        caller: nix::unistd::getpid().as_raw(),
    };
    let mut pidfd: c_int = -1;
    let pid = {
        let _blocked = SignalsBlocked::new()?;
        let args_ptr: *mut ShimArgs = &mut args;
        let flags = if shared {
            libc::CLONE_VM | libc::CLONE_PIDFD | libc::SIGCHLD
        } else {
            libc::CLONE_PIDFD | libc::SIGCHLD
        };
        // SAFETY: without CLONE_VM the shim runs on its own copy of our memory. With it,
        // the shim runs on stack 0 and its child on stack 1 of `stacks`, which the caller
        // keeps mapped until the shim is reaped; they read `ctx` and `args` only until the
        // child has exec'd, which is when the report pipe reaches EOF below (both live
        // until then), and afterwards the shim touches nothing but its own stack.
        unsafe {
            libc::clone(
                cell_shim_main,
                stacks.top(0),
                flags,
                args_ptr.cast(),
                &mut pidfd as *mut c_int,
            )
        }
    };
    if pid < 0 {
        return Err(SandboxError::parent("clone(cell shim)", Errno::last()));
    }
    drop(rep_w);
    // SAFETY: clone stored a fresh pidfd that only we own.
    let owned_pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let mut buf = [0u8; REPORT_BYTES];
    let mut got = 0usize;
    let deadline =
        Instant::now() + std::time::Duration::from_millis(u64::from(ROOT_SETUP_TIMEOUT_MS));
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let _killed = sys::pidfd_send_signal(owned_pidfd.as_fd(), libc::SIGKILL);
            let _reaped = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
            return Err(SandboxError::parent("sandbox setup", Errno::ETIMEDOUT));
        }
        let wait = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(rep_r.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, wait) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(_) if shared => continue,
            Err(e) => return Err(SandboxError::parent("poll(report)", e)),
        }
        match nix::unistd::read(&rep_r, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                if got == REPORT_BYTES {
                    break;
                }
            }
            Err(Errno::EINTR) => continue,
            Err(_) if shared => continue,
            Err(e) => return Err(SandboxError::parent("read(report)", e)),
        }
    }
    let report = if got == REPORT_BYTES {
        Report::from_bytes(&buf)
    } else {
        Report::default()
    };
    use std::os::fd::IntoRawFd;
    Ok((pid, owned_pidfd.into_raw_fd(), report, shared))
}

/// Starts `spec` in a fresh sandbox and returns once the command has been executed (or
/// setup has failed, which is reported as the failing step and errno).
pub fn spawn(spec: SandboxSpec) -> Result<Running, SandboxError> {
    spec::validate(&spec)?;
    let env = spec::effective_env(&spec)?;
    let cwd = spec::sandbox_cwd(spec.cwd.as_deref())?;
    let layout = SystemLayout::get()?;
    let program = seccomp::native_program();
    let landlock_abi = landlock_decision(landlock::abi(), spec.allow_degraded_landlock)?;
    let landlock = landlock_abi.map(|abi| {
        let mut plan = landlock_plan(layout, abi);
        if abi >= 4 {
            plan.connect_port = spec
                .cell
                .as_ref()
                .and_then(|c| c.proxy_port())
                .map(u64::from);
        }
        plan
    });
    let (work_abs, _work_fd, st) = open_work_dir(&spec.work_dir)?;
    let (ids, switch) = match &spec.cell {
        Some(cell) => {
            let ids = cell.host_ids();
            if spec.host_ids.is_some_and(|h| h != ids) {
                return Err(SandboxError::HostIdentity(format!(
                    "the cell maps to {}:{}, not the requested host ids",
                    ids.uid, ids.gid
                )));
            }
            (ids, false)
        }
        None => resolve_host_ids(
            spec.host_ids,
            HostIds {
                uid: st.st_uid,
                gid: st.st_gid,
            },
        )?,
    };

    let mut strings = Vec::with_capacity(spec.argv.len() + env.len());
    for a in &spec.argv {
        strings.push(CString::new(a.as_str()).map_err(|_| spec::invalid("argument holds NUL"))?);
    }
    let argc = strings.len();
    for (k, v) in &env {
        strings.push(
            CString::new(format!("{k}={v}")).map_err(|_| spec::invalid("environment holds NUL"))?,
        );
    }
    let mut argv: Vec<*const libc::c_char> = strings[..argc].iter().map(|s| s.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = strings[argc..].iter().map(|s| s.as_ptr()).collect();
    envp.push(std::ptr::null());

    // Standard streams: pipes for what we capture or feed, /dev/null, or the caller's own.
    let mut keep_open: Vec<OwnedFd> = Vec::new();
    let mut stdio: [Option<RawFd>; 3] = [None, None, None];
    let mut stdin_writer = None;
    match spec.stdin {
        StdinSource::Null => {
            let fd = dev_null()?;
            stdio[0] = Some(fd.as_raw_fd());
            keep_open.push(fd);
        }
        StdinSource::Bytes(bytes) => {
            let (r, w) = pipe_high()?;
            stdio[0] = Some(r.as_raw_fd());
            keep_open.push(r);
            stdin_writer = Some((w, bytes));
        }
        StdinSource::Fd(fd) => {
            let fd = high(fd)?;
            stdio[0] = Some(fd.as_raw_fd());
            keep_open.push(fd);
        }
    }
    let mut readers: [Option<OwnedFd>; 2] = [None, None];
    let mut relays: [Option<OwnedFd>; 2] = [None, None];
    for (i, mode) in [spec.stdout, spec.stderr].into_iter().enumerate() {
        match mode {
            OutputMode::Inherit => {}
            OutputMode::Null => {
                let fd = dev_null()?;
                stdio[i + 1] = Some(fd.as_raw_fd());
                keep_open.push(fd);
            }
            OutputMode::Capture => {
                let (r, w) = pipe_high()?;
                stdio[i + 1] = Some(w.as_raw_fd());
                keep_open.push(w);
                readers[i] = Some(r);
            }
            OutputMode::Fd(fd) => {
                let fd = high(fd)?;
                stdio[i + 1] = Some(fd.as_raw_fd());
                keep_open.push(fd);
            }
            OutputMode::Relay(dest) => {
                let (r, w) = pipe_high()?;
                stdio[i + 1] = Some(w.as_raw_fd());
                keep_open.push(w);
                readers[i] = Some(r);
                relays[i] = Some(dest);
            }
        }
    }

    let l = &spec.limits;
    let ctx = ChildCtx {
        layout,
        uid_map: format!("{SANDBOX_UID} {} 1\n", ids.uid).into_bytes(),
        gid_map: format!("{SANDBOX_GID} {} 1\n", ids.gid).into_bytes(),
        work_path: CString::new(work_abs.as_os_str().as_bytes())
            .map_err(|_| spec::invalid("work dir holds NUL"))?,
        work_dev: st.st_dev,
        work_ino: st.st_ino,
        tmp_opts: CString::new(format!(
            "size={},nr_inodes={},mode=1777",
            l.tmp_size_bytes, l.tmp_inodes
        ))
        .map_err(|_| spec::invalid("tmp options"))?,
        cwd: CString::new(cwd).map_err(|_| spec::invalid("cwd holds NUL"))?,
        landlock,
        rlimits: [
            (libc::RLIMIT_NOFILE, l.nofile),
            (libc::RLIMIT_NPROC, l.nproc),
            (libc::RLIMIT_FSIZE, l.fsize_bytes),
            (libc::RLIMIT_CORE, 0),
            (libc::RLIMIT_AS, l.address_space_bytes),
            (
                libc::RLIMIT_CPU,
                l.cpu_seconds.unwrap_or(libc::RLIM_INFINITY),
            ),
            // No raising of scheduling priority, whatever the daemon was allowed.
            (libc::RLIMIT_NICE, 0),
        ],
        nice: (l.nice > 0).then(|| c_int::from(l.nice)),
        stdio,
        seccomp: program,
        exec_candidates: exec_candidates(&spec.argv[0], &env)?,
        argv,
        envp,
        _strings: strings,
    };

    let stacks = Stacks::new()?;
    let mut report = Report::default();
    let started = Instant::now();
    let mut keep_stacks = false;
    let (pid, pidfd, report) = if let Some(cell) = &spec.cell {
        let (pid, pidfd, report, shared) = clone_into_cell(&ctx, &stacks, cell)?;
        keep_stacks = shared;
        (pid, pidfd, report)
    } else if switch {
        clone_as_root(&ctx, &stacks)?
    } else {
        let mut args = ChildArgs {
            ctx: &ctx,
            report: &mut report,
            report_fd: -1,
            sync_fd: -1,
            cell: CellEntry::No,
            work_mount: -1,
        };
        let _blocked = SignalsBlocked::new()?;
        let mut pidfd: c_int = -1;
        let args_ptr: *mut ChildArgs = &mut args;
        // SAFETY: the callback runs on its own stack in our address space and only reads
        // `ctx` and writes `report`, both alive until after clone returns; CLONE_VFORK keeps
        // this thread suspended until the child has exec'd or exited.
        let pid = unsafe {
            libc::clone(
                sandbox_main,
                stacks.top(0),
                NS_FLAGS | libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
                args_ptr.cast(),
                &mut pidfd as *mut c_int,
            )
        };
        if pid < 0 {
            return Err(SandboxError::parent("clone", Errno::last()));
        }
        // SAFETY: the child wrote the report (if at all) before exec'ing or exiting, which
        // happened before clone returned.
        let report = unsafe { std::ptr::read_volatile(&report) };
        (pid, pidfd, report)
    };
    // A shim sharing our memory runs on these stacks until it is reaped.
    let stacks = keep_stacks.then_some(stacks);
    drop(keep_open);
    drop(ctx);
    if report.step != 0 {
        let _status = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
        if pidfd >= 0 {
            // SAFETY: the pidfd was created for us by clone and is closed exactly once here.
            drop(unsafe { OwnedFd::from_raw_fd(pidfd) });
        }
        let step =
            Step::from_raw(report.step).ok_or(SandboxError::SilentSetupExit(report.step as i32))?;
        let detail = match step {
            Step::Execve => Some(spec.argv[0].clone()),
            Step::Mkdir
            | Step::OpenTree
            | Step::MountSetattr
            | Step::MoveMount
            | Step::CreateMountpointFile => layout
                .labels
                .get(report.item as usize)
                .cloned()
                .or_else(|| (report.item == u32::MAX).then(|| "bind /work".into())),
            Step::ChdirCwd => Some(spec::sandbox_cwd(spec.cwd.as_deref()).unwrap_or_default()),
            _ => None,
        };
        return Err(SandboxError::Setup {
            step,
            detail,
            errno: Errno::from_raw(report.errno),
        });
    }
    let sandbox_pid = pid;
    if pidfd < 0 {
        return Err(SandboxError::parent("clone(CLONE_PIDFD)", Errno::EBADF));
    }
    // SAFETY: clone stored a fresh pidfd that only we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // Not having it only means the run's exit pays for the teardown.
    let mount_ns = sys::mount_namespace_of(pidfd.as_fd(), sandbox_pid).ok();
    Ok(Running {
        pid: Pid::from_raw(sandbox_pid),
        pidfd,
        stdin: stdin_writer,
        stdout: readers[0].take(),
        stderr: readers[1].take(),
        relays,
        max_output: spec.limits.max_output_bytes,
        deadline: spec.limits.wall_timeout.map(|t| started + t),
        started,
        reaped: false,
        landlock_abi,
        mount_ns,
        _stacks: stacks,
    })
}

fn set_nonblocking(fd: &OwnedFd) -> Result<(), SandboxError> {
    let flags =
        fcntl(fd, FcntlArg::F_GETFL).map_err(|e| SandboxError::parent("fcntl(F_GETFL)", e))?;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(|e| SandboxError::parent("fcntl(F_SETFL)", e))?;
    Ok(())
}

/// Reads what is available into `buf`, keeping at most `cap` bytes. Returns false at EOF.
/// Reads at most this many chunks per wake-up, so a writer that keeps the pipe full
/// cannot starve the deadline check.
const READS_PER_WAKE: usize = 16;

/// Reads what is available into `sink`. Returns false at EOF.
fn drain(
    fd: &OwnedFd,
    sink: &mut Sink,
    cap: usize,
    truncated: &mut bool,
) -> Result<bool, SandboxError> {
    let mut chunk = [0u8; 65536];
    for _ in 0..READS_PER_WAKE {
        match nix::unistd::read(fd, &mut chunk) {
            Ok(0) => return Ok(false),
            Ok(n) => match sink {
                Sink::Buffer(buf) => {
                    let room = cap.saturating_sub(buf.len());
                    let keep = room.min(n);
                    buf.extend_from_slice(&chunk[..keep]);
                    if keep < n {
                        *truncated = true;
                    }
                }
                Sink::Relay(out) => {
                    // A closed or failing destination drops the output; the command runs on.
                    let _written = std::io::Write::write_all(out, &chunk[..n]);
                }
            },
            Err(Errno::EAGAIN) => return Ok(true),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(SandboxError::parent("read(output)", e)),
        }
    }
    Ok(true)
}

/// Where captured bytes go.
enum Sink {
    Buffer(Vec<u8>),
    Relay(std::fs::File),
}

impl Running {
    /// The sandbox's pid 1, as seen from the caller's pid namespace.
    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// Kills the whole sandbox: SIGKILL to its pid 1 takes its pid namespace down.
    pub fn kill(&self) -> Result<(), SandboxError> {
        match sys::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(SandboxError::parent("pidfd_send_signal", e)),
        }
    }

    /// The pidfd of the sandbox's pid 1: readable once it has exited.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// When the wall-clock limit expires, if there is one.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Reaps the sandbox if it has exited. For callers that run
    /// their own event loop over [`Running::pidfd`] and handle the streams themselves.
    pub fn try_wait(&mut self) -> Result<Option<Exit>, SandboxError> {
        if self.reaped {
            return Err(SandboxError::parent("waitid", Errno::ECHILD));
        }
        match sys::waitid_pidfd(self.pidfd.as_fd(), true) {
            Ok(None) | Err(Errno::EINTR) => Ok(None),
            Ok(Some(r)) => {
                self.reaped = true;
                Ok(Some(Exit {
                    code: r.code,
                    signal: r.signal,
                    cpu_us: r.cpu_us,
                }))
            }
            Err(e) => Err(SandboxError::parent("waitid", e)),
        }
    }

    /// Time since the clone.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The Landlock ABI this sandbox was restricted with.
    pub fn landlock_abi(&self) -> Option<u32> {
        self.landlock_abi
    }

    /// Takes the run's mount namespace reference (see [`Teardown`]), for callers that
    /// reap with [`Running::try_wait`] and want to report before the teardown.
    pub fn take_teardown(&mut self) -> Teardown {
        Teardown {
            _mount_ns: self.mount_ns.take(),
        }
    }

    /// Waits for the command, feeding stdin, capturing output and enforcing the timeout.
    pub fn wait(self) -> Result<Outcome, SandboxError> {
        self.wait_cancellable(None)
    }

    /// As [`Running::wait`]; when `cancel` becomes readable the sandbox is killed and the
    /// outcome says `cancelled`.
    pub fn wait_cancellable(
        mut self,
        cancel: Option<BorrowedFd<'_>>,
    ) -> Result<Outcome, SandboxError> {
        let [relay_out, relay_err] = std::mem::take(&mut self.relays);
        let sink = |r: Option<OwnedFd>| {
            r.map(|fd| Sink::Relay(std::fs::File::from(fd)))
                .unwrap_or(Sink::Buffer(Vec::new()))
        };
        let mut out = [sink(relay_out), sink(relay_err)];
        let mut truncated = [false, false];
        let mut readers = [self.stdout.take(), self.stderr.take()];
        for r in readers.iter().flatten() {
            set_nonblocking(r)?;
        }
        let mut stdin = self.stdin.take();
        if let Some((w, _)) = &stdin {
            set_nonblocking(w)?;
        }
        let mut stdin_pos = 0usize;
        let mut exited = false;
        let mut exit_seen_at = None;
        let (mut timed_out, mut cancelled) = (false, false);
        let mut killed = false;
        loop {
            if exited && readers.iter().all(Option::is_none) {
                break;
            }
            // After exit every sandbox process is gone, so the pipes reach EOF at once; the
            // grace period only bounds a pathological case.
            if exit_seen_at.is_some_and(|at: Instant| at.elapsed() > Duration::from_secs(2)) {
                break;
            }
            let now = Instant::now();
            let mut timeout = PollTimeout::NONE;
            if let (false, Some(deadline)) = (killed, self.deadline) {
                if now >= deadline {
                    self.kill()?;
                    killed = true;
                    timed_out = true;
                    continue;
                }
                let ms = (deadline - now).as_millis().min(i32::MAX as u128) as i32;
                timeout = PollTimeout::try_from(ms.max(1)).unwrap_or(PollTimeout::MAX);
            }
            if exited {
                timeout = PollTimeout::from(100u16);
            }
            let mut fds = Vec::with_capacity(5);
            let mut kinds = Vec::with_capacity(5);
            if !exited {
                fds.push(PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN));
                kinds.push(0usize);
            }
            for (i, r) in readers.iter().enumerate() {
                if let Some(r) = r {
                    fds.push(PollFd::new(r.as_fd(), PollFlags::POLLIN));
                    kinds.push(1 + i);
                }
            }
            if let Some((w, _)) = &stdin {
                fds.push(PollFd::new(w.as_fd(), PollFlags::POLLOUT));
                kinds.push(3);
            }
            if let (Some(c), false) = (cancel, killed) {
                fds.push(PollFd::new(c, PollFlags::POLLIN));
                kinds.push(4);
            }
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(SandboxError::parent("poll", e)),
            }
            let ready: Vec<(usize, PollFlags)> = fds
                .iter()
                .zip(&kinds)
                .filter_map(|(f, k)| f.revents().filter(|r| !r.is_empty()).map(|r| (*k, r)))
                .collect();
            drop(fds);
            for (kind, _flags) in ready {
                match kind {
                    0 => {
                        exited = true;
                        exit_seen_at = Some(Instant::now());
                        stdin = None;
                    }
                    1 | 2 => {
                        let i = kind - 1;
                        let open = match &readers[i] {
                            Some(r) => drain(r, &mut out[i], self.max_output, &mut truncated[i])?,
                            None => false,
                        };
                        if !open {
                            readers[i] = None;
                        }
                    }
                    3 => {
                        let done = match &stdin {
                            Some((w, data)) => match nix::unistd::write(w, &data[stdin_pos..]) {
                                Ok(n) => {
                                    stdin_pos += n;
                                    stdin_pos >= data.len()
                                }
                                Err(Errno::EAGAIN) | Err(Errno::EINTR) => false,
                                // The command closed its stdin: what it did not read is dropped.
                                Err(_) => true,
                            },
                            None => true,
                        };
                        if done {
                            stdin = None;
                        }
                    }
                    _ => {
                        self.kill()?;
                        killed = true;
                        cancelled = true;
                    }
                }
            }
        }
        let duration = self.started.elapsed();
        let reaped = loop {
            match sys::waitid_pidfd(self.pidfd.as_fd(), false) {
                Err(Errno::EINTR) => continue,
                // Without WNOHANG the kernel returns only once it reaped the child.
                Ok(None) => break Err(SandboxError::parent("waitid", Errno::ECHILD))?,
                Ok(Some(r)) => break r,
                Err(e) => break Err(SandboxError::parent("waitid", e))?,
            }
        };
        self.reaped = true;
        let (exit_code, signal, cpu_us) = (reaped.code, reaped.signal, reaped.cpu_us);
        let [stdout, stderr] = out.map(|s| match s {
            Sink::Buffer(b) => b,
            Sink::Relay(_) => Vec::new(),
        });
        Ok(Outcome {
            exit_code,
            signal,
            stdout,
            stderr,
            stdout_truncated: truncated[0],
            stderr_truncated: truncated[1],
            timed_out,
            cancelled,
            duration,
            cpu_us,
            landlock_abi: self.landlock_abi,
            teardown: Teardown {
                _mount_ns: self.mount_ns.take(),
            },
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.reaped {
            // Best effort on an abandoned sandbox: kill it and reap it so nothing lingers.
            let _killed = sys::pidfd_send_signal(self.pidfd.as_fd(), Signal::SIGKILL as c_int);
            let _reaped = waitid(Id::PIDFd(self.pidfd.as_fd()), WaitPidFlag::WEXITED);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn landlock_fails_closed() {
        for e in [Errno::ENOSYS, Errno::EOPNOTSUPP] {
            assert!(
                matches!(landlock_decision(Err(e), false), Err(SandboxError::LandlockUnavailable(x)) if x == e)
            );
            assert_eq!(landlock_decision(Err(e), true).ok(), Some(None));
        }
        assert_eq!(landlock_decision(Ok(7), false).ok(), Some(Some(7)));
        assert_eq!(landlock_decision(Ok(7), true).ok(), Some(Some(7)));
    }

    #[test]
    fn path_search_uses_the_sandbox_path() {
        let env = vec![("PATH".to_string(), "/opt/x:/usr/bin:".to_string())];
        let c = exec_candidates("tool", &env).unwrap();
        assert_eq!(
            c,
            vec![
                c"/opt/x/tool".to_owned(),
                c"/usr/bin/tool".to_owned(),
                c"./tool".to_owned()
            ]
        );
        assert_eq!(
            exec_candidates("./run.sh", &env).unwrap(),
            vec![c"./run.sh".to_owned()]
        );
    }
}
