//! Noisy-neighbour benchmark: tenant B runs `/bin/true` one exec at a time, first with
//! tenant A idle and then while A floods the daemon with 200 concurrent execs (CPU hogs,
//! fork bombs, output floods and plain runs), in one run of one daemon. Reports B's
//! latency in both phases, their ratio, and every error B saw.
#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::{BenchDaemon, ColdstartArgs, Stats, prepare, stats};

/// Options of `bulkhead bench noisy`.
#[derive(clap::Args, Debug, Clone)]
pub struct NoisyArgs {
    /// B's timed runs per phase.
    #[arg(long, default_value_t = 1000)]
    pub runs: usize,
    /// A's concurrent requests while flooding.
    #[arg(long, default_value_t = 200)]
    pub flood: usize,
    /// What A's requests run, in turn: any of `true`, `cpu` (a busy loop), `fork` (a
    /// fork bomb), `output` (`yes`, an endless output flood).
    #[arg(long, value_delimiter = ',', default_value = "true,cpu,fork,output")]
    pub kinds: Vec<FloodKind>,
    /// When started as root, the unprivileged uid to run as.
    #[arg(long, default_value_t = 65534)]
    pub as_uid: u32,
}

/// One kind of flooding request.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FloodKind {
    /// `/bin/true`.
    True,
    /// A busy loop until the 2 s timeout.
    Cpu,
    /// A fork bomb (held back by the pids limit) until the timeout.
    Fork,
    /// `yes`: output without end until the timeout.
    Output,
}

impl FloodKind {
    /// All kinds, the default mix.
    pub const ALL: [FloodKind; 4] = [
        FloodKind::True,
        FloodKind::Cpu,
        FloodKind::Fork,
        FloodKind::Output,
    ];
}

/// Result of the benchmark.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NoisyReport {
    /// B with A idle.
    pub b_idle: Stats,
    /// B while A floods.
    pub b_flooded: Stats,
    /// `b_flooded.p99 / b_idle.p99`.
    pub p99_ratio: f64,
    /// `b_flooded.p50 / b_idle.p50`.
    pub p50_ratio: f64,
    /// Errors B saw (should be none).
    pub b_errors: Vec<String>,
    /// A's requests answered during the flood, by HTTP status.
    pub a_answers: std::collections::BTreeMap<u16, u64>,
}

/// What one of A's flooding requests runs.
fn flood_request(kind: FloodKind) -> serde_json::Value {
    let argv: &[&str] = match kind {
        FloodKind::True => &["/bin/true"],
        FloodKind::Cpu => &["sh", "-c", "while :; do :; done"],
        FloodKind::Fork => &["sh", "-c", "f() { f | f & }; f; sleep 5"],
        FloodKind::Output => &["yes", "flood"],
    };
    serde_json::json!({"argv": argv, "timeout_ms": 2000})
}

/// Runs the benchmark against `exe`.
pub fn noisy(args: &NoisyArgs, exe: &Path) -> Result<NoisyReport, String> {
    let (work, _uid) = prepare(&ColdstartArgs {
        runs: 0,
        json: false,
        as_uid: args.as_uid,
    })?;
    let dir = work
        .parent()
        .map(|p| p.join("daemon"))
        .ok_or("no temp dir")?;
    let d = BenchDaemon::start(exe, &dir, 2)?;
    // A floods from its own runtime and connection pool: connections are driven by the
    // runtime that opened them.
    let a = crate::client::SocketClient::new(
        &d.state.join("bulkhead.sock"),
        d.tokens.first().ok_or("no tenant")?,
    );
    let mut b_errors = Vec::new();
    let run_b = |n: usize, errors: &mut Vec<String>| {
        let mut lat = Vec::with_capacity(n);
        for _ in 0..n {
            match d.exec(1) {
                Ok(t) => lat.push(t),
                Err(e) => errors.push(e),
            }
        }
        lat
    };
    // Warm the daemon, the spawner and the page cache before timing anything.
    let _warm = run_b(20, &mut b_errors);
    let idle = run_b(args.runs, &mut b_errors);

    let stop = Arc::new(AtomicBool::new(false));
    let answers: Arc<[AtomicU64; 6]> = Arc::new(Default::default());
    let flood = {
        let (stop, answers, n) = (stop.clone(), answers.clone(), args.flood);
        let kinds = if args.kinds.is_empty() {
            FloodKind::ALL.to_vec()
        } else {
            args.kinds.clone()
        };
        std::thread::spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let tasks: Vec<_> = (0..n)
                    .map(|i| {
                        let (a, stop, answers) = (a.clone(), stop.clone(), answers.clone());
                        let body = flood_request(kinds[i % kinds.len()]);
                        tokio::spawn(async move {
                            while !stop.load(Ordering::Relaxed) {
                                let r = a.json(hyper::Method::POST, "/v1/exec", &body).await;
                                let slot = match r.map(|r| r.status.as_u16()) {
                                    Ok(200) => 0,
                                    Ok(429) => 1,
                                    Ok(s) if s < 500 => 2,
                                    Ok(_) => 3,
                                    Err(_) => 4,
                                };
                                answers[slot].fetch_add(1, Ordering::Relaxed);
                            }
                        })
                    })
                    .collect();
                // When B is done, A's requests still queued are abandoned (the client goes
                // away), which takes them out of A's queue.
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                for t in &tasks {
                    t.abort();
                }
                for t in tasks {
                    let _joined = t.await;
                }
            });
            Ok(())
        })
    };
    // Let the flood fill the queue and the slots before B's timed runs, and see A served
    // at least once (on a loaded machine that can take longer than the two seconds).
    std::thread::sleep(Duration::from_secs(2));
    let patience = std::time::Instant::now() + Duration::from_secs(20);
    while answers.iter().all(|n| n.load(Ordering::Relaxed) == 0)
        && std::time::Instant::now() < patience
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let flooded = run_b(args.runs, &mut b_errors);
    stop.store(true, Ordering::Relaxed);
    flood
        .join()
        .map_err(|_| "flood thread panicked".to_string())??;
    let labels = [200u16, 429, 400, 500, 0];
    let a_answers = labels
        .iter()
        .zip(answers.iter())
        .map(|(l, n)| (*l, n.load(Ordering::Relaxed)))
        .filter(|(_, n)| *n > 0)
        .collect();
    let (b_idle, b_flooded) = (stats(idle), stats(flooded));
    let ratio = |x: u64, y: u64| x as f64 / (y.max(1)) as f64;
    let report = NoisyReport {
        p99_ratio: ratio(b_flooded.p99_us, b_idle.p99_us),
        p50_ratio: ratio(b_flooded.p50_us, b_idle.p50_us),
        b_idle,
        b_flooded,
        b_errors,
        a_answers,
    };
    drop(d);
    if let Some(base) = work.parent() {
        let _removed = std::fs::remove_dir_all(base);
    }
    Ok(report)
}

/// The human-readable report, with the target.
pub fn print(r: &NoisyReport) {
    println!("tenant B, /bin/true via POST /v1/exec, one at a time:");
    println!("phase            p50       p90       p99   runs");
    for (name, s) in [("A idle", &r.b_idle), ("A flooding", &r.b_flooded)] {
        println!(
            "{name:<12} {:>6}us  {:>6}us  {:>6}us  {:>5}",
            s.p50_us, s.p90_us, s.p99_us, s.runs
        );
    }
    println!(
        "A's answers during the flood (status: count): {}",
        r.a_answers
            .iter()
            .map(|(s, n)| format!(
                "{}: {n}",
                if *s == 0 {
                    "transport error".into()
                } else {
                    s.to_string()
                }
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "target: B p99 flooded/idle {:.2} (<= 2.00) {}; B errors {} (0) {}",
        r.p99_ratio,
        if r.p99_ratio <= 2.0 { "met" } else { "MISSED" },
        r.b_errors.len(),
        if r.b_errors.is_empty() {
            "met"
        } else {
            "MISSED"
        },
    );
    for e in r.b_errors.iter().take(5) {
        println!("  B error: {e}");
    }
}
