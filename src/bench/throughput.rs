//! Throughput: `/bin/true` runs per second with several concurrent clients, bubblewrap
//! (each client a loop of `bwrap` processes) against `POST /v1/exec` through a daemon
//! (each client its own tenant, so each runs in its own warm cell), measured in
//! alternating windows of one run; and the idle memory of each held cell.
#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{BenchDaemon, ColdstartArgs, bwrap_command, find_bwrap, prepare, time_command};

/// Options of `bulkhead bench throughput`.
#[derive(clap::Args, Debug, Clone)]
pub struct ThroughputArgs {
    /// Concurrent clients.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Seconds per measuring window.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Windows of each (they alternate: bubblewrap, bulkhead, bubblewrap, ...).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// When started as root, the unprivileged uid to run as.
    #[arg(long, default_value_t = 65534)]
    pub as_uid: u32,
}

/// What `bulkhead bench throughput` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ThroughputReport {
    /// Concurrent clients.
    pub clients: usize,
    /// bubblewrap runs per second (absent without bubblewrap).
    pub bwrap_runs_per_s: Option<f64>,
    /// `POST /v1/exec` runs per second.
    pub daemon_runs_per_s: f64,
    /// daemon / bubblewrap.
    pub ratio: Option<f64>,
    /// Cells held when measured.
    pub cells: usize,
    /// Their mean resident set, KiB (pages shared with the spawner count in full).
    pub cell_rss_kib: f64,
    /// Their mean proportional set, KiB.
    pub cell_pss_kib: f64,
    /// Their mean unique set (what dropping one frees), KiB.
    pub cell_uss_kib: f64,
    /// Failed runs, if any.
    pub errors: Vec<String>,
}

/// Runs the benchmark.
pub fn throughput(args: &ThroughputArgs, exe: &Path) -> Result<ThroughputReport, String> {
    let (work, _uid) = prepare(&ColdstartArgs {
        runs: 0,
        json: false,
        as_uid: args.as_uid,
    })?;
    let base = work.parent().ok_or("no temp dir")?.to_path_buf();
    let d = BenchDaemon::start(exe, &base.join("daemon"), args.clients.max(1))?;
    let bwrap = find_bwrap();
    let window = Duration::from_secs_f64(args.seconds.max(0.1));
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    // Each tenant's cell is made before anything is timed.
    for i in 0..args.clients {
        d.exec(i)?;
    }
    let (mut bw_runs, mut bw_time, mut d_runs, mut d_time) = (0u64, 0f64, 0u64, 0f64);
    for _ in 0..args.rounds.max(1) {
        if let Some(b) = &bwrap {
            let t = Instant::now();
            let done = Arc::new(AtomicU64::new(0));
            std::thread::scope(|s| {
                for _ in 0..args.clients {
                    let (done, errors, work) = (done.clone(), errors.clone(), work.clone());
                    s.spawn(move || {
                        while t.elapsed() < window {
                            match time_command(bwrap_command(b, &work)) {
                                Ok(_) => {
                                    done.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e) => {
                                    if let Ok(mut v) = errors.lock() {
                                        v.push(e);
                                    }
                                    return;
                                }
                            }
                        }
                    });
                }
            });
            bw_runs += done.load(Ordering::Relaxed);
            bw_time += t.elapsed().as_secs_f64();
        }
        let t = Instant::now();
        let (runs, errs) = d.exec_concurrently(args.clients, window);
        d_runs += runs;
        d_time += t.elapsed().as_secs_f64();
        if let Ok(mut v) = errors.lock() {
            v.extend(errs);
        }
    }
    let status = d.admin_status()?;
    let cells = status["cells"].as_array().cloned().unwrap_or_default();
    let mean = |k: &str| {
        let n = cells.len().max(1) as f64;
        cells.iter().filter_map(|c| c[k].as_f64()).sum::<f64>() / n
    };
    let bwrap_runs_per_s = bwrap.map(|_| bw_runs as f64 / bw_time.max(1e-9));
    let daemon_runs_per_s = d_runs as f64 / d_time.max(1e-9);
    let report = ThroughputReport {
        clients: args.clients,
        bwrap_runs_per_s,
        daemon_runs_per_s,
        ratio: bwrap_runs_per_s.map(|b| daemon_runs_per_s / b.max(1e-9)),
        cells: cells.len(),
        cell_rss_kib: mean("rss_kib"),
        cell_pss_kib: mean("pss_kib"),
        cell_uss_kib: mean("uss_kib"),
        errors: errors.lock().map(|v| v.clone()).unwrap_or_default(),
    };
    drop(d);
    let _removed = std::fs::remove_dir_all(&base);
    Ok(report)
}

/// The human-readable report, with the targets.
pub fn print(r: &ThroughputReport) {
    println!("/bin/true to completion, {} concurrent clients:", r.clients);
    match r.bwrap_runs_per_s {
        Some(b) => println!("bwrap                {b:>8.0} runs/s"),
        None => println!("bwrap                (not found on PATH: no comparison)"),
    }
    println!(
        "bulkhead POST /v1/exec {:>6.0} runs/s (each client its own tenant, warm cell)",
        r.daemon_runs_per_s
    );
    if let Some(ratio) = r.ratio {
        let verdict = if ratio >= 2.5 { "met" } else { "MISSED" };
        println!("target throughput: {ratio:.2}x >= 2.50x bwrap: {verdict}");
    }
    println!(
        "idle memory per held cell ({} cells): RSS {:.0} KiB, PSS {:.0} KiB, USS {:.0} KiB",
        r.cells, r.cell_rss_kib, r.cell_pss_kib, r.cell_uss_kib
    );
    let verdict = if r.cell_rss_kib <= 1024.0 {
        "met"
    } else {
        "MISSED"
    };
    println!(
        "target idle cell RSS: {:.0} KiB <= 1024 KiB: {verdict}",
        r.cell_rss_kib
    );
    for e in &r.errors {
        println!("  error: {e}");
    }
}
