//! The spawner: the daemon's only way to run a sandbox.
//!
//! Sandbox setup must never run in a multi-threaded process, so `serve` starts, before
//! tokio, a single-threaded re-exec of its own binary (`bulkhead __spawner`) and talks to
//! it over a `SOCK_SEQPACKET` socketpair: one JSON message per packet, the run's
//! stdin/stdout/stderr pipes attached with `SCM_RIGHTS`, and for every run a `Started` or
//! `Failed` reply followed by one `Exited`. The spawner owns the sandboxes (it reaps them
//! and enforces their deadlines); they die with it, and it dies with the daemon. If it dies
//! anyway, the daemon fails the runs in flight and starts a new one.
#![forbid(unsafe_code)]

mod autogroup;
pub mod cgroup;
mod client;
mod process;
pub mod protocol;

pub use client::{Killer, RunExit, RunHandle, SpawnerClient, SpawnerError, start_process};
pub use process::run_spawner;
