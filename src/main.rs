//! The `bulkhead` command line.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use bulkhead::sandbox::{self, HostIds, OutputMode, SandboxSpec, StdinSource};

/// bulkhead: per-tenant isolation for LLM-agent platforms.
#[derive(Parser)]
#[command(name = "bulkhead", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one command in a fresh sandbox (no daemon): like bwrap, with Landlock and
    /// seccomp always on. Exits with the command's status (128+signal when killed),
    /// 125 when the sandbox could not be built, 126/127 when the command could not run.
    Sandbox(SandboxArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
}

#[derive(clap::Args)]
struct SandboxArgs {
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
    /// File fed to the command's stdin (default: /dev/null; use /dev/stdin to pass yours).
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
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    cmd: Vec<String>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Cold-start latency of /bin/true: bubblewrap vs bulkhead (process and library) vs a
    /// plain spawn, interleaved in one run.
    Coldstart(bulkhead::bench::ColdstartArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Sandbox(args) => run_sandbox(args),
        Command::Bench { which: BenchCommand::Coldstart(args) } => match bulkhead::bench::coldstart_cli(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bulkhead: bench: {e}");
                ExitCode::from(1)
            }
        },
    }
}

fn run_sandbox(args: SandboxArgs) -> ExitCode {
    match sandbox_status(args) {
        Ok(code) => ExitCode::from(code),
        Err((code, msg)) => {
            eprintln!("bulkhead: {msg}");
            ExitCode::from(code)
        }
    }
}

/// Creates a missing work dir for the sandbox's host identity. As root that identity must
/// be given: a new directory would otherwise belong to root, which the sandbox refuses.
fn create_work_dir(work: &std::path::Path, host: Option<HostIds>) -> Result<(), (u8, String)> {
    use std::os::unix::fs::DirBuilderExt;
    if std::fs::symlink_metadata(work).is_ok() {
        return Ok(());
    }
    let root = nix::unistd::geteuid().is_root();
    if root && host.is_none() {
        return Err((125, format!("work dir {} does not exist; as root, name its owner with --host-uid/--host-gid", work.display())));
    }
    std::fs::DirBuilder::new().mode(0o700).create(work).map_err(|e| (125, format!("create work dir {}: {e}", work.display())))?;
    if let (true, Some(ids)) = (root, host) {
        std::os::unix::fs::chown(work, Some(ids.uid), Some(ids.gid)).map_err(|e| (125, format!("chown work dir {}: {e}", work.display())))?;
    }
    Ok(())
}

fn sandbox_status(args: SandboxArgs) -> Result<u8, (u8, String)> {
    let host_ids = match (args.host_uid, args.host_gid) {
        (None, None) => None,
        (Some(uid), gid) => Some(HostIds { uid, gid: gid.unwrap_or(uid) }),
        (None, Some(_)) => return Err((2, "--host-gid needs --host-uid".into())),
    };
    create_work_dir(&args.work, host_ids)?;
    let mut spec = SandboxSpec::new(args.work, args.cmd);
    for kv in args.env {
        let (k, v) = kv.split_once('=').ok_or((2, format!("--env {kv:?}: expected K=V")))?;
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
        eprintln!("bulkhead: WARNING: Landlock is unavailable ({e:?}); running a DEGRADED sandbox as --allow-degraded-landlock asked");
    }
    spec.host_ids = host_ids;
    spec.stdout = OutputMode::Inherit;
    spec.stderr = OutputMode::Inherit;
    if let Some(path) = args.stdin {
        let f = std::fs::File::open(&path).map_err(|e| (2, format!("--stdin {}: {e}", path.display())))?;
        spec.stdin = StdinSource::Fd(f.into());
    }
    // Termination signals to us end the sandbox (its pid 1 ignores most signals).
    let mut mask = nix::sys::signal::SigSet::empty();
    for s in [nix::sys::signal::SIGINT, nix::sys::signal::SIGTERM, nix::sys::signal::SIGHUP, nix::sys::signal::SIGQUIT] {
        mask.add(s);
    }
    mask.thread_block().map_err(|e| (125, format!("sigprocmask: {e}")))?;
    let sigfd = nix::sys::signalfd::SignalFd::new(&mask).map_err(|e| (125, format!("signalfd: {e}")))?;
    let running = sandbox::spawn(spec).map_err(|e| {
        let code = match &e {
            e if e.is_exec_failure() => match e {
                sandbox::SandboxError::Setup { errno: nix::errno::Errno::ENOENT, .. } => 127,
                _ => 126,
            },
            _ => 125,
        };
        (code, e.to_string())
    })?;
    let outcome = {
        use std::os::fd::AsFd;
        running.wait_cancellable(Some(sigfd.as_fd())).map_err(|e| (125, e.to_string()))?
    };
    if outcome.cancelled {
        let sig = sigfd.read_signal().ok().flatten().map(|s| s.ssi_signo as i32).unwrap_or(libc::SIGTERM);
        return Ok((128 + sig) as u8);
    }
    if outcome.timed_out {
        eprintln!("bulkhead: timed out; sandbox killed");
    }
    Ok(outcome.shell_status().clamp(0, 255) as u8)
}
