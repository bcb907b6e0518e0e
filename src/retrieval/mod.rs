//! Per-tenant retrieval: datasources and documents in the tenant's own SQLite file,
//! searched with BM25 (FTS5), by vector (cosine, through the in-memory sketch index of
//! [`vectors`]) or both fused. The tenant is the file; the workspace, the allowed
//! datasources and the metadata filter restrict candidates before ranking, never
//! results afterwards. Run state (expiring) and memory (durable) live in the same file
//! ([`memory`]); embeddings come from the caller, the in-process [`embed`]der or a
//! provider's model (through the API layer, which charges the tenant), and are cached in
//! the tenant's file by model and a key made from the caller's boundary and the text.
#![forbid(unsafe_code)]

pub mod embed;
pub mod memory;
pub mod query;
pub mod store;
pub mod vectors;

pub use store::{Document, Hit, IndexVersion, Mode, NewDocument, Retrieval, Search};

/// Retrieval failures.
#[derive(Debug, thiserror::Error)]
pub enum RetrievalError {
    /// A request that cannot be served as given.
    #[error("{0}")]
    Invalid(String),
    /// Nothing of that name in the caller's boundary (whether it exists elsewhere is not
    /// said).
    #[error("{0}")]
    NotFound(String),
    /// The same answer to the client as `NotFound`, but the name exists in another
    /// workspace of the tenant: the caller counts and logs it.
    #[error("{0}")]
    Blocked(String),
    /// More than the limits allow.
    #[error("{0}")]
    TooLarge(String),
    /// The tenant's database failed.
    #[error("retrieval database: {0}")]
    Database(String),
}

/// The pool key of a tenant's database: the tenant and its incarnation, so a tenant made
/// again under the same name never shares the old one's handle.
pub fn pool_key(tenant: &str, incarnation: &str) -> String {
    format!("{tenant}:{incarnation}")
}

/// Longest datasource name.
pub const MAX_NAME: usize = 64;
/// Longest document id, in bytes.
pub const MAX_ID: usize = 256;
/// Largest document text, in bytes.
pub const MAX_TEXT: usize = 1 << 20;
/// Largest metadata object, in bytes of JSON.
pub const MAX_METADATA: usize = 16 * 1024;
/// Documents in one batch.
pub const MAX_BATCH: usize = 256;
/// Largest `top_k`.
pub const MAX_TOP_K: usize = 100;
/// Longest query, in bytes.
pub const MAX_QUERY: usize = 4096;

/// A datasource name: 1..=64 of `[A-Za-z0-9._-]`, not starting with a dot.
pub fn check_name(name: &str) -> Result<(), RetrievalError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(RetrievalError::Invalid(format!(
            "datasource name {name:?}: 1..={MAX_NAME} of [A-Za-z0-9._-], not starting with '.'"
        )))
    }
}

/// A document id: 1..=256 bytes without control characters.
pub fn check_id(id: &str) -> Result<(), RetrievalError> {
    if id.is_empty() || id.len() > MAX_ID || id.chars().any(char::is_control) {
        return Err(RetrievalError::Invalid(format!(
            "document id: 1..={MAX_ID} bytes without control characters"
        )));
    }
    Ok(())
}

/// A metadata filter key: 1..=64 of `[A-Za-z0-9_]` (it becomes a JSON path).
pub fn check_filter_key(key: &str) -> Result<(), RetrievalError> {
    if key.is_empty()
        || key.len() > 64
        || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(RetrievalError::Invalid(format!(
            "filter key {key:?}: 1..=64 of [A-Za-z0-9_]"
        )));
    }
    Ok(())
}
