//! `cargo bench --bench coldstart`: the cold-start comparison against bubblewrap.
//!
//! Runs `/bin/true` interleaved in bubblewrap, `bulkhead-sandbox` (process), the library
//! in-process and a plain spawn, and prints p50/p90/p99 and the ratios to bubblewrap from
//! this one run, plus the targets. `BULKHEAD_BENCH_RUNS` sets the runs per variant.

use std::path::Path;
use std::process::ExitCode;

use bulkhead::bench::{ColdstartArgs, coldstart, print_table, target_lines};

fn main() -> ExitCode {
    let runs = std::env::var("BULKHEAD_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500);
    let args = ColdstartArgs {
        runs,
        json: false,
        as_uid: 65534,
    };
    match coldstart(&args, Path::new(env!("CARGO_BIN_EXE_bulkhead"))) {
        Ok(report) => {
            print_table(&report);
            for line in target_lines(&report) {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("coldstart bench: {e}");
            ExitCode::FAILURE
        }
    }
}
