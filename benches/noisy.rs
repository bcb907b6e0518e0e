//! `cargo bench --bench noisy`: tenant B's exec latency with tenant A idle and while A
//! floods the daemon (200 concurrent execs: CPU hogs, fork bombs, output floods), in one
//! run. `BULKHEAD_BENCH_RUNS` sets B's runs per phase.

use std::path::Path;
use std::process::ExitCode;

use bulkhead::bench::noisy::{FloodKind, NoisyArgs, noisy, print};

fn main() -> ExitCode {
    let runs = std::env::var("BULKHEAD_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let args = NoisyArgs {
        runs,
        flood: 200,
        kinds: FloodKind::ALL.to_vec(),
        as_uid: 65534,
    };
    match noisy(&args, Path::new(env!("CARGO_BIN_EXE_bulkhead"))) {
        Ok(report) => {
            print(&report);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("noisy bench: {e}");
            ExitCode::FAILURE
        }
    }
}
