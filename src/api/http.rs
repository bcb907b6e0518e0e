//! HTTP plumbing: bodies with limits, JSON responses, path decoding.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Response, StatusCode};

use super::error::ApiError;

/// A JSON response with the trace id header.
pub fn json_response(status: StatusCode, body: &serde_json::Value, trace_id: &str) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    response(status, "application/json", bytes, trace_id)
}

/// A response with the given content type.
pub fn response(status: StatusCode, content_type: &str, body: Vec<u8>, trace_id: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let headers = r.headers_mut();
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        headers.insert(hyper::header::CONTENT_TYPE, v);
    }
    if let Ok(v) = hyper::header::HeaderValue::from_str(trace_id) {
        headers.insert("x-trace-id", v);
    }
    r
}

/// Reads the whole body, refusing more than `max` bytes.
pub async fn read_body(body: Incoming, max: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, max).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(ApiError::TooLarge(format!("request body larger than {max} bytes")))
        }
        Err(e) => Err(ApiError::BadRequest(format!("reading the body: {e}"))),
    }
}

/// Parses a JSON body into `T` (which rejects unknown fields).
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("invalid JSON request: {e}")))
}

/// Runs filesystem work off the async workers.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::Internal(format!("worker: {e}")))?
}

/// Decodes `%XX` escapes in a URL path segment into raw bytes.
pub fn percent_decode(raw: &str) -> Result<Vec<u8>, ApiError> {
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            match (b.get(i + 1).and_then(|c| hex(*c)), b.get(i + 2).and_then(|c| hex(*c))) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                }
                _ => return Err(ApiError::BadRequest("malformed percent-encoding in path".into())),
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("a%2Fb%2e%2E").unwrap(), b"a/b..");
        assert_eq!(percent_decode("%ff").unwrap(), vec![0xff]);
        assert!(percent_decode("%g1").is_err());
        assert!(percent_decode("%1").is_err());
    }
}
