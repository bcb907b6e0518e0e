//! Errors of the isolation core.
//!
//! Failures inside the child between `clone` and `execve` are reported as a [`Step`] plus
//! the errno the kernel returned, so callers read "landlock_restrict_self: EINVAL"
//! instead of an anonymous exit status.

use std::fmt;

use nix::errno::Errno;

/// One privileged operation of the child-side setup sequence. Each variant is exactly one
/// syscall (or one tightly bound pair), so an error names the call that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
#[allow(missing_docs)]
pub enum Step {
    PrctlPdeathsig = 1,
    ResetSignal,
    SigprocmaskClear,
    AwaitIdMaps,
    SetgroupsClear,
    Setresgid,
    Setresuid,
    WriteSetgroupsDeny,
    WriteUidMap,
    WriteGidMap,
    OpenWorkDir,
    StatWorkDir,
    WorkDirReplaced,
    Sethostname,
    LoopbackSocket,
    LoopbackUp,
    MountRootTmpfs,
    Mkdir,
    CreateMountpointFile,
    OpenTree,
    MountSetattr,
    MoveMount,
    Symlink,
    WriteEtcFile,
    BindDevNode,
    MountTmpTmpfs,
    MountDevTmpfs,
    RemountDevReadonly,
    MountProc,
    RemountRootReadonly,
    ChdirNewRoot,
    PivotRoot,
    UmountOldRoot,
    ChdirCwd,
    PrctlNoNewPrivs,
    LandlockCreateRuleset,
    LandlockOpenPath,
    LandlockAddRule,
    LandlockRestrictSelf,
    Setrlimit,
    Setsid,
    Setpriority,
    Dup2,
    CloseRange,
    CapbsetDrop,
    CapAmbientClear,
    SetSecurebits,
    Capset,
    SeccompSetModeFilter,
    Execve,
    ParentGone,
    SetnsUser,
    SetnsNet,
    UnshareRun,
    CloneRun,
    ProxySocket,
    ProxyBind,
    ProxyListen,
    ProxyDup,
    LandlockAddPortRule,
    SetnsHostView,
    SetnsCellRoot,
    UnshareMount,
    SignalHostView,
    AwaitHostViewTaken,
    MakePrivate,
}

impl Step {
    /// Every step, in declaration order; used to decode the child's report.
    const ALL: [Step; 66] = [
        Step::PrctlPdeathsig,
        Step::ResetSignal,
        Step::SigprocmaskClear,
        Step::AwaitIdMaps,
        Step::SetgroupsClear,
        Step::Setresgid,
        Step::Setresuid,
        Step::WriteSetgroupsDeny,
        Step::WriteUidMap,
        Step::WriteGidMap,
        Step::OpenWorkDir,
        Step::StatWorkDir,
        Step::WorkDirReplaced,
        Step::Sethostname,
        Step::LoopbackSocket,
        Step::LoopbackUp,
        Step::MountRootTmpfs,
        Step::Mkdir,
        Step::CreateMountpointFile,
        Step::OpenTree,
        Step::MountSetattr,
        Step::MoveMount,
        Step::Symlink,
        Step::WriteEtcFile,
        Step::BindDevNode,
        Step::MountTmpTmpfs,
        Step::MountDevTmpfs,
        Step::RemountDevReadonly,
        Step::MountProc,
        Step::RemountRootReadonly,
        Step::ChdirNewRoot,
        Step::PivotRoot,
        Step::UmountOldRoot,
        Step::ChdirCwd,
        Step::PrctlNoNewPrivs,
        Step::LandlockCreateRuleset,
        Step::LandlockOpenPath,
        Step::LandlockAddRule,
        Step::LandlockRestrictSelf,
        Step::Setrlimit,
        Step::Setsid,
        Step::Setpriority,
        Step::Dup2,
        Step::CloseRange,
        Step::CapbsetDrop,
        Step::CapAmbientClear,
        Step::SetSecurebits,
        Step::Capset,
        Step::SeccompSetModeFilter,
        Step::Execve,
        Step::ParentGone,
        Step::SetnsUser,
        Step::SetnsNet,
        Step::UnshareRun,
        Step::CloneRun,
        Step::ProxySocket,
        Step::ProxyBind,
        Step::ProxyListen,
        Step::ProxyDup,
        Step::LandlockAddPortRule,
        Step::SetnsHostView,
        Step::SetnsCellRoot,
        Step::UnshareMount,
        Step::SignalHostView,
        Step::AwaitHostViewTaken,
        Step::MakePrivate,
    ];

    pub(crate) fn from_raw(raw: u32) -> Option<Step> {
        Step::ALL.iter().copied().find(|s| *s as u32 == raw)
    }

    /// The syscall-style name users see.
    pub fn name(self) -> &'static str {
        match self {
            Step::PrctlPdeathsig => "prctl(PR_SET_PDEATHSIG)",
            Step::ResetSignal => "rt_sigaction(SIG_DFL)",
            Step::SigprocmaskClear => "rt_sigprocmask",
            Step::AwaitIdMaps => "read(id maps written)",
            Step::SetgroupsClear => "setgroups",
            Step::Setresgid => "setresgid",
            Step::Setresuid => "setresuid",
            Step::WriteSetgroupsDeny => "write(/proc/self/setgroups)",
            Step::WriteUidMap => "write(/proc/self/uid_map)",
            Step::WriteGidMap => "write(/proc/self/gid_map)",
            Step::OpenWorkDir => "openat2(work dir)",
            Step::StatWorkDir => "fstat(work dir)",
            Step::WorkDirReplaced => "work dir replaced after validation",
            Step::Sethostname => "sethostname",
            Step::LoopbackSocket => "socket(loopback)",
            Step::LoopbackUp => "ioctl(SIOCSIFFLAGS lo)",
            Step::MountRootTmpfs => "mount(root tmpfs)",
            Step::Mkdir => "mkdir",
            Step::CreateMountpointFile => "open(O_CREAT mount point)",
            Step::OpenTree => "open_tree",
            Step::MountSetattr => "mount_setattr",
            Step::MoveMount => "move_mount",
            Step::Symlink => "symlink",
            Step::WriteEtcFile => "write(/etc file)",
            Step::BindDevNode => "mount(bind /dev node)",
            Step::MountTmpTmpfs => "mount(/tmp tmpfs)",
            Step::MountDevTmpfs => "mount(/dev tmpfs)",
            Step::RemountDevReadonly => "mount(remount /dev read-only)",
            Step::MountProc => "mount(proc)",
            Step::RemountRootReadonly => "mount(remount / read-only)",
            Step::ChdirNewRoot => "chdir(new root)",
            Step::PivotRoot => "pivot_root",
            Step::UmountOldRoot => "umount2(old root)",
            Step::ChdirCwd => "chdir(cwd)",
            Step::PrctlNoNewPrivs => "prctl(PR_SET_NO_NEW_PRIVS)",
            Step::LandlockCreateRuleset => "landlock_create_ruleset",
            Step::LandlockOpenPath => "open(O_PATH landlock rule)",
            Step::LandlockAddRule => "landlock_add_rule",
            Step::LandlockRestrictSelf => "landlock_restrict_self",
            Step::Setrlimit => "setrlimit",
            Step::Setsid => "setsid",
            Step::Setpriority => "setpriority",
            Step::Dup2 => "dup2",
            Step::CloseRange => "close_range",
            Step::CapbsetDrop => "prctl(PR_CAPBSET_DROP)",
            Step::CapAmbientClear => "prctl(PR_CAP_AMBIENT_CLEAR_ALL)",
            Step::SetSecurebits => "prctl(PR_SET_SECUREBITS)",
            Step::Capset => "capset",
            Step::SeccompSetModeFilter => "seccomp(SECCOMP_SET_MODE_FILTER)",
            Step::Execve => "execve",
            Step::ParentGone => "getppid(parent gone)",
            Step::SetnsUser => "setns(cell user namespace)",
            Step::SetnsNet => "setns(cell network namespace)",
            Step::UnshareRun => "unshare(run namespaces)",
            Step::CloneRun => "clone(run)",
            Step::ProxySocket => "socket(egress proxy listener)",
            Step::ProxyBind => "bind(127.0.0.1, egress proxy port)",
            Step::ProxyListen => "listen(egress proxy)",
            Step::ProxyDup => "dup2(egress proxy listener)",
            Step::LandlockAddPortRule => "landlock_add_rule(net port)",
            Step::SetnsHostView => "setns(cell host view)",
            Step::SetnsCellRoot => "setns(cell root)",
            Step::UnshareMount => "unshare(CLONE_NEWNS)",
            Step::SignalHostView => "write(host view ready)",
            Step::AwaitHostViewTaken => "read(host view taken)",
            Step::MakePrivate => "mount(MS_REC|MS_PRIVATE /)",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything that can stop a sandbox from starting or being supervised.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The spec was rejected before anything ran.
    #[error("invalid sandbox spec: {0}")]
    InvalidSpec(String),
    /// The work directory could not be opened safely.
    #[error("work dir {path}: {reason}")]
    WorkDir {
        /// The path as given.
        path: String,
        /// Why it was refused.
        reason: String,
    },
    /// No acceptable unprivileged host identity for the sandbox.
    #[error("host identity: {0}")]
    HostIdentity(String),
    /// The kernel lacks Landlock and the caller did not accept a degraded sandbox.
    #[error(
        "Landlock is not available ({0}); refusing to run without it (allow a degraded sandbox explicitly to override)"
    )]
    LandlockUnavailable(Errno),
    /// The seccomp policy could not be compiled.
    #[error("seccomp policy: {0}")]
    SeccompPolicy(String),
    /// A parent-side syscall failed while preparing or supervising the sandbox.
    #[error("{op}: {errno:?}")]
    Parent {
        /// The operation.
        op: &'static str,
        /// The kernel's answer.
        errno: Errno,
    },
    /// A step of the child-side setup failed.
    #[error("{step}{}: {errno:?}", detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Setup {
        /// The failed step.
        step: Step,
        /// What it operated on, where that helps.
        detail: Option<String>,
        /// The kernel's answer.
        errno: Errno,
    },
    /// The child stopped without reporting (should not happen; kept for honesty).
    #[error("sandbox child exited during setup without a report (status {0})")]
    SilentSetupExit(i32),
}

impl SandboxError {
    /// True when the command itself could not be executed (not found / not executable),
    /// as opposed to the sandbox failing to build.
    pub fn is_exec_failure(&self) -> bool {
        matches!(
            self,
            SandboxError::Setup {
                step: Step::Execve,
                ..
            }
        )
    }

    pub(crate) fn parent(op: &'static str, errno: Errno) -> Self {
        SandboxError::Parent { op, errno }
    }
}
