//! Retrieval routes on the tenant socket: datasources, documents and search, all within
//! the caller's tenant (its own database) and workspace (a condition in every statement).

use bytes::Bytes;
use hyper::{Method, Response, StatusCode};
use std::sync::Arc;

use super::app::App;
use super::error::ApiError;
use super::http::{ApiBody, blocking, json_response, parse_json, percent_decode};
use crate::auth::Boundary;
use crate::retrieval::memory::{self, Owner};
use crate::retrieval::{self, Mode, NewDocument, RetrievalError, Search};

/// `PUT` of run state or memory.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ValueIn {
    value: serde_json::Value,
}

/// `POST /v1/runs/{run_id}/promote`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PromoteIn {
    keys: Vec<String>,
    /// `workspace` (the default) or `user` (the calling actor's own memory).
    #[serde(default)]
    scope: Option<String>,
}

/// `POST /v1/datasources`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateDatasource {
    name: String,
}

/// One document of `POST /v1/documents`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DocumentIn {
    datasource: String,
    id: String,
    text: String,
    #[serde(default)]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    vector: Option<serde_json::Value>,
}

/// `POST /v1/documents`: one document, or a batch.
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum DocumentsIn {
    Batch { documents: Vec<DocumentIn> },
    One(DocumentIn),
}

/// `POST /v1/search`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchIn {
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    vector: Option<serde_json::Value>,
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    datasources: Option<Vec<String>>,
    #[serde(default)]
    filter: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    mode: Option<String>,
}

/// Chunks the in-process embedder embeds for one request.
const MAX_EMBED_CHUNKS: usize = 1024;
/// How long a search result stays cached (writes invalidate it sooner).
const SEARCH_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(300);

/// A client's vector: an array of 1..=4096 finite numbers, returned at unit length.
fn parse_vector(what: &str, v: &serde_json::Value) -> Result<Vec<f32>, ApiError> {
    let bad = || ApiError::BadRequest(format!("{what}: an array of finite numbers"));
    let items = v.as_array().ok_or_else(bad)?;
    if items.len() > retrieval::vectors::MAX_DIM {
        return Err(ApiError::BadRequest(format!(
            "{what}: at most {} numbers",
            retrieval::vectors::MAX_DIM
        )));
    }
    let mut out = Vec::with_capacity(items.len());
    for x in items {
        let f = x.as_f64().ok_or_else(bad)? as f32;
        if !f.is_finite() {
            return Err(bad());
        }
        out.push(f);
    }
    Ok(retrieval::vectors::normalized(&out)?)
}

/// Where texts get their vectors when the caller supplies none: one source per daemon,
/// so every vector of an index comes from one model.
pub enum Embeddings {
    /// The in-process model (`retrieval.embedder`).
    Local(Arc<retrieval::embed::Embedder>),
    /// A configured model reached through LLM routing (`retrieval.embeddings_model`),
    /// charged to the tenant whose text it embeds.
    Provider {
        /// The public model name.
        model: String,
        /// Its identity in embedding caches: the public name, provider and upstream
        /// model, so a remapped name never reuses another model's vectors.
        id: String,
    },
}

impl Embeddings {
    fn id(&self) -> &str {
        match self {
            Embeddings::Local(e) => e.id(),
            Embeddings::Provider { id, .. } => id,
        }
    }
}

/// The caller's embeddings source: none where a provider's model is configured but
/// outside the tenant's model allowlist, which then embeds nothing, as if none were
/// configured.
fn embeddings_for<'a>(app: &'a App, b: &Boundary) -> Option<&'a Embeddings> {
    match app.embeddings.as_ref()? {
        Embeddings::Provider { model, .. } if super::llm::allowed_model(app, b, model).is_err() => {
            None
        }
        source => Some(source),
    }
}

/// Texts sent to a provider's embeddings model in one call: answers stay well under the
/// router's read limit even for 3,072-number vectors.
const PROVIDER_BATCH: usize = 128;

/// Vectors for a request's texts, and what is left to do once they have been used.
struct Embedded {
    /// Unit vectors, in the order of the texts.
    vectors: Vec<Vec<f32>>,
    /// What a provider charged (micro-USD; 0 for the in-process model or all cached).
    spent: u64,
    /// Vectors made for this request, to be cached once the request has used them, so
    /// a vector that failed its request is never served from the cache.
    fresh: Vec<([u8; 32], Vec<f32>)>,
}

/// Unit vectors for `texts`, through the tenant's own embedding cache (in its database,
/// keyed by model and a [`crate::cache::CacheKey`] of the caller's whole boundary and the
/// text, so another workspace, actor or token never learns from it whether a text was
/// embedded before).
async fn embed_texts(
    app: &Arc<App>,
    b: &Boundary,
    source: &Embeddings,
    texts: Vec<String>,
) -> Result<Embedded, ApiError> {
    let (key, db) = database(app, b);
    let id = source.id().to_string();
    let digests: Vec<[u8; 32]> = texts
        .iter()
        .map(|t| {
            crate::cache::CacheKey::new(b, crate::cache::Kind::Embedding, &[t.as_bytes()]).bytes()
        })
        .collect();
    let mut found = {
        let (app2, d2) = (app.clone(), digests.clone());
        blocking(move || Ok(app2.retrieval.cached_embeddings(&key, &db, &id, &d2)?)).await?
    };
    let missing: Vec<usize> = (0..texts.len()).filter(|i| found[*i].is_none()).collect();
    if missing.is_empty() {
        return Ok(Embedded {
            vectors: found.into_iter().flatten().collect(),
            spent: 0,
            fresh: Vec::new(),
        });
    }
    let inputs: Vec<String> = missing.iter().map(|i| texts[*i].clone()).collect();
    let (made, spent) = match source {
        Embeddings::Local(e) => {
            let e = e.clone();
            let made = blocking(move || {
                let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
                e.embed(&refs)
                    .map_err(|e| ApiError::Internal(e.to_string()))
            })
            .await?;
            (made, 0)
        }
        Embeddings::Provider { model, .. } => {
            let (mut made, mut spent) = (Vec::with_capacity(inputs.len()), 0);
            for batch in inputs.chunks(PROVIDER_BATCH) {
                let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
                let (unit, cost) = super::llm::embed_for_retrieval(app, b, model, &refs).await?;
                spent += cost;
                made.extend(unit);
            }
            (made, spent)
        }
    };
    let fresh: Vec<([u8; 32], Vec<f32>)> = missing
        .iter()
        .zip(&made)
        .map(|(i, v)| (digests[*i], v.clone()))
        .collect();
    for (i, v) in missing.into_iter().zip(made) {
        found[i] = Some(v);
    }
    Ok(Embedded {
        vectors: found.into_iter().flatten().collect(),
        spent,
        fresh,
    })
}

/// Caches the vectors a request made, now that it has used them.
async fn remember(
    app: &Arc<App>,
    b: &Boundary,
    source: &Embeddings,
    fresh: Vec<([u8; 32], Vec<f32>)>,
) -> Result<(), ApiError> {
    if fresh.is_empty() {
        return Ok(());
    }
    let (key, db) = database(app, b);
    let (app2, id) = (app.clone(), source.id().to_string());
    blocking(move || {
        let refs: Vec<([u8; 32], &[f32])> = fresh.iter().map(|(d, v)| (*d, v.as_slice())).collect();
        Ok(app2.retrieval.cache_embeddings(&key, &db, &id, &refs)?)
    })
    .await
}

/// Adds `x-bulkhead-cost-usd` when a provider embedded for the request.
fn with_cost(mut resp: Response<ApiBody>, app: &App, spent: u64) -> Response<ApiBody> {
    if matches!(app.embeddings, Some(Embeddings::Provider { .. }))
        && let Ok(v) = hyper::header::HeaderValue::from_str(&crate::llm::cost::usd(spent))
    {
        resp.headers_mut().insert("x-bulkhead-cost-usd", v);
    }
    resp
}

impl From<RetrievalError> for ApiError {
    fn from(e: RetrievalError) -> ApiError {
        match e {
            RetrievalError::Invalid(m) => ApiError::BadRequest(m),
            RetrievalError::NotFound(m) | RetrievalError::Blocked(m) => ApiError::NotFound(m),
            RetrievalError::TooLarge(m) => ApiError::TooLarge(m),
            RetrievalError::Database(m) => ApiError::Internal(m),
        }
    }
}

/// Counts and logs (with the trace id) a request that named something of another
/// workspace; the client gets the same 404 as for something that does not exist.
fn counted(app: &App, b: &Boundary, e: RetrievalError) -> ApiError {
    if matches!(e, RetrievalError::Blocked(_)) {
        app.meters.record_blocked(b.tenant().as_str());
        tracing::warn!(
            tenant = %b.tenant(),
            workspace = b.workspace(),
            trace_id = b.trace_id(),
            "blocked a cross-boundary access"
        );
    }
    ApiError::from(e)
}

/// Whether the token may use datasource `name` (its allowlist, when it has one); one
/// outside it is answered like a missing one, and counted.
fn allowed(app: &App, b: &Boundary, name: &str) -> Result<(), ApiError> {
    match b.allowed_datasources() {
        Some(list) if !list.iter().any(|n| n == name) => Err(counted(
            app,
            b,
            RetrievalError::Blocked(format!("no datasource {name:?}")),
        )),
        _ => Ok(()),
    }
}

/// Where the caller's tenant keeps its database, and the pool key for it.
fn database(app: &App, b: &Boundary) -> (String, std::path::PathBuf) {
    (
        retrieval::pool_key(b.tenant().as_str(), b.incarnation()),
        app.registry.tenant_dir(b.tenant()).join("retrieval.db"),
    )
}

/// Routes `/v1/datasources...`, `/v1/documents` and `/v1/search`; `None` if `path` is
/// none of them.
pub async fn route(
    app: &Arc<App>,
    b: &Boundary,
    method: &Method,
    path: &str,
    body: &Bytes,
) -> Option<Result<Response<ApiBody>, ApiError>> {
    let r = match path {
        "/v1/datasources" => match *method {
            Method::POST => create_datasource(app, b, body).await,
            _ => Err(ApiError::Method),
        },
        "/v1/documents" => match *method {
            Method::POST => put_documents(app, b, body).await,
            _ => Err(ApiError::Method),
        },
        "/v1/search" => match *method {
            Method::POST => search(app, b, body).await,
            _ => Err(ApiError::Method),
        },
        _ if path.starts_with("/v1/runs/")
            || path.starts_with("/v1/memory/")
            || path.starts_with("/v1/users/me/memory/") =>
        {
            memory_route(app, b, method, path, body).await
        }
        _ => {
            let rest = path.strip_prefix("/v1/datasources/")?;
            let (ds, id) = rest.split_once("/documents/")?;
            let decode = |s: &str| {
                percent_decode(s).and_then(|v| {
                    String::from_utf8(v)
                        .map_err(|_| ApiError::BadRequest("path is not UTF-8".into()))
                })
            };
            match (decode(ds), decode(id)) {
                (Ok(ds), Ok(id)) => match *method {
                    Method::GET => get_document(app, b, ds, id).await,
                    Method::DELETE => delete_document(app, b, ds, id).await,
                    _ => Err(ApiError::Method),
                },
                (Err(e), _) | (_, Err(e)) => Err(e),
            }
        }
    };
    Some(r)
}

/// The policy action of a retrieval or memory route (`None`: not one).
pub fn action_of(method: &Method, path: &str) -> Option<crate::policy::Action> {
    use crate::policy::Action;
    if memory_target(path).is_some() {
        return match *method {
            Method::GET => Some(Action::MemoryRead),
            Method::PUT | Method::DELETE | Method::POST => Some(Action::MemoryWrite),
            _ => None,
        };
    }
    match (method, path) {
        (&Method::POST, "/v1/datasources" | "/v1/documents") => Some(Action::RetrievalWrite),
        (&Method::POST, "/v1/search") => Some(Action::RetrievalRead),
        _ => {
            let rest = path.strip_prefix("/v1/datasources/")?;
            rest.contains("/documents/").then_some(())?;
            match *method {
                Method::GET => Some(Action::RetrievalRead),
                Method::DELETE => Some(Action::RetrievalWrite),
                _ => None,
            }
        }
    }
}

async fn create_datasource(
    app: &Arc<App>,
    b: &Boundary,
    body: &Bytes,
) -> Result<Response<ApiBody>, ApiError> {
    let req: CreateDatasource = parse_json(body)?;
    retrieval::check_name(&req.name)?;
    if b.allowed_datasources()
        .is_some_and(|list| !list.contains(&req.name))
    {
        return Err(ApiError::Policy(crate::policy::Denial::Scope {
            scope: "retrieval.write",
            why: "the token's datasource allowlist does not name it",
        }));
    }
    let (key, db) = database(app, b);
    let (app2, ws, name) = (app.clone(), b.workspace().to_string(), req.name.clone());
    let created =
        blocking(move || Ok(app2.retrieval.create_datasource(&key, &db, &ws, &name)?)).await?;
    if created {
        super::tenant::audit_ok(app, b, "datasource.create", Some(req.name.clone())).await?;
    }
    Ok(json_response(
        if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        &serde_json::json!({"name": req.name, "workspace": b.workspace(), "created": created}),
        b.trace_id(),
    ))
}

async fn put_documents(
    app: &Arc<App>,
    b: &Boundary,
    body: &Bytes,
) -> Result<Response<ApiBody>, ApiError> {
    let docs = match parse_json::<DocumentsIn>(body)? {
        DocumentsIn::Batch { documents } => documents,
        DocumentsIn::One(d) => vec![d],
    };
    if docs.is_empty() || docs.len() > retrieval::MAX_BATCH {
        return Err(ApiError::BadRequest(format!(
            "1..={} documents per request",
            retrieval::MAX_BATCH
        )));
    }
    let mut new = Vec::with_capacity(docs.len());
    for d in docs {
        retrieval::check_name(&d.datasource)?;
        retrieval::check_id(&d.id)?;
        allowed(app, b, &d.datasource)?;
        let vector = match &d.vector {
            Some(v) => Some(parse_vector(&format!("document {:?}: vector", d.id), v)?),
            None => None,
        };
        if d.text.len() > retrieval::MAX_TEXT {
            return Err(ApiError::TooLarge(format!(
                "document {:?}: text over {} bytes",
                d.id,
                retrieval::MAX_TEXT
            )));
        }
        let metadata = d.metadata.map(serde_json::Value::Object);
        if metadata
            .as_ref()
            .is_some_and(|m| m.to_string().len() > retrieval::MAX_METADATA)
        {
            return Err(ApiError::TooLarge(format!(
                "document {:?}: metadata over {} bytes",
                d.id,
                retrieval::MAX_METADATA
            )));
        }
        // A document's own vector stands for each of its chunks.
        let vectors = match vector {
            Some(v) => vec![v; retrieval::store::chunks(&d.text).len()],
            None => Vec::new(),
        };
        new.push(NewDocument {
            datasource: d.datasource,
            id: d.id,
            text: d.text,
            metadata,
            vectors,
        });
    }
    let summary: Vec<(String, String)> = new
        .iter()
        .map(|d| (d.datasource.clone(), d.id.clone()))
        .collect();
    let (key, db) = database(app, b);
    let mut spent = 0;
    let mut made = None;
    if let Some(source) = embeddings_for(app, b) {
        let texts: Vec<String> = new
            .iter()
            .filter(|d| d.vectors.is_empty())
            .flat_map(|d| retrieval::store::chunks(&d.text))
            .map(str::to_string)
            .collect();
        if texts.len() > MAX_EMBED_CHUNKS {
            return Err(ApiError::TooLarge(format!(
                "{} chunks to embed; at most {MAX_EMBED_CHUNKS} per request (send smaller batches)",
                texts.len()
            )));
        }
        if !texts.is_empty() {
            // Embedding may be charged: the datasources must exist first.
            let (app2, key2, db2, ws) = (
                app.clone(),
                key.clone(),
                db.clone(),
                b.workspace().to_string(),
            );
            let names: Vec<String> = summary.iter().map(|(ds, _)| ds.clone()).collect();
            blocking(move || Ok(app2.retrieval.check_datasources(&key2, &db2, &ws, &names)))
                .await?
                .map_err(|e| counted(app, b, e))?;
            let e = embed_texts(app, b, source, texts).await?;
            spent = e.spent;
            made = Some((source, e.fresh));
            let mut vectors = e.vectors.into_iter();
            for d in new.iter_mut().filter(|d| d.vectors.is_empty()) {
                let n = retrieval::store::chunks(&d.text).len();
                d.vectors = vectors.by_ref().take(n).collect();
            }
        }
    }
    let (app2, ws, b2) = (app.clone(), b.workspace().to_string(), b.clone());
    let counts = blocking(move || {
        app2.retrieval
            .put_documents(&key, &db, &ws, &new)
            .map_err(|e| counted(&app2, &b2, e))
    })
    .await?;
    if let Some((source, fresh)) = made {
        remember(app, b, source, fresh).await?;
    }
    let mut sources: Vec<&str> = summary.iter().map(|(ds, _)| ds.as_str()).collect();
    sources.sort_unstable();
    sources.dedup();
    super::tenant::audit_ok(
        app,
        b,
        "documents.put",
        Some(format!(
            "{} document(s) in {}",
            summary.len(),
            sources.join(",")
        )),
    )
    .await?;
    let out: Vec<serde_json::Value> = summary
        .iter()
        .zip(counts)
        .map(|((ds, id), chunks)| serde_json::json!({"datasource": ds, "id": id, "chunks": chunks}))
        .collect();
    let resp = json_response(
        StatusCode::OK,
        &serde_json::json!({"documents": out}),
        b.trace_id(),
    );
    Ok(with_cost(resp, app, spent))
}

async fn get_document(
    app: &Arc<App>,
    b: &Boundary,
    datasource: String,
    id: String,
) -> Result<Response<ApiBody>, ApiError> {
    retrieval::check_name(&datasource)?;
    retrieval::check_id(&id)?;
    allowed(app, b, &datasource)?;
    let (key, db) = database(app, b);
    let (app2, ws) = (app.clone(), b.workspace().to_string());
    let doc = blocking(move || {
        Ok(app2
            .retrieval
            .get_document(&key, &db, &ws, &datasource, &id))
    })
    .await?
    .map_err(|e| counted(app, b, e))?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::to_value(doc).unwrap_or_default(),
        b.trace_id(),
    ))
}

async fn delete_document(
    app: &Arc<App>,
    b: &Boundary,
    datasource: String,
    id: String,
) -> Result<Response<ApiBody>, ApiError> {
    retrieval::check_name(&datasource)?;
    retrieval::check_id(&id)?;
    allowed(app, b, &datasource)?;
    let (key, db) = database(app, b);
    let (app2, ws, ds2, id2) = (
        app.clone(),
        b.workspace().to_string(),
        datasource.clone(),
        id.clone(),
    );
    blocking(move || Ok(app2.retrieval.delete_document(&key, &db, &ws, &ds2, &id2)))
        .await?
        .map_err(|e| counted(app, b, e))?;
    super::tenant::audit_ok(app, b, "document.delete", Some(datasource)).await?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"deleted": true, "id": id}),
        b.trace_id(),
    ))
}

/// The ranking a search asks for, resolved against what the request and the daemon
/// have: an explicit `mode` must be servable; without one, text and a vector source
/// give hybrid, a vector alone gives vector, text alone gives text.
fn resolve_mode(
    requested: Option<&str>,
    query: bool,
    vector: bool,
    embeddings: bool,
) -> Result<Mode, ApiError> {
    let vectors = vector || (query && embeddings);
    let no_source = "no query vector was given and no embedder is configured (retrieval.embedder or retrieval.embeddings_model)";
    match requested {
        Some("text") if query => Ok(Mode::Text),
        Some("text") => Err(ApiError::BadRequest("mode text needs a query".into())),
        Some("vector") if vectors => Ok(Mode::Vector),
        Some("vector") => Err(ApiError::BadRequest(format!("mode vector: {no_source}"))),
        Some("hybrid") if query && vectors => Ok(Mode::Hybrid),
        Some("hybrid") if !query => Err(ApiError::BadRequest("mode hybrid needs a query".into())),
        Some("hybrid") => Err(ApiError::BadRequest(format!("mode hybrid: {no_source}"))),
        Some(other) => Err(ApiError::BadRequest(format!(
            "mode {other:?}: text, vector or hybrid"
        ))),
        None if query && vectors => Ok(Mode::Hybrid),
        None if vector => Ok(Mode::Vector),
        None if query => Ok(Mode::Text),
        None => Err(ApiError::BadRequest(
            "a query or a vector is required".into(),
        )),
    }
}

async fn search(app: &Arc<App>, b: &Boundary, body: &Bytes) -> Result<Response<ApiBody>, ApiError> {
    let req: SearchIn = parse_json(body)?;
    let query = req.query.unwrap_or_default();
    if query.len() > retrieval::MAX_QUERY {
        return Err(ApiError::TooLarge(format!(
            "query over {} bytes",
            retrieval::MAX_QUERY
        )));
    }
    let vector = match &req.vector {
        Some(v) => Some(parse_vector("vector", v)?),
        None => None,
    };
    let has_query = !query.trim().is_empty();
    // Vectors asked for from a provider's model this tenant may not use: say so.
    if let (Some(Embeddings::Provider { model, .. }), None, Some("vector" | "hybrid"), true) =
        (&app.embeddings, &vector, req.mode.as_deref(), has_query)
    {
        super::llm::allowed_model(app, b, model)?;
    }
    let mode = resolve_mode(
        req.mode.as_deref(),
        has_query,
        vector.is_some(),
        embeddings_for(app, b).is_some(),
    )?;
    let top_k = req.top_k.unwrap_or(10);
    if !(1..=retrieval::MAX_TOP_K).contains(&top_k) {
        return Err(ApiError::BadRequest(format!(
            "top_k must be 1..={}",
            retrieval::MAX_TOP_K
        )));
    }
    if let Some(names) = &req.datasources {
        if names.is_empty() || names.len() > 256 {
            return Err(ApiError::BadRequest(
                "datasources: 1..=256 names, or leave it out for all".into(),
            ));
        }
        for n in names {
            retrieval::check_name(n)?;
        }
    }
    let mut filter = Vec::new();
    for (k, v) in req.filter.unwrap_or_default() {
        retrieval::check_filter_key(&k)?;
        if !(v.is_string() || v.is_number() || v.is_boolean()) {
            return Err(ApiError::BadRequest(format!(
                "filter {k:?}: a string, number or boolean"
            )));
        }
        filter.push((k, v));
    }
    if filter.len() > 16 {
        return Err(ApiError::BadRequest("at most 16 filter keys".into()));
    }
    let requested = req.datasources.clone();
    let mut datasources = req.datasources;
    if let Some(names) = &datasources {
        for n in names {
            allowed(app, b, n)?;
        }
    }
    // A token with an allowlist searches only those datasources, whatever it asks.
    if datasources.is_none() {
        datasources = b.allowed_datasources().map(<[String]>::to_vec);
    }
    if let Some(names) = &mut datasources {
        names.sort_unstable();
        names.dedup();
    }
    let mut s = Search {
        query,
        vector,
        mode,
        top_k,
        datasources,
        filter,
    };
    let (key, db) = database(app, b);
    // Names the caller gave must be datasources of its workspace.
    if let Some(names) = requested {
        let (app2, key2, db2, ws) = (
            app.clone(),
            key.clone(),
            db.clone(),
            b.workspace().to_string(),
        );
        blocking(move || Ok(app2.retrieval.check_datasources(&key2, &db2, &ws, &names)))
            .await?
            .map_err(|e| counted(app, b, e))?;
    }
    let version = {
        let (app2, key2, db2) = (app.clone(), key.clone(), db.clone());
        blocking(move || Ok(app2.retrieval.version(&key2, &db2)?)).await?
    };
    let cache_key = |v: retrieval::IndexVersion| search_cache_key(b, &s, v);
    let mut spent = 0;
    let (hits, cached) = match app.search_cache.get(&cache_key(version)) {
        Some(hits) => (hits, true),
        None => {
            let mut s2 = s.clone();
            let mut made = None;
            if let (Some(source), None, true) =
                (embeddings_for(app, b), &s2.vector, s2.mode != Mode::Text)
            {
                let e = embed_texts(app, b, source, vec![s2.query.clone()]).await?;
                s2.vector = e.vectors.into_iter().next();
                spent = e.spent;
                made = Some((source, e.fresh));
            }
            let (app2, ws) = (app.clone(), b.workspace().to_string());
            let (hits, seen, query_vector) = blocking(move || {
                let (hits, seen) = app2.retrieval.search(&key, &db, &ws, &s2)?;
                Ok((hits, seen, s2.vector))
            })
            .await?;
            if let Some((source, fresh)) = made {
                remember(app, b, source, fresh).await?;
            }
            let hits = Arc::new(hits);
            // Keyed by the version the search saw, so a write in between is never
            // hidden behind an entry of the version before it.
            let k = cache_key(seen);
            app.search_cache
                .put(k, b.tenant().as_str(), hits.clone(), SEARCH_CACHE_TTL);
            s.vector = query_vector;
            (hits, false)
        }
    };
    let mut sources: Vec<&str> = hits.iter().map(|h| h.datasource.as_str()).collect();
    sources.sort_unstable();
    sources.dedup();
    tracing::info!(
        target: "bulkhead::trace",
        trace_id = b.trace_id(),
        tenant = %b.tenant(),
        namespace = %format!("{}/{}", b.tenant(), b.workspace()),
        mode = ?s.mode,
        datasources = %sources.join(","),
        results = hits.len(),
        cache = if cached { "hit" } else { "miss" },
        "search"
    );
    let mut body = serde_json::json!({"mode": s.mode, "results": &*hits});
    if s.mode == Mode::Text && embeddings_for(app, b).is_none() {
        body["note"] = match &app.embeddings {
            Some(Embeddings::Provider { model, .. }) => format!(
                "full-text only: no query vector was given and the embeddings model {model:?} is not allowed for this tenant"
            ),
            _ => "full-text only: no query vector was given and no embedder is configured".into(),
        }
        .into();
    }
    let mut resp = json_response(StatusCode::OK, &body, b.trace_id());
    resp.headers_mut().insert(
        "x-bulkhead-cache",
        hyper::header::HeaderValue::from_static(if cached { "hit" } else { "miss" }),
    );
    Ok(with_cost(resp, app, spent))
}

/// The search cache's key: the caller's boundary, the index version, and everything of
/// the request that changes its answer (mode, query, vector, top_k, datasource set,
/// filter).
fn search_cache_key(
    b: &Boundary,
    s: &Search,
    v: retrieval::IndexVersion,
) -> crate::cache::CacheKey {
    let mode = [s.mode as u8];
    let version = [v.opened.to_le_bytes(), v.writes.to_le_bytes()].concat();
    let top_k = (s.top_k as u64).to_le_bytes();
    let vector = s
        .vector
        .as_deref()
        .map(retrieval::vectors::to_blob)
        .unwrap_or_default();
    let sources = match &s.datasources {
        Some(names) => serde_json::to_vec(names).unwrap_or_default(),
        None => b"*".to_vec(),
    };
    let filter = serde_json::to_vec(&s.filter).unwrap_or_default();
    crate::cache::CacheKey::new(
        b,
        crate::cache::Kind::Search,
        &[
            &mode,
            &version,
            &top_k,
            s.query.as_bytes(),
            &vector,
            &crate::cache::digest(&sources),
            &filter,
        ],
    )
}

/// What a memory path names.
#[derive(Debug)]
enum MemoryTarget<'a> {
    /// `/v1/runs/{run_id}/state/{key}`.
    RunState(&'a str, &'a str),
    /// `/v1/runs/{run_id}/promote`.
    Promote(&'a str),
    /// `/v1/memory/{key}` or `/v1/users/me/memory/{key}`.
    Memory(bool, &'a str),
}

fn memory_target(path: &str) -> Option<MemoryTarget<'_>> {
    if let Some(rest) = path.strip_prefix("/v1/runs/") {
        if let Some(run) = rest.strip_suffix("/promote") {
            return Some(MemoryTarget::Promote(run));
        }
        let (run, key) = rest.split_once("/state/")?;
        return Some(MemoryTarget::RunState(run, key));
    }
    if let Some(key) = path.strip_prefix("/v1/users/me/memory/") {
        return Some(MemoryTarget::Memory(true, key));
    }
    path.strip_prefix("/v1/memory/")
        .map(|key| MemoryTarget::Memory(false, key))
}

async fn memory_route(
    app: &Arc<App>,
    b: &Boundary,
    method: &Method,
    path: &str,
    body: &Bytes,
) -> Result<Response<ApiBody>, ApiError> {
    let target =
        memory_target(path).ok_or_else(|| ApiError::NotFound(format!("no route {path}")))?;
    tracing::info!(
        target: "bulkhead::trace",
        trace_id = b.trace_id(),
        tenant = %b.tenant(),
        namespace = %format!("{}/{}", b.tenant(), b.workspace()),
        method = %method,
        memory = ?target,
        "memory"
    );
    let (key, db) = database(app, b);
    let ws = b.workspace().to_string();
    let app2 = app.clone();
    let reply = |v: serde_json::Value| Ok(json_response(StatusCode::OK, &v, b.trace_id()));
    match (target, method.clone()) {
        (MemoryTarget::RunState(run, k), m) => {
            memory::check_key("run id", run)?;
            memory::check_key("key", k)?;
            let (run, k) = (run.to_string(), k.to_string());
            match m {
                Method::PUT => {
                    let v: ValueIn = parse_json(body)?;
                    let ttl = app.config.memory.run_state_ttl_s.saturating_mul(1000);
                    let (run2, k2) = (run.clone(), k.clone());
                    blocking(move || {
                        Ok(app2
                            .retrieval
                            .put_run_state(&key, &db, &ws, &run2, &k2, &v.value, ttl)?)
                    })
                    .await?;
                    super::tenant::audit_ok(app, b, "run_state.put", Some(format!("{run}/{k}")))
                        .await?;
                    reply(serde_json::json!({"run_id": run, "key": k}))
                }
                Method::GET => {
                    let v = blocking(move || {
                        Ok(app2.retrieval.get_run_state(&key, &db, &ws, &run, &k))
                    })
                    .await?
                    .map_err(|e| counted(app, b, e))?;
                    reply(serde_json::json!({"value": v}))
                }
                _ => Err(ApiError::Method),
            }
        }
        (MemoryTarget::Promote(run), Method::POST) => {
            memory::check_key("run id", run)?;
            let req: PromoteIn = parse_json(body)?;
            if req.keys.is_empty() || req.keys.len() > memory::MAX_PROMOTE {
                return Err(ApiError::BadRequest(format!(
                    "keys: 1..={} names",
                    memory::MAX_PROMOTE
                )));
            }
            for k in &req.keys {
                memory::check_key("key", k)?;
            }
            let owner = match req.scope.as_deref() {
                None | Some("workspace") => Owner::Workspace,
                Some("user") => Owner::Actor(b.actor().to_string()),
                Some(other) => {
                    return Err(ApiError::BadRequest(format!(
                        "scope {other:?}: workspace or user"
                    )));
                }
            };
            let (run, keys) = (run.to_string(), req.keys.clone());
            let run2 = run.clone();
            blocking(move || Ok(app2.retrieval.promote(&key, &db, &ws, &run2, &keys, &owner)))
                .await?
                .map_err(|e| counted(app, b, e))?;
            super::tenant::audit_ok(
                app,
                b,
                "run_state.promote",
                Some(format!("{run}: {}", req.keys.join(","))),
            )
            .await?;
            reply(serde_json::json!({"promoted": req.keys}))
        }
        (MemoryTarget::Promote(_), _) => Err(ApiError::Method),
        (MemoryTarget::Memory(own, k), m) => {
            memory::check_key("key", k)?;
            let owner = if own {
                Owner::Actor(b.actor().to_string())
            } else {
                Owner::Workspace
            };
            let k = k.to_string();
            match m {
                Method::PUT => {
                    let v: ValueIn = parse_json(body)?;
                    let k2 = k.clone();
                    blocking(move || {
                        Ok(app2
                            .retrieval
                            .put_memory(&key, &db, &ws, &owner, &k2, &v.value)?)
                    })
                    .await?;
                    super::tenant::audit_ok(app, b, "memory.put", Some(k.clone())).await?;
                    reply(serde_json::json!({"key": k}))
                }
                Method::GET => {
                    let v =
                        blocking(move || Ok(app2.retrieval.get_memory(&key, &db, &ws, &owner, &k)))
                            .await?
                            .map_err(|e| counted(app, b, e))?;
                    reply(serde_json::json!({"value": v}))
                }
                Method::DELETE => {
                    let k2 = k.clone();
                    blocking(move || Ok(app2.retrieval.delete_memory(&key, &db, &ws, &owner, &k2)))
                        .await?
                        .map_err(|e| counted(app, b, e))?;
                    super::tenant::audit_ok(app, b, "memory.delete", Some(k.clone())).await?;
                    reply(serde_json::json!({"deleted": true, "key": k}))
                }
                _ => Err(ApiError::Method),
            }
        }
    }
}
