//! Retrieval through the library (no daemon): ingestion rate and full-text search
//! latency over one tenant with many chunks, searched across the whole tenant, the
//! database size, and optionally search across many small tenants through the bounded
//! pool. Text is synthetic: words drawn from a fixed vocabulary with a skewed frequency,
//! so common words are common, as in real notes.
//!
//! With `--embedder DIR` (a sentence-transformers model such as all-MiniLM-L6-v2), a
//! second tenant of the same size is built from English words (the model's own
//! vocabulary) and embedded by the in-process embedder: embedding rates, ingestion with
//! supplied vectors, vector and hybrid search latency, and recall@10 of vector search
//! against an exact float scan of every vector. Embedding 100k chunks takes minutes on
//! two cores, so the corpus vectors are kept in `--vector-cache` for the next run.
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
    /// A sentence-transformers model directory: also measure embedding, vector and
    /// hybrid search on real model vectors.
    #[arg(long)]
    pub embedder: Option<std::path::PathBuf>,
    /// Where corpus vectors are kept between runs.
    #[arg(long, default_value = "target/bench-cache")]
    pub vector_cache: std::path::PathBuf,
}

/// Vector and hybrid search over real model vectors.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VectorReport {
    /// The model's identity.
    pub model: String,
    /// Chunks in the tenant.
    pub chunks: usize,
    /// In-process embedding of chunks, batched: chunks per second.
    pub embed_chunks_per_s: f64,
    /// Embedding one query: p50, p99 (µs).
    pub embed_query_us: (u64, u64),
    /// Storing chunks with supplied vectors (batches of 256): chunks per second.
    pub ingest_chunks_per_s: f64,
    /// Vector search across the tenant, top 10: p50, p99 (µs).
    pub vector_us: (u64, u64),
    /// Hybrid (full-text + vector, fused) across the tenant, top 10: p50, p99 (µs).
    pub hybrid_us: (u64, u64),
    /// Mean share of the exact top 10 (float scan of every vector) that vector search
    /// returned.
    pub recall_at_10: f64,
    /// Its database file (with WAL), bytes.
    pub db_bytes: u64,
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
    /// The same content-word queries once the file also holds another workspace's
    /// (empty) datasource, so every match is checked against the caller's: p50, p99 (µs).
    pub search_restricted_us: (u64, u64),
    /// Its database file (with WAL), bytes.
    pub db_bytes: u64,
    /// Search across random small tenants: p50, p99 (µs), with the pool's open count.
    pub many_tenants: Option<((u64, u64), usize)>,
    /// With a model: vector and hybrid search.
    pub vectors: Option<VectorReport>,
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
    r.create_datasource("big", &db, "elsewhere", "other")
        .map_err(|e| e.to_string())?;
    let mut restricted = Vec::with_capacity(args.queries);
    for _ in 0..args.queries {
        restricted.push(search(&r, "big", &db, &mut words, false)?);
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
        search_restricted_us: percentiles(restricted),
        db_bytes,
        many_tenants,
        vectors: match &args.embedder {
            Some(model) => Some(measure_vectors(args, dir, model)?),
            None => None,
        },
    })
}

/// Words per chunk of the vector corpus: a sentence (embedding cost grows with length).
const SENTENCE_WORDS: usize = 16;

/// English words from the model's WordPiece vocabulary, in its order (BERT's lists
/// common words first).
fn english_words(model: &std::path::Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(model.join("vocab.txt")).map_err(|e| e.to_string())?;
    let words: Vec<String> = text
        .lines()
        .filter(|w| w.len() >= 3 && w.bytes().all(|b| b.is_ascii_lowercase()))
        .take(VOCAB)
        .map(str::to_string)
        .collect();
    if words.len() < 1000 {
        return Err("the model's vocab.txt has too few English words".into());
    }
    Ok(words)
}

/// `n` words from `vocab`, skewed towards its start.
fn sentence(vocab: &[String], rng: &mut Words, n: usize) -> String {
    (0..n)
        .map(|_| {
            rng.next();
            let u = (rng.0 % 1_000_000) as f64 / 1_000_000.0;
            let rank = ((vocab.len() as f64).powf(u) as usize).min(vocab.len() - 1);
            vocab[rank].as_str()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The corpus vectors: read from the cache file, or embedded (and timed) and saved.
fn corpus_vectors(
    e: &crate::retrieval::embed::Embedder,
    texts: &[String],
    cache: &std::path::Path,
) -> Result<(Vec<Vec<f32>>, Option<f64>), String> {
    let dim = e.dim();
    let file = cache.join(format!("{}-{}x{dim}.f32", e.id(), texts.len()));
    if let Ok(bytes) = std::fs::read(&file)
        && bytes.len() == texts.len() * dim * 4
    {
        let all = crate::retrieval::vectors::from_blob(&bytes).unwrap_or_default();
        return Ok((all.chunks(dim).map(<[f32]>::to_vec).collect(), None));
    }
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let t = Instant::now();
    let mut out = Vec::with_capacity(texts.len());
    for batch in refs.chunks(256) {
        out.extend(e.embed(batch).map_err(|e| e.to_string())?);
    }
    let rate = texts.len() as f64 / t.elapsed().as_secs_f64().max(1e-9);
    std::fs::create_dir_all(cache).map_err(|e| e.to_string())?;
    let blob: Vec<u8> = out
        .iter()
        .flat_map(|v| crate::retrieval::vectors::to_blob(v))
        .collect();
    std::fs::write(&file, blob).map_err(|e| format!("{}: {e}", file.display()))?;
    Ok((out, Some(rate)))
}

fn measure_vectors(
    args: &RetrievalArgs,
    dir: &std::path::Path,
    model: &std::path::Path,
) -> Result<VectorReport, String> {
    use crate::retrieval::vectors::dot;
    let e = crate::retrieval::embed::Embedder::load(model).map_err(|e| e.to_string())?;
    let vocab = english_words(model)?;
    let mut rng = Words(0xD1B5_4A32_D192_ED03);
    let texts: Vec<String> = (0..args.chunks)
        .map(|_| sentence(&vocab, &mut rng, SENTENCE_WORDS))
        .collect();
    let (corpus, rate) = corpus_vectors(&e, &texts, &args.vector_cache)?;
    let embed_chunks_per_s = match rate {
        Some(r) => r,
        None => {
            // Vectors came from the cache: time a sample.
            let sample: Vec<&str> = texts.iter().take(512).map(String::as_str).collect();
            let t = Instant::now();
            e.embed(&sample).map_err(|e| e.to_string())?;
            sample.len() as f64 / t.elapsed().as_secs_f64().max(1e-9)
        }
    };
    let r = Retrieval::new(args.pool);
    let db = dir.join("vec.db");
    r.create_datasource("vec", &db, "default", "notes")
        .map_err(|e| e.to_string())?;
    let t = Instant::now();
    for (start, batch) in texts.chunks(256).enumerate() {
        let docs: Vec<NewDocument> = batch
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let j = start * 256 + i;
                NewDocument {
                    datasource: "notes".into(),
                    id: format!("d{j}"),
                    text: text.clone(),
                    metadata: None,
                    vectors: vec![corpus[j].clone()],
                }
            })
            .collect();
        r.put_documents("vec", &db, "default", &docs)
            .map_err(|e| e.to_string())?;
    }
    let ingest_chunks_per_s = args.chunks as f64 / t.elapsed().as_secs_f64().max(1e-9);
    let queries = args.queries.min(300);
    let (mut embed_lat, mut vector_lat, mut hybrid_lat) = (Vec::new(), Vec::new(), Vec::new());
    let mut recall = 0.0;
    for _ in 0..queries {
        let query = sentence(&vocab[200..], &mut rng, 4);
        let t = Instant::now();
        let qv = e
            .embed(&[query.as_str()])
            .map_err(|e| e.to_string())?
            .pop()
            .ok_or("no query vector")?;
        embed_lat.push(t.elapsed());
        let mut s = Search {
            query,
            vector: Some(qv.clone()),
            mode: Mode::Vector,
            top_k: 10,
            datasources: None,
            filter: Vec::new(),
        };
        let t = Instant::now();
        let (hits, _) = r
            .search("vec", &db, "default", &s)
            .map_err(|e| e.to_string())?;
        vector_lat.push(t.elapsed());
        s.mode = Mode::Hybrid;
        let t = Instant::now();
        r.search("vec", &db, "default", &s)
            .map_err(|e| e.to_string())?;
        hybrid_lat.push(t.elapsed());
        let mut exact: Vec<(f32, usize)> = corpus
            .iter()
            .enumerate()
            .map(|(j, v)| (dot(&qv, v), j))
            .collect();
        exact.select_nth_unstable_by(9, |a, b| b.0.total_cmp(&a.0));
        let found = exact[..10]
            .iter()
            .filter(|(_, j)| hits.iter().any(|h| h.id == format!("d{j}")))
            .count();
        recall += found as f64 / 10.0;
    }
    let size = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
    Ok(VectorReport {
        model: e.id().to_string(),
        chunks: args.chunks,
        embed_chunks_per_s,
        embed_query_us: percentiles(embed_lat),
        ingest_chunks_per_s,
        vector_us: percentiles(vector_lat),
        hybrid_us: percentiles(hybrid_lat),
        recall_at_10: recall / queries.max(1) as f64,
        db_bytes: size(&db) + size(&dir.join("vec.db-wal")),
    })
}

/// The human-readable report, with the targets.
pub fn print(r: &RetrievalReport) {
    let ok = |met: bool| if met { "met" } else { "MISSED" };
    println!(
        "one tenant, {} chunks of 50 words, full-text search across the tenant (top_k 10):",
        r.chunks
    );
    println!(
        "target full-text search p50 {} us <= 3000 us: {} (p99 {} us)",
        r.search_us.0,
        ok(r.search_us.0 <= 3000),
        r.search_us.1
    );
    println!(
        "queries with the commonest words too: p50 {} us, p99 {} us",
        r.search_common_us.0, r.search_common_us.1
    );
    println!(
        "with another workspace in the file (each match checked against the caller's datasources): p50 {} us, p99 {} us",
        r.search_restricted_us.0, r.search_restricted_us.1
    );
    println!(
        "ingestion: {:.0} chunks/s (text only; with vectors: see the model's figures)",
        r.ingest_chunks_per_s
    );
    println!(
        "database: {:.1} MB ({:.1} MB per 100k chunks)",
        r.db_bytes as f64 / 1e6,
        r.db_bytes as f64 / 1e6 * 100_000.0 / r.chunks.max(1) as f64
    );
    if let Some(v) = &r.vectors {
        println!(
            "one tenant, {} chunks of {SENTENCE_WORDS} English words with {} vectors, across the tenant (top_k 10):",
            v.chunks, v.model
        );
        println!(
            "target hybrid search p50 {} us <= 10000 us: {}; p99 {} us <= 25000 us: {}",
            v.hybrid_us.0,
            ok(v.hybrid_us.0 <= 10_000),
            v.hybrid_us.1,
            ok(v.hybrid_us.1 <= 25_000)
        );
        println!(
            "target recall@10 of vector search against an exact float scan {:.3} >= 0.95: {}",
            v.recall_at_10,
            ok(v.recall_at_10 >= 0.95)
        );
        println!(
            "vector search alone: p50 {} us, p99 {} us",
            v.vector_us.0, v.vector_us.1
        );
        println!(
            "target ingestion with supplied vectors {:.0} chunks/s >= 2000: {}",
            v.ingest_chunks_per_s,
            ok(v.ingest_chunks_per_s >= 2000.0)
        );
        println!(
            "target in-process embedding of a query p50 {} us <= 15000 us: {} (p99 {} us)",
            v.embed_query_us.0,
            ok(v.embed_query_us.0 <= 15_000),
            v.embed_query_us.1
        );
        println!(
            "target in-process embedding of chunks {:.0} chunks/s >= 100: {}",
            v.embed_chunks_per_s,
            ok(v.embed_chunks_per_s >= 100.0)
        );
        println!(
            "database with vectors: {:.1} MB ({:.1} MB per 100k chunks)",
            v.db_bytes as f64 / 1e6,
            v.db_bytes as f64 / 1e6 * 100_000.0 / v.chunks.max(1) as f64
        );
    }
    if let Some(((p50, p99), open)) = r.many_tenants {
        println!(
            "random small tenants: search p50 {p50} us <= 5000 us: {} (p99 {p99} us), {open} databases open",
            ok(p50 <= 5000)
        );
    }
}
