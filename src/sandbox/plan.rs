//! Everything the child needs, built before the clone: C strings, the mount plan, the
//! Landlock rules, argv/envp arrays and exec candidates. The child only reads this.

use std::ffi::{CString, c_char};
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::OnceLock;

use super::error::SandboxError;
use super::landlock::{self, Access, RulesetAttr};
use super::spec::{SANDBOX_GID, SANDBOX_UID, SANDBOX_USER};

/// Where the new root tmpfs is mounted before `pivot_root`. Inside our own mount
/// namespace, so the host's `/tmp` is untouched; the work dir is opened before this
/// mount so that a work dir under `/tmp` still resolves.
pub(crate) const NEWROOT: &str = "/tmp";

/// A read-only bind of a host path into the new root.
pub(crate) struct Bind {
    pub src: CString,
    pub dst: CString,
    pub is_dir: bool,
}

/// How the host lays out its system directories, read once per process.
pub(crate) struct SystemLayout {
    /// Directories bound read-only (`/usr`, and `/bin`, `/lib*`, `/sbin` when they are
    /// real directories).
    pub system_binds: Vec<Bind>,
    /// `(target, link)` for top-level symlinks such as `/bin -> usr/bin`.
    pub symlinks: Vec<(CString, CString)>,
    /// Directories created in the new root, parents first.
    pub mkdirs: Vec<CString>,
    /// Host files and directories bound read-only under `/etc`.
    pub etc_binds: Vec<Bind>,
    /// Synthesized `/etc` files.
    pub etc_files: Vec<(CString, Vec<u8>)>,
    /// `/dev` nodes: (host node, mount point in the new root).
    pub dev_nodes: Vec<(CString, CString)>,
    /// `/dev` symlinks (target, link).
    pub dev_symlinks: Vec<(CString, CString)>,
    pub newroot: CString,
    pub root_opts: CString,
    pub dev_dir: CString,
    pub dev_opts: CString,
    pub tmp_dir: CString,
    pub work_dir: CString,
    pub proc_dir: CString,
    /// The same three mount points as a run in a cell sees them (it starts inside the
    /// cell's prebuilt root).
    pub inside_work: CString,
    pub inside_tmp: CString,
    pub inside_proc: CString,
    /// Paths (inside the sandbox) and their Landlock access.
    pub landlock_paths: Vec<(CString, Access)>,
    pub last_cap: u32,
    /// Labels for error details, indexed like the lists above (see `Item`).
    pub labels: Vec<String>,
}

fn cstr(s: &str) -> Result<CString, SandboxError> {
    CString::new(s).map_err(|_| SandboxError::InvalidSpec(format!("{s:?} holds NUL")))
}

fn in_root(p: &str) -> Result<CString, SandboxError> {
    cstr(&format!("{NEWROOT}{p}"))
}

/// DESIGN.md's system view: `/usr` and the host's `/bin`, `/lib*`, `/sbin` (links or
/// directories). Nothing else of the host (no `/opt`, `/var`, `/home`).
const SYSTEM_DIRS: [&str; 7] = [
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
];
/// The host's `/etc` entries a program needs: the loader cache, CA certificates
/// (Debian's `ssl/certs`, Fedora's `pki`), the alternatives links `/usr/bin` points
/// through, and the time zone.
const ETC_BINDS: [&str; 5] = [
    "/etc/ld.so.cache",
    "/etc/ssl/certs",
    "/etc/pki",
    "/etc/alternatives",
    "/etc/localtime",
];
const DEV_NODES: [&str; 5] = ["null", "zero", "full", "random", "urandom"];

impl SystemLayout {
    /// The layout of this host, built on first use.
    pub fn get() -> Result<&'static SystemLayout, SandboxError> {
        static LAYOUT: OnceLock<Result<SystemLayout, String>> = OnceLock::new();
        match LAYOUT.get_or_init(|| SystemLayout::discover().map_err(|e| e.to_string())) {
            Ok(l) => Ok(l),
            Err(e) => Err(SandboxError::InvalidSpec(format!("host layout: {e}"))),
        }
    }

    fn discover() -> Result<SystemLayout, SandboxError> {
        let mut system_binds = Vec::new();
        let mut symlinks = Vec::new();
        let mut mkdirs = Vec::new();
        let mut landlock_paths = Vec::new();
        let mut labels = Vec::new();
        for dir in SYSTEM_DIRS {
            let Ok(meta) = std::fs::symlink_metadata(dir) else {
                continue;
            };
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(dir)
                    .map_err(|e| SandboxError::InvalidSpec(format!("{dir}: {e}")))?;
                let target = target
                    .to_str()
                    .ok_or_else(|| SandboxError::InvalidSpec(format!("{dir}: non-UTF-8 link")))?;
                symlinks.push((cstr(target)?, in_root(dir)?));
            } else if meta.is_dir() {
                mkdirs.push(in_root(dir)?);
                labels.push(format!("bind {dir}"));
                system_binds.push(Bind {
                    src: cstr(dir)?,
                    dst: in_root(dir)?,
                    is_dir: true,
                });
                landlock_paths.push((cstr(dir)?, Access::ReadExec));
            }
        }
        if system_binds.iter().all(|b| b.src.as_bytes() != b"/usr") {
            return Err(SandboxError::InvalidSpec(
                "host has no /usr directory".into(),
            ));
        }
        mkdirs.push(in_root("/etc")?);
        let mut etc_binds = Vec::new();
        for path in ETC_BINDS {
            let Ok(meta) = std::fs::metadata(path) else {
                continue;
            };
            // Parents of nested binds (e.g. /etc/ssl) must exist in the new root.
            let parent = Path::new(path)
                .parent()
                .and_then(Path::to_str)
                .unwrap_or("/etc");
            if parent != "/etc" {
                let p = in_root(parent)?;
                if !mkdirs.contains(&p) {
                    mkdirs.push(p);
                }
            }
            if meta.is_dir() {
                mkdirs.push(in_root(path)?);
            }
            labels.push(format!("bind {path}"));
            etc_binds.push(Bind {
                src: cstr(path)?,
                dst: in_root(path)?,
                is_dir: meta.is_dir(),
            });
        }
        let passwd = format!(
            "root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n{SANDBOX_USER}:x:{SANDBOX_UID}:{SANDBOX_GID}:{SANDBOX_USER}:/work:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        );
        let group = format!("root:x:0:\n{SANDBOX_USER}:x:{SANDBOX_GID}:\nnogroup:x:65534:\n");
        let etc_files = vec![
            (in_root("/etc/passwd")?, passwd.into_bytes()),
            (in_root("/etc/group")?, group.into_bytes()),
            (in_root("/etc/nsswitch.conf")?, b"passwd: files\ngroup: files\nshadow: files\nhosts: files\nnetworks: files\nprotocols: files\nservices: files\n".to_vec()),
            (in_root("/etc/hosts")?, b"127.0.0.1 localhost sandbox\n::1 localhost ip6-localhost ip6-loopback\n".to_vec()),
            (in_root("/etc/hostname")?, b"sandbox\n".to_vec()),
        ];
        for d in ["/work", "/tmp", "/dev", "/proc"] {
            mkdirs.push(in_root(d)?);
        }
        let dev_nodes = DEV_NODES
            .iter()
            .map(|n| Ok((cstr(&format!("/dev/{n}"))?, in_root(&format!("/dev/{n}"))?)))
            .collect::<Result<Vec<_>, SandboxError>>()?;
        let dev_symlinks = vec![
            (cstr("/proc/self/fd")?, in_root("/dev/fd")?),
            (cstr("/proc/self/fd/0")?, in_root("/dev/stdin")?),
            (cstr("/proc/self/fd/1")?, in_root("/dev/stdout")?),
            (cstr("/proc/self/fd/2")?, in_root("/dev/stderr")?),
        ];
        landlock_paths.push((cstr("/etc")?, Access::Read));
        landlock_paths.push((cstr("/proc")?, Access::Read));
        landlock_paths.push((cstr("/work")?, Access::ReadWriteExec));
        landlock_paths.push((cstr("/tmp")?, Access::ReadWriteExec));
        for n in DEV_NODES {
            landlock_paths.push((cstr(&format!("/dev/{n}"))?, Access::Device));
        }
        let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40);
        Ok(SystemLayout {
            system_binds,
            symlinks,
            mkdirs,
            etc_binds,
            etc_files,
            dev_nodes,
            dev_symlinks,
            newroot: cstr(NEWROOT)?,
            root_opts: cstr("size=1m,nr_inodes=512,mode=0755")?,
            dev_dir: in_root("/dev")?,
            dev_opts: cstr("size=16k,nr_inodes=64,mode=0755")?,
            tmp_dir: in_root("/tmp")?,
            work_dir: in_root("/work")?,
            proc_dir: in_root("/proc")?,
            inside_work: cstr("/work")?,
            inside_tmp: cstr("/tmp")?,
            inside_proc: cstr("/proc")?,
            landlock_paths,
            last_cap,
            labels,
        })
    }
}

/// Landlock as the child applies it.
pub(crate) struct LandlockPlan {
    pub attr: RulesetAttr,
    pub attr_size: usize,
    /// (path inside the sandbox, rights).
    pub rules: Vec<(*const c_char, u64)>,
    /// The one TCP port the sandbox may connect to (its cell's egress proxy); with none,
    /// every TCP connect is refused (ABI 4 and later).
    pub connect_port: Option<u64>,
}

/// The per-spawn part of the plan plus references to the static part.
pub(crate) struct ChildCtx {
    pub layout: &'static SystemLayout,
    /// `uid_map`/`gid_map` contents: written by the child itself (unprivileged caller) or
    /// by the root parent into `/proc/<child>/` (see `spawn::clone_as_root`).
    pub uid_map: Vec<u8>,
    pub gid_map: Vec<u8>,
    pub work_path: CString,
    pub work_dev: u64,
    pub work_ino: u64,
    pub tmp_opts: CString,
    pub cwd: CString,
    pub landlock: Option<LandlockPlan>,
    /// (resource, limit) pairs.
    pub rlimits: [(u32, u64); 7],
    /// The nice value (1..=19) of the sandbox's processes; `None` leaves it alone.
    pub nice: Option<libc::c_int>,
    /// Descriptors to install as 0, 1, 2; `None` keeps the caller's.
    pub stdio: [Option<RawFd>; 3],
    pub seccomp: &'static [libc::sock_filter],
    /// Absolute paths to try in order for `execve`.
    pub exec_candidates: Vec<CString>,
    pub argv: Vec<*const c_char>,
    pub envp: Vec<*const c_char>,
    /// Backing storage for `argv`/`envp` pointers.
    pub _strings: Vec<CString>,
}

/// Builds the Landlock plan for `abi`, pointing into the static layout.
pub(crate) fn landlock_plan(layout: &'static SystemLayout, abi: u32) -> LandlockPlan {
    let (attr, attr_size) = landlock::ruleset_attr(abi);
    let rules = layout
        .landlock_paths
        .iter()
        .map(|(p, a)| (p.as_ptr(), landlock::rights(*a, abi)))
        .collect();
    LandlockPlan {
        attr,
        attr_size,
        rules,
        connect_port: None,
    }
}
