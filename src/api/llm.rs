//! The OpenAI-compatible endpoints: `POST /v1/chat/completions` and `GET /v1/models`.
//!
//! A call is parsed, the tenant's overlay applied (default model, `max_tokens` cap,
//! system prompt first), its worst-case cost reserved against the tenant's budgets,
//! sent upstream through the shared router, and settled to what the upstream reported.
//! Nothing of the tenant, its actor or the trace goes upstream.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};

use super::app::App;
use super::error::ApiError;
use super::http::{json_response, response};
use crate::audit::{Event, LlmDetails};
use crate::auth::Boundary;
use crate::llm::cost::{cost_micro, usd, worst_case_micro};

/// `max_tokens` when neither the request nor the overlay bounds it: the reservation
/// needs a bound, and the upstream gets the same one.
const DEFAULT_MAX_TOKENS: u64 = 4096;

fn usd_to_micro(usd: f64) -> u64 {
    (usd * 1e6).floor().clamp(0.0, u64::MAX as f64) as u64
}

/// `GET /v1/models`: the models this tenant may call.
pub fn models(app: &App, b: &Boundary) -> Response<Full<Bytes>> {
    let allowed = app.limits(b.tenant()).allowed_models;
    let data: Vec<serde_json::Value> = app
        .llm
        .models()
        .filter(|m| allowed.as_ref().is_none_or(|a| a.iter().any(|x| x == m)))
        .map(|m| serde_json::json!({"id": m, "object": "model", "created": 0, "owned_by": "bulkhead"}))
        .collect();
    json_response(
        StatusCode::OK,
        &serde_json::json!({"object": "list", "data": data}),
        b.trace_id(),
    )
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    app: &Arc<App>,
    b: &Boundary,
    body: &[u8],
) -> Result<Response<Full<Bytes>>, ApiError> {
    let mut req: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON request: {e}")))?;
    if req.get("stream").and_then(|v| v.as_bool()) == Some(true) {
        return Err(ApiError::BadRequest(
            "streaming (\"stream\": true) is not supported yet; send the request without it".into(),
        ));
    }
    if !req.get("messages").is_some_and(|m| m.is_array()) {
        return Err(ApiError::BadRequest("`messages` must be an array".into()));
    }
    let settings = app.settings(b.tenant());
    let model = checked_model(app, b, &req)?;
    // The output bound: the request's, capped by the overlay's, or a default.
    let asked = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| req.get(*k).and_then(|v| v.as_u64()));
    let cap = settings.max_tokens.map(u64::from);
    let max_tokens = match (asked, cap) {
        (Some(a), Some(c)) => a.min(c),
        (Some(a), None) => a,
        (None, Some(c)) => c,
        (None, None) => DEFAULT_MAX_TOKENS,
    };
    let key = if req.contains_key("max_completion_tokens") {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    req.insert(key.into(), max_tokens.into());
    if let Some(prompt) = &settings.system_prompt
        && let Some(serde_json::Value::Array(messages)) = req.get_mut("messages")
    {
        messages.insert(0, serde_json::json!({"role": "system", "content": prompt}));
    }
    // Fields that would name the caller upstream are dropped.
    req.remove("user");
    req.remove("metadata");
    req.insert("model".into(), model.clone().into());
    let upstream_body = serde_json::Value::Object(req);
    call(
        app,
        b,
        "chat/completions",
        model,
        upstream_body,
        max_tokens,
        body.len(),
    )
    .await
}

/// `POST /v1/embeddings`: the default model applies; nothing else of the overlay does.
pub async fn embeddings(
    app: &Arc<App>,
    b: &Boundary,
    body: &[u8],
) -> Result<Response<Full<Bytes>>, ApiError> {
    let mut req: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON request: {e}")))?;
    if !req
        .get("input")
        .is_some_and(|i| i.is_string() || i.is_array())
    {
        return Err(ApiError::BadRequest(
            "`input` must be a string or an array".into(),
        ));
    }
    let model = checked_model(app, b, &req)?;
    req.remove("user");
    req.insert("model".into(), model.clone().into());
    call(
        app,
        b,
        "embeddings",
        model,
        serde_json::Value::Object(req),
        0,
        body.len(),
    )
    .await
}

/// The request's model (or the tenant's default), known and allowed for the tenant.
fn checked_model(
    app: &App,
    b: &Boundary,
    req: &serde_json::Map<String, serde_json::Value>,
) -> Result<String, ApiError> {
    let model = match req.get("model") {
        Some(serde_json::Value::String(m)) => m.clone(),
        None | Some(serde_json::Value::Null) => app
            .settings(b.tenant())
            .model
            .clone()
            .ok_or_else(|| ApiError::BadRequest("`model` is required".into()))?,
        Some(_) => return Err(ApiError::BadRequest("`model` must be a string".into())),
    };
    if !app.llm.has(&model) {
        return Err(ApiError::ModelNotFound(model));
    }
    if app
        .limits(b.tenant())
        .allowed_models
        .as_ref()
        .is_some_and(|a| !a.contains(&model))
    {
        return Err(ApiError::ModelNotAllowed(model));
    }
    Ok(model)
}

/// Reserves the call's worst case, makes it, settles to its usage, audits it and
/// answers with the provider's body and the cost.
async fn call(
    app: &Arc<App>,
    b: &Boundary,
    path: &'static str,
    model: String,
    upstream_body: serde_json::Value,
    max_tokens: u64,
    body_len: usize,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let t0 = std::time::Instant::now();
    let limits = app.limits(b.tenant());
    let rate = app
        .llm
        .worst_rate(&model)
        .ok_or_else(|| ApiError::ModelNotFound(model.clone()))?;
    let request_bytes = serde_json::to_vec(&upstream_body)
        .map(|v| v.len() as u64)
        .unwrap_or(body_len as u64);
    let reserve = worst_case_micro(request_bytes, max_tokens, rate);
    let tenant = b.tenant().as_str();
    app.meters
        .reserve_spend(
            tenant,
            reserve,
            limits.daily_budget_usd.map(usd_to_micro),
            limits.monthly_budget_usd.map(usd_to_micro),
        )
        .map_err(|which| {
            ApiError::BudgetExceeded(format!(
                "this call could cost up to {} USD, more than is left of {which}",
                usd(reserve)
            ))
        })?;
    let answer = app.llm.post(path, &model, &upstream_body).await;
    let (spent, tokens) = match &answer {
        Ok(a) => match (a.usage, app.llm.rate(&a.model)) {
            (Some(u), Some(r)) => (cost_micro(u, r), (u.input, u.output)),
            // A success without usage cannot be priced exactly: it is charged its
            // reservation, never less than it might have cost.
            (None, _) if (200..300).contains(&a.status) => (reserve, (0, 0)),
            _ => (0, (0, 0)),
        },
        Err(_) => (0, (0, 0)),
    };
    app.meters
        .settle_spend(tenant, reserve, spent.min(reserve), tokens);
    let latency_ms = t0.elapsed().as_millis() as u64;
    let (outcome, reason) = match &answer {
        Ok(a) if (200..300).contains(&a.status) => ("ok", None),
        Ok(_) => ("error", Some("upstream_refused")),
        Err(e) => ("error", Some(ApiError::from_llm_ref(e).status_and_code().1)),
    };
    let event = Event {
        actor: b.actor().to_string(),
        tenant: Some(b.tenant().to_string()),
        action: "llm".into(),
        target: Some(model.clone()),
        outcome: outcome.into(),
        reason_code: reason.map(String::from),
        trace_id: Some(b.trace_id().to_string()),
        llm: Some(LlmDetails {
            model: answer.as_ref().map_or(model.clone(), |a| a.model.clone()),
            input_tokens: tokens.0,
            output_tokens: tokens.1,
            cost_usd: usd(spent.min(reserve)),
            latency_ms,
            attempts: answer.as_ref().map_or(0, |a| a.attempts as u64),
        }),
        ..Default::default()
    };
    app.audit.record(event).await?;
    let a = answer.map_err(ApiError::from)?;
    let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut resp = response(status, "application/json", a.body.to_vec(), b.trace_id());
    if let Ok(v) = hyper::header::HeaderValue::from_str(&usd(spent.min(reserve))) {
        resp.headers_mut().insert("x-bulkhead-cost-usd", v);
    }
    Ok(resp)
}
