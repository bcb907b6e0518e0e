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
use crate::retrieval::{self, NewDocument, RetrievalError, Search};

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

/// Vectors need an embeddings source, which this build does not have yet.
const NO_VECTORS: &str =
    "vector and hybrid search are not available: no embeddings source is configured";

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

/// Where the caller's tenant keeps its database, and the pool key for it.
fn database(app: &App, b: &Boundary) -> (String, std::path::PathBuf) {
    (
        format!("{}:{}", b.tenant(), b.incarnation()),
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
        if d.vector.is_some() {
            return Err(ApiError::BadRequest(NO_VECTORS.into()));
        }
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
        new.push(NewDocument {
            datasource: d.datasource,
            id: d.id,
            text: d.text,
            metadata,
        });
    }
    let summary: Vec<(String, String)> = new
        .iter()
        .map(|d| (d.datasource.clone(), d.id.clone()))
        .collect();
    let (key, db) = database(app, b);
    let (app2, ws) = (app.clone(), b.workspace().to_string());
    let counts = blocking(move || Ok(app2.retrieval.put_documents(&key, &db, &ws, &new)?)).await?;
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
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"documents": out}),
        b.trace_id(),
    ))
}

async fn get_document(
    app: &Arc<App>,
    b: &Boundary,
    datasource: String,
    id: String,
) -> Result<Response<ApiBody>, ApiError> {
    retrieval::check_name(&datasource)?;
    retrieval::check_id(&id)?;
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

async fn search(app: &Arc<App>, b: &Boundary, body: &Bytes) -> Result<Response<ApiBody>, ApiError> {
    let req: SearchIn = parse_json(body)?;
    if req.vector.is_some() || req.mode.as_deref().is_some_and(|m| m != "text") {
        return Err(ApiError::BadRequest(NO_VECTORS.into()));
    }
    let query = req
        .query
        .ok_or_else(|| ApiError::BadRequest("query is required".into()))?;
    if query.len() > retrieval::MAX_QUERY {
        return Err(ApiError::TooLarge(format!(
            "query over {} bytes",
            retrieval::MAX_QUERY
        )));
    }
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
    let s = Search {
        query,
        top_k,
        datasources: req.datasources,
        filter,
    };
    let (key, db) = database(app, b);
    let (app2, ws) = (app.clone(), b.workspace().to_string());
    let hits = blocking(move || Ok(app2.retrieval.search(&key, &db, &ws, &s)?)).await?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({
            "mode": "text",
            "note": "full-text only: no embeddings source is configured",
            "results": hits,
        }),
        b.trace_id(),
    ))
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
                        Ok(app2.retrieval.get_run_state(&key, &db, &ws, &run, &k)?)
                    })
                    .await?;
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
            blocking(move || {
                Ok(app2
                    .retrieval
                    .promote(&key, &db, &ws, &run2, &keys, &owner)?)
            })
            .await?;
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
                    let v = blocking(move || {
                        Ok(app2.retrieval.get_memory(&key, &db, &ws, &owner, &k)?)
                    })
                    .await?;
                    reply(serde_json::json!({"value": v}))
                }
                Method::DELETE => {
                    let k2 = k.clone();
                    blocking(move || {
                        Ok(app2.retrieval.delete_memory(&key, &db, &ws, &owner, &k2)?)
                    })
                    .await?;
                    super::tenant::audit_ok(app, b, "memory.delete", Some(k.clone())).await?;
                    reply(serde_json::json!({"deleted": true, "key": k}))
                }
                _ => Err(ApiError::Method),
            }
        }
    }
}
