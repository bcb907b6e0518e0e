//! One SQLite file per tenant (`<tenant>/retrieval.db`, WAL, FTS5), opened on demand
//! through a bounded pool. Every statement that reads or changes documents names the
//! caller's workspace (and, for searches, its datasources) in its own `WHERE`, so a
//! search ranks only allowed rows and `LIMIT` fills `top_k` from them.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

use super::RetrievalError;
use super::query::fts_expression;

/// Bytes of text per chunk (cut at a whitespace before it when there is one).
const CHUNK_BYTES: usize = 1200;

const SCHEMA: &str = "
PRAGMA foreign_keys = ON;
CREATE TABLE IF NOT EXISTS datasources (
    id INTEGER PRIMARY KEY,
    workspace TEXT NOT NULL,
    name TEXT NOT NULL,
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
    text TEXT NOT NULL
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

/// What a search may look at and how much to return.
#[derive(Debug, Clone)]
pub struct Search {
    /// The question.
    pub query: String,
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
    /// BM25 relevance (higher is better).
    pub score: f64,
    /// The document's metadata.
    pub metadata: Option<serde_json::Value>,
}

/// The pool of open tenant databases.
pub struct Retrieval {
    cap: usize,
    open: Mutex<Pool>,
}

#[derive(Default)]
struct Pool {
    conns: HashMap<String, (PathBuf, Arc<Mutex<Connection>>)>,
    /// Least recently used first.
    order: Vec<String>,
}

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
fn chunks(text: &str) -> Vec<&str> {
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
    pub(super) fn conn(
        &self,
        key: &str,
        db: &Path,
    ) -> Result<Arc<Mutex<Connection>>, RetrievalError> {
        {
            let mut pool = lock(&self.open);
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
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;",
        )
        .map_err(sql)?;
        c.execute_batch(SCHEMA).map_err(sql)?;
        let c = Arc::new(Mutex::new(c));
        let mut pool = lock(&self.open);
        if let Some((_, have)) = pool.conns.get(key) {
            return Ok(have.clone());
        }
        while pool.conns.len() >= self.cap && !pool.order.is_empty() {
            let oldest = pool.order.remove(0);
            pool.conns.remove(&oldest);
        }
        pool.conns
            .insert(key.to_string(), (db.to_path_buf(), c.clone()));
        pool.order.push(key.to_string());
        Ok(c)
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
        let mut c = lock(&c);
        let tx = c.transaction().map_err(sql)?;
        let mut counts = Vec::with_capacity(docs.len());
        for d in docs {
            let ds: i64 = tx
                .query_row(
                    "SELECT id FROM datasources WHERE workspace = ?1 AND name = ?2",
                    params![workspace, d.datasource],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql)?
                .ok_or_else(|| {
                    RetrievalError::NotFound(format!("no datasource {:?}", d.datasource))
                })?;
            let metadata = d.metadata.as_ref().map(|m| m.to_string());
            let existing: Option<i64> = tx
                .query_row(
                    "SELECT id FROM documents WHERE datasource = ?1 AND ext_id = ?2",
                    params![ds, d.id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql)?;
            let doc = match existing {
                Some(id) => {
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
            let parts = chunks(&d.text);
            for (seq, text) in parts.iter().enumerate() {
                tx.execute(
                    "INSERT INTO chunks (document, seq, text) VALUES (?1, ?2, ?3)",
                    params![doc, seq as i64, text],
                )
                .map_err(sql)?;
            }
            counts.push(parts.len());
        }
        tx.commit().map_err(sql)?;
        Ok(counts)
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
        let mut c = lock(&c);
        let tx = c.transaction().map_err(sql)?;
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
        tx.execute("DELETE FROM chunks WHERE document = ?1", params![doc])
            .map_err(sql)?;
        tx.execute("DELETE FROM documents WHERE id = ?1", params![doc])
            .map_err(sql)?;
        tx.commit().map_err(sql)
    }

    /// Full-text search over the workspace's (allowed) datasources: candidates are
    /// restricted inside the query, then ranked by BM25 and cut at `top_k`.
    pub fn search(
        &self,
        key: &str,
        db: &Path,
        workspace: &str,
        s: &Search,
    ) -> Result<Vec<Hit>, RetrievalError> {
        let Some(expr) = fts_expression(&s.query) else {
            return Ok(Vec::new());
        };
        let c = self.conn(key, db)?;
        let c = lock(&c);
        let mut sql_text = String::from(
            "SELECT s.name, d.ext_id, c.seq, c.text, d.metadata, bm25(chunks_fts)
             FROM chunks_fts
             JOIN chunks c ON c.id = chunks_fts.rowid
             JOIN documents d ON d.id = c.document
             JOIN datasources s ON s.id = d.datasource
             WHERE chunks_fts MATCH ?1 AND s.workspace = ?2",
        );
        let mut args: Vec<rusqlite::types::Value> = vec![expr.into(), workspace.to_string().into()];
        if let Some(names) = &s.datasources {
            sql_text.push_str(" AND s.name IN (SELECT value FROM json_each(?3))");
            args.push(serde_json::Value::from(names.clone()).to_string().into());
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
        sql_text.push_str(&format!(
            " ORDER BY bm25(chunks_fts) LIMIT ?{}",
            args.len() + 1
        ));
        args.push((s.top_k as i64).into());
        let mut stmt = c.prepare_cached(&sql_text).map_err(sql)?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                Ok(Hit {
                    datasource: r.get(0)?,
                    id: r.get(1)?,
                    chunk: r.get(2)?,
                    text: r.get(3)?,
                    metadata: r
                        .get::<_, Option<String>>(4)?
                        .and_then(|m| serde_json::from_str(&m).ok()),
                    score: -r.get::<_, f64>(5)?,
                })
            })
            .map_err(sql)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql)?;
        Ok(rows)
    }
}

/// Why a document was not found in `workspace`: it exists in no other workspace of the
/// tenant (`NotFound`) or it does (`Blocked`); the client is told the same either way.
fn elsewhere(c: &Connection, workspace: &str, datasource: &str, id: &str) -> RetrievalError {
    let message = format!("no document {id:?} in datasource {datasource:?}");
    let other: Option<i64> = c
        .query_row(
            "SELECT 1 FROM documents d JOIN datasources s ON s.id = d.datasource
             WHERE s.workspace <> ?1 AND s.name = ?2 AND d.ext_id = ?3 LIMIT 1",
            params![workspace, datasource, id],
            |r| r.get(0),
        )
        .optional()
        .unwrap_or(None);
    match other {
        Some(_) => RetrievalError::Blocked(message),
        None => RetrievalError::NotFound(message),
    }
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
