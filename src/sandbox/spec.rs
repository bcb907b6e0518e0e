//! What a caller asks for: [`SandboxSpec`] and its limits. Validation happens here, before
//! anything is cloned, so a bad spec changes nothing.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use super::error::SandboxError;

/// The uid/gid the sandbox runs as inside its user namespace.
pub const SANDBOX_UID: u32 = 1000;
/// The gid the sandbox runs as inside its user namespace.
pub const SANDBOX_GID: u32 = 1000;
/// The name of the sandbox user in the synthesized `/etc/passwd`.
pub const SANDBOX_USER: &str = "sandbox";

/// Resource limits of one sandbox. Memory and process limits are rlimits here; cgroup
/// limits arrive with the daemon, where a delegated subtree may exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock limit; at expiry the whole pid namespace is killed.
    pub wall_timeout: Option<Duration>,
    /// Bytes kept of each of stdout and stderr when captured; the rest is drained and
    /// dropped, and the outcome says it was truncated.
    pub max_output_bytes: usize,
    /// RLIMIT_NOFILE.
    pub nofile: u64,
    /// RLIMIT_NPROC. In a fresh user namespace this counts the sandbox's own processes.
    pub nproc: u64,
    /// RLIMIT_FSIZE in bytes.
    pub fsize_bytes: u64,
    /// RLIMIT_AS in bytes.
    pub address_space_bytes: u64,
    /// RLIMIT_CPU in seconds (per process: each process of the sandbox is killed when it
    /// has used this much CPU). `None`: no limit.
    pub cpu_seconds: Option<u64>,
    /// Size of the `/tmp` tmpfs in bytes.
    pub tmp_size_bytes: u64,
    /// Inode cap of the `/tmp` tmpfs.
    pub tmp_inodes: u64,
    /// Nice value (0..=19) of the sandbox's processes. Each sandbox is its own session,
    /// and on kernels with autogroups the CPU is shared between sessions, not processes:
    /// the daemon's spawner also sets this value on the session's autogroup of runs that
    /// last. 0 leaves the priority alone.
    pub nice: u8,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            wall_timeout: None,
            max_output_bytes: 1 << 20,
            nofile: 1024,
            nproc: 256,
            fsize_bytes: 1 << 30,
            address_space_bytes: 8 << 30,
            cpu_seconds: None,
            tmp_size_bytes: 128 << 20,
            tmp_inodes: 16_384,
            nice: 0,
        }
    }
}

/// Where the command's stdin comes from.
#[derive(Debug, Default)]
pub enum StdinSource {
    /// `/dev/null`.
    #[default]
    Null,
    /// These bytes, written by the supervisor through a pipe.
    Bytes(Vec<u8>),
    /// An open file (or pipe) handed to the command as fd 0.
    Fd(OwnedFd),
}

/// What happens to stdout or stderr.
#[derive(Debug, Default)]
pub enum OutputMode {
    /// Captured through a pipe, up to `Limits::max_output_bytes`.
    #[default]
    Capture,
    /// The caller's own descriptor is passed through unchanged.
    Inherit,
    /// `/dev/null`.
    Null,
    /// This descriptor (e.g. a pipe the caller reads itself).
    Fd(OwnedFd),
    /// Streamed through a pipe to this descriptor by the supervisor, so the command
    /// never holds it (use for terminals: a tty fd would let the command read what is
    /// typed and change terminal settings).
    Relay(OwnedFd),
}

/// An unprivileged host uid/gid that the sandbox's user maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostIds {
    /// Host uid.
    pub uid: u32,
    /// Host gid.
    pub gid: u32,
}

/// Everything needed to run one command in a fresh sandbox.
#[derive(Debug)]
pub struct SandboxSpec {
    /// The command and its arguments; `argv[0]` is looked up in the sandbox's `PATH`
    /// unless it contains a `/`.
    pub argv: Vec<String>,
    /// Extra environment on top of the cleared base (`PATH`, `HOME=/work`,
    /// `LANG=C.UTF-8`); later entries win.
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox: `/work` or a path beneath it.
    pub cwd: Option<String>,
    /// The host directory mounted read-write at `/work`.
    pub work_dir: PathBuf,
    /// Resource limits.
    pub limits: Limits,
    /// Standard input.
    pub stdin: StdinSource,
    /// Standard output.
    pub stdout: OutputMode,
    /// Standard error.
    pub stderr: OutputMode,
    /// Host identity when the caller is root (required then; must be unprivileged). An
    /// unprivileged caller can only map its own ids, so this must be unset or equal them.
    pub host_ids: Option<HostIds>,
    /// Run even if the kernel has no Landlock (the sandbox is then weaker; say so).
    pub allow_degraded_landlock: bool,
    /// Run inside this tenant cell (joining its user and network namespaces) instead of
    /// making fresh ones. Its host ids are the run's; `host_ids`, if set, must match.
    pub cell: Option<std::sync::Arc<super::cell::Cell>>,
}

impl SandboxSpec {
    /// A spec with default limits, stdin from `/dev/null` and captured output.
    pub fn new(work_dir: impl Into<PathBuf>, argv: Vec<String>) -> Self {
        SandboxSpec {
            argv,
            env: Vec::new(),
            cwd: None,
            work_dir: work_dir.into(),
            limits: Limits::default(),
            stdin: StdinSource::Null,
            stdout: OutputMode::Capture,
            stderr: OutputMode::Capture,
            host_ids: None,
            allow_degraded_landlock: false,
            cell: None,
        }
    }
}

const MAX_ARGS: usize = 4096;
const MAX_ARG_BYTES: usize = 1 << 20;

pub(crate) fn invalid(msg: impl Into<String>) -> SandboxError {
    SandboxError::InvalidSpec(msg.into())
}

/// The base environment, overlaid by the spec's entries, validated.
pub(crate) fn effective_env(spec: &SandboxSpec) -> Result<Vec<(String, String)>, SandboxError> {
    let mut env: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin".into(),
        ),
        ("HOME".into(), "/work".into()),
        ("LANG".into(), "C.UTF-8".into()),
    ];
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(invalid(format!(
                "environment name {k:?} is empty or holds '=' or NUL"
            )));
        }
        if v.contains('\0') {
            return Err(invalid(format!("environment value of {k} holds NUL")));
        }
        env.retain(|(existing, _)| existing != k);
        env.push((k.clone(), v.clone()));
    }
    Ok(env)
}

/// Validates argv, cwd and limits.
pub(crate) fn validate(spec: &SandboxSpec) -> Result<(), SandboxError> {
    if spec.argv.is_empty() || spec.argv[0].is_empty() {
        return Err(invalid("argv is empty"));
    }
    if spec.argv.len() > MAX_ARGS {
        return Err(invalid(format!("more than {MAX_ARGS} arguments")));
    }
    let total: usize = spec.argv.iter().map(String::len).sum();
    if total > MAX_ARG_BYTES {
        return Err(invalid("arguments exceed 1 MiB"));
    }
    if spec.argv.iter().any(|a| a.contains('\0')) {
        return Err(invalid("an argument holds NUL"));
    }
    sandbox_cwd(spec.cwd.as_deref())?;
    let l = &spec.limits;
    if l.nofile < 16
        || l.nproc < 1
        || l.address_space_bytes < (16 << 20)
        || l.tmp_size_bytes < 4096
        || l.tmp_inodes < 16
    {
        return Err(invalid("limits too small to start a process"));
    }
    if l.nice > 19 {
        return Err(invalid("nice must be 0..=19"));
    }
    Ok(())
}

/// The absolute working directory inside the sandbox: `/work` or beneath it, with no `..`.
pub(crate) fn sandbox_cwd(cwd: Option<&str>) -> Result<String, SandboxError> {
    let Some(cwd) = cwd else {
        return Ok("/work".into());
    };
    let rel = cwd
        .strip_prefix("/work")
        .map(|r| r.trim_start_matches('/'))
        .unwrap_or(cwd);
    if cwd.starts_with('/') && !(cwd == "/work" || cwd.starts_with("/work/")) {
        return Err(invalid(format!("cwd {cwd:?} is not under /work")));
    }
    if cwd.contains('\0') || rel.split('/').any(|c| c == "..") {
        return Err(invalid(format!("cwd {cwd:?} holds NUL or '..'")));
    }
    let rel = rel.trim_end_matches('/');
    Ok(if rel.is_empty() {
        "/work".into()
    } else {
        format!("/work/{rel}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cwd_stays_under_work() {
        assert_eq!(sandbox_cwd(None).unwrap(), "/work");
        assert_eq!(sandbox_cwd(Some("sub/dir")).unwrap(), "/work/sub/dir");
        assert_eq!(sandbox_cwd(Some("/work/a/")).unwrap(), "/work/a");
        assert!(sandbox_cwd(Some("/etc")).is_err());
        assert!(sandbox_cwd(Some("/workshop")).is_err());
        assert!(sandbox_cwd(Some("a/../../etc")).is_err());
        assert!(sandbox_cwd(Some("/work/..")).is_err());
    }

    #[test]
    fn env_is_validated_and_overrides_base() {
        let mut spec = SandboxSpec::new("/tmp", vec!["true".into()]);
        spec.env = vec![("HOME".into(), "/work/h".into())];
        let env = effective_env(&spec).unwrap();
        assert_eq!(env.iter().filter(|(k, _)| k == "HOME").count(), 1);
        assert!(env.contains(&("HOME".into(), "/work/h".into())));
        spec.env = vec![("A=B".into(), "x".into())];
        assert!(effective_env(&spec).is_err());
    }
}
