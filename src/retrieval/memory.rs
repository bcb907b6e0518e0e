//! Run state and durable memory, in the tenant's retrieval database. Run state belongs
//! to one run id of one workspace and expires; memory belongs to the workspace, or to one
//! actor of it when asked, and stays. Nothing moves from run state to memory except by
//! [`Retrieval::promote`], which the caller audits.
#![forbid(unsafe_code)]

use std::path::Path;

use rusqlite::{OptionalExtension, params};

use super::RetrievalError;
use super::store::{Retrieval, lock, not_found_or_blocked, sql};

/// Largest stored value, in bytes of JSON.
pub const MAX_VALUE: usize = 64 * 1024;
/// Keys promoted at once.
pub const MAX_PROMOTE: usize = 100;

/// Whose memory: the whole workspace's, or one actor's within it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// Shared by the workspace's actors.
    Workspace,
    /// One actor's (token id).
    Actor(String),
}

impl Owner {
    fn column(&self) -> String {
        match self {
            Owner::Workspace => String::new(),
            Owner::Actor(a) => format!("actor:{a}"),
        }
    }
}

/// A key or run id: 1..=128 of `[A-Za-z0-9._:-]`.
pub fn check_key(what: &str, key: &str) -> Result<(), RetrievalError> {
    let ok = !key.is_empty()
        && key.len() <= 128
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(RetrievalError::Invalid(format!(
            "{what} {key:?}: 1..=128 of [A-Za-z0-9._:-]"
        )))
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn encode(value: &serde_json::Value) -> Result<String, RetrievalError> {
    let text = value.to_string();
    if text.len() > MAX_VALUE {
        return Err(RetrievalError::TooLarge(format!(
            "value over {MAX_VALUE} bytes of JSON"
        )));
    }
    Ok(text)
}

fn decode(text: String) -> serde_json::Value {
    serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
}

impl Retrieval {
    /// Sets run state `key` of `run_id`, expiring `ttl_ms` from now; expired entries of
    /// the tenant are swept on the way.
    #[allow(clippy::too_many_arguments)]
    pub fn put_run_state(
        &self,
        pool_key: &str,
        db: &Path,
        workspace: &str,
        run_id: &str,
        key: &str,
        value: &serde_json::Value,
        ttl_ms: u64,
    ) -> Result<(), RetrievalError> {
        let text = encode(value)?;
        let c = self.conn(pool_key, db)?;
        let c = lock(&c);
        let now = now_ms();
        c.execute("DELETE FROM run_state WHERE expires <= ?1", params![now])
            .map_err(sql)?;
        c.execute(
            "INSERT INTO run_state (workspace, run_id, key, value, expires) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (workspace, run_id, key) DO UPDATE SET value = excluded.value, expires = excluded.expires",
            params![workspace, run_id, key, text, now.saturating_add(ttl_ms as i64)],
        )
        .map_err(sql)?;
        Ok(())
    }

    /// Run state `key` of `run_id`, unless expired.
    pub fn get_run_state(
        &self,
        pool_key: &str,
        db: &Path,
        workspace: &str,
        run_id: &str,
        key: &str,
    ) -> Result<serde_json::Value, RetrievalError> {
        let c = self.conn(pool_key, db)?;
        let c = lock(&c);
        c.query_row(
            "SELECT value FROM run_state WHERE workspace = ?1 AND run_id = ?2 AND key = ?3 AND expires > ?4",
            params![workspace, run_id, key, now_ms()],
            |r| r.get::<_, String>(0),
        )
        .optional()
        .map_err(sql)?
        .map(decode)
        .ok_or_else(|| {
            run_elsewhere(
                &c,
                workspace,
                run_id,
                format!("no state {key:?} for run {run_id:?}"),
            )
        })
    }

    /// Sets memory `key` of `owner` in `workspace`.
    pub fn put_memory(
        &self,
        pool_key: &str,
        db: &Path,
        workspace: &str,
        owner: &Owner,
        key: &str,
        value: &serde_json::Value,
    ) -> Result<(), RetrievalError> {
        let text = encode(value)?;
        let c = self.conn(pool_key, db)?;
        let c = lock(&c);
        c.execute(
            "INSERT INTO memory (workspace, owner, key, value) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (workspace, owner, key) DO UPDATE SET value = excluded.value",
            params![workspace, owner.column(), key, text],
        )
        .map_err(sql)?;
        Ok(())
    }

    /// Memory `key` of `owner` in `workspace`.
    pub fn get_memory(
        &self,
        pool_key: &str,
        db: &Path,
        workspace: &str,
        owner: &Owner,
        key: &str,
    ) -> Result<serde_json::Value, RetrievalError> {
        let c = self.conn(pool_key, db)?;
        let c = lock(&c);
        c.query_row(
            "SELECT value FROM memory WHERE workspace = ?1 AND owner = ?2 AND key = ?3",
            params![workspace, owner.column(), key],
            |r| r.get::<_, String>(0),
        )
        .optional()
        .map_err(sql)?
        .map(decode)
        .ok_or_else(|| memory_elsewhere(&c, workspace, owner, key))
    }

    /// Deletes memory `key` of `owner` in `workspace`.
    pub fn delete_memory(
        &self,
        pool_key: &str,
        db: &Path,
        workspace: &str,
        owner: &Owner,
        key: &str,
    ) -> Result<(), RetrievalError> {
        let c = self.conn(pool_key, db)?;
        let c = lock(&c);
        let n = c
            .execute(
                "DELETE FROM memory WHERE workspace = ?1 AND owner = ?2 AND key = ?3",
                params![workspace, owner.column(), key],
            )
            .map_err(sql)?;
        if n == 0 {
            return Err(memory_elsewhere(&c, workspace, owner, key));
        }
        Ok(())
    }

    /// Copies the named run state keys (all unexpired, or nothing) into `owner`'s memory
    /// in one transaction.
    pub fn promote(
        &self,
        pool_key: &str,
        db: &Path,
        workspace: &str,
        run_id: &str,
        keys: &[String],
        owner: &Owner,
    ) -> Result<(), RetrievalError> {
        let c = self.conn(pool_key, db)?;
        let mut c = lock(&c);
        let tx = c
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql)?;
        let now = now_ms();
        for key in keys {
            let value: String = tx
                .query_row(
                    "SELECT value FROM run_state WHERE workspace = ?1 AND run_id = ?2 AND key = ?3 AND expires > ?4",
                    params![workspace, run_id, key, now],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql)?
                .ok_or_else(|| {
                    run_elsewhere(
                        &tx,
                        workspace,
                        run_id,
                        format!("no state {key:?} for run {run_id:?}"),
                    )
                })?;
            tx.execute(
                "INSERT INTO memory (workspace, owner, key, value) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (workspace, owner, key) DO UPDATE SET value = excluded.value",
                params![workspace, owner.column(), key, value],
            )
            .map_err(sql)?;
        }
        tx.commit().map_err(sql)
    }
}

/// `NotFound`, or `Blocked` when the run id has state in another workspace of the tenant
/// (the client is told the same either way).
fn run_elsewhere(
    c: &rusqlite::Connection,
    workspace: &str,
    run_id: &str,
    message: String,
) -> RetrievalError {
    not_found_or_blocked(
        c,
        "SELECT 1 FROM run_state WHERE workspace <> ?1 AND run_id = ?2",
        params![workspace, run_id],
        message,
    )
}

/// `NotFound`, or `Blocked` when `key` is held by another workspace or another actor of
/// the tenant (the client is told the same either way).
fn memory_elsewhere(
    c: &rusqlite::Connection,
    workspace: &str,
    owner: &Owner,
    key: &str,
) -> RetrievalError {
    not_found_or_blocked(
        c,
        "SELECT 1 FROM memory WHERE key = ?3 AND NOT (workspace = ?1 AND owner = ?2)",
        params![workspace, owner.column(), key],
        format!("no memory {key:?}"),
    )
}
