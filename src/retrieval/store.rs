//! One SQLite file per tenant (`<tenant>/retrieval.db`, WAL, FTS5), opened on demand
//! through a bounded pool. Every statement that reads or changes documents names the
//! caller's workspace (and, for searches, its datasources) in its own `WHERE`, so a
//! search ranks only allowed rows and `LIMIT` fills `top_k` from them.
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

use super::RetrievalError;
use super::query::fts_expression;
use super::vectors::{self, VectorIndex};

/// Bytes of text per chunk (cut at a whitespace before it when there is one).
const CHUNK_BYTES: usize = 1200;

const SCHEMA: &str = "
PRAGMA foreign_keys = ON;
CREATE TABLE IF NOT EXISTS datasources (
    id INTEGER PRIMARY KEY,
    workspace TEXT NOT NULL,
    name TEXT NOT NULL,
    dim INTEGER,
    UNIQUE (workspace, name)
);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY,
    datasource INTEGER NOT NULL REFERENCES datasources(id) ON DELETE CASCADE,
    ext_id TEXT NOT NULL,
    metadata TEXT,
    UNIQUE (datasource, ext_id)
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    document INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    text TEXT NOT NULL,
    datasource INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS chunks_document ON chunks(document);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    text, content='chunks', content_rowid='id', tokenize='porter unicode61 remove_diacritics 2'
);
CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.id, old.text);
END;
CREATE TABLE IF NOT EXISTS run_state (
    workspace TEXT NOT NULL,
    run_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    expires INTEGER NOT NULL,
    PRIMARY KEY (workspace, run_id, key)
);
CREATE INDEX IF NOT EXISTS run_state_expires ON run_state(expires);
CREATE TABLE IF NOT EXISTS vectors (
    chunk INTEGER PRIMARY KEY REFERENCES chunks(id) ON DELETE CASCADE,
    datasource INTEGER NOT NULL,
    v BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS embedding_cache (
    model TEXT NOT NULL,
    digest BLOB NOT NULL,
    v BLOB NOT NULL,
    PRIMARY KEY (model, digest)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS memory (
    workspace TEXT NOT NULL,
    owner TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (workspace, owner, key)
);
";

/// A document to store (upserted by its id within its datasource).
#[derive(Debug, Clone)]
pub struct NewDocument {
    /// Datasource name in the caller's workspace.
    pub datasource: String,
    /// The caller's own id, unique in its datasource.
    pub id: String,
    /// Its text.
    pub text: String,
    /// A JSON object, kept as given.
    pub metadata: Option<serde_json::Value>,
    /// Unit vectors: none, or one per chunk of [`chunks`]`(text)`.
    pub vectors: Vec<Vec<f32>>,
}

/// A stored document.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Document {
    /// Datasource name.
    pub datasource: String,
    /// The caller's id.
    pub id: String,
    /// The whole text (its chunks joined).
    pub text: String,
    /// Its chunk count.
    pub chunks: usize,
    /// Its metadata.
    pub metadata: Option<serde_json::Value>,
}

/// How a search ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// BM25 over the words of the query.
    Text,
    /// Nearest vectors to the query vector (cosine).
    Vector,
    /// Both, fused by reciprocal rank.
    Hybrid,
}

/// What a search may look at and how much to return.
#[derive(Debug, Clone)]
pub struct Search {
    /// The question (text and hybrid modes).
    pub query: String,
    /// The query's unit vector (vector and hybrid modes).
    pub vector: Option<Vec<f32>>,
    /// How to rank.
    pub mode: Mode,
    /// Results wanted.
    pub top_k: usize,
    /// Only these datasources (of the workspace); `None`: all of the workspace's.
    pub datasources: Option<Vec<String>>,
    /// Metadata equality filters (top-level keys).
    pub filter: Vec<(String, serde_json::Value)>,
}

/// One search result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Hit {
    /// Datasource name.
    pub datasource: String,
    /// Document id.
    pub id: String,
    /// Chunk number within the document.
    pub chunk: i64,
    /// The chunk's text.
    pub text: String,
    /// Relevance, higher is better: BM25 (text), cosine similarity (vector), or the
    /// reciprocal-rank-fusion score (hybrid).
    pub score: f64,
    /// The document's metadata.
    pub metadata: Option<serde_json::Value>,
}

/// The pool of open tenant databases.
pub struct Retrieval {
    cap: usize,
    open: Mutex<Pool>,
}

/// What a pool key may no longer open: the keys of deleted tenants' incarnations. A
/// request of a deleted incarnation still in flight would otherwise open, by path, the
/// file of a tenant made again under the same name.
#[derive(Default)]
struct Retired(std::collections::HashSet<String>);

#[derive(Default)]
struct Pool {
    retired: Retired,
    conns: HashMap<String, (PathBuf, Arc<Mutex<Db>>)>,
    /// Least recently used first.
    order: Vec<String>,
}

/// One open tenant database and what is kept beside it.
pub(super) struct Db {
    conn: Connection,
    /// Sketches of the stored vectors by dimension, loaded on the first vector search.
    vectors: Option<HashMap<usize, VectorIndex>>,
    /// Changes on every write to documents; with `opened`, names the index's content
    /// for the search cache (a reopened file starts a new sequence).
    writes: u64,
    opened: u64,
}

impl std::ops::Deref for Db {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl std::ops::DerefMut for Db {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

/// Which content of a tenant's index a result was computed from; any write to its
/// documents gives a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IndexVersion {
    /// Random per opening of the file.
    pub opened: u64,
    /// Writes since then.
    pub writes: u64,
}

/// Reciprocal rank fusion's damping constant (the usual 60).
const RRF_K: f64 = 60.0;

impl std::fmt::Debug for Retrieval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Retrieval(cap={})", self.cap)
    }
}

pub(super) fn sql(e: rusqlite::Error) -> RetrievalError {
    RetrievalError::Database(e.to_string())
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Splits `text` into chunks of at most [`CHUNK_BYTES`], at whitespace where possible.
pub fn chunks(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        if rest.len() <= CHUNK_BYTES {
            out.push(rest);
            break;
        }
        let mut end = CHUNK_BYTES;
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let cut = rest[..end]
            .rfind(char::is_whitespace)
            .filter(|i| *i > 0)
            .unwrap_or(end);
        out.push(rest[..cut].trim_end());
        rest = rest[cut..].trim_start();
    }
    out
}

impl Retrieval {
    /// A pool keeping at most `cap` databases open.
    pub fn new(cap: usize) -> Retrieval {
        Retrieval {
            cap: cap.max(1),
            open: Mutex::new(Pool::default()),
        }
    }

    /// The connection for `key` (the tenant and its incarnation, so a tenant made again
    /// under the same name never reuses the old one's handle), opening `db` if needed.
    pub(super) fn conn(&self, key: &str, db: &Path) -> Result<Arc<Mutex<Db>>, RetrievalError> {
        let gone = || RetrievalError::NotFound("the tenant was deleted".into());
        {
            let mut pool = lock(&self.open);
            if pool.retired.0.contains(key) {
                return Err(gone());
            }
            if let Some((_, c)) = pool.conns.get(key) {
                let c = c.clone();
                pool.order.retain(|k| k != key);
                pool.order.push(key.to_string());
                return Ok(c);
            }
        }
        // The tenant's directory is traversable (its sandboxes reach work/ through it),
        // so the file is made 0600 before SQLite opens it; SQLite gives its WAL and
        // shared-memory files the same mode.
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(db)
                .map_err(|e| RetrievalError::Database(format!("{}: {e}", db.display())))?;
        }
        let c = Connection::open(db).map_err(sql)?;
        c.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;
             PRAGMA mmap_size = 268435456;",
        )
        .map_err(sql)?;
        c.execute_batch(SCHEMA).map_err(sql)?;
        migrate(&c)?;
        let c = Arc::new(Mutex::new(Db {
            conn: c,
            vectors: None,
            writes: 0,
            opened: rand::random(),
        }));
        let mut pool = lock(&self.open);
        // Retired while the file was being opened: the path may already name the file
        // of a new tenant of the same name. (A key retired after this check opened the
        // old file, which deletion removes only after retiring.)
        if pool.retired.0.contains(key) {
            return Err(gone());
        }
        if let Some((_, have)) = pool.conns.get(key) {
            return Ok(have.clone());
        }
        // Only idle databases are closed: one in use stays (the pool may briefly hold
        // more than its cap), so a key never has two connections to its file.
        while pool.conns.len() >= self.cap {
            let idle = pool.order.iter().position(|k| {
                pool.conns
                    .get(k)
                    .is_some_and(|(_, c)| Arc::strong_count(c) == 1)
            });
            let Some(at) = idle else { break };
            let oldest = pool.order.remove(at);
            pool.conns.remove(&oldest);
        }
        pool.conns
            .insert(key.to_string(), (db.to_path_buf(), c.clone()));
        pool.order.push(key.to_string());
        Ok(c)
    }

    /// Stops `key` (a tenant incarnation about to be deleted) from opening its file
    /// again, and closes every pooled connection to files under `dir`. Call before the
    /// files go.
    pub fn retire(&self, key: &str, dir: &Path) {
        lock(&self.open).retired.0.insert(key.to_string());
        self.forget_under(dir);
    }

    /// Undoes [`Retrieval::retire`] when the deletion failed and the tenant stays.
    pub fn unretire(&self, key: &str) {
        lock(&self.open).retired.0.remove(key);
    }

    /// Closes every pooled connection to files under `dir` (a tenant being deleted).
    pub fn forget_under(&self, dir: &Path) {
        let mut pool = lock(&self.open);
        let gone: Vec<String> = pool
            .conns
            .iter()
            .filter(|(_, (p, _))| p.starts_with(dir))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            pool.conns.remove(&k);
            pool.order.retain(|o| *o != k);
        }
    }

    /// How many databases are open.
    pub fn open_count(&self) -> usize {
        lock(&self.open).conns.len()
    }

    /// Creates datasource `name` in `workspace`; `false` if it already existed.
    pub fn create_datasource(
        &self,
        key: &str,
        db: &Path,
        workspace: &str,
        name: &str,
    ) -> Result<bool, RetrievalError> {
        let c = self.conn(key, db)?;
        let c = lock(&c);
        let n = c
            .execute(
                "INSERT OR IGNORE INTO datasources (workspace, name) VALUES (?1, ?2)",
                params![workspace, name],
            )
            .map_err(sql)?;
        Ok(n == 1)
    }

    /// Stores `docs` in one transaction (all or none); each replaces any document of
    /// the same id in its datasource. Returns the chunk count of each.
    pub fn put_documents(
        &self,
        key: &str,
        db: &Path,
        workspace: &str,
        docs: &[NewDocument],
    ) -> Result<Vec<usize>, RetrievalError> {
        let c = self.conn(key, db)?;
        let mut guard = lock(&c);
        let db = &mut *guard;
        let tx = db
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql)?;
        let mut counts = Vec::with_capacity(docs.len());
        let mut removed: Vec<i64> = Vec::new();
        let mut added: Vec<(i64, i64, &[f32])> = Vec::new();
        for d in docs {
            let ds: i64 = tx
                .query_row(
                    "SELECT id FROM datasources WHERE workspace = ?1 AND name = ?2",
                    params![workspace, d.datasource],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql)?
                .ok_or_else(|| datasource_elsewhere(&tx, workspace, &d.datasource))?;
            let metadata = d.metadata.as_ref().map(|m| m.to_string());
            let existing: Option<i64> = tx
                .query_row(
                    "SELECT id FROM documents WHERE datasource = ?1 AND ext_id = ?2",
                    params![ds, d.id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql)?;
            let parts = chunks(&d.text);
            if !d.vectors.is_empty() && d.vectors.len() != parts.len() {
                return Err(RetrievalError::Invalid(format!(
                    "document {:?}: {} vectors for {} chunks",
                    d.id,
                    d.vectors.len(),
                    parts.len()
                )));
            }
            if let Some(first) = d.vectors.first() {
                if d.vectors.iter().any(|v| v.len() != first.len()) {
                    return Err(RetrievalError::Invalid(format!(
                        "document {:?}: its vectors differ in dimension",
                        d.id
                    )));
                }
                check_dimension(&tx, ds, &d.datasource, first.len())?;
            }
            let doc = match existing {
                Some(id) => {
                    removed.extend(chunk_ids(&tx, id)?);
                    tx.execute("DELETE FROM chunks WHERE document = ?1", params![id])
                        .map_err(sql)?;
                    tx.execute(
                        "UPDATE documents SET metadata = ?1 WHERE id = ?2",
                        params![metadata, id],
                    )
                    .map_err(sql)?;
                    id
                }
                None => {
                    tx.execute(
                        "INSERT INTO documents (datasource, ext_id, metadata) VALUES (?1, ?2, ?3)",
                        params![ds, d.id, metadata],
                    )
                    .map_err(sql)?;
                    tx.last_insert_rowid()
                }
            };
            for (seq, text) in parts.iter().enumerate() {
                tx.execute(
                    "INSERT INTO chunks (document, seq, text, datasource) VALUES (?1, ?2, ?3, ?4)",
                    params![doc, seq as i64, text, ds],
                )
                .map_err(sql)?;
                if let Some(v) = d.vectors.get(seq) {
                    let chunk = tx.last_insert_rowid();
                    tx.execute(
                        "INSERT INTO vectors (chunk, datasource, v) VALUES (?1, ?2, ?3)",
                        params![chunk, ds, vectors::to_blob(v)],
                    )
                    .map_err(sql)?;
                    added.push((chunk, ds, v));
                }
            }
            counts.push(parts.len());
        }
        tx.commit().map_err(sql)?;
        db.writes += 1;
        if let Some(indexes) = &mut db.vectors {
            for chunk in removed {
                indexes.values_mut().for_each(|ix| ix.remove(chunk));
            }
            for (chunk, ds, v) in added {
                indexes
                    .entry(v.len())
                    .or_insert_with(|| VectorIndex::new(v.len()))
                    .insert(chunk, ds, v);
            }
        }
        Ok(counts)
    }

    /// Checks that every name in `names` is a datasource of `workspace`.
    pub fn check_datasources(
        &self,
        key: &str,
        db: &Path,
        workspace: &str,
        names: &[String],
    ) -> Result<(), RetrievalError> {
        let c = self.conn(key, db)?;
        let c = lock(&c);
        let mut stmt = c
            .prepare_cached("SELECT 1 FROM datasources WHERE workspace = ?1 AND name = ?2")
            .map_err(sql)?;
        for name in names {
            if !stmt.exists(params![workspace, name]).map_err(sql)? {
                return Err(datasource_elsewhere(&c, workspace, name));
            }
        }
        Ok(())
    }

    /// Which content of the tenant's index a search would see now.
    pub fn version(&self, key: &str, db: &Path) -> Result<IndexVersion, RetrievalError> {
        let c = self.conn(key, db)?;
        let c = lock(&c);
        Ok(IndexVersion {
            opened: c.opened,
            writes: c.writes,
        })
    }

    /// Cached embeddings of `model` for the given keys (`None` where absent); the API
    /// makes each key from the caller's boundary and the text.
    pub fn cached_embeddings(
        &self,
        key: &str,
        db: &Path,
        model: &str,
        digests: &[[u8; 32]],
    ) -> Result<Vec<Option<Vec<f32>>>, RetrievalError> {
        let c = self.conn(key, db)?;
        let c = lock(&c);
        let mut stmt = c
            .prepare_cached("SELECT v FROM embedding_cache WHERE model = ?1 AND digest = ?2")
            .map_err(sql)?;
        digests
            .iter()
            .map(|d| {
                let blob: Option<Vec<u8>> = stmt
                    .query_row(params![model, &d[..]], |r| r.get(0))
                    .optional()
                    .map_err(sql)?;
                Ok(blob.and_then(|b| vectors::from_blob(&b)))
            })
            .collect()
    }

    /// Remembers embeddings of `model` under the given keys.
    pub fn cache_embeddings(
        &self,
        key: &str,
        db: &Path,
        model: &str,
        entries: &[([u8; 32], &[f32])],
    ) -> Result<(), RetrievalError> {
        let c = self.conn(key, db)?;
        let mut c = lock(&c);
        let tx = c
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO embedding_cache (model, digest, v) VALUES (?1, ?2, ?3)",
                )
                .map_err(sql)?;
            for (digest, v) in entries {
                stmt.execute(params![model, &digest[..], vectors::to_blob(v)])
                    .map_err(sql)?;
            }
        }
        tx.commit().map_err(sql)
    }

    /// The document `id` of datasource `datasource` in `workspace`.
    pub fn get_document(
        &self,
        key: &str,
        db: &Path,
        workspace: &str,
        datasource: &str,
        id: &str,
    ) -> Result<Document, RetrievalError> {
        let c = self.conn(key, db)?;
        let c = lock(&c);
        let found: Option<(i64, Option<String>)> = c
            .query_row(
                "SELECT d.id, d.metadata FROM documents d JOIN datasources s ON s.id = d.datasource
                 WHERE s.workspace = ?1 AND s.name = ?2 AND d.ext_id = ?3",
                params![workspace, datasource, id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql)?;
        let Some((doc, metadata)) = found else {
            return Err(elsewhere(&c, workspace, datasource, id));
        };
        let mut stmt = c
            .prepare_cached("SELECT text FROM chunks WHERE document = ?1 ORDER BY seq")
            .map_err(sql)?;
        let parts = stmt
            .query_map(params![doc], |r| r.get::<_, String>(0))
            .map_err(sql)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql)?;
        Ok(Document {
            datasource: datasource.to_string(),
            id: id.to_string(),
            text: parts.join("\n"),
            chunks: parts.len(),
            metadata: metadata.and_then(|m| serde_json::from_str(&m).ok()),
        })
    }

    /// Deletes the document; `NotFound` if the workspace has no such document.
    pub fn delete_document(
        &self,
        key: &str,
        db: &Path,
        workspace: &str,
        datasource: &str,
        id: &str,
    ) -> Result<(), RetrievalError> {
        let c = self.conn(key, db)?;
        let mut guard = lock(&c);
        let db = &mut *guard;
        let tx = db
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql)?;
        let doc: i64 = tx
            .query_row(
                "SELECT d.id FROM documents d JOIN datasources s ON s.id = d.datasource
                 WHERE s.workspace = ?1 AND s.name = ?2 AND d.ext_id = ?3",
                params![workspace, datasource, id],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql)?
            .ok_or_else(|| elsewhere(&tx, workspace, datasource, id))?;
        let removed = chunk_ids(&tx, doc)?;
        tx.execute("DELETE FROM chunks WHERE document = ?1", params![doc])
            .map_err(sql)?;
        tx.execute("DELETE FROM documents WHERE id = ?1", params![doc])
            .map_err(sql)?;
        tx.commit().map_err(sql)?;
        db.writes += 1;
        if let Some(indexes) = &mut db.vectors {
            for chunk in removed {
                indexes.values_mut().for_each(|ix| ix.remove(chunk));
            }
        }
        Ok(())
    }

    /// Searches the workspace's (allowed) datasources. Every ranking query restricts its
    /// candidates to the workspace, the named datasources and the metadata filter before
    /// ranking, so `top_k` fills from allowed rows. Returns the hits and the index
    /// version they were computed from.
    pub fn search(
        &self,
        key: &str,
        db: &Path,
        workspace: &str,
        s: &Search,
    ) -> Result<(Vec<Hit>, IndexVersion), RetrievalError> {
        let c = self.conn(key, db)?;
        let mut guard = lock(&c);
        let db = &mut *guard;
        let version = IndexVersion {
            opened: db.opened,
            writes: db.writes,
        };
        let hits = match s.mode {
            Mode::Text => text_hits(&db.conn, workspace, s, s.top_k)?,
            Mode::Vector => vector_hits(db, workspace, s, s.top_k)?,
            Mode::Hybrid => {
                // Each list goes deeper than top_k so a chunk ranked moderately by both
                // can outrank one ranked high by only one.
                let depth = (s.top_k * 3).max(30);
                let text = text_hits(&db.conn, workspace, s, depth)?;
                let near = vector_hits(db, workspace, s, depth)?;
                fuse(text, near, s.top_k)
            }
        };
        Ok((hits, version))
    }
}

/// Appends the conditions that keep rows (aliases `s` datasources, `d` documents) inside
/// `workspace`, the named datasources and, with `filter`, the metadata filter; every
/// value is bound.
fn restrict(
    sql_text: &mut String,
    args: &mut Vec<rusqlite::types::Value>,
    workspace: &str,
    s: &Search,
    filter: bool,
) {
    args.push(workspace.to_string().into());
    sql_text.push_str(&format!(" AND s.workspace = ?{}", args.len()));
    if let Some(names) = &s.datasources {
        args.push(serde_json::Value::from(names.clone()).to_string().into());
        sql_text.push_str(&format!(
            " AND s.name IN (SELECT value FROM json_each(?{}))",
            args.len()
        ));
    }
    if !filter {
        return;
    }
    for (k, v) in &s.filter {
        // Keys are checked to be [A-Za-z0-9_] by the caller; both are bound.
        sql_text.push_str(&format!(
            " AND json_extract(d.metadata, ?{}) IS ?{}",
            args.len() + 1,
            args.len() + 2
        ));
        args.push(format!("$.{k}").into());
        args.push(match v {
            serde_json::Value::Bool(b) => i64::from(*b).into(),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => i.into(),
                None => n.as_f64().unwrap_or(0.0).into(),
            },
            serde_json::Value::String(t) => t.clone().into(),
            _ => rusqlite::types::Value::Null,
        });
    }
}

fn hit_row(r: &rusqlite::Row<'_>, score: f64) -> rusqlite::Result<Hit> {
    Ok(Hit {
        datasource: r.get(0)?,
        id: r.get(1)?,
        chunk: r.get(2)?,
        text: r.get(3)?,
        metadata: r
            .get::<_, Option<String>>(4)?
            .and_then(|m| serde_json::from_str(&m).ok()),
        score,
    })
}

/// BM25 over the allowed chunks, best `depth`.
fn text_hits(
    c: &Connection,
    workspace: &str,
    s: &Search,
    depth: usize,
) -> Result<Vec<Hit>, RetrievalError> {
    let Some(expr) = fts_expression(&s.query) else {
        return Ok(Vec::new());
    };
    if s.filter.is_empty() {
        let allowed = allowed_sources(c, workspace, s)?;
        if allowed.is_empty() {
            return Ok(Vec::new());
        }
        let all: i64 = c
            .prepare_cached("SELECT count(*) FROM datasources")
            .and_then(|mut st| st.query_row([], |r| r.get(0)))
            .map_err(sql)?;
        // When the caller may see every datasource of the file (a tenant searched
        // whole), checking each match would exclude nothing; otherwise each match is
        // checked through the chunk's own datasource column, without joining documents.
        // The workspace is checked again on the rows returned either way.
        let restricted = (allowed.len() as i64) < all;
        let (join, only) = if restricted {
            (
                " JOIN chunks k ON k.id = chunks_fts.rowid",
                " AND k.datasource IN (SELECT value FROM json_each(?4))",
            )
        } else {
            ("", "")
        };
        let sql_text = format!(
            "SELECT s.name, d.ext_id, c.seq, c.text, d.metadata, t.r
             FROM (SELECT chunks_fts.rowid AS id, bm25(chunks_fts) AS r FROM chunks_fts{join}
                   WHERE chunks_fts MATCH ?1{only}
                   ORDER BY r LIMIT ?3) t
             JOIN chunks c ON c.id = t.id
             JOIN documents d ON d.id = c.document
             JOIN datasources s ON s.id = d.datasource
             WHERE s.workspace = ?2
             ORDER BY t.r"
        );
        let ids = serde_json::Value::from(allowed).to_string();
        let mut args: Vec<rusqlite::types::Value> = vec![
            expr.into(),
            workspace.to_string().into(),
            (depth as i64).into(),
        ];
        if restricted {
            args.push(ids.into());
        }
        return bm25_rows(c, &sql_text, &args);
    }
    let mut sql_text = String::from(
        "SELECT s.name, d.ext_id, c.seq, c.text, d.metadata, bm25(chunks_fts)
         FROM chunks_fts
         JOIN chunks c ON c.id = chunks_fts.rowid
         JOIN documents d ON d.id = c.document
         JOIN datasources s ON s.id = d.datasource
         WHERE chunks_fts MATCH ?1",
    );
    let mut args: Vec<rusqlite::types::Value> = vec![expr.into()];
    restrict(&mut sql_text, &mut args, workspace, s, true);
    args.push((depth as i64).into());
    sql_text.push_str(&format!(" ORDER BY bm25(chunks_fts) LIMIT ?{}", args.len()));
    bm25_rows(c, &sql_text, &args)
}

/// Runs a full-text statement whose sixth column is the BM25 rank (lower is better).
fn bm25_rows(
    c: &Connection,
    sql_text: &str,
    args: &[rusqlite::types::Value],
) -> Result<Vec<Hit>, RetrievalError> {
    c.prepare_cached(sql_text)
        .map_err(sql)?
        .query_map(rusqlite::params_from_iter(args.iter()), |r| {
            let rank: f64 = r.get(5)?;
            hit_row(r, -rank)
        })
        .map_err(sql)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql)
}

/// Sign-sketch candidates per result wanted, reranked by byte vectors; set against
/// exact search on all-MiniLM-L6-v2 vectors (`bulkhead bench retrieval --embedder`).
const OVERSAMPLE: usize = 64;
/// Fewest sign-sketch candidates.
const MIN_CANDIDATES: usize = 1000;
/// Byte-vector survivors per result wanted that are rescored from the stored floats.
const RESCORE: usize = 2;

/// Ids of the datasources the search may look at: the workspace's, or those of them it
/// names.
fn allowed_sources(
    c: &Connection,
    workspace: &str,
    s: &Search,
) -> Result<Vec<i64>, RetrievalError> {
    let mut sql_text = String::from("SELECT s.id FROM datasources s WHERE 1");
    let mut args = Vec::new();
    restrict(&mut sql_text, &mut args, workspace, s, false);
    c.prepare_cached(&sql_text)
        .map_err(sql)?
        .query_map(rusqlite::params_from_iter(args.iter()), |r| r.get(0))
        .map_err(sql)?
        .collect::<Result<_, _>>()
        .map_err(sql)
}

/// Nearest allowed chunks to the query vector by cosine, best `depth`: candidates by
/// sign sketch among the allowed datasources (and filtered chunks), rescored exactly
/// from the stored float vectors.
fn vector_hits(
    db: &mut Db,
    workspace: &str,
    s: &Search,
    depth: usize,
) -> Result<Vec<Hit>, RetrievalError> {
    let Some(q) = &s.vector else {
        return Err(RetrievalError::Invalid(
            "this search mode needs a query vector".into(),
        ));
    };
    let Db { conn, vectors, .. } = db;
    let sources = allowed_sources(conn, workspace, s)?;
    if sources.is_empty() {
        return Ok(Vec::new());
    }
    // Each datasource's vectors have one dimension, fixed by its first; only the
    // searched datasources' are compared with the query's (nothing of other workspaces
    // is revealed or can get in the way).
    let dims: Vec<usize> = conn
        .prepare_cached(
            "SELECT DISTINCT dim FROM datasources
             WHERE dim IS NOT NULL AND id IN (SELECT value FROM json_each(?1)) ORDER BY dim",
        )
        .map_err(sql)?
        .query_map(
            params![serde_json::Value::from(sources.clone()).to_string()],
            |r| r.get::<_, i64>(0),
        )
        .map_err(sql)?
        .map(|d| d.map(|d| d as usize))
        .collect::<Result<_, _>>()
        .map_err(sql)?;
    if dims.is_empty() {
        return Ok(Vec::new());
    }
    if !dims.contains(&q.len()) {
        return Err(RetrievalError::Invalid(format!(
            "vector: {} dimensions, but the datasources searched hold vectors of {dims:?}",
            q.len()
        )));
    }
    let only: Option<HashSet<i64>> = if s.filter.is_empty() {
        None
    } else {
        let mut sql_text = String::from(
            "SELECT c.id FROM chunks c
             JOIN documents d ON d.id = c.document
             JOIN datasources s ON s.id = d.datasource
             WHERE 1",
        );
        let mut args = Vec::new();
        restrict(&mut sql_text, &mut args, workspace, s, true);
        Some(
            conn.prepare_cached(&sql_text)
                .map_err(sql)?
                .query_map(rusqlite::params_from_iter(args.iter()), |r| r.get(0))
                .map_err(sql)?
                .collect::<Result<_, _>>()
                .map_err(sql)?,
        )
    };
    if vectors.is_none() {
        *vectors = Some(load_index(conn)?);
    }
    let Some(index) = vectors.as_ref().and_then(|m| m.get(&q.len())) else {
        return Ok(Vec::new());
    };
    let wide = (depth * OVERSAMPLE).max(MIN_CANDIDATES);
    let candidates = index.nearest(q, &sources, only.as_ref(), wide, depth * RESCORE);
    let mut scored: Vec<(f32, i64)> = Vec::with_capacity(candidates.len());
    {
        let mut stmt = conn
            .prepare_cached("SELECT v FROM vectors WHERE chunk = ?1")
            .map_err(sql)?;
        for chunk in candidates {
            let mut rows = stmt.query(params![chunk]).map_err(sql)?;
            if let Some(r) = rows.next().map_err(sql)? {
                let blob = r.get_ref(0).map_err(sql)?.as_blob().map_err(|e| {
                    RetrievalError::Database(format!("vector of chunk {chunk}: {e}"))
                })?;
                if let Some(v) = vectors::from_blob(blob) {
                    scored.push((vectors::dot(q, &v), chunk));
                }
            }
        }
    }
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.truncate(depth);
    // Each result is read back under the same restriction it was chosen by, so a stale
    // sketch could never hand out a row from elsewhere.
    let mut stmt = conn
        .prepare_cached(
            "SELECT s.name, d.ext_id, c.seq, c.text, d.metadata FROM chunks c
             JOIN documents d ON d.id = c.document
             JOIN datasources s ON s.id = d.datasource
             WHERE c.id = ?1 AND s.workspace = ?2
               AND s.id IN (SELECT value FROM json_each(?3))",
        )
        .map_err(sql)?;
    let allowed = serde_json::Value::from(sources.clone()).to_string();
    let mut hits = Vec::with_capacity(scored.len());
    for (score, chunk) in scored {
        if let Some(h) = stmt
            .query_row(params![chunk, workspace, allowed], |r| {
                hit_row(r, f64::from(score))
            })
            .optional()
            .map_err(sql)?
        {
            hits.push(h);
        }
    }
    Ok(hits)
}

/// Reciprocal rank fusion of two ranked lists, best `top_k`.
fn fuse(text: Vec<Hit>, near: Vec<Hit>, top_k: usize) -> Vec<Hit> {
    let mut fused: Vec<Hit> = Vec::with_capacity(text.len() + near.len());
    for list in [text, near] {
        for (rank, mut hit) in list.into_iter().enumerate() {
            let score = 1.0 / (RRF_K + rank as f64 + 1.0);
            match fused
                .iter_mut()
                .find(|h| h.datasource == hit.datasource && h.id == hit.id && h.chunk == hit.chunk)
            {
                Some(h) => h.score += score,
                None => {
                    hit.score = score;
                    fused.push(hit);
                }
            }
        }
    }
    // Stable: equal scores keep text-first order.
    fused.sort_by(|a, b| b.score.total_cmp(&a.score));
    fused.truncate(top_k);
    fused
}

/// Every stored vector's sketch, by dimension.
fn load_index(c: &Connection) -> Result<HashMap<usize, VectorIndex>, RetrievalError> {
    let mut indexes: HashMap<usize, VectorIndex> = HashMap::new();
    let mut stmt = c
        .prepare("SELECT chunk, datasource, v FROM vectors")
        .map_err(sql)?;
    let mut rows = stmt.query([]).map_err(sql)?;
    while let Some(r) = rows.next().map_err(sql)? {
        let chunk: i64 = r.get(0).map_err(sql)?;
        let source: i64 = r.get(1).map_err(sql)?;
        let blob = r
            .get_ref(2)
            .map_err(sql)?
            .as_blob()
            .map_err(|e| RetrievalError::Database(format!("vector of chunk {chunk}: {e}")))?;
        if let Some(v) = vectors::from_blob(blob) {
            indexes
                .entry(v.len())
                .or_insert_with(|| VectorIndex::new(v.len()))
                .insert(chunk, source, &v);
        }
    }
    Ok(indexes)
}

/// Brings a database made by an earlier version up to this schema: chunks gained their
/// datasource (so a search checks it without joining documents for every match), and
/// datasources their vectors' dimension.
fn migrate(c: &Connection) -> Result<(), RetrievalError> {
    let current: bool = c
        .prepare("SELECT 1 FROM pragma_table_info('chunks') WHERE name = 'datasource'")
        .and_then(|mut s| s.exists([]))
        .map_err(sql)?;
    if !current {
        c.execute_batch(
            "BEGIN;
             ALTER TABLE chunks ADD COLUMN datasource INTEGER NOT NULL DEFAULT 0;
             UPDATE chunks SET datasource = (SELECT datasource FROM documents WHERE id = chunks.document);
             COMMIT;",
        )
        .map_err(sql)?;
    }
    let dims: bool = c
        .prepare("SELECT 1 FROM pragma_table_info('datasources') WHERE name = 'dim'")
        .and_then(|mut s| s.exists([]))
        .map_err(sql)?;
    if !dims {
        c.execute_batch(
            "BEGIN;
             ALTER TABLE datasources ADD COLUMN dim INTEGER;
             UPDATE datasources SET dim = (SELECT length(v) / 4 FROM vectors WHERE vectors.datasource = datasources.id LIMIT 1);
             COMMIT;",
        )
        .map_err(sql)?;
    }
    Ok(())
}

/// Refuses vectors of another dimension than datasource `ds` already holds; records it
/// with the first.
fn check_dimension(c: &Connection, ds: i64, name: &str, dim: usize) -> Result<(), RetrievalError> {
    let have: Option<i64> = c
        .query_row(
            "SELECT dim FROM datasources WHERE id = ?1",
            params![ds],
            |r| r.get(0),
        )
        .map_err(sql)?;
    match have {
        Some(have) if have as usize != dim => Err(RetrievalError::Invalid(format!(
            "vector: {dim} dimensions, but datasource {name:?} holds vectors of {have}"
        ))),
        Some(_) => Ok(()),
        None => {
            c.execute(
                "UPDATE datasources SET dim = ?1 WHERE id = ?2",
                params![dim as i64, ds],
            )
            .map_err(sql)?;
            Ok(())
        }
    }
}

/// The chunk ids of document `doc`.
fn chunk_ids(c: &Connection, doc: i64) -> Result<Vec<i64>, RetrievalError> {
    c.prepare_cached("SELECT id FROM chunks WHERE document = ?1")
        .map_err(sql)?
        .query_map(params![doc], |r| r.get(0))
        .map_err(sql)?
        .collect::<Result<_, _>>()
        .map_err(sql)
}

/// Why datasource `name` is not in `workspace`: absent from the tenant (`NotFound`) or
/// in another of its workspaces (`Blocked`); the client is told the same either way.
fn datasource_elsewhere(c: &Connection, workspace: &str, name: &str) -> RetrievalError {
    not_found_or_blocked(
        c,
        "SELECT 1 FROM datasources WHERE workspace <> ?1 AND name = ?2",
        params![workspace, name],
        format!("no datasource {name:?}"),
    )
}

/// `Blocked` with `message` when `elsewhere` (a query for the name outside the caller's
/// boundary) finds a row, else `NotFound`: what the caller counts differs, what the
/// client is told does not.
pub(super) fn not_found_or_blocked(
    c: &Connection,
    elsewhere: &str,
    args: impl rusqlite::Params,
    message: String,
) -> RetrievalError {
    let other = c
        .prepare_cached(elsewhere)
        .and_then(|mut s| s.exists(args))
        .unwrap_or(false);
    if other {
        RetrievalError::Blocked(message)
    } else {
        RetrievalError::NotFound(message)
    }
}

/// Why a document was not found in `workspace`: it exists in no other workspace of the
/// tenant (`NotFound`) or it does (`Blocked`); the client is told the same either way.
fn elsewhere(c: &Connection, workspace: &str, datasource: &str, id: &str) -> RetrievalError {
    not_found_or_blocked(
        c,
        "SELECT 1 FROM documents d JOIN datasources s ON s.id = d.datasource
         WHERE s.workspace <> ?1 AND s.name = ?2 AND d.ext_id = ?3",
        params![workspace, datasource, id],
        format!("no document {id:?} in datasource {datasource:?}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_keeps_at_most_its_cap_open() {
        let dir = std::env::temp_dir().join(format!("bulkhead-pool-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let r = Retrieval::new(2);
        for i in 0..5 {
            let db = dir.join(format!("t{i}.db"));
            assert!(
                r.create_datasource(&format!("t{i}"), &db, "w", "d")
                    .unwrap()
            );
            assert!(r.open_count() <= 2);
        }
        // An evicted database opens again with its data.
        assert!(
            !r.create_datasource("t0", &dir.join("t0.db"), "w", "d")
                .unwrap()
        );
        r.forget_under(&dir);
        assert_eq!(r.open_count(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_database_in_use_is_never_closed_and_a_retired_key_never_opens_again() {
        let dir = std::env::temp_dir().join(format!("bulkhead-retire-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let r = Retrieval::new(1);
        let (a, b) = (dir.join("a.db"), dir.join("b.db"));
        let held = r.conn("a:1", &a).unwrap();
        r.conn("b:1", &b).unwrap();
        // `a` is in use, so opening `b` went over the cap rather than closing it: a
        // second connection to a.db would make concurrent writers fail with BUSY.
        assert_eq!(r.open_count(), 2);
        assert!(Arc::ptr_eq(&held, &r.conn("a:1", &a).unwrap()));
        drop(held);
        r.conn("c:1", &dir.join("c.db")).unwrap();
        assert!(r.open_count() <= 2);
        // A deleted incarnation's key cannot open the file again, even by its old path,
        // which a tenant made again under the same name now owns; the new key can.
        r.retire("a:1", &dir);
        assert!(matches!(
            r.create_datasource("a:1", &a, "w", "d"),
            Err(RetrievalError::NotFound(_))
        ));
        assert!(r.create_datasource("a:2", &a, "w", "d").unwrap());
        r.unretire("a:1");
        assert!(!r.create_datasource("a:1", &a, "w", "d").unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn chunks_cut_at_whitespace_and_keep_every_word() {
        let text = "word ".repeat(1000);
        let parts = chunks(&text);
        assert!(parts.len() > 3);
        assert!(parts.iter().all(|p| p.len() <= CHUNK_BYTES));
        assert_eq!(parts.concat().matches("word").count(), 1000);
        let wide = "é".repeat(2000);
        assert!(chunks(&wide).iter().all(|p| p.len() <= CHUNK_BYTES));
    }
}
