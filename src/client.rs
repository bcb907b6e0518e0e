//! A small client for the two sockets (used by the CLI and the tests), on hyperlocal.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyperlocal::{UnixClientExt, UnixConnector, Uri};

/// A response: status and body.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// Response headers.
    pub headers: hyper::HeaderMap,
    /// Body bytes.
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON (Null when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// A header's value, when present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The error's reason code, if this is an error response.
    pub fn reason_code(&self) -> Option<String> {
        self.json()["error"]["reason_code"]
            .as_str()
            .map(String::from)
    }
}

/// One socket and one credential.
#[derive(Debug, Clone)]
pub struct SocketClient {
    socket: PathBuf,
    bearer: String,
    client: Client<UnixConnector, Full<Bytes>>,
}

impl SocketClient {
    /// A client for `socket` sending `Authorization: Bearer <bearer>`.
    pub fn new(socket: &Path, bearer: &str) -> SocketClient {
        SocketClient {
            socket: socket.to_path_buf(),
            bearer: bearer.trim().to_string(),
            client: Client::unix(),
        }
    }

    /// Another credential over the same connection pool (one process, many tokens).
    pub fn with_bearer(&self, bearer: &str) -> SocketClient {
        SocketClient {
            socket: self.socket.clone(),
            bearer: bearer.trim().to_string(),
            client: self.client.clone(),
        }
    }

    /// Sends one request and returns as soon as the answer's head has arrived, with its
    /// body still to read (streamed answers).
    pub async fn open(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        // hyperlocal panics on a path it cannot parse; the same path after an equally
        // plain host (its host is the socket path in hex) tells first.
        if !path.starts_with('/') || format!("unix://h:0{path}").parse::<hyper::Uri>().is_err() {
            return Err(format!("invalid request path {path:?}"));
        }
        let uri: hyper::Uri = Uri::new(&self.socket, path).into();
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.bearer),
            )
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        self.client
            .request(req)
            .await
            .map_err(|e| format!("{}: {e}", self.socket.display()))
    }

    /// Sends one request.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<Reply, String> {
        let resp = self.open(method, path, body).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// Sends a JSON request.
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<Reply, String> {
        self.request(
            method,
            path,
            serde_json::to_vec(body).map_err(|e| e.to_string())?,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unparsable_path_is_an_error_not_a_panic() {
        let c = SocketClient::new(Path::new("/nonexistent/bulkhead.sock"), "tk");
        for path in ["/v1/memory/bad key", "relative", "/a\nb", "/\u{7f}"] {
            let e = c
                .request(Method::GET, path, Vec::new())
                .await
                .err()
                .unwrap_or_default();
            assert!(e.contains("invalid request path"), "{path:?}: {e}");
        }
        // A good path gets as far as the (missing) socket.
        let e = c
            .request(Method::GET, "/v1/usage", Vec::new())
            .await
            .err()
            .unwrap_or_default();
        assert!(e.contains("/nonexistent/bulkhead.sock"), "{e}");
    }
}
