//! `Idempotency-Key` for mutating requests: a repeat within 24 h gets the stored response
//! without running again; the same key with a different request is `409
//! idempotency_conflict`; a repeat that arrives while the first still runs waits for it.
//! Records live under the tenant's root (`<tenant>/idempotency/`), so keys of different
//! tenants never meet; they survive restarts and are swept after expiry.

use super::http::ApiBody;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Full};
use hyper::{Response, StatusCode};
use sha2::{Digest, Sha256};

use super::error::ApiError;

/// How long a key is remembered.
pub const TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    request_sha256: String,
    status: u16,
    content_type: String,
    body: String,
    created_unix: u64,
}

/// Per-key locks for requests in flight.
#[derive(Default)]
pub struct Keys {
    locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Checks a client's key: 1..=128 of `[A-Za-z0-9._:-]`.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 128
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

/// The digest that says whether a repeat is the same request.
pub fn request_digest(method: &str, path: &str, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(method.as_bytes());
    h.update([0]);
    h.update(path.as_bytes());
    h.update([0]);
    h.update(body);
    hex(&h.finalize())
}

fn replay(rec: &Record, trace_id: &str) -> Response<ApiBody> {
    let mut r = super::http::response(
        StatusCode::from_u16(rec.status).unwrap_or(StatusCode::OK),
        &rec.content_type,
        rec.body.clone().into_bytes(),
        trace_id,
    );
    r.headers_mut().insert(
        "idempotent-replayed",
        hyper::header::HeaderValue::from_static("true"),
    );
    r
}

impl Keys {
    /// Runs `work` at most once per (tenant dir, key) within the TTL.
    pub async fn once<F>(
        &self,
        tenant_dir: &Path,
        key: &str,
        digest: String,
        trace_id: &str,
        work: F,
    ) -> Result<Response<ApiBody>, ApiError>
    where
        F: std::future::Future<Output = Result<Response<ApiBody>, ApiError>>,
    {
        let dir = tenant_dir.join("idempotency");
        let file = dir.join(format!("{}.json", hex(&Sha256::digest(key.as_bytes()))));
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(file.clone())
            .or_default()
            .clone();
        let result = {
            let _held = lock.lock().await;
            let stored = std::fs::read(&file)
                .ok()
                .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
                .filter(|r| now().saturating_sub(r.created_unix) < TTL.as_secs());
            match stored {
                Some(rec) if rec.request_sha256 == digest => Ok(replay(&rec, trace_id)),
                Some(_) => Err(ApiError::IdempotencyConflict(format!(
                    "Idempotency-Key {key:?} was used for a different request"
                ))),
                None => {
                    let response = match work.await {
                        Ok(r) => r,
                        Err(e) => e.response(trace_id),
                    };
                    let (parts, body) = response.into_parts();
                    let bytes = body
                        .collect()
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    // Server-side failures and rate limits are not final: a retry runs again.
                    let status = parts.status.as_u16();
                    if let (true, Ok(text)) =
                        (status < 500 && status != 429, std::str::from_utf8(&bytes))
                    {
                        let rec = Record {
                            request_sha256: digest,
                            status,
                            content_type: parts
                                .headers
                                .get(hyper::header::CONTENT_TYPE)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("application/json")
                                .to_string(),
                            body: text.to_string(),
                            created_unix: now(),
                        };
                        let json = serde_json::to_vec(&rec)
                            .map_err(|e| ApiError::Internal(e.to_string()))?;
                        let name = file
                            .file_name()
                            .and_then(|n| n.to_str())
                            .unwrap_or("record.json")
                            .to_string();
                        let dir2 = dir.clone();
                        super::http::blocking(move || {
                            std::fs::create_dir_all(&dir2)
                                .map_err(|e| ApiError::Internal(format!("idempotency dir: {e}")))?;
                            crate::tenant::write_atomic(&dir2, &name, &json, 0o600)
                                .map_err(|e| ApiError::Internal(format!("idempotency record: {e}")))
                        })
                        .await?;
                    }
                    Ok(Response::from_parts(
                        parts,
                        http_body_util::Either::Left(Full::new(bytes)),
                    ))
                }
            }
        };
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(&lock) <= 2 {
            locks.remove(&file);
        }
        result
    }
}

/// Removes expired records of every tenant under `tenants_dir`.
pub fn sweep(tenants_dir: &Path) {
    let Ok(tenants) = std::fs::read_dir(tenants_dir) else {
        return;
    };
    for t in tenants.flatten() {
        let Ok(records) = std::fs::read_dir(t.path().join("idempotency")) else {
            continue;
        };
        for r in records.flatten() {
            let old = r
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age > TTL);
            if old {
                // Best effort: a record that cannot be removed is retried at the next sweep.
                let _removed = std::fs::remove_file(r.path());
            }
        }
    }
}
