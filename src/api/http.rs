//! HTTP plumbing: bodies with limits, JSON responses, path decoding.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Response, StatusCode};

use super::error::ApiError;

/// Every response body: whole (almost all), or streamed from a task (LLM streams).
pub type ApiBody = http_body_util::Either<Full<Bytes>, ChannelBody>;

/// A body fed chunk by chunk through a channel; it ends when the sender is dropped, and
/// a client that goes away closes the receiver, which the sender sees.
#[derive(Debug)]
pub struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
}

impl ChannelBody {
    /// A body and the sender that feeds it (`depth` chunks may wait unread).
    pub fn new(depth: usize) -> (tokio::sync::mpsc::Sender<Bytes>, ChannelBody) {
        let (tx, rx) = tokio::sync::mpsc::channel(depth.max(1));
        (tx, ChannelBody { rx })
    }
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// A JSON response with the trace id header.
pub fn json_response(
    status: StatusCode,
    body: &serde_json::Value,
    trace_id: &str,
) -> Response<ApiBody> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    response(status, "application/json", bytes, trace_id)
}

/// A response with the given content type.
pub fn response(
    status: StatusCode,
    content_type: &str,
    body: Vec<u8>,
    trace_id: &str,
) -> Response<ApiBody> {
    let mut r = Response::new(http_body_util::Either::Left(Full::new(Bytes::from(body))));
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

/// Reads the whole body: refused up front when its declared length exceeds `max`, cut
/// off past `max`, bounded in time, and counted against the daemon-wide in-flight budget
/// for as long as the handler holds it.
pub async fn read_body(
    app: &super::App,
    body: Incoming,
    max: usize,
) -> Result<(Bytes, tokio::sync::SemaphorePermit<'_>), ApiError> {
    use hyper::body::Body;
    let declared = body.size_hint().exact();
    if declared.is_some_and(|n| n > max as u64) {
        return Err(ApiError::TooLarge(format!(
            "request body larger than {max} bytes"
        )));
    }
    let reserve = declared.map(|n| n as usize).unwrap_or(max);
    let permit = reserve_bytes(app, reserve).await?;
    let timeout = std::time::Duration::from_millis(app.config.server.body_read_timeout_ms);
    let collected = tokio::time::timeout(timeout, Limited::new(body, max).collect())
        .await
        .map_err(|_| {
            ApiError::Timeout(format!(
                "request body not received within {} ms",
                timeout.as_millis()
            ))
        })?;
    match collected {
        Ok(c) => Ok((c.to_bytes(), permit)),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::TooLarge(format!(
                "request body larger than {max} bytes"
            )))
        }
        Err(e) => Err(ApiError::BadRequest(format!("reading the body: {e}"))),
    }
}

/// Takes `bytes` from the in-flight budget (waiting while others hold it).
pub async fn reserve_bytes(
    app: &super::App,
    bytes: usize,
) -> Result<tokio::sync::SemaphorePermit<'_>, ApiError> {
    let kib = u32::try_from(bytes.div_ceil(1024).max(1))
        .map_err(|_| ApiError::TooLarge("request too large".into()))?;
    if kib as usize > app.config.server.max_inflight_bytes / 1024 {
        return Err(ApiError::TooLarge(format!(
            "larger than the daemon's in-flight budget of {} bytes",
            app.config.server.max_inflight_bytes
        )));
    }
    app.inflight
        .acquire_many(kib)
        .await
        .map_err(|_| ApiError::ShuttingDown)
}

/// Parses a JSON body into `T` (which rejects unknown fields).
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON request: {e}")))
}

/// Runs filesystem work off the async workers.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("worker: {e}")))?
}

/// Decodes `%XX` escapes in a URL path segment into raw bytes.
pub fn percent_decode(raw: &str) -> Result<Vec<u8>, ApiError> {
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            match (
                b.get(i + 1).and_then(|c| hex(*c)),
                b.get(i + 2).and_then(|c| hex(*c)),
            ) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                }
                _ => {
                    return Err(ApiError::BadRequest(
                        "malformed percent-encoding in path".into(),
                    ));
                }
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
