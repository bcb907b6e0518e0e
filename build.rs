//! Compiles the seccomp policy for the target architecture at build time, so that no
//! process ever parses or compiles it at run time (the library's tests re-derive it from
//! the JSON and compare).

#[path = "src/sandbox/seccomp_tree.rs"]
#[allow(dead_code)]
mod seccomp_tree;

use std::fmt::Write as _;

fn main() {
    println!("cargo:rerun-if-changed=seccomp/x86_64.json");
    println!("cargo:rerun-if-changed=seccomp/aarch64.json");
    println!("cargo:rerun-if-changed=seccomp/holder-x86_64.json");
    println!("cargo:rerun-if-changed=seccomp/holder-aarch64.json");
    println!("cargo:rerun-if-changed=src/sandbox/seccomp_tree.rs");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let (file, target) = match arch.as_str() {
        "x86_64" => ("seccomp/x86_64.json", seccompiler::TargetArch::x86_64),
        "aarch64" => ("seccomp/aarch64.json", seccompiler::TargetArch::aarch64),
        other => panic!("bulkhead has no seccomp policy for {other}"),
    };
    let json = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{file}: {e}"));
    let program =
        seccomp_tree::compile_policy(&json, target).unwrap_or_else(|e| panic!("{file}: {e}"));
    let mut src = format!(
        "/// Built from `{file}` by build.rs.\npub static NATIVE_PROGRAM: [libc::sock_filter; {}] = [\n",
        program.len()
    );
    for i in &program {
        let _ = writeln!(
            src,
            "    libc::sock_filter {{ code: {:#06x}, jt: {}, jf: {}, k: {:#010x} }},",
            i.code, i.jt, i.jf, i.k
        );
    }
    src.push_str("];\n");
    // The cell holder's filter is six calls; seccompiler's linear program is what we embed.
    let holder_file = format!("seccomp/holder-{arch}.json");
    let holder_json =
        std::fs::read_to_string(&holder_file).unwrap_or_else(|e| panic!("{holder_file}: {e}"));
    let mut filters = seccompiler::compile_from_json(holder_json.as_bytes(), target)
        .unwrap_or_else(|e| panic!("{holder_file}: {e}"));
    let holder = filters
        .remove("holder")
        .unwrap_or_else(|| panic!("{holder_file}: no `holder` filter"));
    let _ = writeln!(
        src,
        "/// Built from `{holder_file}` by build.rs.\npub static HOLDER_PROGRAM: [libc::sock_filter; {}] = [",
        holder.len()
    );
    for i in &holder {
        let _ = writeln!(
            src,
            "    libc::sock_filter {{ code: {:#06x}, jt: {}, jf: {}, k: {:#010x} }},",
            i.code, i.jt, i.jf, i.k
        );
    }
    src.push_str("];\n");
    let out_dir = std::env::var("OUT_DIR").unwrap_or_else(|e| panic!("OUT_DIR: {e}"));
    let out = std::path::Path::new(&out_dir).join("seccomp_program.rs");
    std::fs::write(&out, src).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
}
