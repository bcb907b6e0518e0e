//! Re-lays seccompiler's linear program as a binary search over syscall-number ranges.
//!
//! Shared verbatim by `build.rs` (which compiles the embedded policy at build time) and
//! the library (whose tests prove the result equals seccompiler's own program), so it
//! depends on nothing but seccompiler and std.
//!
//! Why: seccompiler emits one linear chain of syscall checks. Attaching a filter makes
//! the kernel JIT it and pre-evaluate it for every syscall number (the constant-action
//! cache), so the chain's length is paid on every spawn. Here consecutive numbers with
//! the same plain "allow" merge into ranges, ranges are found by binary search, and every
//! per-syscall argument check stays exactly the code seccompiler produced.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, TargetArch, sock_filter};

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_JMP_JGT_K: u16 = 0x25;
const BPF_JMP_JGE_K: u16 = 0x35;
const BPF_JMP_JA: u16 = 0x05;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;
/// `SECCOMP_RET_ALLOW`.
pub const RET_ALLOW: u32 = 0x7fff_0000;
/// `SECCOMP_RET_KILL_PROCESS`.
pub const RET_KILL_PROCESS: u32 = 0x8000_0000;
/// Syscall numbers with this bit set come from the x32 ABI, which shares the x86_64 audit
/// arch value; the filter kills such callers.
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// Segments per leaf of the search tree: small enough that every conditional jump fits
/// classic BPF's 8-bit offsets, large enough to keep the tree shallow.
const LEAF_SIZE: usize = 6;

/// The audit arch value the kernel reports for `arch`.
pub fn audit_arch(arch: TargetArch) -> Result<u32, String> {
    match arch {
        TargetArch::x86_64 => Ok(0xC000_003E),
        TargetArch::aarch64 => Ok(0xC000_00B7),
        other => Err(format!("no audit arch for {other:?}")),
    }
}

/// One syscall's compiled match path, as seccompiler produced it.
#[derive(Clone, Debug, PartialEq)]
enum Entry {
    /// Matches on the number alone and returns this action.
    Plain(u32),
    /// Argument checks: seccompiler's instructions entered on a number match. Their
    /// internal jumps are relative and stay valid when the block moves as a unit.
    Checked(Vec<sock_filter>),
}

/// Syscall numbers `lo..=hi` sharing one entry.
struct Segment<'a> {
    lo: u32,
    hi: u32,
    entry: &'a Entry,
}

/// Compiles the JSON policy (filters `sandbox` and `enosys`) for `arch` into one program.
pub fn compile_policy(json: &str, arch: TargetArch) -> Result<Vec<sock_filter>, String> {
    let map = seccompiler::compile_from_json(json.as_bytes(), arch)
        .map_err(|e| format!("seccompiler: {e}"))?;
    if map.len() != 2 {
        return Err("policy must hold exactly the filters `sandbox` and `enosys`".into());
    }
    let sandbox = map.get("sandbox").ok_or("filter `sandbox` missing")?;
    let enosys = map.get("enosys").ok_or("filter `enosys` missing")?;
    let (default_action, mut entries) = split_linear(sandbox)?;
    let (enosys_default, enosys_entries) = split_linear(enosys)?;
    if enosys_default != RET_ALLOW {
        return Err("filter `enosys` must allow what it does not list".into());
    }
    for (nr, entry) in enosys_entries {
        if entries.insert(nr, entry).is_some() {
            return Err(format!(
                "syscall {nr} appears in both `sandbox` and `enosys`"
            ));
        }
    }
    build_tree(arch, default_action, &entries)
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

fn offset(from_next: usize, to: usize) -> Result<u8, String> {
    to.checked_sub(from_next)
        .and_then(|d| u8::try_from(d).ok())
        .ok_or_else(|| "jump offset does not fit".to_string())
}

/// Splits seccompiler's linear program into its mismatch action and one entry per syscall.
///
/// The layout it emits (seccompiler 0.5, `backend/filter.rs`) is: a 3-instruction arch
/// check, `LD nr`, then per syscall `JEQ nr, 0, 1` followed by its rule chain and a
/// `RET mismatch`, and a final `RET mismatch`. A block's extent is found by following the
/// path a non-matching number takes (a run of `JA`s) to the next block.
fn split_linear(prog: &BpfProgram) -> Result<(u32, BTreeMap<u32, Entry>), String> {
    let bad = |why: &str| format!("unexpected seccompiler output: {why}");
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

fn segments(entries: &BTreeMap<u32, Entry>) -> Vec<Segment<'_>> {
    let mut out: Vec<Segment<'_>> = Vec::new();
    for (nr, entry) in entries {
        if let Some(last) = out.last_mut() {
            let plain_allow = |e: &Entry| *e == Entry::Plain(RET_ALLOW);
            if plain_allow(entry) && plain_allow(last.entry) && last.hi + 1 == *nr {
                last.hi = *nr;
                continue;
            }
        }
        out.push(Segment {
            lo: *nr,
            hi: *nr,
            entry,
        });
    }
    out
}

fn build_tree(
    arch: TargetArch,
    default_action: u32,
    entries: &BTreeMap<u32, Entry>,
) -> Result<Vec<sock_filter>, String> {
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
    emit_node(&segments(entries), default_action, &mut out)?;
    if out.len() > 4096 {
        return Err(format!("filter too long: {}", out.len()));
    }
    Ok(out)
}

fn emit_node(
    list: &[Segment<'_>],
    default_action: u32,
    out: &mut Vec<sock_filter>,
) -> Result<(), String> {
    if list.len() <= LEAF_SIZE {
        return emit_leaf(list, default_action, out);
    }
    let (left, right) = list.split_at(list.len() / 2);
    let mut left_code = Vec::new();
    emit_node(left, default_action, &mut left_code)?;
    // nr >= pivot: fall into the JA that skips the left subtree; else skip the JA.
    out.push(jump(BPF_JMP_JGE_K, right[0].lo, 0, 1));
    out.push(stmt(
        BPF_JMP_JA,
        u32::try_from(left_code.len()).map_err(|_| "subtree too long")?,
    ));
    out.extend(left_code);
    emit_node(right, default_action, out)
}

/// A leaf: a check per segment (`JEQ` for one number, `JGE lo`+`JGT hi` for a range), then
/// `RET default`, `RET allow`, then the other actions and argument-check blocks.
fn emit_leaf(
    list: &[Segment<'_>],
    default_action: u32,
    out: &mut Vec<sock_filter>,
) -> Result<(), String> {
    let checks: usize = list.iter().map(|s| if s.lo == s.hi { 1 } else { 2 }).sum();
    let default_at = checks;
    let allow_at = checks + 1;
    let mut body_at = checks + 2;
    let mut code = Vec::with_capacity(checks + 2);
    let mut bodies = Vec::new();
    for seg in list {
        let target = match seg.entry {
            Entry::Plain(action) if *action == RET_ALLOW => allow_at,
            Entry::Plain(action) => {
                bodies.push(stmt(BPF_RET_K, *action));
                body_at += 1;
                body_at - 1
            }
            Entry::Checked(block) => {
                bodies.extend_from_slice(block);
                body_at += block.len();
                body_at - block.len()
            }
        };
        if seg.lo == seg.hi {
            let here = code.len();
            code.push(jump(BPF_JMP_JEQ_K, seg.lo, offset(here + 1, target)?, 0));
        } else {
            // Below lo: skip the upper-bound check to the next segment. Above hi: next
            // segment. Otherwise: the target.
            code.push(jump(BPF_JMP_JGE_K, seg.lo, 0, 1));
            let here = code.len();
            code.push(jump(BPF_JMP_JGT_K, seg.hi, 0, offset(here + 1, target)?));
        }
    }
    debug_assert_eq!(code.len(), default_at);
    out.extend(code);
    out.push(stmt(BPF_RET_K, default_action));
    out.push(stmt(BPF_RET_K, RET_ALLOW));
    if !bodies.is_empty() {
        out.extend(bodies);
        // Argument blocks keep seccompiler's never-taken "next syscall" jumps, which point
        // one past the block; this keeps that target inside the program.
        out.push(stmt(BPF_RET_K, default_action));
    }
    Ok(())
}
