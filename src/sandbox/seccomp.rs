//! The seccomp policy: reviewed JSON in `seccomp/<arch>.json`, parsed and compiled per
//! syscall by seccompiler, laid out as a binary search over syscall numbers
//! (`seccomp_tree.rs`, see there for why) and embedded at build time.
//!
//! The JSON holds two named filters: `sandbox` (the default-deny allowlist, mismatch
//! action EPERM) and `enosys` (calls that must fail with ENOSYS: `clone3`, so that libc
//! falls back to `clone`, whose flags the filter can inspect). Other ABIs (i386, x32) are
//! killed.

use seccompiler::{TargetArch, sock_filter};

use super::error::SandboxError;
use super::seccomp_tree;

/// The x86_64 policy, embedded so that the binary needs no data files.
pub const POLICY_X86_64: &str = include_str!("../../seccomp/x86_64.json");
/// The aarch64 policy.
pub const POLICY_AARCH64: &str = include_str!("../../seccomp/aarch64.json");

/// The architecture this binary runs on, as seccompiler names it.
#[cfg(target_arch = "x86_64")]
pub const NATIVE_ARCH: TargetArch = TargetArch::x86_64;
/// The architecture this binary runs on, as seccompiler names it.
#[cfg(target_arch = "aarch64")]
pub const NATIVE_ARCH: TargetArch = TargetArch::aarch64;

fn policy_for(arch: TargetArch) -> Result<&'static str, SandboxError> {
    match arch {
        TargetArch::x86_64 => Ok(POLICY_X86_64),
        TargetArch::aarch64 => Ok(POLICY_AARCH64),
        other => Err(SandboxError::SeccompPolicy(format!(
            "no policy for {other:?}"
        ))),
    }
}

/// The filter for this binary's architecture, compiled from the JSON policy by build.rs.
pub fn native_program() -> &'static [libc::sock_filter] {
    &generated::NATIVE_PROGRAM
}

/// The cell holder's filter (`seccomp/holder-<arch>.json`): waiting, dropping pages and
/// exiting only.
pub fn holder_program() -> &'static [libc::sock_filter] {
    &generated::HOLDER_PROGRAM
}

mod generated {
    include!(concat!(env!("OUT_DIR"), "/seccomp_program.rs"));
}

/// Compiles the embedded policy for `arch` (what build.rs does for the native one).
pub fn compile(arch: TargetArch) -> Result<Vec<sock_filter>, SandboxError> {
    seccomp_tree::compile_policy(policy_for(arch)?, arch).map_err(SandboxError::SeccompPolicy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::seccomp_tree::{RET_ALLOW, RET_KILL_PROCESS, X32_SYSCALL_BIT, audit_arch};

    /// A classic-BPF interpreter for the instructions seccompiler and the tree use.
    fn run(prog: &[sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let mut acc: u32 = 0;
        let mut pc = 0usize;
        loop {
            let ins = &prog[pc];
            match ins.code {
                0x20 => {
                    let k = ins.k as usize;
                    acc = u32::from_le_bytes(data[k..k + 4].try_into().unwrap());
                    pc += 1;
                }
                0x54 => {
                    acc &= ins.k;
                    pc += 1;
                }
                0x05 => pc += 1 + ins.k as usize,
                0x15 | 0x25 | 0x35 | 0x45 => {
                    let cond = match ins.code {
                        0x15 => acc == ins.k,
                        0x25 => acc > ins.k,
                        0x35 => acc >= ins.k,
                        _ => acc & ins.k != 0,
                    };
                    pc += 1 + if cond { ins.jt } else { ins.jf } as usize;
                }
                0x06 => return ins.k,
                other => panic!("opcode {other:#x} at {pc}"),
            }
        }
    }

    fn reference(arch: TargetArch, nr: u32, args: [u64; 6]) -> u32 {
        let map =
            seccompiler::compile_from_json(policy_for(arch).unwrap().as_bytes(), arch).unwrap();
        let a = audit_arch(arch).unwrap();
        let en = run(&map["enosys"], nr, a, args);
        if en != RET_ALLOW {
            return en;
        }
        run(&map["sandbox"], nr, a, args)
    }

    const EPERM: u32 = 0x0005_0000 | 1;
    const ENOSYS: u32 = 0x0005_0000 | 38;

    fn arg_cases() -> Vec<[u64; 6]> {
        let mut v = vec![[0; 6], [u64::MAX; 6]];
        for special in [
            0x5412u64,
            0x541C,
            0xFFFF_FFFF_0000_5412,
            0x1_0000_5412,
            0x5413,
            0x10000000 | 17,
            0x11,
            0x20000 | 17,
            0xffff_ffff,
            1,
            2,
            10,
            16,
            17,
            0x0040_0000,
        ] {
            for idx in 0..3 {
                let mut a = [0u64; 6];
                a[idx] = special;
                v.push(a);
            }
        }
        v
    }

    #[test]
    fn tree_agrees_with_seccompiler_on_every_syscall() {
        for arch in [TargetArch::x86_64, TargetArch::aarch64] {
            let tree = compile(arch).unwrap();
            let cases = arg_cases();
            let reference_map =
                seccompiler::compile_from_json(policy_for(arch).unwrap().as_bytes(), arch).unwrap();
            let a = audit_arch(arch).unwrap();
            for nr in 0..1024u32 {
                for args in &cases {
                    let en = run(&reference_map["enosys"], nr, a, *args);
                    let want = if en != RET_ALLOW {
                        en
                    } else {
                        run(&reference_map["sandbox"], nr, a, *args)
                    };
                    assert_eq!(
                        run(&tree, nr, a, *args),
                        want,
                        "{arch:?} nr {nr} args {args:x?}"
                    );
                }
            }
        }
    }

    #[test]
    fn tree_is_much_shorter_than_the_chain() {
        let tree = compile(TargetArch::x86_64).unwrap();
        let chain =
            seccompiler::compile_from_json(POLICY_X86_64.as_bytes(), TargetArch::x86_64).unwrap();
        assert!(
            tree.len() * 3 < chain["sandbox"].len(),
            "tree {} vs chain {}",
            tree.len(),
            chain["sandbox"].len()
        );
    }

    #[test]
    fn embedded_program_is_the_policy_compiled_now() {
        let now = compile(NATIVE_ARCH).unwrap();
        let embedded = native_program();
        assert_eq!(now.len(), embedded.len());
        for (a, b) in now.iter().zip(embedded) {
            assert_eq!((a.code, a.jt, a.jf, a.k), (b.code, b.jt, b.jf, b.k));
        }
    }

    #[test]
    fn foreign_abis_are_killed() {
        let tree = compile(TargetArch::x86_64).unwrap();
        // i386 audit arch.
        assert_eq!(run(&tree, 0, 0x4000_0003, [0; 6]), RET_KILL_PROCESS);
        // x32: x86_64 audit arch with the x32 bit set on the number (read = 0).
        assert_eq!(
            run(&tree, X32_SYSCALL_BIT, 0xC000_003E, [0; 6]),
            RET_KILL_PROCESS
        );
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn policy_denies_what_the_threat_model_names() {
        let x = TargetArch::x86_64;
        let denied = [
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_move_mount,
            libc::SYS_fsopen,
            libc::SYS_fsmount,
            libc::SYS_fsconfig,
            libc::SYS_open_tree,
            libc::SYS_mount_setattr,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_request_key,
            libc::SYS_bpf,
            libc::SYS_perf_event_open,
            libc::SYS_userfaultfd,
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_enter,
            libc::SYS_io_uring_register,
            libc::SYS_kexec_load,
            libc::SYS_kexec_file_load,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_delete_module,
            libc::SYS_reboot,
            libc::SYS_swapon,
            libc::SYS_swapoff,
            libc::SYS_acct,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_open_by_handle_at,
            libc::SYS_name_to_handle_at,
        ];
        for nr in denied {
            assert_eq!(reference(x, nr as u32, [0; 6]), EPERM, "syscall {nr}");
            assert_eq!(
                run(&compile(x).unwrap(), nr as u32, 0xC000_003E, [0; 6]),
                EPERM,
                "syscall {nr}"
            );
        }
        let tree = compile(x).unwrap();
        let a = 0xC000_003E;
        let nr = |n: i64| n as u32;
        assert_eq!(run(&tree, nr(libc::SYS_clone3), a, [0; 6]), ENOSYS);
        // clone: threads allowed, any namespace flag refused.
        assert_eq!(
            run(&tree, nr(libc::SYS_clone), a, [0x003d0f00, 0, 0, 0, 0, 0]),
            RET_ALLOW
        );
        for flag in [
            0x20000u64,
            0x0200_0000,
            0x0400_0000,
            0x0800_0000,
            0x1000_0000,
            0x2000_0000,
            0x4000_0000,
        ] {
            assert_eq!(
                run(&tree, nr(libc::SYS_clone), a, [flag | 17, 0, 0, 0, 0, 0]),
                EPERM,
                "flag {flag:#x}"
            );
        }
        // ioctl: TIOCSTI / TIOCLINUX refused however the upper half is set.
        for req in [0x5412u64, 0x541C, 0xdead_beef_0000_5412, 0x1_0000_541C] {
            assert_eq!(
                run(&tree, nr(libc::SYS_ioctl), a, [1, req, 0, 0, 0, 0]),
                EPERM,
                "req {req:#x}"
            );
        }
        assert_eq!(
            run(&tree, nr(libc::SYS_ioctl), a, [1, 0x5401, 0, 0, 0, 0]),
            RET_ALLOW
        );
        // personality: only the query and PER_LINUX.
        assert_eq!(
            run(
                &tree,
                nr(libc::SYS_personality),
                a,
                [0xffff_ffff, 0, 0, 0, 0, 0]
            ),
            RET_ALLOW
        );
        assert_eq!(
            run(
                &tree,
                nr(libc::SYS_personality),
                a,
                [0x0040_0000, 0, 0, 0, 0, 0]
            ),
            EPERM
        );
        // socket families.
        assert_eq!(
            run(&tree, nr(libc::SYS_socket), a, [1, 1, 0, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(
            run(&tree, nr(libc::SYS_socket), a, [17, 3, 0, 0, 0, 0]),
            EPERM
        );
        assert_eq!(
            run(&tree, nr(libc::SYS_socket), a, [38, 5, 0, 0, 0, 0]),
            EPERM
        );
        assert_eq!(run(&tree, nr(libc::SYS_read), a, [0; 6]), RET_ALLOW);
        // prctl: allowed, except clearing or changing the parent-death signal.
        assert_eq!(
            run(&tree, nr(libc::SYS_prctl), a, [15, 0, 0, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(
            run(&tree, nr(libc::SYS_prctl), a, [1, 0, 0, 0, 0, 0]),
            EPERM
        );
        assert_eq!(
            run(
                &tree,
                nr(libc::SYS_prctl),
                a,
                [0x1_0000_0001, 0, 0, 0, 0, 0]
            ),
            EPERM
        );
    }
}
