//! `cargo bench --bench throughput`: `/bin/true` runs per second with 4 concurrent
//! clients, bubblewrap against `POST /v1/exec` in warm cells, in alternating windows of
//! one run, and the idle memory of each held cell.

use std::path::Path;
use std::process::ExitCode;

use bulkhead::bench::throughput::{ThroughputArgs, print, throughput};

fn main() -> ExitCode {
    let args = ThroughputArgs {
        clients: 4,
        seconds: 3.0,
        rounds: 2,
        as_uid: 65534,
    };
    match throughput(&args, Path::new(env!("CARGO_BIN_EXE_bulkhead"))) {
        Ok(report) => {
            print(&report);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("throughput bench: {e}");
            ExitCode::FAILURE
        }
    }
}
