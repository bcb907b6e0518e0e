//! The seccomp policy: reviewed JSON in `seccomp/<arch>.json`, parsed and compiled per
//! syscall by seccompiler, then laid out as a binary search over syscall numbers.
//!
//! Why the re-layout: seccompiler emits one linear chain of syscall checks. Attaching a
//! filter makes the kernel pre-evaluate it for every syscall number (the constant-action
//! cache), so a linear chain of ~290 entries costs O(n²) work on every spawn. The tree
//! keeps each evaluation at O(log n) while every per-syscall argument check stays exactly
//! the code seccompiler produced; `tests` below prove both programs agree.
//!
//! The JSON holds two named filters: `sandbox` (the default-deny allowlist, mismatch
//! action EPERM) and `enosys` (calls that must fail with ENOSYS: `clone3`, so that libc
//! falls back to `clone`, whose flags the filter can inspect).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, TargetArch, sock_filter};

use super::error::SandboxError;

/// The x86_64 policy, embedded so that the binary needs no data files.
pub const POLICY_X86_64: &str = include_str!("../../seccomp/x86_64.json");
/// The aarch64 policy.
pub const POLICY_AARCH64: &str = include_str!("../../seccomp/aarch64.json");

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_JMP_JGE_K: u16 = 0x35;
const BPF_JMP_JA: u16 = 0x05;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
/// Syscall numbers with this bit set come from the x32 ABI, which shares the x86_64 audit
/// arch value; the filter kills such callers.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// Syscalls per leaf of the search tree: small enough that every jump fits the 8-bit
/// offsets of classic BPF, large enough to keep the tree shallow.
const LEAF_SIZE: usize = 8;

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
        other => Err(SandboxError::SeccompPolicy(format!("no policy for {other:?}"))),
    }
}

fn audit_arch(arch: TargetArch) -> Result<u32, SandboxError> {
    match arch {
        TargetArch::x86_64 => Ok(0xC000_003E),
        TargetArch::aarch64 => Ok(0xC000_00B7),
        other => Err(SandboxError::SeccompPolicy(format!("no audit arch for {other:?}"))),
    }
}

/// The compiled filter for this process's architecture, built on first use and shared by
/// every spawn after it.
pub fn native_program() -> Result<&'static [sock_filter], SandboxError> {
    static PROGRAM: OnceLock<Result<Vec<sock_filter>, String>> = OnceLock::new();
    let compiled = PROGRAM.get_or_init(|| compile(NATIVE_ARCH).map_err(|e| e.to_string()));
    match compiled {
        Ok(p) => Ok(p.as_slice()),
        Err(e) => Err(SandboxError::SeccompPolicy(e.clone())),
    }
}

/// One syscall's compiled match path, as seccompiler produced it.
#[derive(Clone, Debug)]
enum Entry {
    /// Matches on the number alone and returns this action.
    Plain(u32),
    /// Argument checks: seccompiler's instructions entered on a number match. Their
    /// internal jumps are relative and stay valid when the block moves as a unit.
    Checked(Vec<sock_filter>),
}

/// Compiles the policy for `arch` into one tree-shaped BPF program.
pub fn compile(arch: TargetArch) -> Result<Vec<sock_filter>, SandboxError> {
    let json = policy_for(arch)?;
    let map = seccompiler::compile_from_json(json.as_bytes(), arch)
        .map_err(|e| SandboxError::SeccompPolicy(format!("seccompiler: {e}")))?;
    let sandbox = map
        .get("sandbox")
        .ok_or_else(|| SandboxError::SeccompPolicy("filter `sandbox` missing".into()))?;
    let enosys = map
        .get("enosys")
        .ok_or_else(|| SandboxError::SeccompPolicy("filter `enosys` missing".into()))?;
    if map.len() != 2 {
        return Err(SandboxError::SeccompPolicy(
            "policy must hold exactly the filters `sandbox` and `enosys`".into(),
        ));
    }
    let (default_action, mut entries) = split_linear(sandbox)?;
    let (enosys_default, enosys_entries) = split_linear(enosys)?;
    if enosys_default != RET_ALLOW {
        return Err(SandboxError::SeccompPolicy(
            "filter `enosys` must allow what it does not list".into(),
        ));
    }
    for (nr, entry) in enosys_entries {
        if entries.insert(nr, entry).is_some() {
            return Err(SandboxError::SeccompPolicy(format!(
                "syscall {nr} appears in both `sandbox` and `enosys`"
            )));
        }
    }
    build_tree(arch, default_action, &entries)
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// Splits seccompiler's linear program into its mismatch action and one entry per syscall.
///
/// The layout it emits (seccompiler 0.5, `backend/filter.rs`) is: a 3-instruction arch
/// check, `LD nr`, then per syscall `JEQ nr, 0, 1` followed by its rule chain and a
/// `RET mismatch`, and a final `RET mismatch`. A block's extent is found by following the
/// path a non-matching number takes (a run of `JA`s) to the next block.
fn split_linear(prog: &BpfProgram) -> Result<(u32, BTreeMap<u32, Entry>), SandboxError> {
    let bad = |why: &str| SandboxError::SeccompPolicy(format!("unexpected seccompiler output: {why}"));
    let last = prog.last().ok_or_else(|| bad("empty program"))?;
    if last.code != BPF_RET_K {
        return Err(bad("program does not end in RET"));
    }
    let mismatch = last.k;
    let ld_nr = prog.get(3).ok_or_else(|| bad("too short"))?;
    if ld_nr.code != BPF_LD_W_ABS || ld_nr.k != SECCOMP_DATA_NR {
        return Err(bad("no syscall-number load at 3"));
    }
    let mut entries = BTreeMap::new();
    let mut pc = 4;
    while pc < prog.len() - 1 {
        let head = &prog[pc];
        if head.code != BPF_JMP_JEQ_K || head.jt != 0 || head.jf != 1 {
            return Err(bad("block does not start with JEQ nr,0,1"));
        }
        // The path a non-matching number takes: skip one, then follow JAs.
        let mut next = pc + 2;
        while let Some(ins) = prog.get(next) {
            if ins.code != BPF_JMP_JA {
                break;
            }
            next = next + 1 + ins.k as usize;
        }
        if next <= pc + 2 || next > prog.len() - 1 {
            return Err(bad("block extent out of range"));
        }
        let body = &prog[pc + 1..next];
        let entry = match body {
            [a, b, ret_match, ret_mismatch]
                if a.code == BPF_JMP_JA
                    && a.k == 1
                    && b.code == BPF_JMP_JA
                    && b.k == 2
                    && ret_match.code == BPF_RET_K
                    && ret_mismatch.code == BPF_RET_K =>
            {
                Entry::Plain(ret_match.k)
            }
            _ => Entry::Checked(body.to_vec()),
        };
        if entries.insert(head.k, entry).is_some() {
            return Err(bad("syscall listed twice"));
        }
        pc = next;
    }
    Ok((mismatch, entries))
}

fn build_tree(
    arch: TargetArch,
    default_action: u32,
    entries: &BTreeMap<u32, Entry>,
) -> Result<Vec<sock_filter>, SandboxError> {
    let mut out = vec![
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARCH),
        jump(BPF_JMP_JEQ_K, audit_arch(arch)?, 1, 0),
        stmt(BPF_RET_K, RET_KILL_PROCESS),
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR),
    ];
    if arch == TargetArch::x86_64 {
        out.push(jump(BPF_JMP_JGE_K, X32_SYSCALL_BIT, 0, 1));
        out.push(stmt(BPF_RET_K, RET_KILL_PROCESS));
    }
    let list: Vec<(u32, &Entry)> = entries.iter().map(|(k, v)| (*k, v)).collect();
    emit_node(&list, default_action, &mut out)?;
    if out.len() > 4096 {
        return Err(SandboxError::SeccompPolicy(format!("filter too long: {}", out.len())));
    }
    Ok(out)
}

fn emit_node(list: &[(u32, &Entry)], default_action: u32, out: &mut Vec<sock_filter>) -> Result<(), SandboxError> {
    if list.len() <= LEAF_SIZE {
        return emit_leaf(list, default_action, out);
    }
    let mid = list.len() / 2;
    let (left, right) = list.split_at(mid);
    let mut left_code = Vec::new();
    emit_node(left, default_action, &mut left_code)?;
    // nr >= pivot: fall into the JA that skips the left subtree; else skip the JA.
    out.push(jump(BPF_JMP_JGE_K, right[0].0, 0, 1));
    out.push(stmt(BPF_JMP_JA, u32::try_from(left_code.len()).map_err(|_| too_far())?));
    out.extend(left_code);
    emit_node(right, default_action, out)
}

fn too_far() -> SandboxError {
    SandboxError::SeccompPolicy("jump offset does not fit".into())
}

/// A leaf: one `JEQ` per syscall, then `RET default`, `RET allow`, then the argument-check
/// blocks, each entered from its `JEQ`.
fn emit_leaf(list: &[(u32, &Entry)], default_action: u32, out: &mut Vec<sock_filter>) -> Result<(), SandboxError> {
    let n = list.len();
    let allow_at = n + 1;
    let mut body_at = n + 2;
    let mut jumps = Vec::with_capacity(n);
    let mut bodies = Vec::new();
    for (i, (nr, entry)) in list.iter().enumerate() {
        let target = match entry {
            Entry::Plain(action) if *action == RET_ALLOW => allow_at,
            Entry::Plain(action) => {
                let at = body_at;
                bodies.push(stmt(BPF_RET_K, *action));
                body_at += 1;
                at
            }
            Entry::Checked(code) => {
                let at = body_at;
                bodies.extend_from_slice(code);
                body_at += code.len();
                at
            }
        };
        let offset = u8::try_from(target - (i + 1)).map_err(|_| too_far())?;
        jumps.push(jump(BPF_JMP_JEQ_K, *nr, offset, 0));
    }
    out.extend(jumps);
    out.push(stmt(BPF_RET_K, default_action));
    out.push(stmt(BPF_RET_K, RET_ALLOW));
    out.extend(bodies);
    // Argument blocks keep seccompiler's never-taken "next syscall" jumps, which point one
    // past the block; this keeps that target inside the program for the kernel's checker.
    out.push(stmt(BPF_RET_K, default_action));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let map = seccompiler::compile_from_json(policy_for(arch).unwrap().as_bytes(), arch).unwrap();
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
            0x5412u64, 0x541C, 0xFFFF_FFFF_0000_5412, 0x1_0000_5412, 0x5413, 0x10000000 | 17, 0x11,
            0x20000 | 17, 0xffff_ffff, 1, 2, 10, 16, 17, 0x0040_0000,
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
                    let want = if en != RET_ALLOW { en } else { run(&reference_map["sandbox"], nr, a, *args) };
                    assert_eq!(run(&tree, nr, a, *args), want, "{arch:?} nr {nr} args {args:x?}");
                }
            }
        }
    }

    #[test]
    fn tree_is_much_shorter_to_walk_than_the_chain() {
        let tree = compile(TargetArch::x86_64).unwrap();
        assert!(tree.len() < 700, "tree has {} instructions", tree.len());
    }

    #[test]
    fn foreign_abis_are_killed() {
        let tree = compile(TargetArch::x86_64).unwrap();
        // i386 audit arch.
        assert_eq!(run(&tree, 0, 0x4000_0003, [0; 6]), RET_KILL_PROCESS);
        // x32: x86_64 audit arch with the x32 bit set on the number (read = 0).
        assert_eq!(run(&tree, X32_SYSCALL_BIT, 0xC000_003E, [0; 6]), RET_KILL_PROCESS);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn policy_denies_what_the_threat_model_names() {
        let x = TargetArch::x86_64;
        let denied = [
            libc::SYS_ptrace, libc::SYS_mount, libc::SYS_umount2, libc::SYS_pivot_root,
            libc::SYS_move_mount, libc::SYS_fsopen, libc::SYS_fsmount, libc::SYS_fsconfig,
            libc::SYS_open_tree, libc::SYS_mount_setattr, libc::SYS_unshare, libc::SYS_setns,
            libc::SYS_keyctl, libc::SYS_add_key, libc::SYS_request_key, libc::SYS_bpf,
            libc::SYS_perf_event_open, libc::SYS_userfaultfd, libc::SYS_io_uring_setup,
            libc::SYS_io_uring_enter, libc::SYS_io_uring_register, libc::SYS_kexec_load,
            libc::SYS_kexec_file_load, libc::SYS_init_module, libc::SYS_finit_module,
            libc::SYS_delete_module, libc::SYS_reboot, libc::SYS_swapon, libc::SYS_swapoff,
            libc::SYS_acct, libc::SYS_process_vm_readv, libc::SYS_process_vm_writev,
            libc::SYS_open_by_handle_at, libc::SYS_name_to_handle_at,
        ];
        for nr in denied {
            assert_eq!(reference(x, nr as u32, [0; 6]), EPERM, "syscall {nr}");
            assert_eq!(run(&compile(x).unwrap(), nr as u32, 0xC000_003E, [0; 6]), EPERM, "syscall {nr}");
        }
        let tree = compile(x).unwrap();
        let a = 0xC000_003E;
        let nr = |n: i64| n as u32;
        assert_eq!(run(&tree, nr(libc::SYS_clone3), a, [0; 6]), ENOSYS);
        // clone: threads allowed, any namespace flag refused.
        assert_eq!(run(&tree, nr(libc::SYS_clone), a, [0x003d0f00, 0, 0, 0, 0, 0]), RET_ALLOW);
        for flag in [0x20000u64, 0x0200_0000, 0x0400_0000, 0x0800_0000, 0x1000_0000, 0x2000_0000, 0x4000_0000] {
            assert_eq!(run(&tree, nr(libc::SYS_clone), a, [flag | 17, 0, 0, 0, 0, 0]), EPERM, "flag {flag:#x}");
        }
        // ioctl: TIOCSTI / TIOCLINUX refused however the upper half is set.
        for req in [0x5412u64, 0x541C, 0xdead_beef_0000_5412, 0x1_0000_541C] {
            assert_eq!(run(&tree, nr(libc::SYS_ioctl), a, [1, req, 0, 0, 0, 0]), EPERM, "req {req:#x}");
        }
        assert_eq!(run(&tree, nr(libc::SYS_ioctl), a, [1, 0x5401, 0, 0, 0, 0]), RET_ALLOW);
        // personality: only the query and PER_LINUX.
        assert_eq!(run(&tree, nr(libc::SYS_personality), a, [0xffff_ffff, 0, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(run(&tree, nr(libc::SYS_personality), a, [0x0040_0000, 0, 0, 0, 0, 0]), EPERM);
        // socket families.
        assert_eq!(run(&tree, nr(libc::SYS_socket), a, [1, 1, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(run(&tree, nr(libc::SYS_socket), a, [17, 3, 0, 0, 0, 0]), EPERM);
        assert_eq!(run(&tree, nr(libc::SYS_socket), a, [38, 5, 0, 0, 0, 0]), EPERM);
        assert_eq!(run(&tree, nr(libc::SYS_read), a, [0; 6]), RET_ALLOW);
    }
}
