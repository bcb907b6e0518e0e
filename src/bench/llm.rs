//! LLM routing overhead: `POST /v1/chat/completions` straight to a fake upstream and
//! through a daemon routing to it, in one run: whole answers at several concurrencies
//! (closed loop), the same with 200 clients paced below saturation, the time to the first
//! streamed byte, and the daemon's memory per open stream.
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
    /// Concurrency levels (each client sends its next request when the last is answered).
    #[arg(long, value_delimiter = ',', default_value = "1,50,200")]
    pub clients: Vec<usize>,
    /// Requests per second, all clients together, of the paced 200-client run.
    #[arg(long, default_value_t = 2000.0)]
    pub paced_rate: f64,
    /// Streams held open at once to measure the daemon's memory per stream.
    #[arg(long, default_value_t = 200)]
    pub streams: usize,
    /// When started as root, the unprivileged uid to run as.
    #[arg(long, default_value_t = 65534)]
    pub as_uid: u32,
}

/// p50, p99 (µs) and requests/s.
pub type Figures = (u64, u64, f64);

/// One path at one concurrency.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Level {
    /// Concurrent clients.
    pub clients: usize,
    /// Whole answers straight from the fake upstream.
    pub direct: Figures,
    /// Whole answers through the daemon.
    pub bulkhead: Figures,
    /// Streamed answers straight from the fake upstream: time to the first byte.
    pub stream_direct: Figures,
    /// Streamed answers through the daemon: time to the first byte.
    pub stream_bulkhead: Figures,
}

/// Whole answers with clients paced below saturation, so latency is the path's own.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Paced {
    /// Concurrent clients (connections).
    pub clients: usize,
    /// Requests per second offered, all clients together.
    pub rate: f64,
    /// Straight to the fake upstream.
    pub direct: Figures,
    /// Through the daemon.
    pub bulkhead: Figures,
}

/// The daemon's memory with streams held open.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StreamMemory {
    /// Streams open at once (each had received its first event).
    pub streams: usize,
    /// Daemon RSS before they were opened, KiB.
    pub rss_before_kib: u64,
    /// Daemon RSS with all of them open, KiB.
    pub rss_open_kib: u64,
    /// (open - before) / streams, KiB.
    pub per_stream_kib: f64,
}

/// What `bulkhead bench llm` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LlmReport {
    /// Per concurrency level.
    pub levels: Vec<Level>,
    /// 200 clients, paced.
    pub paced: Option<Paced>,
    /// Memory per open stream.
    pub stream_memory: Option<StreamMemory>,
    /// The daemon's peak resident set, KiB.
    pub daemon_peak_rss_kib: Option<u64>,
    /// Errors seen.
    pub errors: Vec<String>,
}

const ANSWER: &str = r#"{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":10,"completion_tokens":2,"total_tokens":12}}"#;
const FIRST_EVENT: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"ok\"},\"finish_reason\":null}]}\n\n";
const LAST_EVENTS: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":2,\"total_tokens\":12}}\n\ndata: [DONE]\n\n";
/// How long the fake keeps a stream of model `hold` open after its first event.
const HOLD: Duration = Duration::from_secs(3);

/// The fake's streamed answer: events sent as they are produced.
struct Events(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Events {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

type FakeBody = http_body_util::Either<Full<Bytes>, Events>;

async fn fake_answer(
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<FakeBody>, std::convert::Infallible> {
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut r = if v["stream"] == true {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let hold = v["model"] == "hold";
        tokio::spawn(async move {
            if tx
                .send(Bytes::from_static(FIRST_EVENT.as_bytes()))
                .await
                .is_err()
            {
                return;
            }
            if hold {
                tokio::time::sleep(HOLD).await;
            }
            let _sent = tx.send(Bytes::from_static(LAST_EVENTS.as_bytes())).await;
        });
        let mut r = hyper::Response::new(FakeBody::Right(Events(rx)));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/event-stream"),
        );
        r
    } else {
        let mut r = hyper::Response::new(FakeBody::Left(Full::new(Bytes::from_static(
            ANSWER.as_bytes(),
        ))));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        r
    };
    *r.status_mut() = hyper::StatusCode::OK;
    Ok(r)
}

/// A fake upstream answering every request at once (streams: the first event at once,
/// the rest at once too, or after [`HOLD`] for model `hold`), on its own thread and
/// runtime.
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
                // Each event is its own small write: without this, Nagle holds the first
                // one back until the client's delayed ACK (40 ms).
                let _nodelay = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let _served = hyper::server::conn::http1::Builder::new()
                        .serve_connection(
                            hyper_util::rt::TokioIo::new(stream),
                            hyper::service::service_fn(fake_answer),
                        )
                        .await;
                });
            }
        });
    });
    Ok(port)
}

fn stats(mut v: Vec<Duration>, wall: Duration) -> Figures {
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

/// One way of sending a chat completion, and what is timed.
#[derive(Clone)]
struct Caller {
    direct: bool,
    stream: bool,
    model: &'static str,
    direct_client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    url: Arc<str>,
    through: crate::client::SocketClient,
}

impl Caller {
    fn body(&self) -> Bytes {
        let mut body = serde_json::json!({"model": self.model, "max_tokens": 16,
            "messages": [{"role": "user", "content": "hello"}]});
        if self.stream {
            body["stream"] = serde_json::Value::Bool(true);
        }
        Bytes::from(body.to_string())
    }

    /// Sends one call; returns the time to the whole answer, or for a stream to its
    /// first byte (the rest is then read to the end, untimed).
    async fn call(&self) -> Result<Duration, String> {
        let t = Instant::now();
        let resp = if self.direct {
            let req = hyper::Request::post(&*self.url)
                .header("content-type", "application/json")
                .body(Full::new(self.body()))
                .map_err(|e| e.to_string())?;
            self.direct_client
                .request(req)
                .await
                .map_err(|e| e.to_string())?
        } else {
            self.through
                .open(
                    hyper::Method::POST,
                    "/v1/chat/completions",
                    self.body().to_vec(),
                )
                .await?
        };
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        let mut body = resp.into_body();
        if self.stream {
            let first = loop {
                match body.frame().await {
                    Some(Ok(f)) if f.data_ref().is_some_and(|d| !d.is_empty()) => {
                        break t.elapsed();
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(e.to_string()),
                    None => return Err("stream ended before its first byte".into()),
                }
            };
            body.collect().await.map_err(|e| e.to_string())?;
            Ok(first)
        } else {
            body.collect().await.map_err(|e| e.to_string())?;
            Ok(t.elapsed())
        }
    }
}

/// `clients` tasks sending `per` calls each: each as soon as the last is answered, or
/// with `pace`, one every `pace` per client, clients staggered across it. Returns the
/// timings, the failures and the wall time.
async fn drive(
    c: &Caller,
    clients: usize,
    per: usize,
    pace: Option<Duration>,
) -> (Vec<Duration>, Vec<String>, Duration) {
    let t0 = tokio::time::Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per);
                let mut failed = Vec::new();
                for k in 0..per {
                    if let Some(interval) = pace {
                        let offset = interval.mul_f64(i as f64 / clients as f64);
                        tokio::time::sleep_until(t0 + offset + interval * k as u32).await;
                    }
                    match c.call().await {
                        Ok(d) => lat.push(d),
                        Err(e) => failed.push(e),
                    }
                }
                (lat, failed)
            })
        })
        .collect();
    let (mut all, mut failures) = (Vec::new(), Vec::new());
    for task in tasks {
        match task.await {
            Ok((lat, failed)) => {
                all.extend(lat);
                failures.extend(failed);
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    (all, failures, t0.elapsed())
}

/// Runs the benchmark.
pub fn llm(args: &LlmArgs, exe: &Path) -> Result<LlmReport, String> {
    let (work, _uid) = prepare(&ColdstartArgs {
        runs: 0,
        json: false,
        as_uid: args.as_uid,
    })?;
    let base = work.parent().ok_or("no temp dir")?.to_path_buf();
    let result = measure(args, exe, &base);
    let _removed = std::fs::remove_dir_all(&base);
    result
}

fn measure(args: &LlmArgs, exe: &Path, base: &Path) -> Result<LlmReport, String> {
    let port = fake_upstream()?;
    let state = base.join("daemon");
    std::fs::create_dir_all(&state).map_err(|e| e.to_string())?;
    let config = format!(
        "[providers.fake]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\n[models.\"m\"]\nprovider = \"fake\"\nupstream = \"m\"\n[models.\"hold\"]\nprovider = \"fake\"\nupstream = \"hold\"\n[rate_card.\"m\"]\ninput = 0.15\noutput = 0.60\n[rate_card.\"hold\"]\ninput = 0.15\noutput = 0.60\n"
    );
    std::fs::write(state.join("config.toml"), config).map_err(|e| e.to_string())?;
    let d = BenchDaemon::start(exe, &state, 1)?;
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let note = {
        let errors = errors.clone();
        move |e: String| {
            if let Ok(mut v) = errors.lock()
                && v.len() < 10
            {
                v.push(e);
            }
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let caller = |direct: bool, stream: bool, model: &'static str| -> Result<Caller, String> {
        Ok(Caller {
            direct,
            stream,
            model,
            direct_client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build_http(),
            url: format!("http://127.0.0.1:{port}/v1/chat/completions").into(),
            through: d.client(0).ok_or("no tenant")?,
        })
    };

    // Memory first, on a fresh daemon: RSS with every stream open against RSS before.
    let stream_memory = if args.streams > 0 {
        let warm = caller(false, true, "m")?;
        rt.block_on(async {
            for _ in 0..20 {
                if let Err(e) = warm.call().await {
                    note(format!("warm-up: {e}"));
                }
            }
        });
        let before = d.rss_kib().ok_or("daemon RSS unreadable")?;
        let hold = caller(false, true, "hold")?;
        let open = rt.block_on(async {
            let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(args.streams);
            let tasks: Vec<_> = (0..args.streams)
                .map(|_| {
                    let (hold, ready_tx) = (hold.clone(), ready_tx.clone());
                    tokio::spawn(async move {
                        let resp = hold
                            .through
                            .open(
                                hyper::Method::POST,
                                "/v1/chat/completions",
                                hold.body().to_vec(),
                            )
                            .await?;
                        let mut body = resp.into_body();
                        match body.frame().await {
                            Some(Ok(_)) => {}
                            _ => return Err("no first event".to_string()),
                        }
                        let _ready = ready_tx.send(()).await;
                        body.collect().await.map_err(|e| e.to_string())?;
                        Ok::<_, String>(())
                    })
                })
                .collect();
            drop(ready_tx);
            let mut ready = 0;
            let deadline = tokio::time::Instant::now() + HOLD / 2;
            while ready < args.streams {
                match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
                    Ok(Some(())) => ready += 1,
                    _ => break,
                }
            }
            let open = (ready, d.rss_kib());
            for t in tasks {
                match t.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => note(format!("held stream: {e}")),
                    Err(e) => note(format!("held stream: {e}")),
                }
            }
            open
        });
        match open {
            (ready, Some(rss)) if ready == args.streams => Some(StreamMemory {
                streams: ready,
                rss_before_kib: before,
                rss_open_kib: rss,
                per_stream_kib: rss.saturating_sub(before) as f64 / ready as f64,
            }),
            (ready, _) => {
                note(format!("only {ready} of {} streams opened", args.streams));
                None
            }
        }
    } else {
        None
    };

    let closed = |c: &Caller, clients: usize| {
        let per = (args.requests / clients.max(1)).max(1);
        let (lat, failed, wall) = rt.block_on(drive(c, clients.max(1), per, None));
        failed.into_iter().for_each(&note);
        stats(lat, wall)
    };
    let mut levels = Vec::new();
    for &clients in &args.clients {
        levels.push(Level {
            clients,
            direct: closed(&caller(true, false, "m")?, clients),
            bulkhead: closed(&caller(false, false, "m")?, clients),
            stream_direct: closed(&caller(true, true, "m")?, clients),
            stream_bulkhead: closed(&caller(false, true, "m")?, clients),
        });
    }

    // 200 connections, each sending at its own steady pace, staggered.
    let paced = if args.paced_rate > 0.0 {
        let clients = 200usize;
        let interval = Duration::from_secs_f64(clients as f64 / args.paced_rate);
        let per = (args.requests / clients).max(5);
        let run = |c: Caller| {
            let (lat, failed, wall) = rt.block_on(drive(&c, clients, per, Some(interval)));
            failed.into_iter().for_each(&note);
            stats(lat, wall)
        };
        Some(Paced {
            clients,
            rate: args.paced_rate,
            direct: run(caller(true, false, "m")?),
            bulkhead: run(caller(false, false, "m")?),
        })
    } else {
        None
    };

    let report = LlmReport {
        levels,
        paced,
        stream_memory,
        daemon_peak_rss_kib: d.peak_rss_kib(),
        errors: errors.lock().map(|v| v.clone()).unwrap_or_default(),
    };
    drop(d);
    Ok(report)
}

/// The human-readable report, with the targets.
pub fn print(r: &LlmReport) {
    let v = |ok: bool| if ok { "met" } else { "MISSED" };
    // Signed: on a noisy machine the daemon's tail can come out below the direct one's,
    // and that is shown as it was measured, not as zero.
    let added = |b: u64, d: u64| b as i64 - d as i64;
    println!("POST /v1/chat/completions to a fake upstream answering at once; microseconds");
    println!("closed loop (each client sends again when answered):");
    println!(
        "clients  what             direct p50/p99    req/s   bulkhead p50/p99    req/s   added p50/p99"
    );
    let row = |clients: usize, what: &str, d: Figures, b: Figures| {
        println!(
            "{clients:>7}  {what:<15} {:>7} {:>7} {:>8.0}   {:>8} {:>8} {:>8.0}   {:>6} {:>6}",
            d.0,
            d.1,
            d.2,
            b.0,
            b.1,
            b.2,
            added(b.0, d.0),
            added(b.1, d.1),
        );
    };
    for l in &r.levels {
        row(l.clients, "whole answer", l.direct, l.bulkhead);
        row(
            l.clients,
            "stream 1st byte",
            l.stream_direct,
            l.stream_bulkhead,
        );
    }
    if let Some(p) = &r.paced {
        println!(
            "paced: {} clients, {:.0} requests/s in all ({:.1}/s each):",
            p.clients,
            p.rate,
            p.rate / p.clients as f64
        );
        row(p.clients, "whole answer", p.direct, p.bulkhead);
        let (p50, p99) = (
            added(p.bulkhead.0, p.direct.0),
            added(p.bulkhead.1, p.direct.1),
        );
        println!(
            "target added latency, 200 paced clients: p50 {p50} us <= 500 us: {}; p99 {p99} us <= 2000 us: {}",
            v(p50 <= 500),
            v(p99 <= 2000)
        );
    }
    if let Some(l) = r.levels.iter().find(|l| l.clients == 200) {
        println!(
            "(200 clients closed loop saturate the 2 cores: added p50 {} us, p99 {} us is queueing)",
            added(l.bulkhead.0, l.direct.0),
            added(l.bulkhead.1, l.direct.1)
        );
    }
    if let Some(l) = r.levels.iter().find(|l| l.clients == 1) {
        let first = added(l.stream_bulkhead.0, l.stream_direct.0);
        println!(
            "target time to first streamed byte added, 1 client: p50 {first} us <= 1000 us: {}",
            v(first <= 1000)
        );
    }
    if let Some(l) = r.levels.iter().find(|l| l.clients == 50) {
        println!(
            "target throughput at 50 clients: {:.0} requests/s >= 5000: {} (direct {:.0}/s)",
            l.bulkhead.2,
            v(l.bulkhead.2 >= 5000.0),
            l.direct.2
        );
    }
    if let Some(m) = &r.stream_memory {
        println!(
            "target daemon memory per open stream: {:.1} KiB <= 64 KiB: {} ({} streams open: RSS {} -> {} KiB)",
            m.per_stream_kib,
            v(m.per_stream_kib <= 64.0),
            m.streams,
            m.rss_before_kib,
            m.rss_open_kib
        );
    }
    if let Some(kib) = r.daemon_peak_rss_kib {
        println!("daemon peak RSS: {:.1} MiB", kib as f64 / 1024.0);
    }
    for e in &r.errors {
        println!("  error: {e}");
    }
}
