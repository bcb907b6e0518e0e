//! `bulkhead-sandbox`: `bulkhead sandbox` as a program of its own, which starts faster
//! because it links only the sandbox (see `bulkhead::cli::sandbox`).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

/// Run one command in a fresh sandbox (no daemon): like bwrap, with Landlock and seccomp
/// always on; the same as `bulkhead sandbox`. Exits with the command's status (128+signal
/// when killed), 125 when the sandbox could not be built, 126/127 when the command could
/// not run.
#[derive(Parser)]
#[command(name = "bulkhead-sandbox", version, about)]
struct Cli {
    #[command(flatten)]
    args: bulkhead::cli::sandbox::SandboxArgs,
}

fn main() -> ExitCode {
    bulkhead::cli::sandbox::run(Cli::parse().args)
}
