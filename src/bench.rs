//! Cold-start benchmark.
#![forbid(unsafe_code)]

/// Options of `bulkhead bench coldstart`.
#[derive(clap::Args, Debug)]
pub struct ColdstartArgs {
    /// Runs per variant.
    #[arg(long, default_value_t = 200)]
    pub runs: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the benchmark and prints the result.
pub fn coldstart_cli(_args: &ColdstartArgs) -> Result<(), String> {
    Err("not yet".into())
}
