//! The child side: one linear function run between `clone` and `execve`.
//!
//! Two ways in. An unprivileged caller clones with `CLONE_VM|CLONE_VFORK`: the child runs
//! on a private stack in the caller's address space, writes its own id maps (it may map
//! only the caller's ids) and reports failures through shared memory. A root caller must
//! not share its memory with a task that will hold a tenant's uid (that task would be
//! open to that uid's other processes through /proc), so it clones without `CLONE_VM`:
//! the child waits on a pipe while the parent writes its id maps, switches to the sandbox
//! user inside the new namespace, and reports failures through a close-on-exec pipe.
//!
//! Rules for everything in this file: no allocation, no locks, no panics, no glibc
//! wrappers with process-wide side effects (glibc's `setresuid` & co. broadcast to the
//! caller's threads, so the raw syscalls are used). Every failure is reported as
//! `(step, errno, item)` and ends the child; the parent turns it into
//! [`SandboxError::Setup`](super::error::SandboxError).

use std::ffi::{c_int, c_void};
use std::ptr;

use super::error::Step;
use super::plan::{ChildCtx, SystemLayout};
use super::spec::{SANDBOX_GID, SANDBOX_UID};
use super::sys::{self, MountAttr, OpenHow};

/// A setup failure: which step, the errno, and which item of a list it concerned.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Report {
    pub step: u32,
    pub errno: i32,
    pub item: u32,
}

/// Size of a report sent through the report pipe.
pub(crate) const REPORT_BYTES: usize = 12;

impl Report {
    pub(crate) fn from_bytes(b: &[u8; REPORT_BYTES]) -> Report {
        let word = |i: usize| [b[i], b[i + 1], b[i + 2], b[i + 3]];
        Report {
            step: u32::from_ne_bytes(word(0)),
            errno: i32::from_ne_bytes(word(4)),
            item: u32::from_ne_bytes(word(8)),
        }
    }
}

/// What the clone callback receives.
#[derive(Clone, Copy)]
pub(crate) struct ChildArgs {
    pub ctx: *const ChildCtx,
    /// Shared-memory report (CLONE_VM path).
    pub report: *mut Report,
    /// Report pipe (root path), or -1.
    pub report_fd: c_int,
    /// Read end of the "id maps written" pipe (root path), or -1.
    pub sync_fd: c_int,
    /// Entering a tenant's cell (its user and network namespaces already exist and the
    /// shim has joined them): no id maps to write, only the switch to the sandbox user.
    pub cell: CellEntry,
    /// In a cell: the detached clone of the work dir the shim made, to attach at `/work`;
    /// -1 otherwise.
    pub work_mount: c_int,
}

/// How the run's child reaches its user namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CellEntry {
    /// A fresh user namespace made by this clone.
    No,
    /// Joined a cell whose namespace lets us drop supplementary groups (root caller).
    DropGroups,
    /// Joined a cell made by an unprivileged caller (setgroups is denied there).
    KeepGroups,
}

/// Exit status of a child that failed during setup (the report says why).
const SETUP_FAILED: c_int = 125;
/// Exit status when no exec candidate could be run.
const EXEC_FAILED: c_int = 127;

fn errno() -> i32 {
    // SAFETY: __errno_location returns the calling thread's errno slot, always valid. In a
    // CLONE_VM child that is the suspended parent thread's slot, which nothing else uses
    // while the parent waits for the vfork to complete.
    unsafe { *libc::__errno_location() }
}

/// Where a failure goes.
#[derive(Clone, Copy)]
struct Sink {
    shared: *mut Report,
    fd: c_int,
}

/// Records a failed step and returns the child's exit status.
fn fail(sink: Sink, step: Step, item: u32) -> c_int {
    let e = errno();
    if sink.fd >= 0 {
        let mut bytes = [0u8; REPORT_BYTES];
        bytes[0..4].copy_from_slice(&(step as u32).to_ne_bytes());
        bytes[4..8].copy_from_slice(&e.to_ne_bytes());
        bytes[8..12].copy_from_slice(&item.to_ne_bytes());
        // SAFETY: writes a local buffer to a pipe we hold; a short or failed write leaves
        // the parent with an incomplete report, which it treats as a silent exit.
        unsafe {
            libc::write(sink.fd, bytes.as_ptr().cast(), bytes.len());
        }
    } else {
        // SAFETY: `shared` points at the parent's Report, alive for the whole clone; the
        // parent is suspended (vfork) while we write it.
        unsafe {
            ptr::write_volatile(&mut (*sink.shared).errno, e);
            ptr::write_volatile(&mut (*sink.shared).item, item);
            ptr::write_volatile(&mut (*sink.shared).step, step as u32);
        }
    }
    if step == Step::Execve {
        EXEC_FAILED
    } else {
        SETUP_FAILED
    }
}

macro_rules! check {
    ($call:expr, $report:expr, $step:expr) => {
        check!($call, $report, $step, 0)
    };
    ($call:expr, $report:expr, $step:expr, $item:expr) => {
        if ($call) < 0 {
            return fail($report, $step, $item as u32);
        }
    };
}

/// Waits for one byte on the caller's sync pipe; EOF (the caller is gone) and errors other
/// than EINTR fail as `step`.
fn await_byte(fd: c_int, report: Sink, step: Step) -> Result<(), c_int> {
    let mut byte = 0u8;
    loop {
        // SAFETY: reads one byte into a local from a descriptor we hold.
        let n = unsafe { libc::read(fd, (&mut byte as *mut u8).cast(), 1) };
        if n == 1 {
            return Ok(());
        }
        if n == 0 {
            // SAFETY: our own thread's errno slot (see `errno`).
            unsafe { *libc::__errno_location() = libc::EPIPE };
        }
        if n == 0 || errno() != libc::EINTR {
            return Err(fail(report, step, 0));
        }
    }
}

/// Writes `data` to an existing file (the id maps, setgroups).
///
/// # Safety
/// `path` must be NUL-terminated.
unsafe fn write_file(path: *const libc::c_char, data: &[u8]) -> c_int {
    // SAFETY: the caller passes a NUL-terminated path; data is a valid slice.
    unsafe {
        let fd = libc::open(path, libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return -1;
        }
        let n = libc::write(fd, data.as_ptr().cast(), data.len());
        let saved = errno();
        libc::close(fd);
        if n != data.len() as isize {
            *libc::__errno_location() = if n < 0 { saved } else { libc::EIO };
            return -1;
        }
        0
    }
}

/// Creates a file with `data` (synthesized /etc entries, empty mount points).
///
/// # Safety
/// `path` must be NUL-terminated.
unsafe fn create_file(path: *const libc::c_char, data: &[u8]) -> c_int {
    // SAFETY: as for write_file.
    unsafe {
        let fd = libc::open(
            path,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
            0o644,
        );
        if fd < 0 {
            return -1;
        }
        if !data.is_empty() {
            let n = libc::write(fd, data.as_ptr().cast(), data.len());
            if n != data.len() as isize {
                let saved = if n < 0 { errno() } else { libc::EIO };
                libc::close(fd);
                *libc::__errno_location() = saved;
                return -1;
            }
        }
        libc::close(fd)
    }
}

/// Clones `src` (a path, or `src_fd` when the path is empty) as a detached mount, sets
/// `attrs` on it and attaches it at `dst`. Returns the failing step.
///
/// # Safety
/// Pointers must be NUL-terminated strings.
unsafe fn bind(
    src_fd: c_int,
    src: *const libc::c_char,
    dst: *const libc::c_char,
    recursive: bool,
    attrs: u64,
) -> Result<(), Step> {
    let mut flags = sys::OPEN_TREE_CLONE | sys::OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= sys::AT_RECURSIVE;
    }
    if src_fd >= 0 {
        flags |= sys::AT_EMPTY_PATH;
    }
    // SAFETY: NUL-terminated strings and a live MountAttr of the size we pass.
    unsafe {
        let fd = libc::syscall(
            libc::SYS_open_tree,
            if src_fd >= 0 { src_fd } else { libc::AT_FDCWD },
            src,
            flags,
        ) as c_int;
        if fd < 0 {
            return Err(Step::OpenTree);
        }
        let attr = MountAttr {
            attr_set: attrs,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        let set_flags = sys::AT_EMPTY_PATH | if recursive { sys::AT_RECURSIVE } else { 0 };
        if libc::syscall(
            libc::SYS_mount_setattr,
            fd,
            c"".as_ptr(),
            set_flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        ) < 0
        {
            let e = errno();
            libc::close(fd);
            *libc::__errno_location() = e;
            return Err(Step::MountSetattr);
        }
        if libc::syscall(
            libc::SYS_move_mount,
            fd,
            c"".as_ptr(),
            libc::AT_FDCWD,
            dst,
            sys::MOVE_MOUNT_F_EMPTY_PATH,
        ) < 0
        {
            let e = errno();
            libc::close(fd);
            *libc::__errno_location() = e;
            return Err(Step::MoveMount);
        }
        libc::close(fd);
    }
    Ok(())
}

/// Like `check!`, for the helpers that return `Result<(), exit status>`.
macro_rules! step {
    ($call:expr, $report:expr, $step:expr) => {
        step!($call, $report, $step, 0)
    };
    ($call:expr, $report:expr, $step:expr, $item:expr) => {
        if ($call) < 0 {
            return Err(fail($report, $step, $item as u32));
        }
    };
}

/// Re-opens the validated work dir without following symlinks and makes sure it is the
/// inode the parent checked, so a swap in between is caught. Returns an `O_PATH` fd.
///
/// # Safety
/// Only from the clone children (raw syscalls, no allocation).
unsafe fn open_work_dir(ctx: &ChildCtx, report: Sink) -> Result<c_int, c_int> {
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: sys::RESOLVE_NO_SYMLINKS | sys::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: a NUL-terminated path from the plan and a live OpenHow of the size passed.
    unsafe {
        let work_fd = libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            ctx.work_path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        ) as c_int;
        step!(work_fd, report, Step::OpenWorkDir);
        let mut st: libc::stat = std::mem::zeroed();
        step!(libc::fstat(work_fd, &mut st), report, Step::StatWorkDir);
        if st.st_dev != ctx.work_dev || st.st_ino != ctx.work_ino {
            *libc::__errno_location() = libc::ESTALE;
            return Err(fail(report, Step::WorkDirReplaced, 0));
        }
        Ok(work_fd)
    }
}

/// Builds the sandbox's read-only system view under `layout.newroot`: a small tmpfs with
/// the system directories, `/etc` and `/dev`, and empty mount points for `/work`, `/tmp`
/// and `/proc`. Run once per cell by its holder, or by each run outside a cell.
///
/// # Safety
/// Only from the clone children, in a mount namespace of their own.
unsafe fn build_root(layout: &SystemLayout, report: Sink) -> Result<(), c_int> {
    // SAFETY: NUL-terminated strings from the static layout, live structs of the sizes
    // passed, plain integers; the sequence is linear and each result is checked.
    unsafe {
        step!(
            libc::mount(
                c"tmpfs".as_ptr(),
                layout.newroot.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                layout.root_opts.as_ptr().cast()
            ),
            report,
            Step::MountRootTmpfs
        );
        for (i, d) in layout.mkdirs.iter().enumerate() {
            step!(libc::mkdir(d.as_ptr(), 0o755), report, Step::Mkdir, i);
        }
        let ro = sys::MOUNT_ATTR_RDONLY | sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV;
        for (i, b) in layout.system_binds.iter().enumerate() {
            if let Err(step) = bind(-1, b.src.as_ptr(), b.dst.as_ptr(), true, ro) {
                return Err(fail(report, step, i as u32));
            }
        }
        for (i, (target, link)) in layout.symlinks.iter().enumerate() {
            step!(
                libc::symlink(target.as_ptr(), link.as_ptr()),
                report,
                Step::Symlink,
                i
            );
        }
        for (i, (path, data)) in layout.etc_files.iter().enumerate() {
            step!(
                create_file(path.as_ptr(), data),
                report,
                Step::WriteEtcFile,
                i
            );
        }
        let etc_base = layout.system_binds.len();
        for (i, b) in layout.etc_binds.iter().enumerate() {
            if !b.is_dir {
                step!(
                    create_file(b.dst.as_ptr(), &[]),
                    report,
                    Step::CreateMountpointFile,
                    etc_base + i
                );
            }
            if let Err(step) = bind(-1, b.src.as_ptr(), b.dst.as_ptr(), true, ro) {
                return Err(fail(report, step, (etc_base + i) as u32));
            }
        }
        step!(
            libc::mount(
                c"tmpfs".as_ptr(),
                layout.dev_dir.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                layout.dev_opts.as_ptr().cast()
            ),
            report,
            Step::MountDevTmpfs
        );
        let dev_attr = MountAttr {
            attr_set: sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NOEXEC,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        for (i, (src, dst)) in layout.dev_nodes.iter().enumerate() {
            step!(
                create_file(dst.as_ptr(), &[]),
                report,
                Step::CreateMountpointFile,
                i
            );
            step!(
                libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    ptr::null(),
                    libc::MS_BIND,
                    ptr::null()
                ),
                report,
                Step::BindDevNode,
                i
            );
            step!(
                libc::syscall(
                    libc::SYS_mount_setattr,
                    libc::AT_FDCWD,
                    dst.as_ptr(),
                    0u32,
                    &dev_attr as *const MountAttr,
                    std::mem::size_of::<MountAttr>()
                ),
                report,
                Step::MountSetattr,
                i
            );
        }
        for (i, (target, link)) in layout.dev_symlinks.iter().enumerate() {
            step!(
                libc::symlink(target.as_ptr(), link.as_ptr()),
                report,
                Step::Symlink,
                i
            );
        }
        step!(
            libc::mount(
                ptr::null(),
                layout.dev_dir.as_ptr(),
                ptr::null(),
                libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                ptr::null()
            ),
            report,
            Step::RemountDevReadonly
        );
        step!(
            libc::mount(
                ptr::null(),
                layout.newroot.as_ptr(),
                ptr::null(),
                libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV,
                ptr::null()
            ),
            report,
            Step::RemountRootReadonly
        );
    }
    Ok(())
}

/// Enters the new root and detaches the host's: `pivot_root(".", ".")` stacks the old
/// root on top of the new one, and the lazy unmount removes it whole.
///
/// # Safety
/// Only from the clone children, after `build_root`.
unsafe fn enter_root(layout: &SystemLayout, report: Sink) -> Result<(), c_int> {
    // SAFETY: NUL-terminated strings; each result is checked.
    unsafe {
        step!(
            libc::chdir(layout.newroot.as_ptr()),
            report,
            Step::ChdirNewRoot
        );
        step!(
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()),
            report,
            Step::PivotRoot
        );
        step!(
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
            report,
            Step::UmountOldRoot
        );
    }
    Ok(())
}

/// A run outside a cell builds everything itself: loopback, the system view, the work
/// dir, a fresh `/tmp` and `/proc`, then pivots into it.
///
/// # Safety
/// Only from `sandbox_main`, in the run's fresh namespaces.
unsafe fn fresh_root(ctx: &ChildCtx, report: Sink) -> Result<(), c_int> {
    let layout = ctx.layout;
    // SAFETY: NUL-terminated strings from the plan, live structs of the sizes passed,
    // plain integers; each result is checked.
    unsafe {
        let work_fd = open_work_dir(ctx, report)?;
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        step!(sock, report, Step::LoopbackSocket);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        ifr.ifr_name[0] = b'l' as libc::c_char;
        ifr.ifr_name[1] = b'o' as libc::c_char;
        ifr.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        step!(
            libc::ioctl(sock, libc::SIOCSIFFLAGS, &ifr as *const libc::ifreq),
            report,
            Step::LoopbackUp
        );
        libc::close(sock);
        build_root(layout, report)?;
        if let Err(step) = bind(
            work_fd,
            c"".as_ptr(),
            layout.work_dir.as_ptr(),
            false,
            sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV,
        ) {
            return Err(fail(report, step, u32::MAX));
        }
        libc::close(work_fd);
        run_mounts(
            ctx,
            layout.tmp_dir.as_ptr(),
            layout.proc_dir.as_ptr(),
            report,
        )?;
        enter_root(layout, report)
    }
}

/// A run in a cell starts in a copy of the cell's prebuilt root (the shim joined it), so
/// only its own mounts remain: the work dir the shim cloned from the host's view, a fresh
/// `/tmp` and `/proc`. The cell's holder brought up loopback.
///
/// # Safety
/// Only from `sandbox_main`, in the run's fresh namespaces inside a cell.
unsafe fn cell_root(ctx: &ChildCtx, work_mount: c_int, report: Sink) -> Result<(), c_int> {
    let layout = ctx.layout;
    // SAFETY: NUL-terminated strings from the plan and a detached mount the shim made;
    // each result is checked.
    unsafe {
        if libc::syscall(
            libc::SYS_move_mount,
            work_mount,
            c"".as_ptr(),
            libc::AT_FDCWD,
            layout.inside_work.as_ptr(),
            sys::MOVE_MOUNT_F_EMPTY_PATH,
        ) < 0
        {
            return Err(fail(report, Step::MoveMount, u32::MAX));
        }
        libc::close(work_mount);
        run_mounts(
            ctx,
            layout.inside_tmp.as_ptr(),
            layout.inside_proc.as_ptr(),
            report,
        )
    }
}

/// The run's own `/tmp` (sized by its limits) and the `/proc` of its pid namespace.
///
/// # Safety
/// Only from the clone children; the paths are NUL-terminated.
unsafe fn run_mounts(
    ctx: &ChildCtx,
    tmp: *const libc::c_char,
    proc_dir: *const libc::c_char,
    report: Sink,
) -> Result<(), c_int> {
    // SAFETY: NUL-terminated strings; each result is checked.
    unsafe {
        step!(
            libc::mount(
                c"tmpfs".as_ptr(),
                tmp,
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                ctx.tmp_opts.as_ptr().cast()
            ),
            report,
            Step::MountTmpTmpfs
        );
        // proc of our own pid namespace: we are its pid 1.
        step!(
            libc::mount(
                c"proc".as_ptr(),
                proc_dir,
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                ptr::null()
            ),
            report,
            Step::MountProc
        );
    }
    Ok(())
}

/// The sandbox process: pid 1 of its own namespaces. Builds the filesystem view, locks
/// itself down and executes the command.
pub(crate) extern "C" fn sandbox_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the ChildArgs the parent passed to clone. With CLONE_VM the parent
    // is suspended until we exec or exit; without it we read our own copy.
    let args = unsafe { &*(arg as *const ChildArgs) };
    // SAFETY: ctx is the parent's plan, read-only here.
    let ctx = unsafe { &*args.ctx };
    let report = Sink {
        shared: args.report,
        fd: args.report_fd,
    };
    // SAFETY: every call below gets NUL-terminated strings from the plan, live structs of
    // the sizes passed, or plain integers. The sequence is linear; each result is checked.
    unsafe {
        check!(
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0),
            report,
            Step::PrctlPdeathsig
        );
        for sig in 1..32 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            check!(
                libc::signal(sig, libc::SIG_DFL) as isize,
                report,
                Step::ResetSignal,
                sig
            );
        }

        if args.cell != CellEntry::No {
            // In a cell: the shim joined the tenant's user namespace, where the sandbox user
            // is mapped to the tenant's host uid. Become it; with a root caller that also
            // leaves root's supplementary groups and host uid 0 behind.
            let parent = libc::getppid();
            if args.cell == CellEntry::DropGroups {
                check!(
                    libc::syscall(libc::SYS_setgroups, 0usize, ptr::null::<libc::gid_t>()),
                    report,
                    Step::SetgroupsClear
                );
            }
            check!(
                libc::syscall(libc::SYS_setresgid, SANDBOX_GID, SANDBOX_GID, SANDBOX_GID),
                report,
                Step::Setresgid
            );
            check!(
                libc::syscall(libc::SYS_setresuid, SANDBOX_UID, SANDBOX_UID, SANDBOX_UID),
                report,
                Step::Setresuid
            );
            // A credential change clears the parent-death signal; set it again and make
            // sure the shim did not die in between.
            check!(
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0),
                report,
                Step::PrctlPdeathsig
            );
            if libc::getppid() != parent {
                *libc::__errno_location() = libc::ESRCH;
                return fail(report, Step::ParentGone, 0);
            }
        } else if args.sync_fd >= 0 {
            // Root caller: the parent maps the tenant's host ids for us; then we become the
            // sandbox user inside the namespace (dropping root's supplementary groups) and
            // never hold host uid 0 again.
            if let Err(status) = await_byte(args.sync_fd, report, Step::AwaitIdMaps) {
                return status;
            }
            check!(
                libc::syscall(libc::SYS_setgroups, 0usize, ptr::null::<libc::gid_t>()),
                report,
                Step::SetgroupsClear
            );
            check!(
                libc::syscall(libc::SYS_setresgid, SANDBOX_GID, SANDBOX_GID, SANDBOX_GID),
                report,
                Step::Setresgid
            );
            check!(
                libc::syscall(libc::SYS_setresuid, SANDBOX_UID, SANDBOX_UID, SANDBOX_UID),
                report,
                Step::Setresuid
            );
            // Changing uid cleared the parent-death signal: set it again, then make sure the
            // parent did not die before that (it holds the sync pipe open until we exec).
            check!(
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0),
                report,
                Step::PrctlPdeathsig
            );
            let mut pfd = libc::pollfd {
                fd: args.sync_fd,
                events: 0,
                revents: 0,
            };
            check!(libc::poll(&mut pfd, 1, 0), report, Step::AwaitIdMaps);
            if pfd.revents & libc::POLLHUP != 0 {
                *libc::__errno_location() = libc::EPIPE;
                return fail(report, Step::AwaitIdMaps, 1);
            }
        } else {
            // Unprivileged caller: map its own ids to the sandbox user. setgroups must be
            // denied before an unprivileged gid_map write.
            check!(
                write_file(c"/proc/self/setgroups".as_ptr(), b"deny"),
                report,
                Step::WriteSetgroupsDeny
            );
            check!(
                write_file(c"/proc/self/uid_map".as_ptr(), &ctx.uid_map),
                report,
                Step::WriteUidMap
            );
            check!(
                write_file(c"/proc/self/gid_map".as_ptr(), &ctx.gid_map),
                report,
                Step::WriteGidMap
            );
        }

        check!(
            libc::sethostname(c"sandbox".as_ptr(), 7),
            report,
            Step::Sethostname
        );
        let root = if args.cell == CellEntry::No {
            fresh_root(ctx, report)
        } else {
            cell_root(ctx, args.work_mount, report)
        };
        if let Err(status) = root {
            return status;
        }
        check!(libc::chdir(ctx.cwd.as_ptr()), report, Step::ChdirCwd);

        // A session of its own, and so, on kernels with autogroups, a CPU-scheduling group
        // of its own, which the spawner lowers once the run has lasted a while (the kernel
        // lets unprivileged callers do that only ten times a second, host-wide). The nice
        // value orders CPU where autogroups are off.
        check!(libc::setsid(), report, Step::Setsid);
        if let Some(nice) = ctx.nice {
            check!(
                libc::setpriority(libc::PRIO_PROCESS, 0, nice),
                report,
                Step::Setpriority
            );
        }

        check!(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            report,
            Step::PrctlNoNewPrivs
        );
        if let Some(ll) = &ctx.landlock {
            let ruleset = libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &ll.attr as *const _,
                ll.attr_size,
                0u32,
            ) as c_int;
            check!(ruleset, report, Step::LandlockCreateRuleset);
            for (i, (path, access)) in ll.rules.iter().enumerate() {
                let fd = libc::open(*path, libc::O_PATH | libc::O_CLOEXEC);
                check!(fd, report, Step::LandlockOpenPath, i);
                let rule = super::landlock::PathBeneathAttr {
                    allowed_access: *access,
                    parent_fd: fd,
                };
                let r = libc::syscall(
                    libc::SYS_landlock_add_rule,
                    ruleset,
                    super::landlock::RULE_PATH_BENEATH,
                    &rule as *const _,
                    0u32,
                );
                let e = errno();
                libc::close(fd);
                if r < 0 {
                    *libc::__errno_location() = e;
                    return fail(report, Step::LandlockAddRule, i as u32);
                }
            }
            if let Some(port) = ll.connect_port {
                let rule = super::landlock::NetPortAttr {
                    allowed_access: super::landlock::NET_CONNECT_TCP,
                    port,
                };
                check!(
                    libc::syscall(
                        libc::SYS_landlock_add_rule,
                        ruleset,
                        super::landlock::RULE_NET_PORT,
                        &rule as *const _,
                        0u32,
                    ),
                    report,
                    Step::LandlockAddPortRule
                );
            }
            check!(
                libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32),
                report,
                Step::LandlockRestrictSelf
            );
            libc::close(ruleset);
        }
        for (i, (resource, limit)) in ctx.rlimits.iter().enumerate() {
            let rl = libc::rlimit {
                rlim_cur: *limit,
                rlim_max: *limit,
            };
            check!(
                libc::setrlimit(*resource as _, &rl),
                report,
                Step::Setrlimit,
                i
            );
        }
        for (target, src) in ctx.stdio.iter().enumerate() {
            if let Some(src) = src {
                check!(
                    libc::dup2(*src, target as c_int),
                    report,
                    Step::Dup2,
                    target
                );
            }
        }
        // Close-on-exec rather than close: the report pipe must survive until execve.
        check!(
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC
            ),
            report,
            Step::CloseRange
        );

        // Capabilities: lock the securebits so exec can never re-grant, empty the bounding
        // and ambient sets, then clear the rest with capset.
        check!(
            libc::prctl(libc::PR_SET_SECUREBITS, 0xEF, 0, 0, 0),
            report,
            Step::SetSecurebits
        );
        check!(
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0
            ),
            report,
            Step::CapAmbientClear
        );
        for cap in 0..=ctx.layout.last_cap {
            check!(
                libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0),
                report,
                Step::CapbsetDrop,
                cap
            );
        }
        let header = CapHeader {
            version: 0x2008_0522,
            pid: 0,
        };
        let data = [CapData::default(); 2];
        check!(
            libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()),
            report,
            Step::Capset
        );

        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        check!(
            libc::sigprocmask(libc::SIG_SETMASK, &empty, ptr::null_mut()),
            report,
            Step::SigprocmaskClear
        );

        // Last hardening call: after this only execve (and exit) are needed.
        let prog = SockFprog {
            len: ctx.seccomp.len() as u16,
            filter: ctx.seccomp.as_ptr().cast(),
        };
        check!(
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0u32,
                &prog as *const SockFprog
            ),
            report,
            Step::SeccompSetModeFilter
        );

        // PATH search as execvp does it, but over the sandbox's PATH, not ours.
        let mut saw_eacces = false;
        let mut last = libc::ENOENT;
        for (i, cand) in ctx.exec_candidates.iter().enumerate() {
            libc::execve(cand.as_ptr(), ctx.argv.as_ptr(), ctx.envp.as_ptr());
            last = errno();
            match last {
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ELOOP | libc::ENAMETOOLONG => {}
                libc::EACCES => saw_eacces = true,
                _ => return fail(report, Step::Execve, i as u32),
            }
        }
        *libc::__errno_location() = if saw_eacces { libc::EACCES } else { last };
        fail(report, Step::Execve, 0)
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const c_void,
}

/// What the shim of a run in a cell receives.
pub(crate) struct ShimArgs {
    /// For the run's child: the plan, the report pipe, and `cell` set.
    pub child: ChildArgs,
    /// The cell's user and network namespaces (descriptors of ours, copied to the shim).
    pub userns: c_int,
    pub netns: c_int,
    /// The cell's view of the host's mounts (where the work dir is found) and its
    /// prebuilt root (see `holder_main`).
    pub host_view: c_int,
    pub template: c_int,
    /// Top of the stack the run's child uses (in the shim's copy of our memory).
    pub child_stack: *mut c_void,
    /// The caller's pid: the shim dies with it.
    pub caller: libc::pid_t,
}

/// The shim of a run in a cell: cloned with its own copy of the caller's memory for a
/// root caller, sharing it otherwise (see `spawn::clone_into_cell`; joining a user
/// namespace needs a single-threaded process with its own `fs`, not its own memory), it
/// joins the cell's user and network namespaces, clones the work dir as a detached mount
/// from the cell's host view, joins the cell's root and makes the run's fresh mount (a
/// copy of that root), pid, ipc, uts and cgroup namespaces, and clones the run's child
/// (pid 1 of the new pid namespace) with `CLONE_VM|CLONE_VFORK`. Once that child has exec'd, the shim closes
/// every descriptor, waits for it and ends the same way, so its caller sees the run's
/// status and (through rusage) its CPU time. Killing the shim kills the run: the child's
/// parent-death signal is SIGKILL, and it is the pid namespace's init.
pub(crate) extern "C" fn cell_shim_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is our own copy of the ShimArgs the caller passed to clone.
    let args = unsafe { &*(arg as *const ShimArgs) };
    let report = Sink {
        shared: ptr::null_mut(),
        fd: args.child.report_fd,
    };
    // SAFETY: plain syscalls on integers and live local structs; every result is checked.
    unsafe {
        check!(
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0),
            report,
            Step::PrctlPdeathsig
        );
        if libc::getppid() != args.caller {
            *libc::__errno_location() = libc::ESRCH;
            return fail(report, Step::ParentGone, 0);
        }
        check!(
            libc::setns(args.userns, libc::CLONE_NEWUSER),
            report,
            Step::SetnsUser
        );
        check!(
            libc::setns(args.netns, libc::CLONE_NEWNET),
            report,
            Step::SetnsNet
        );
        // The work dir is cloned as a detached mount from the cell's view of the host,
        // the only place it can be reached; the run then starts in a copy of the cell's
        // root and attaches it there.
        check!(
            libc::setns(args.host_view, libc::CLONE_NEWNS),
            report,
            Step::SetnsHostView
        );
        // ctx is the caller's plan, alive until the child has exec'd; read-only here.
        let ctx = &*args.child.ctx;
        let work_fd = match open_work_dir(ctx, report) {
            Ok(fd) => fd,
            Err(status) => return status,
        };
        let work_mount = libc::syscall(
            libc::SYS_open_tree,
            work_fd,
            c"".as_ptr(),
            sys::OPEN_TREE_CLONE | sys::OPEN_TREE_CLOEXEC | sys::AT_EMPTY_PATH,
        ) as c_int;
        check!(work_mount, report, Step::OpenTree, u32::MAX);
        libc::close(work_fd);
        let attr = MountAttr {
            attr_set: sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        check!(
            libc::syscall(
                libc::SYS_mount_setattr,
                work_mount,
                c"".as_ptr(),
                sys::AT_EMPTY_PATH,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            ),
            report,
            Step::MountSetattr,
            u32::MAX
        );
        check!(
            libc::setns(args.template, libc::CLONE_NEWNS),
            report,
            Step::SetnsCellRoot
        );
        check!(
            libc::unshare(
                libc::CLONE_NEWNS
                    | libc::CLONE_NEWPID
                    | libc::CLONE_NEWIPC
                    | libc::CLONE_NEWUTS
                    | libc::CLONE_NEWCGROUP
            ),
            report,
            Step::UnshareRun
        );
        libc::close(args.userns);
        libc::close(args.netns);
        libc::close(args.host_view);
        libc::close(args.template);
        // The shim re-raises the run's fatal signal on itself: never as a core dump.
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        check!(
            libc::setrlimit(libc::RLIMIT_CORE, &no_core),
            report,
            Step::Setrlimit
        );
        let mut child_args = args.child;
        child_args.work_mount = work_mount;
        let child_args: *const ChildArgs = &child_args;
        let pid = libc::clone(
            sandbox_main,
            args.child_stack,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            child_args as *mut c_void,
        );
        check!(pid, report, Step::CloneRun);
        // The child has exec'd (or failed and reported). Hold nothing of the caller's: its
        // pipes must reach EOF when the run's processes close them, not when we exit.
        libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
        let mut info: libc::siginfo_t = std::mem::zeroed();
        loop {
            let r = libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED);
            if r == 0 || errno() != libc::EINTR {
                break;
            }
        }
        let status = info.si_status();
        if info.si_code == libc::CLD_EXITED {
            return status;
        }
        // Killed by a signal: end the same way, so the caller sees what the run saw.
        libc::signal(status, libc::SIG_DFL);
        let mut only: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut only);
        libc::sigaddset(&mut only, status);
        libc::sigprocmask(libc::SIG_UNBLOCK, &only, ptr::null_mut());
        libc::kill(libc::getpid(), status);
        128 + status
    }
}

/// The one byte a holder writes to its report pipe (failure reports are
/// [`REPORT_BYTES`] long) once it sits in the cell's host view for the caller to take.
pub(crate) const HOST_VIEW_READY: u8 = 0xAC;

/// What a cell's holder receives.
pub(crate) struct HolderArgs {
    /// Read end of the "id maps written" pipe.
    pub sync_fd: c_int,
    /// Write end of the report pipe: a failure is written there; success closes it.
    pub report_fd: c_int,
    /// The holder's own seccomp filter.
    pub seccomp: &'static [libc::sock_filter],
    /// Where to leave the egress proxy's listening socket (on 127.0.0.1:`proxy_port` of
    /// the cell's network namespace) for the caller to take with `pidfd_getfd`; -1: none.
    pub proxy_fd: c_int,
    /// The proxy's port.
    pub proxy_port: u16,
    /// The system view every run of the cell starts from.
    pub layout: &'static SystemLayout,
}

/// A cell's holder: cloned into a new user, network and pid namespace, it waits for its
/// id maps, brings up `lo`, becomes the sandbox user, makes the cell's host view (which
/// the caller takes while the holder waits) and builds the cell's root, drops every
/// capability, installs its own filter (which allows nothing but waiting for signals,
/// dropping pages and exiting), gives up its copy of its creator's memory and waits to
/// be killed. It holds the namespaces; it never runs anything.
/// Mappings an idle holder gives up (see [`callers_pages`]).
const MAX_DROPPED: usize = 64;

/// The mappings of the holder's memory that only its creator uses, so that an idle cell
/// costs little: clone copied the page tables of the caller's heap, data, relocated
/// tables and file pages, and all of them count in the holder's RSS. Once its filter is
/// in place the holder runs nothing but [`idle`] (raw syscalls on its own stack, no
/// libc, no GOT, no TLS), so after [`idle_memory`] has dropped them it touches none of
/// this again. Kept: the mapping holding the current stack, the one holding this
/// thread's TLS, the caller's main stack (it holds the command line that `ps` and
/// `/proc/<pid>/cmdline` show) and the kernel's own (`[vdso]`, `[vvar]`, ...). Best
/// effort: a map that cannot be read leaves memory as it is.
fn callers_pages(out: &mut [(usize, usize); MAX_DROPPED]) -> usize {
    let here = 0u8;
    let sp = &here as *const u8 as usize;
    // SAFETY: our own thread's errno slot; only its address is used.
    let tls = unsafe { libc::__errno_location() } as usize;
    // SAFETY: opens a path given as a C string literal; the result is checked.
    let fd = unsafe {
        libc::open(
            c"/proc/self/maps".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return 0;
    }
    let (mut buf, mut have, mut n) = ([0u8; 4096], 0usize, 0usize);
    loop {
        // SAFETY: reads into the unused tail of a local buffer from a descriptor we hold.
        let got = unsafe { libc::read(fd, buf[have..].as_mut_ptr().cast(), buf.len() - have) };
        if got <= 0 {
            break;
        }
        have += got as usize;
        let mut start = 0;
        while let Some(len) = buf[start..have].iter().position(|&b| b == b'\n') {
            if let Some((lo, hi)) = droppable(&buf[start..start + len])
                && !(lo..hi).contains(&sp)
                && !(lo..hi).contains(&tls)
                && n < MAX_DROPPED
            {
                out[n] = (lo, hi);
                n += 1;
            }
            start += len + 1;
        }
        if start == 0 && have == buf.len() {
            // A line longer than the buffer: forget it.
            have = 0;
            continue;
        }
        buf.copy_within(start..have, 0);
        have -= start;
    }
    // SAFETY: closes the descriptor opened above.
    unsafe {
        libc::close(fd);
    }
    n
}

/// The range of a `/proc/self/maps` line that [`callers_pages`] may give up: any private
/// mapping but the main stack and the kernel's special ones.
fn droppable(line: &[u8]) -> Option<(usize, usize)> {
    let mut fields = line.split(|&b| b == b' ').filter(|f| !f.is_empty());
    let range = fields.next()?;
    let perms = fields.next()?;
    let (_offset, _dev, _inode) = (fields.next()?, fields.next()?, fields.next()?);
    let path = fields.next().unwrap_or(b"");
    let dash = range.iter().position(|&b| b == b'-')?;
    let (lo, hi) = (hex(&range[..dash])?, hex(&range[dash + 1..])?);
    let private = perms.get(3) == Some(&b'p');
    let special = path.first() == Some(&b'[') && path != b"[heap]";
    (private && !special && lo < hi).then_some((lo, hi))
}

fn hex(digits: &[u8]) -> Option<usize> {
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    digits.iter().try_fold(0usize, |acc, &d| {
        let v = (d as char).to_digit(16)?;
        Some(acc << 4 | v as usize)
    })
}

/// Gives up the mappings [`callers_pages`] listed and waits for SIGKILL, the holder's
/// whole idle life, without touching any of them: raw syscalls only (the filter allows
/// `madvise` and `rt_sigsuspend`), with every signal blocked. A dropped page of a
/// private file mapping would read back as the file's unrelocated bytes and one of
/// anonymous memory as zeros, so nothing here may call into libc or read a static.
fn idle(dropped: &[(usize, usize)], all: &libc::sigset_t) -> ! {
    for &(lo, hi) in dropped {
        // SAFETY: MADV_DONTNEED on a whole mapping of this process that nothing after
        // this point reads (see above); a failure leaves it as it was.
        unsafe {
            raw_syscall3(libc::SYS_madvise, lo, hi - lo, libc::MADV_DONTNEED as usize);
        }
    }
    loop {
        // SAFETY: waits with the signal mask at `all`, a live set on our own stack; only
        // SIGKILL (and SIGSTOP) can end or pause it.
        unsafe {
            raw_syscall3(
                libc::SYS_rt_sigsuspend,
                all as *const libc::sigset_t as usize,
                8,
                0,
            );
        }
    }
}

/// A system call without libc (see [`idle`]).
///
/// # Safety
/// The caller upholds the call's own contract.
#[cfg(target_arch = "x86_64")]
unsafe fn raw_syscall3(nr: libc::c_long, a: usize, b: usize, c: usize) -> isize {
    let ret: isize;
    // SAFETY: the x86-64 syscall convention: number and result in rax, arguments in
    // rdi, rsi, rdx; the kernel clobbers rcx and r11.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a,
            in("rsi") b,
            in("rdx") c,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// A system call without libc (see [`idle`]).
///
/// # Safety
/// The caller upholds the call's own contract.
#[cfg(target_arch = "aarch64")]
unsafe fn raw_syscall3(nr: libc::c_long, a: usize, b: usize, c: usize) -> isize {
    let ret: isize;
    // SAFETY: the aarch64 syscall convention: number in x8, arguments in x0..x2, result
    // in x0.
    unsafe {
        std::arch::asm!(
            "svc 0",
            in("x8") nr,
            inlateout("x0") a as isize => ret,
            in("x1") b,
            in("x2") c,
            options(nostack),
        );
    }
    ret
}

pub(crate) extern "C" fn holder_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is our own copy of the HolderArgs the caller passed to clone.
    let args = unsafe { &*(arg as *const HolderArgs) };
    let report = Sink {
        shared: ptr::null_mut(),
        fd: args.report_fd,
    };
    // SAFETY: plain syscalls on integers and live local structs; every result is checked.
    unsafe {
        // Keep only the two pipes: everything else is the caller's.
        let (lo, hi) = if args.sync_fd < args.report_fd {
            (args.sync_fd, args.report_fd)
        } else {
            (args.report_fd, args.sync_fd)
        };
        for (first, last) in [(0, lo - 1), (lo + 1, hi - 1), (hi + 1, c_int::MAX)] {
            if first <= last {
                check!(
                    libc::syscall(libc::SYS_close_range, first as u32, last as u32, 0u32),
                    report,
                    Step::CloseRange
                );
            }
        }
        check!(
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0),
            report,
            Step::PrctlPdeathsig
        );
        // The holder is pid 1 of a pid namespace of its own, where getppid() says 0; a
        // parent that died before the death signal was set shows as the sync pipe's
        // writer gone (checked again below, while the caller still holds it).
        if let Err(status) = await_byte(args.sync_fd, report, Step::AwaitIdMaps) {
            return status;
        }
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        check!(sock, report, Step::LoopbackSocket);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        ifr.ifr_name[0] = b'l' as libc::c_char;
        ifr.ifr_name[1] = b'o' as libc::c_char;
        ifr.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        check!(
            libc::ioctl(sock, libc::SIOCSIFFLAGS, &ifr as *const libc::ifreq),
            report,
            Step::LoopbackUp
        );
        libc::close(sock);
        if args.proxy_fd >= 0 {
            let sock = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            check!(sock, report, Step::ProxySocket);
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: args.proxy_port.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
                },
                sin_zero: [0; 8],
            };
            check!(
                libc::bind(
                    sock,
                    (&addr as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
                ),
                report,
                Step::ProxyBind
            );
            check!(libc::listen(sock, 1024), report, Step::ProxyListen);
            if sock != args.proxy_fd {
                check!(libc::dup2(sock, args.proxy_fd), report, Step::ProxyDup);
                libc::close(sock);
            }
        }
        check!(
            libc::syscall(libc::SYS_setresgid, SANDBOX_GID, SANDBOX_GID, SANDBOX_GID),
            report,
            Step::Setresgid
        );
        check!(
            libc::syscall(libc::SYS_setresuid, SANDBOX_UID, SANDBOX_UID, SANDBOX_UID),
            report,
            Step::Setresuid
        );
        check!(
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0),
            report,
            Step::PrctlPdeathsig
        );
        let mut pfd = libc::pollfd {
            fd: args.sync_fd,
            events: 0,
            revents: 0,
        };
        check!(libc::poll(&mut pfd, 1, 0), report, Step::AwaitIdMaps);
        if pfd.revents & libc::POLLHUP != 0 {
            *libc::__errno_location() = libc::ESRCH;
            return fail(report, Step::ParentGone, 1);
        }
        // Two mount namespaces, both owned by the cell's user namespace: a copy of the
        // host's (runs find their work dir there), and the cell's root, built once and
        // made private so that nothing mounted on the host or in a run reaches it. Each
        // run starts in a copy of the latter.
        check!(libc::unshare(libc::CLONE_NEWNS), report, Step::UnshareMount);
        // The caller takes this one from /proc/<holder>/ns/mnt while we wait, so that the
        // holder itself never keeps a view of the host.
        check!(
            libc::write(args.report_fd, [HOST_VIEW_READY].as_ptr().cast(), 1) as c_int,
            report,
            Step::SignalHostView
        );
        if let Err(status) = await_byte(args.sync_fd, report, Step::AwaitHostViewTaken) {
            return status;
        }
        libc::close(args.sync_fd);
        check!(
            libc::unshare(libc::CLONE_NEWNS),
            report,
            Step::UnshareMount,
            1
        );
        check!(
            libc::mount(
                ptr::null(),
                c"/".as_ptr(),
                ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                ptr::null()
            ),
            report,
            Step::MakePrivate
        );
        if let Err(status) = build_root(args.layout, report) {
            return status;
        }
        // The kernel lets a user namespace mount proc only where one is already fully
        // visible, so the cell's root keeps one for runs to mount theirs over: that of
        // the holder's own pid namespace, which holds nothing but the holder.
        check!(
            libc::mount(
                c"proc".as_ptr(),
                args.layout.proc_dir.as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                ptr::null()
            ),
            report,
            Step::MountProc
        );
        if let Err(status) = enter_root(args.layout, report) {
            return status;
        }
        check!(libc::chdir(c"/".as_ptr()), report, Step::ChdirCwd);
        let header = CapHeader {
            version: 0x2008_0522,
            pid: 0,
        };
        let data = [CapData::default(); 2];
        check!(
            libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()),
            report,
            Step::Capset
        );
        check!(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            report,
            Step::PrctlNoNewPrivs
        );
        let prog = SockFprog {
            len: args.seccomp.len() as u16,
            filter: args.seccomp.as_ptr().cast(),
        };
        let mut dropped = [(0usize, 0usize); MAX_DROPPED];
        let n = callers_pages(&mut dropped);
        check!(
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0u32,
                &prog as *const SockFprog
            ),
            report,
            Step::SeccompSetModeFilter
        );
        // Success is the report pipe closing with the holder still alive.
        libc::close(args.report_fd);
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        idle(&dropped[..n], &all)
    }
}

#[cfg(test)]
mod tests {
    use super::droppable;

    #[test]
    fn an_idle_holder_keeps_the_main_stack_and_the_kernels_mappings() {
        let line = |l: &str| droppable(l.as_bytes());
        assert_eq!(
            line("559f14a6c000-559f14d6d000 r--p 00000000 fe:00 10011087   /usr/bin/bulkhead"),
            Some((0x559f_14a6_c000, 0x559f_14d6_d000))
        );
        assert!(
            line("559f14d6d000-559f1581c000 r-xp 00300000 fe:00 10011087 /usr/bin/bulkhead")
                .is_some()
        );
        assert!(
            line("559f1581c000-559f15888000 r--p 00dae000 fe:00 10011087 /usr/bin/bulkhead")
                .is_some()
        );
        assert!(line("55f07cfe2000-55f07d024000 rw-p 00000000 00:00 0    [heap]").is_some());
        assert!(line("7fb6ca34a000-7fb6ca38a000 rw-p 00000000 00:00 0 ").is_some());
        for kept in [
            "7ffcbcba5000-7ffcbcbc6000 rw-p 00000000 00:00 0   [stack]",
            "7ffcbcbf0000-7ffcbcbf4000 r--p 00000000 00:00 0   [vvar]",
            "7ffcbcbf4000-7ffcbcbf6000 r-xp 00000000 00:00 0   [vdso]",
            "7f0000000000-7f0000001000 rw-s 00000000 00:01 5   /memfd:x (deleted)",
            "garbage",
            "7f00-7e00 rw-p 00000000 00:00 0",
        ] {
            assert_eq!(line(kept), None, "{kept}");
        }
    }
}
