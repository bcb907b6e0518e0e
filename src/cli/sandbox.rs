//! `bulkhead sandbox`, also built alone as `bulkhead-sandbox`: one command in a fresh
//! sandbox, no daemon. The lone binary links only this path, so it maps and relocates a
//! fraction of the full one and starts faster, which a one-shot sandbox pays every run.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::sandbox::{self, HostIds, OutputMode, SandboxSpec, StdinSource};

/// The options and command of `bulkhead sandbox` and `bulkhead-sandbox`.
#[derive(clap::Args)]
pub struct SandboxArgs {
    /// Host directory mounted read-write at /work. Symlinks and '..' in the path are
    /// refused. If it does not exist it is created (mode 0700; as root, owned by
    /// --host-uid/--host-gid).
    #[arg(long)]
    work: PathBuf,
    /// Kill the whole sandbox after this many milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Extra environment variable (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Regular file fed to the command's stdin (no symlinks in its path), or - for your
    /// own stdin. Default: /dev/null.
    #[arg(long)]
    stdin: Option<PathBuf>,
    /// Working directory inside the sandbox (/work or beneath it).
    #[arg(long)]
    cwd: Option<String>,
    /// When run as root: host uid the sandbox maps to (default: the work dir's owner).
    #[arg(long)]
    host_uid: Option<u32>,
    /// When run as root: host gid the sandbox maps to (default: the --host-uid value, or
    /// the work dir's group when neither is given).
    #[arg(long)]
    host_gid: Option<u32>,
    /// Maximum processes inside the sandbox (RLIMIT_NPROC).
    #[arg(long)]
    pids: Option<u64>,
    /// Address-space limit in bytes (RLIMIT_AS).
    #[arg(long)]
    memory_bytes: Option<u64>,
    /// Run even if the kernel lacks Landlock (a weaker sandbox; a warning is printed).
    #[arg(long)]
    allow_degraded_landlock: bool,
    /// Run the way the daemon does: make a cell first (a holder process with the user and
    /// network namespaces), then run the command in it with fresh mount, pid, ipc, uts
    /// and cgroup namespaces.
    #[arg(long)]
    cell: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    cmd: Vec<String>,
}

/// Builds the sandbox, runs the command in it and returns its exit status (125 when the
/// sandbox could not be built, 126/127 when the command could not run, 128+signal when
/// it was killed), after printing why on stderr.
pub fn run(args: SandboxArgs) -> ExitCode {
    match sandbox_status(args) {
        Ok(code) => ExitCode::from(code),
        Err((code, msg)) => {
            eprintln!("bulkhead: {msg}");
            ExitCode::from(code)
        }
    }
}

/// Opens a directory path refusing symlinks and magic links anywhere in it.
fn open_no_symlinks(
    path: &std::path::Path,
    flags: nix::fcntl::OFlag,
) -> nix::Result<std::os::fd::OwnedFd> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    nix::fcntl::openat2(nix::fcntl::AT_FDCWD, path, how)
}

/// Creates a missing work dir for the sandbox's host identity. As root that identity must
/// be given: a new directory would otherwise belong to root, which the sandbox refuses.
/// Everything goes through descriptors (no symlink followed, the new directory chowned
/// through its own fd), so a tenant who can write the parent cannot redirect the chown.
fn create_work_dir(work: &std::path::Path, host: Option<HostIds>) -> Result<(), (u8, String)> {
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    let fail = |what: String| (125, format!("work dir {}: {what}", work.display()));
    if work
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(fail("'..' components are refused".into()));
    }
    let abs = std::path::absolute(work).map_err(|e| fail(e.to_string()))?;
    let (Some(parent), Some(name)) = (abs.parent(), abs.file_name()) else {
        return Ok(());
    };
    let Ok(parent_fd) = open_no_symlinks(parent, OFlag::O_PATH | OFlag::O_DIRECTORY) else {
        // Let the sandbox's own validation explain what is wrong with the path.
        return Ok(());
    };
    match nix::sys::stat::fstatat(&parent_fd, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Err(nix::errno::Errno::ENOENT) => {}
        _ => return Ok(()),
    }
    let root = nix::unistd::geteuid().is_root();
    if root && host.is_none() {
        return Err(fail(
            "does not exist; as root, name its owner with --host-uid/--host-gid".into(),
        ));
    }
    nix::sys::stat::mkdirat(&parent_fd, name, Mode::from_bits_truncate(0o700))
        .map_err(|e| fail(format!("mkdir: {e}")))?;
    if let (true, Some(ids)) = (root, host) {
        use nix::fcntl::{OpenHow, ResolveFlag};
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        let dir = nix::fcntl::openat2(&parent_fd, name, how)
            .map_err(|e| fail(format!("open after mkdir: {e}")))?;
        let st = nix::sys::stat::fstat(&dir).map_err(|e| fail(format!("fstat: {e}")))?;
        if st.st_uid != 0 {
            return Err(fail("was replaced while being created".into()));
        }
        nix::unistd::fchown(&dir, Some(ids.uid.into()), Some(ids.gid.into()))
            .map_err(|e| fail(format!("chown: {e}")))?;
    }
    Ok(())
}

/// Opens the `--stdin` file: `-` is the caller's own stdin; anything else must be a
/// regular file reached without symlinks (and, as root, not hard-linked), so that a
/// tenant-planted link cannot make a root caller feed the sandbox a file the tenant may
/// not read, and a FIFO cannot hang the caller.
fn open_stdin(path: &std::path::Path) -> Result<std::os::fd::OwnedFd, (u8, String)> {
    use nix::fcntl::OFlag;
    use std::os::fd::AsFd;
    let fail = |what: String| (2, format!("--stdin {}: {what}", path.display()));
    if path.as_os_str() == "-" {
        return std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| fail(e.to_string()));
    }
    let fd = open_no_symlinks(
        path,
        OFlag::O_RDONLY | OFlag::O_NOCTTY | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW,
    )
    .map_err(|e| match e {
        nix::errno::Errno::ELOOP => fail("a path component is a symlink (refused)".into()),
        e => fail(e.desc().into()),
    })?;
    let st = nix::sys::stat::fstat(&fd).map_err(|e| fail(e.to_string()))?;
    if nix::sys::stat::SFlag::from_bits_truncate(st.st_mode) & nix::sys::stat::SFlag::S_IFMT
        != nix::sys::stat::SFlag::S_IFREG
    {
        return Err(fail(
            "not a regular file (use - to pass your own stdin)".into(),
        ));
    }
    if nix::unistd::geteuid().is_root() && st.st_nlink > 1 {
        return Err(fail(
            "has several hard links; refused when running as root".into(),
        ));
    }
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()))
        .map_err(|e| fail(e.to_string()))?;
    Ok(fd)
}

/// A terminal is relayed through a pipe (the command never holds the tty); anything
/// else is passed through as is.
fn output_mode(fd: std::os::fd::BorrowedFd<'_>) -> Result<OutputMode, (u8, String)> {
    if nix::unistd::isatty(fd).unwrap_or(false) {
        let dup = fd
            .try_clone_to_owned()
            .map_err(|e| (125, format!("dup: {e}")))?;
        Ok(OutputMode::Relay(dup))
    } else {
        Ok(OutputMode::Inherit)
    }
}

fn sandbox_status(args: SandboxArgs) -> Result<u8, (u8, String)> {
    let host_ids = match (args.host_uid, args.host_gid) {
        (None, None) => None,
        (Some(uid), gid) => Some(HostIds {
            uid,
            gid: gid.unwrap_or(uid),
        }),
        (None, Some(_)) => return Err((2, "--host-gid needs --host-uid".into())),
    };
    create_work_dir(&args.work, host_ids)?;
    let mut spec = SandboxSpec::new(args.work, args.cmd);
    for kv in args.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or((2, format!("--env {kv:?}: expected K=V")))?;
        spec.env.push((k.to_string(), v.to_string()));
    }
    spec.cwd = args.cwd;
    spec.limits.wall_timeout = args.timeout_ms.map(Duration::from_millis);
    if let Some(p) = args.pids {
        spec.limits.nproc = p;
    }
    if let Some(m) = args.memory_bytes {
        spec.limits.address_space_bytes = m;
    }
    spec.allow_degraded_landlock = args.allow_degraded_landlock;
    if let (true, Err(e)) = (args.allow_degraded_landlock, sandbox::landlock::abi()) {
        eprintln!(
            "bulkhead: WARNING: Landlock is unavailable ({e:?}); running a DEGRADED sandbox as --allow-degraded-landlock asked"
        );
    }
    spec.host_ids = host_ids;
    if args.cell {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&spec.work_dir)
            .map_err(|e| (125, format!("{}: {e}", spec.work_dir.display())))?;
        let (ids, _) = sandbox::resolve_host_ids(
            host_ids,
            HostIds {
                uid: meta.uid(),
                gid: meta.gid(),
            },
        )
        .map_err(|e| (125, e.to_string()))?;
        let root = nix::unistd::geteuid().is_root();
        let cell =
            sandbox::Cell::create(root.then_some(ids), None).map_err(|e| (125, e.to_string()))?;
        spec.cell = Some(std::sync::Arc::new(cell));
    }
    {
        use std::os::fd::AsFd;
        spec.stdout = output_mode(std::io::stdout().as_fd())?;
        spec.stderr = output_mode(std::io::stderr().as_fd())?;
    }
    if let Some(path) = args.stdin {
        spec.stdin = StdinSource::Fd(open_stdin(&path)?);
    }
    // Termination signals to us end the sandbox (its pid 1 ignores most signals).
    let mut mask = nix::sys::signal::SigSet::empty();
    for s in [
        nix::sys::signal::SIGINT,
        nix::sys::signal::SIGTERM,
        nix::sys::signal::SIGHUP,
        nix::sys::signal::SIGQUIT,
    ] {
        mask.add(s);
    }
    mask.thread_block()
        .map_err(|e| (125, format!("sigprocmask: {e}")))?;
    let sigfd =
        nix::sys::signalfd::SignalFd::new(&mask).map_err(|e| (125, format!("signalfd: {e}")))?;
    let running = sandbox::spawn(spec).map_err(|e| {
        let code = match &e {
            e if e.is_exec_failure() => match e {
                sandbox::SandboxError::Setup {
                    errno: nix::errno::Errno::ENOENT,
                    ..
                } => 127,
                _ => 126,
            },
            _ => 125,
        };
        (code, e.to_string())
    })?;
    let outcome = {
        use std::os::fd::AsFd;
        running
            .wait_cancellable(Some(sigfd.as_fd()))
            .map_err(|e| (125, e.to_string()))?
    };
    if outcome.cancelled {
        let sig = sigfd
            .read_signal()
            .ok()
            .flatten()
            .map(|s| s.ssi_signo as i32)
            .unwrap_or(libc::SIGTERM);
        return Ok((128 + sig) as u8);
    }
    if outcome.timed_out {
        eprintln!("bulkhead: timed out; sandbox killed");
    }
    Ok(outcome.shell_status().clamp(0, 255) as u8)
}
