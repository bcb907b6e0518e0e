//! Full-text retrieval through the library (no daemon): ingestion rate and search
//! latency over one tenant with many chunks, searched across the whole tenant, the
//! database size, and optionally search across many small tenants through the bounded
//! pool. Text is synthetic: words drawn from a fixed vocabulary with a skewed frequency,
//! so common words are common, as in real notes.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use crate::retrieval::{Mode, NewDocument, Retrieval, Search};

/// Options of `bulkhead bench retrieval`.
#[derive(clap::Args, Debug, Clone)]
pub struct RetrievalArgs {
    /// Chunks in the big tenant (one chunk per document).
    #[arg(long, default_value_t = 100_000)]
    pub chunks: usize,
    /// Searches timed.
    #[arg(long, default_value_t = 500)]
    pub queries: usize,
    /// Small tenants (0: skip that part).
    #[arg(long, default_value_t = 0)]
    pub tenants: usize,
    /// Chunks per small tenant.
    #[arg(long, default_value_t = 1000)]
    pub tenant_chunks: usize,
    /// Open databases the pool keeps.
    #[arg(long, default_value_t = 256)]
    pub pool: usize,
}

/// What `bulkhead bench retrieval` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RetrievalReport {
    /// Chunks in the big tenant.
    pub chunks: usize,
    /// Chunks stored per second (batches of 256 documents, each batch one transaction).
    pub ingest_chunks_per_s: f64,
    /// Full-text search across the big tenant, queries of 4 words drawn evenly from the
    /// vocabulary (what people search for: content words): p50, p99 (µs).
    pub search_us: (u64, u64),
    /// The same with query words drawn like the documents' (the commonest words, which
    /// match most chunks, included): p50, p99 (µs).
    pub search_common_us: (u64, u64),
    /// Its database file (with WAL), bytes.
    pub db_bytes: u64,
    /// Search across random small tenants: p50, p99 (µs), with the pool's open count.
    pub many_tenants: Option<((u64, u64), usize)>,
}

const VOCAB: usize = 5000;

/// A deterministic pseudo-random word stream (xorshift), skewed towards low word numbers.
struct Words(u64);

impl Words {
    fn next(&mut self) -> String {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let u = (self.0 % 1_000_000) as f64 / 1_000_000.0;
        let rank = ((VOCAB as f64).powf(u) as usize).min(VOCAB - 1);
        format!("w{rank}x")
    }

    fn text(&mut self, n: usize) -> String {
        (0..n).map(|_| self.next()).collect::<Vec<_>>().join(" ")
    }

    /// A word drawn evenly from the vocabulary.
    fn even(&mut self) -> String {
        self.next();
        format!("w{}x", self.0 % VOCAB as u64)
    }
}

fn percentiles(mut v: Vec<Duration>) -> (u64, u64) {
    v.sort();
    let at = |p: f64| {
        v.get(((v.len().max(1) - 1) as f64 * p).round() as usize)
            .map_or(0, |d| d.as_micros() as u64)
    };
    (at(0.5), at(0.99))
}

fn fill(
    r: &Retrieval,
    key: &str,
    db: &std::path::Path,
    chunks: usize,
    words: &mut Words,
) -> Result<(), String> {
    r.create_datasource(key, db, "default", "notes")
        .map_err(|e| e.to_string())?;
    let mut i = 0;
    while i < chunks {
        let n = (chunks - i).min(256);
        let docs: Vec<NewDocument> = (i..i + n)
            .map(|j| NewDocument {
                datasource: "notes".into(),
                id: format!("d{j}"),
                text: words.text(50),
                metadata: None,
                vectors: Vec::new(),
            })
            .collect();
        r.put_documents(key, db, "default", &docs)
            .map_err(|e| e.to_string())?;
        i += n;
    }
    Ok(())
}

/// Runs the benchmark in a fresh temporary directory.
pub fn retrieval(args: &RetrievalArgs) -> Result<RetrievalReport, String> {
    let dir = std::env::temp_dir().join(format!("bulkhead-bench-retrieval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let result = measure(args, &dir);
    let _removed = std::fs::remove_dir_all(&dir);
    result
}

fn measure(args: &RetrievalArgs, dir: &std::path::Path) -> Result<RetrievalReport, String> {
    let r = Retrieval::new(args.pool);
    let mut words = Words(0x9E37_79B9_7F4A_7C15);
    let db = dir.join("big.db");
    let t = Instant::now();
    fill(&r, "big", &db, args.chunks, &mut words)?;
    let ingest = args.chunks as f64 / t.elapsed().as_secs_f64().max(1e-9);
    let search =
        |r: &Retrieval, key: &str, db: &std::path::Path, words: &mut Words, common: bool| {
            let query = if common {
                words.text(4)
            } else {
                (0..4).map(|_| words.even()).collect::<Vec<_>>().join(" ")
            };
            let q = Search {
                query,
                vector: None,
                mode: Mode::Text,
                top_k: 10,
                datasources: None,
                filter: Vec::new(),
            };
            let t = Instant::now();
            r.search(key, db, "default", &q)
                .map(|_| t.elapsed())
                .map_err(|e| e.to_string())
        };
    let mut lat = Vec::with_capacity(args.queries);
    let mut common = Vec::with_capacity(args.queries);
    for _ in 0..args.queries {
        lat.push(search(&r, "big", &db, &mut words, false)?);
        common.push(search(&r, "big", &db, &mut words, true)?);
    }
    let size = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let db_bytes = size(&db) + size(&dir.join("big.db-wal"));
    let many_tenants = if args.tenants > 0 {
        for t in 0..args.tenants {
            fill(
                &r,
                &format!("t{t}"),
                &dir.join(format!("t{t}.db")),
                args.tenant_chunks,
                &mut words,
            )?;
        }
        let mut lat = Vec::with_capacity(args.queries);
        let mut pick = Words(0x2545_F491_4F6C_DD1D);
        for _ in 0..args.queries {
            pick.next();
            let t = (pick.0 % args.tenants as u64) as usize;
            lat.push(search(
                &r,
                &format!("t{t}"),
                &dir.join(format!("t{t}.db")),
                &mut words,
                false,
            )?);
        }
        Some((percentiles(lat), r.open_count()))
    } else {
        None
    };
    Ok(RetrievalReport {
        chunks: args.chunks,
        ingest_chunks_per_s: ingest,
        search_us: percentiles(lat),
        search_common_us: percentiles(common),
        db_bytes,
        many_tenants,
    })
}

/// The human-readable report, with the targets.
pub fn print(r: &RetrievalReport) {
    let v = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "one tenant, {} chunks of 50 words, full-text search across the tenant (top_k 10):",
        r.chunks
    );
    println!(
        "target full-text search p50 {} us <= 3000 us: {} (p99 {} us)",
        r.search_us.0,
        v(r.search_us.0 <= 3000),
        r.search_us.1
    );
    println!(
        "queries with the commonest words too: p50 {} us, p99 {} us",
        r.search_common_us.0, r.search_common_us.1
    );
    println!(
        "ingestion: {:.0} chunks/s (text only; the 2,000/s target is with vectors, not built yet)",
        r.ingest_chunks_per_s
    );
    println!(
        "database: {:.1} MB ({:.1} MB per 100k chunks)",
        r.db_bytes as f64 / 1e6,
        r.db_bytes as f64 / 1e6 * 100_000.0 / r.chunks.max(1) as f64
    );
    if let Some(((p50, p99), open)) = r.many_tenants {
        println!(
            "random small tenants: search p50 {p50} us <= 5000 us: {} (p99 {p99} us), {open} databases open",
            v(p50 <= 5000)
        );
    }
}
