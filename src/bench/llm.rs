//! LLM routing overhead: `POST /v1/chat/completions` straight to a fake upstream and
//! through a daemon routing to it, in one run, at several concurrencies.
#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use super::{BenchDaemon, ColdstartArgs, prepare};

/// Options of `bulkhead bench llm`.
#[derive(clap::Args, Debug, Clone)]
pub struct LlmArgs {
    /// Requests per concurrency level and path.
    #[arg(long, default_value_t = 2000)]
    pub requests: usize,
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,50,200")]
    pub clients: Vec<usize>,
    /// When started as root, the unprivileged uid to run as.
    #[arg(long, default_value_t = 65534)]
    pub as_uid: u32,
}

/// One path at one concurrency.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Level {
    /// Concurrent clients.
    pub clients: usize,
    /// Straight to the fake upstream: p50, p99 (µs) and requests/s.
    pub direct: (u64, u64, f64),
    /// Through the daemon: p50, p99 (µs) and requests/s.
    pub bulkhead: (u64, u64, f64),
}

/// What `bulkhead bench llm` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LlmReport {
    /// Per concurrency level.
    pub levels: Vec<Level>,
    /// The daemon's peak resident set, KiB.
    pub daemon_peak_rss_kib: Option<u64>,
    /// Errors seen.
    pub errors: Vec<String>,
}

const ANSWER: &str = r#"{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":10,"completion_tokens":2,"total_tokens":12}}"#;

/// A fake upstream answering every request at once, on its own thread and runtime.
fn fake_upstream() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        let mut r =
                            hyper::Response::new(Full::new(Bytes::from_static(ANSWER.as_bytes())));
                        r.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, std::convert::Infallible>(r)
                    });
                    let _served = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    Ok(port)
}

fn stats(mut v: Vec<Duration>, wall: Duration) -> (u64, u64, f64) {
    v.sort();
    let at = |p: f64| {
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .map_or(0, |d| d.as_micros() as u64)
    };
    (
        at(0.5),
        at(0.99),
        v.len() as f64 / wall.as_secs_f64().max(1e-9),
    )
}

/// Runs the benchmark.
pub fn llm(args: &LlmArgs, exe: &Path) -> Result<LlmReport, String> {
    let (work, _uid) = prepare(&ColdstartArgs {
        runs: 0,
        json: false,
        as_uid: args.as_uid,
    })?;
    let base = work.parent().ok_or("no temp dir")?.to_path_buf();
    let port = fake_upstream()?;
    let state = base.join("daemon");
    std::fs::create_dir_all(&state).map_err(|e| e.to_string())?;
    let config = format!(
        "[providers.fake]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\n[models.\"m\"]\nprovider = \"fake\"\nupstream = \"m\"\n[rate_card.\"m\"]\ninput = 0.15\noutput = 0.60\n"
    );
    std::fs::write(state.join("config.toml"), config).map_err(|e| e.to_string())?;
    let d = BenchDaemon::start(exe, &state, 1)?;
    let body = serde_json::json!({"model": "m", "max_tokens": 16,
        "messages": [{"role": "user", "content": "hello"}]});
    let bytes = Bytes::from(serde_json::to_vec(&body).map_err(|e| e.to_string())?);
    let direct_client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let through = d.client(0).ok_or("no tenant")?;
    let mut levels = Vec::new();
    for &clients in &args.clients {
        let per = (args.requests / clients.max(1)).max(1);
        let run = |direct: bool| {
            rt.block_on(async {
                let t = Instant::now();
                let tasks: Vec<_> = (0..clients.max(1))
                    .map(|_| {
                        let (c, url, bytes) = (direct_client.clone(), url.clone(), bytes.clone());
                        let (through, body) = (through.clone(), body.clone());
                        let errors = errors.clone();
                        tokio::spawn(async move {
                            let mut lat = Vec::with_capacity(per);
                            for _ in 0..per {
                                let t = Instant::now();
                                let ok = if direct {
                                    let req = hyper::Request::post(url.as_str())
                                        .header("content-type", "application/json")
                                        .body(Full::new(bytes.clone()));
                                    match req {
                                        Ok(req) => match c.request(req).await {
                                            Ok(r) => {
                                                let s = r.status().is_success();
                                                s && r.into_body().collect().await.is_ok()
                                            }
                                            Err(_) => false,
                                        },
                                        Err(_) => false,
                                    }
                                } else {
                                    through
                                        .json(hyper::Method::POST, "/v1/chat/completions", &body)
                                        .await
                                        .is_ok_and(|r| r.status.is_success())
                                };
                                if ok {
                                    lat.push(t.elapsed());
                                } else if let Ok(mut e) = errors.lock()
                                    && e.len() < 10
                                {
                                    e.push(format!(
                                        "{} request failed",
                                        if direct { "direct" } else { "bulkhead" }
                                    ));
                                }
                            }
                            lat
                        })
                    })
                    .collect();
                let mut all = Vec::new();
                for task in tasks {
                    if let Ok(v) = task.await {
                        all.extend(v);
                    }
                }
                stats(all, t.elapsed())
            })
        };
        let direct = run(true);
        let bulkhead = run(false);
        levels.push(Level {
            clients,
            direct,
            bulkhead,
        });
    }
    let report = LlmReport {
        levels,
        daemon_peak_rss_kib: d.peak_rss_kib(),
        errors: errors.lock().map(|v| v.clone()).unwrap_or_default(),
    };
    drop(d);
    let _removed = std::fs::remove_dir_all(&base);
    Ok(report)
}

/// The human-readable report, with the targets.
pub fn print(r: &LlmReport) {
    println!("POST /v1/chat/completions, non-streaming, fake upstream answering at once:");
    println!(
        "clients   direct p50/p99 us   req/s   bulkhead p50/p99 us   req/s   added p50/p99 us"
    );
    for l in &r.levels {
        println!(
            "{:>7}   {:>7} {:>7}   {:>7.0}   {:>9} {:>9}   {:>7.0}   {:>7} {:>7}",
            l.clients,
            l.direct.0,
            l.direct.1,
            l.direct.2,
            l.bulkhead.0,
            l.bulkhead.1,
            l.bulkhead.2,
            l.bulkhead.0.saturating_sub(l.direct.0),
            l.bulkhead.1.saturating_sub(l.direct.1),
        );
    }
    if let Some(l) = r.levels.iter().find(|l| l.clients == 200) {
        let (p50, p99) = (
            l.bulkhead.0.saturating_sub(l.direct.0),
            l.bulkhead.1.saturating_sub(l.direct.1),
        );
        let v = |ok: bool| if ok { "met" } else { "MISSED" };
        println!(
            "target added latency at 200 clients: p50 {p50} us <= 500 us: {}; p99 {p99} us <= 2000 us: {}",
            v(p50 <= 500),
            v(p99 <= 2000)
        );
    }
    if let Some(l) = r.levels.iter().find(|l| l.clients == 50) {
        let ok = l.bulkhead.2 >= 5000.0;
        println!(
            "target throughput at 50 clients: {:.0} requests/s >= 5000: {}",
            l.bulkhead.2,
            if ok { "met" } else { "MISSED" }
        );
    }
    if let Some(kib) = r.daemon_peak_rss_kib {
        println!("daemon peak RSS: {:.1} MiB", kib as f64 / 1024.0);
    }
    for e in &r.errors {
        println!("  error: {e}");
    }
}
