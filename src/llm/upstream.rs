//! Calling providers: one pooled client for every tenant, the model table with its
//! fallbacks, and bounded retries with jittered backoff.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

use super::config::{Kind, LlmConfig, Rate};
use super::cost::TokenUsage;
use super::secret::Secret;

/// The largest upstream answer read.
const MAX_ANSWER: usize = 16 << 20;
/// Models tried for one call (the asked one and its fallbacks).
const MAX_ATTEMPTS: usize = 4;

/// Why a call could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// No such public model.
    #[error("model {0:?} does not exist")]
    UnknownModel(String),
    /// Every model in the chain failed (429, 5xx, timeout or no connection).
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
}

/// An upstream answer.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status the provider gave.
    pub status: u16,
    /// Its body, with `model` set back to the public name.
    pub body: Bytes,
    /// The public model that answered (a fallback, perhaps).
    pub model: String,
    /// Token usage, when the answer reported it.
    pub usage: Option<TokenUsage>,
    /// Models tried.
    pub attempts: usize,
}

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// Routes calls to providers.
pub struct Router {
    config: LlmConfig,
    keys: BTreeMap<String, Option<Secret>>,
    /// One pooled client per provider: each trusts the provider's own roots (its
    /// `ca_file`, or the system's), and requests carry no tenant state, so every tenant's
    /// calls to a provider share its connections.
    clients: BTreeMap<String, Client<Https, Full<Bytes>>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("models", &self.config.models.keys().collect::<Vec<_>>())
            .field("keys", &self.keys)
            .finish()
    }
}

/// An upstream that has started to answer a streamed call.
pub struct Stream {
    /// The public model answering.
    pub model: String,
    /// Models tried.
    pub attempts: usize,
    /// The event stream, as it arrives.
    pub body: hyper::body::Incoming,
}

/// What a call that asked for a stream got.
pub enum Opened {
    /// A stream (2xx).
    Stream(Stream),
    /// A whole answer: the provider refused the request (4xx other than 429).
    Whole(Answer),
}

enum Attempt {
    Answered(Answer),
    Streaming(Stream),
    Retry(String),
}

impl Router {
    /// A router over `config` (validated) with the providers' keys. Fails when a
    /// provider's `ca_file` cannot be read or holds no certificate, or when an https
    /// provider without one would have no trusted roots at all.
    pub fn new(
        config: LlmConfig,
        keys: BTreeMap<String, Option<Secret>>,
    ) -> Result<Router, String> {
        let mut system_roots: Option<Arc<rustls::RootCertStore>> = None;
        let mut clients = BTreeMap::new();
        for (name, p) in &config.providers {
            let roots = match &p.ca_file {
                Some(file) => Arc::new(
                    roots_from_file(file)
                        .map_err(|e| format!("providers.{name}.ca_file {}: {e}", file.display()))?,
                ),
                None => system_roots.get_or_insert_with(system_trust).clone(),
            };
            if p.base_url.starts_with("https://") && roots.is_empty() {
                return Err(format!(
                    "providers.{name}: https needs trusted roots, and the system has none \
                     (install ca-certificates or set ca_file)"
                ));
            }
            // ring: no C toolchain beyond cc to build (aws-lc-rs needs cmake), at the cost
            // of rustls' post-quantum key exchange, which ring lacks.
            #[allow(deprecated)]
            let crypto = rustls::crypto::ring::default_provider();
            let tls = rustls::ClientConfig::builder_with_provider(Arc::new(crypto))
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS: {e}"))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            let mut http = HttpConnector::new();
            http.set_nodelay(true);
            http.set_connect_timeout(Some(Duration::from_secs(10)));
            // Plain http:// stays allowed for local servers (vLLM, Ollama on loopback).
            http.enforce_http(false);
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_http1()
                .wrap_connector(http);
            let client = Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .build(connector);
            clients.insert(name.clone(), client);
        }
        Ok(Router {
            config,
            keys,
            clients,
        })
    }

    /// Public model names.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.config.models.keys().map(String::as_str)
    }

    /// The API the provider of `model` speaks.
    pub fn kind(&self, model: &str) -> Option<Kind> {
        let m = self.config.models.get(model)?;
        Some(self.config.providers.get(&m.provider)?.kind)
    }

    /// Whether `model` exists.
    pub fn has(&self, model: &str) -> bool {
        self.config.models.contains_key(model)
    }

    /// The price of `model`.
    pub fn rate(&self, model: &str) -> Option<Rate> {
        self.config.rate_card.get(model).copied()
    }

    /// The highest price among `model` and its fallbacks (what a reservation must cover,
    /// since any of them may answer).
    pub fn worst_rate(&self, model: &str) -> Option<Rate> {
        let chain = self.chain(model);
        let rates: Vec<Rate> = chain.iter().filter_map(|m| self.rate(m)).collect();
        let first = *rates.first()?;
        Some(rates.iter().fold(first, |a, r| Rate {
            input: a.input.max(r.input),
            output: a.output.max(r.output),
            cached_input: None,
        }))
    }

    /// How many bytes longer a request body gets upstream, where the longest upstream
    /// model name of `model`'s chain replaces the public one: the reservation covers
    /// the body as sent.
    pub fn name_growth(&self, model: &str) -> u64 {
        self.chain(model)
            .iter()
            .filter_map(|m| self.config.models.get(m))
            .map(|m| m.upstream.len().saturating_sub(model.len()) as u64)
            .max()
            .unwrap_or(0)
    }

    fn chain(&self, model: &str) -> Vec<String> {
        let mut chain = vec![model.to_string()];
        if let Some(m) = self.config.models.get(model) {
            for f in &m.fallbacks {
                if chain.len() < MAX_ATTEMPTS && !chain.contains(f) {
                    chain.push(f.clone());
                }
            }
        }
        chain
    }

    /// `POST {base_url}/{path}` (`chat/completions` or `embeddings`) of `body` (an OpenAI
    /// request object) to `model`, then to its fallbacks in order while answers are 429
    /// or 5xx or do not come.
    pub async fn post(
        &self,
        path: &'static str,
        model: &str,
        body: &serde_json::Value,
    ) -> Result<Answer, LlmError> {
        match self.send(path, model, body, false).await? {
            Opened::Whole(a) => Ok(a),
            Opened::Stream(_) => Err(LlmError::Unavailable("unexpected stream".into())),
        }
    }

    /// Like [`Router::post`] for a streamed call: fallbacks apply until an upstream
    /// starts to answer; from then on its event stream is the answer.
    pub async fn open_stream(
        &self,
        path: &'static str,
        model: &str,
        body: &serde_json::Value,
    ) -> Result<Opened, LlmError> {
        self.send(path, model, body, true).await
    }

    async fn send(
        &self,
        path: &'static str,
        model: &str,
        body: &serde_json::Value,
        stream: bool,
    ) -> Result<Opened, LlmError> {
        if !self.has(model) {
            return Err(LlmError::UnknownModel(model.to_string()));
        }
        let mut last = String::new();
        for (i, public) in self.chain(model).iter().enumerate() {
            if i > 0 {
                // Jittered backoff: 50..150 ms times the attempt number.
                let jitter = 50 + u64::from(rand::random::<u8>()) * 100 / 255;
                tokio::time::sleep(Duration::from_millis(jitter * i as u64)).await;
            }
            match self.attempt(path, public, body, i + 1, stream).await {
                Attempt::Answered(a) => return Ok(Opened::Whole(a)),
                Attempt::Streaming(s) => return Ok(Opened::Stream(s)),
                Attempt::Retry(why) => {
                    tracing::warn!(model = %public, why = %why, "upstream attempt failed");
                    last = format!("{public}: {why}");
                }
            }
        }
        Err(LlmError::Unavailable(last))
    }

    async fn attempt(
        &self,
        path: &'static str,
        public: &str,
        body: &serde_json::Value,
        n: usize,
        stream: bool,
    ) -> Attempt {
        let Some(m) = self.config.models.get(public) else {
            return Attempt::Retry("not configured".into());
        };
        let Some(p) = self.config.providers.get(&m.provider) else {
            return Attempt::Retry("no provider".into());
        };
        let wanted = if path == "messages" {
            Kind::Anthropic
        } else {
            Kind::Openai
        };
        if p.kind != wanted {
            return Attempt::Retry(format!("its provider does not serve /{path}"));
        }
        let Some(client) = self.clients.get(&m.provider) else {
            return Attempt::Retry("no client".into());
        };
        let mut body = body.clone();
        if let Some(obj) = body.as_object_mut() {
            obj.insert(
                "model".into(),
                serde_json::Value::String(m.upstream.clone()),
            );
        }
        let Ok(bytes) = serde_json::to_vec(&body) else {
            return Attempt::Retry("unencodable body".into());
        };
        let url = format!("{}/{path}", p.base_url.trim_end_matches('/'));
        let mut req = hyper::Request::post(url).header("content-type", "application/json");
        if p.kind == Kind::Anthropic {
            req = req.header("anthropic-version", "2023-06-01");
        }
        if let Some(Some(key)) = self.keys.get(&m.provider) {
            req = match p.kind {
                Kind::Openai => req.header("authorization", format!("Bearer {}", key.expose())),
                Kind::Anthropic => req.header("x-api-key", key.expose()),
            };
        }
        let Ok(req) = req.body(Full::new(Bytes::from(bytes))) else {
            return Attempt::Retry("bad upstream URL".into());
        };
        let timeout = Duration::from_millis(p.timeout_ms);
        if stream {
            // The timeout covers the wait for the answer to start; a stream may then last.
            return match tokio::time::timeout(timeout, client.request(req)).await {
                Ok(Ok(resp)) => {
                    let status = resp.status().as_u16();
                    if status == 429 || status >= 500 {
                        Attempt::Retry(format!("HTTP {status}"))
                    } else if (200..300).contains(&status) {
                        Attempt::Streaming(Stream {
                            model: public.to_string(),
                            attempts: n,
                            body: resp.into_body(),
                        })
                    } else {
                        let body = Limited::new(resp.into_body(), MAX_ANSWER)
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        Attempt::Answered(Answer {
                            status,
                            body,
                            model: public.to_string(),
                            usage: None,
                            attempts: n,
                        })
                    }
                }
                Ok(Err(e)) => Attempt::Retry(error_chain(&e)),
                Err(_) => Attempt::Retry("timed out".into()),
            };
        }
        let call = async {
            let resp = client.request(req).await.map_err(|e| error_chain(&e))?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        let (status, raw) = match tokio::time::timeout(timeout, call).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Attempt::Retry(e),
            Err(_) => return Attempt::Retry("timed out".into()),
        };
        if status == 429 || status >= 500 {
            return Attempt::Retry(format!("HTTP {status}"));
        }
        if !(200..300).contains(&status) {
            // The request itself was refused: the client sees the provider's answer.
            return Attempt::Answered(Answer {
                status,
                body: raw,
                model: public.to_string(),
                usage: None,
                attempts: n,
            });
        }
        let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&raw) else {
            return Attempt::Retry("answer is not JSON".into());
        };
        let usage = v.get("usage").and_then(|u| match p.kind {
            Kind::Openai => TokenUsage::from_openai(u),
            Kind::Anthropic => TokenUsage::from_anthropic(u),
        });
        if let Some(obj) = v.as_object_mut() {
            obj.insert(
                "model".into(),
                serde_json::Value::String(public.to_string()),
            );
        }
        let body = serde_json::to_vec(&v).map(Bytes::from).unwrap_or(raw);
        Attempt::Answered(Answer {
            status,
            body,
            model: public.to_string(),
            usage,
            attempts: n,
        })
    }
}

/// A client error with its causes ("client error (Connect): invalid peer certificate:
/// UnknownIssuer"): hyper's own message says only which stage failed.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// The certificates of a PEM file, as the only roots a provider trusts.
fn roots_from_file(file: &std::path::Path) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(file).map_err(|e| e.to_string())? {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    if roots.is_empty() {
        return Err("no certificate in it".into());
    }
    Ok(roots)
}

/// The system's trusted roots (what `ca-certificates` installs); unreadable entries are
/// skipped, and none at all is reported where an https provider needs them.
fn system_trust() -> Arc<rustls::RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(error = %e, "reading the system's trusted certificates");
    }
    let mut roots = rustls::RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if ignored > 0 {
        tracing::warn!(added, ignored, "some system certificates could not be used");
    }
    Arc::new(roots)
}
