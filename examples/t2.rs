use std::time::Instant;
fn main() {
    let tree = bulkhead::sandbox::seccomp::compile(bulkhead::sandbox::seccomp::NATIVE_ARCH).unwrap();
    let map = seccompiler::compile_from_json(bulkhead::sandbox::seccomp::POLICY_X86_64.as_bytes(), seccompiler::TargetArch::x86_64).unwrap();
    let lin = map["sandbox"].clone();
    for (name, prog) in [("tree", tree.clone()), ("linear", lin.clone()), ("tree", tree), ("linear", lin)] {
        let mut v = vec![];
        for _ in 0..50 {
            match unsafe { nix::unistd::fork() }.unwrap() {
                nix::unistd::ForkResult::Child => {
                    unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
                    let t = Instant::now();
                    seccompiler::apply_filter(&prog).unwrap();
                    let us = t.elapsed().as_micros() as i32;
                    unsafe { libc::_exit(us.min(250)) };
                }
                nix::unistd::ForkResult::Parent { child } => {
                    if let nix::sys::wait::WaitStatus::Exited(_, c) = nix::sys::wait::waitpid(child, None).unwrap() { v.push(c) }
                }
            }
        }
        v.sort();
        println!("{name} len {} median attach {}us", prog.len(), v[v.len() / 2]);
    }
}
