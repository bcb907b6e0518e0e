//! Landlock ABI constants and the rule set the child applies after `pivot_root`.
//!
//! The child uses raw syscalls (no allocation between clone and exec); this module only
//! computes, before the clone, which rights each path gets at the ABI the kernel offers.

use std::sync::OnceLock;

use nix::errno::Errno;

// Constants from <linux/landlock.h>.
pub(crate) const CREATE_RULESET_VERSION: u32 = 1;
pub(crate) const RULE_PATH_BENEATH: u32 = 1;

pub(crate) const FS_EXECUTE: u64 = 1 << 0;
pub(crate) const FS_WRITE_FILE: u64 = 1 << 1;
pub(crate) const FS_READ_FILE: u64 = 1 << 2;
pub(crate) const FS_READ_DIR: u64 = 1 << 3;
pub(crate) const FS_REMOVE_DIR: u64 = 1 << 4;
pub(crate) const FS_REMOVE_FILE: u64 = 1 << 5;
pub(crate) const FS_MAKE_CHAR: u64 = 1 << 6;
pub(crate) const FS_MAKE_DIR: u64 = 1 << 7;
pub(crate) const FS_MAKE_REG: u64 = 1 << 8;
pub(crate) const FS_MAKE_SOCK: u64 = 1 << 9;
pub(crate) const FS_MAKE_FIFO: u64 = 1 << 10;
pub(crate) const FS_MAKE_BLOCK: u64 = 1 << 11;
pub(crate) const FS_MAKE_SYM: u64 = 1 << 12;
pub(crate) const FS_REFER: u64 = 1 << 13;
pub(crate) const FS_TRUNCATE: u64 = 1 << 14;
pub(crate) const FS_IOCTL_DEV: u64 = 1 << 15;
pub(crate) const NET_BIND_TCP: u64 = 1 << 0;
pub(crate) const NET_CONNECT_TCP: u64 = 1 << 1;
pub(crate) const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
pub(crate) const SCOPE_SIGNAL: u64 = 1 << 1;

/// `struct landlock_ruleset_attr`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RulesetAttr {
    pub handled_access_fs: u64,
    pub handled_access_net: u64,
    pub scoped: u64,
}

/// `struct landlock_path_beneath_attr` (packed in the UAPI).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct PathBeneathAttr {
    pub allowed_access: u64,
    pub parent_fd: i32,
}

/// `struct landlock_net_port_attr` (packed in the UAPI).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct NetPortAttr {
    pub allowed_access: u64,
    pub port: u64,
}

/// `LANDLOCK_RULE_NET_PORT`.
pub(crate) const RULE_NET_PORT: u32 = 2;

/// What a path in the sandbox is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// System paths: read and execute.
    ReadExec,
    /// `/etc`, `/proc`: read only.
    Read,
    /// `/work`, `/tmp`: everything but device nodes.
    ReadWriteExec,
    /// The allowed `/dev` nodes: read, write, truncate, ioctl.
    Device,
}

/// The Landlock ABI of the running kernel: `Ok(n)`, or the errno that says it is absent
/// (ENOSYS: not built; EOPNOTSUPP: disabled at boot).
pub fn abi() -> Result<u32, Errno> {
    static ABI: OnceLock<Result<u32, Errno>> = OnceLock::new();
    *ABI.get_or_init(super::sys::landlock_abi)
}

fn fs_mask(abi: u32) -> u64 {
    let mut m = FS_EXECUTE
        | FS_WRITE_FILE
        | FS_READ_FILE
        | FS_READ_DIR
        | FS_REMOVE_DIR
        | FS_REMOVE_FILE
        | FS_MAKE_CHAR
        | FS_MAKE_DIR
        | FS_MAKE_REG
        | FS_MAKE_SOCK
        | FS_MAKE_FIFO
        | FS_MAKE_BLOCK
        | FS_MAKE_SYM;
    if abi >= 2 {
        m |= FS_REFER;
    }
    if abi >= 3 {
        m |= FS_TRUNCATE;
    }
    if abi >= 5 {
        m |= FS_IOCTL_DEV;
    }
    m
}

/// The ruleset attribute and its size for `abi`: every right the ABI knows is handled,
/// so anything not granted by a rule is denied.
pub(crate) fn ruleset_attr(abi: u32) -> (RulesetAttr, usize) {
    let mut attr = RulesetAttr {
        handled_access_fs: fs_mask(abi),
        ..Default::default()
    };
    let mut size = 8;
    if abi >= 4 {
        // No port rules: every TCP bind and connect is refused.
        attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP;
        size = 16;
    }
    if abi >= 6 {
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL;
        size = 24;
    }
    (attr, size)
}

/// The rights a rule grants for `access` at `abi`.
pub(crate) fn rights(access: Access, abi: u32) -> u64 {
    let read = FS_READ_FILE | FS_READ_DIR;
    let bits = match access {
        Access::ReadExec => read | FS_EXECUTE,
        Access::Read => read,
        Access::ReadWriteExec => fs_mask(abi) & !(FS_MAKE_CHAR | FS_MAKE_BLOCK | FS_IOCTL_DEV),
        Access::Device => FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE | FS_IOCTL_DEV,
    };
    bits & fs_mask(abi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rights_never_exceed_the_abi() {
        for abi in 1..=7 {
            for a in [
                Access::ReadExec,
                Access::Read,
                Access::ReadWriteExec,
                Access::Device,
            ] {
                assert_eq!(rights(a, abi) & !fs_mask(abi), 0);
            }
        }
        assert_eq!(
            rights(Access::ReadWriteExec, 7) & (FS_MAKE_CHAR | FS_MAKE_BLOCK),
            0
        );
        let (attr, size) = ruleset_attr(7);
        assert_eq!(size, 24);
        assert_eq!(attr.handled_access_net, NET_BIND_TCP | NET_CONNECT_TCP);
        assert_eq!(ruleset_attr(3).1, 8);
    }
}
