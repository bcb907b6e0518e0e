//! The OpenAI-compatible endpoints: `POST /v1/chat/completions` and `GET /v1/models`.
//!
//! A call is parsed, the tenant's overlay applied (default model, `max_tokens` cap,
//! system prompt first), its worst-case cost reserved against the tenant's budgets,
//! admitted in the audit log (a line whose sync runs while the upstream works, and which
//! is durable before the caller gets any of the answer), sent upstream through the
//! shared router, and settled to what the upstream reported (a second line, not waited
//! for).
//! Nothing of the tenant, its actor or the trace goes upstream.

use std::sync::Arc;

use bytes::Bytes;

use hyper::{Response, StatusCode};

use super::app::App;
use super::error::ApiError;
use super::http::{ApiBody, ChannelBody, json_response, response};
use crate::audit::{Event, LlmDetails};
use crate::auth::Boundary;
use crate::llm::cost::{TokenUsage, cost_micro, usd, worst_case_micro};
use crate::llm::upstream::Opened;

/// `max_tokens` when neither the request nor the overlay bounds it: the reservation
/// needs a bound, and the upstream gets the same one.
const DEFAULT_MAX_TOKENS: u64 = 4096;

/// The longest line of an upstream event stream relayed (longer: the stream is ended).
const MAX_EVENT_LINE: usize = 16 << 20;

fn usd_to_micro(usd: f64) -> u64 {
    (usd * 1e6).floor().clamp(0.0, u64::MAX as f64) as u64
}

/// `GET /v1/models`: the models this tenant may call.
pub fn models(app: &App, b: &Boundary) -> Response<ApiBody> {
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
) -> Result<Response<ApiBody>, ApiError> {
    let mut req = parse_object(body)?;
    let stream = stream_flag(&req)?;
    if stream {
        // Usage arrives in a last chunk only when asked for; it is what the call costs.
        let mut options = req
            .get("stream_options")
            .and_then(|o| o.as_object().cloned())
            .unwrap_or_default();
        options.insert("include_usage".into(), true.into());
        req.insert("stream_options".into(), serde_json::Value::Object(options));
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
    let max_tokens = output_bound(asked, cap);
    // Every output bound the request names gets the effective one (so neither can ask
    // for more than was reserved); with none, `max_tokens` is added.
    let named: Vec<&str> = ["max_completion_tokens", "max_tokens"]
        .into_iter()
        .filter(|k| req.contains_key(*k))
        .collect();
    if named.is_empty() {
        req.insert("max_tokens".into(), max_tokens.into());
    }
    for k in named {
        req.insert(k.into(), max_tokens.into());
    }
    // `n` choices each produce up to `max_tokens`.
    let choices = match req.get("n") {
        None | Some(serde_json::Value::Null) => 1,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=128).contains(n))
            .ok_or_else(|| ApiError::BadRequest("`n` must be an integer 1..=128".into()))?,
    };
    if let Some(prompt) = &settings.system_prompt
        && let Some(serde_json::Value::Array(messages)) = req.get_mut("messages")
    {
        messages.insert(0, serde_json::json!({"role": "system", "content": prompt}));
    }
    for k in NOT_FORWARDED {
        req.remove(*k);
    }
    req.insert("model".into(), model.clone().into());
    let upstream_body = serde_json::Value::Object(req);
    let c = Call {
        path: "chat/completions",
        model,
        upstream_body,
        max_tokens: max_tokens.saturating_mul(choices),
        body_len: body.len(),
        stream,
    };
    call(app, b, c).await
}

/// `POST /v1/messages` (Anthropic's Messages API) to a model of an Anthropic provider:
/// the overlay's default model, `max_tokens` cap and system prompt (first) apply.
pub async fn messages(
    app: &Arc<App>,
    b: &Boundary,
    body: &[u8],
) -> Result<Response<ApiBody>, ApiError> {
    let mut req = parse_object(body)?;
    if !req.get("messages").is_some_and(|m| m.is_array()) {
        return Err(ApiError::BadRequest("`messages` must be an array".into()));
    }
    let settings = app.settings(b.tenant());
    let model = checked_model(app, b, &req)?;
    if app.llm.kind(&model) != Some(crate::llm::config::Kind::Anthropic) {
        return Err(ApiError::BadRequest(format!(
            "model {model:?} is served through /v1/chat/completions"
        )));
    }
    let asked = req.get("max_tokens").and_then(|v| v.as_u64());
    let cap = settings.max_tokens.map(u64::from);
    let max_tokens = output_bound(asked, cap);
    req.insert("max_tokens".into(), max_tokens.into());
    if let Some(prompt) = &settings.system_prompt {
        let system = match req.remove("system") {
            None | Some(serde_json::Value::Null) => serde_json::Value::String(prompt.clone()),
            Some(serde_json::Value::String(s)) => format!("{prompt}\n\n{s}").into(),
            Some(serde_json::Value::Array(mut blocks)) => {
                blocks.insert(0, serde_json::json!({"type": "text", "text": prompt}));
                serde_json::Value::Array(blocks)
            }
            Some(_) => {
                return Err(ApiError::BadRequest(
                    "`system` must be a string or an array of blocks".into(),
                ));
            }
        };
        req.insert("system".into(), system);
    }
    for k in NOT_FORWARDED {
        req.remove(*k);
    }
    req.insert("model".into(), model.clone().into());
    let stream = stream_flag(&req)?;
    let c = Call {
        path: "messages",
        model,
        upstream_body: serde_json::Value::Object(req),
        max_tokens,
        body_len: body.len(),
        stream,
    };
    call(app, b, c).await
}

/// An error in the Anthropic API's own shape (with our `reason_code`).
pub fn anthropic_error(e: &ApiError, trace_id: &str) -> Response<ApiBody> {
    let (status, code) = e.status_and_code();
    let kind = match status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        _ => "api_error",
    };
    json_response(
        status,
        &serde_json::json!({"type": "error", "error": {"type": kind, "message": e.to_string(), "reason_code": code}}),
        trace_id,
    )
}

/// `POST /v1/embeddings`: the default model applies; nothing else of the overlay does.
pub async fn embeddings(
    app: &Arc<App>,
    b: &Boundary,
    body: &[u8],
) -> Result<Response<ApiBody>, ApiError> {
    let mut req = parse_object(body)?;
    if !req
        .get("input")
        .is_some_and(|i| i.is_string() || i.is_array())
    {
        return Err(ApiError::BadRequest(
            "`input` must be a string or an array".into(),
        ));
    }
    let model = checked_model(app, b, &req)?;
    for k in NOT_FORWARDED {
        req.remove(*k);
    }
    req.insert("model".into(), model.clone().into());
    let c = Call {
        path: "embeddings",
        model,
        upstream_body: serde_json::Value::Object(req),
        max_tokens: 0,
        body_len: body.len(),
        stream: false,
    };
    call(app, b, c).await
}

/// A request body that must be a JSON object.
fn parse_object(body: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON request: {e}")))
}

/// The output bound of a call: the request's, capped by the overlay's, or a default.
fn output_bound(asked: Option<u64>, cap: Option<u64>) -> u64 {
    match (asked, cap) {
        (Some(a), Some(c)) => a.min(c),
        (Some(a), None) => a,
        (None, Some(c)) => c,
        (None, None) => DEFAULT_MAX_TOKENS,
    }
}

/// `stream`: absent, null or a boolean.
fn stream_flag(req: &serde_json::Map<String, serde_json::Value>) -> Result<bool, ApiError> {
    match req.get("stream") {
        None | Some(serde_json::Value::Null) => Ok(false),
        Some(serde_json::Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::BadRequest("`stream` must be a boolean".into())),
    }
}

/// Request fields that would identify the caller upstream, or make the provider keep or
/// price the call differently from what the rate card says: dropped before sending.
const NOT_FORWARDED: &[&str] = &[
    "user",
    "metadata",
    "safety_identifier",
    "prompt_cache_key",
    "store",
    "service_tier",
];

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
    allowed_model(app, b, &model)?;
    Ok(model)
}

/// `model` is configured, and in the tenant's model allowlist if it has one.
pub(super) fn allowed_model(app: &App, b: &Boundary, model: &str) -> Result<(), ApiError> {
    if !app.llm.has(model) {
        return Err(ApiError::ModelNotFound(model.to_string()));
    }
    if app
        .limits(b.tenant())
        .allowed_models
        .as_ref()
        .is_some_and(|a| !a.iter().any(|m| m == model))
    {
        return Err(ApiError::ModelNotAllowed(model.to_string()));
    }
    Ok(())
}

/// One upstream call, as the handlers prepared it.
struct Call {
    path: &'static str,
    model: String,
    upstream_body: serde_json::Value,
    max_tokens: u64,
    body_len: usize,
    stream: bool,
}

/// What a call came to, for the meters and the audit line.
struct Settled {
    model: String,
    tokens: (u64, u64),
    spent: u64,
    attempts: usize,
    outcome: &'static str,
    reason: Option<&'static str>,
    /// Tokens taken from the `tpm` bucket up front.
    worst_tokens: u64,
}

/// The line that admits a call, begun once its worst case is reserved: it commits while
/// the upstream works, and the answer waits for it, so every call the daemon answers
/// (or starts to stream) is on disk before the caller has any of it.
fn admit(app: &App, b: &Boundary, asked: &str, reserve: u64) -> crate::audit::Durable {
    app.audit.begin(Event {
        actor: b.actor().to_string(),
        tenant: Some(b.tenant().to_string()),
        action: "llm.admit".into(),
        target: Some(asked.to_string()),
        outcome: "ok".into(),
        trace_id: Some(b.trace_id().to_string()),
        llm: Some(LlmDetails {
            model: asked.to_string(),
            cost_usd: usd(0),
            reserved_usd: Some(usd(reserve)),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Settles the reservation to what was spent and returns the call's audit line.
fn settle(
    app: &App,
    b: &Boundary,
    asked: &str,
    reserve: u64,
    t0: std::time::Instant,
    s: Settled,
) -> Event {
    // What the provider reported is charged, even past the reservation (inputs such as
    // images can count more tokens than their bytes): the reservation is what admits
    // the call, the usage is what it cost.
    let spent = s.spent;
    app.meters.settle_spend(
        b.tenant().as_str(),
        b.actor().as_str(),
        reserve,
        spent,
        s.tokens,
    );
    if let Some(tpm) = app.limits(b.tenant()).tpm {
        let used = s.tokens.0.saturating_add(s.tokens.1);
        app.meters.give_back_per_minute(
            &format!("tpm/{}", b.tenant()),
            tpm,
            s.worst_tokens.saturating_sub(used),
        );
    }
    Event {
        actor: b.actor().to_string(),
        tenant: Some(b.tenant().to_string()),
        action: "llm".into(),
        target: Some(asked.to_string()),
        outcome: s.outcome.into(),
        reason_code: s.reason.map(String::from),
        trace_id: Some(b.trace_id().to_string()),
        llm: Some(LlmDetails {
            model: s.model,
            input_tokens: s.tokens.0,
            output_tokens: s.tokens.1,
            cost_usd: usd(spent),
            latency_ms: t0.elapsed().as_millis() as u64,
            attempts: s.attempts as u64,
            reserved_usd: Some(usd(reserve)),
        }),
        ..Default::default()
    }
}

/// A line of an OpenAI event stream (given without, returned with its `\n`): a `data:`
/// line gets `model` set back to the public name and its usage noted; other lines pass
/// unchanged.
fn rewrite_event(line: &[u8], model: &str, usage: &mut Option<TokenUsage>) -> Bytes {
    let unchanged = || {
        let mut out = line.to_vec();
        out.push(b'\n');
        Bytes::from(out)
    };
    let Some(data) = line
        .strip_prefix(b"data:")
        .map(|d| d.strip_prefix(b" ").unwrap_or(d))
    else {
        return unchanged();
    };
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return unchanged();
    };
    match v.get("type").and_then(|t| t.as_str()) {
        // Anthropic: input tokens (and the model) in message_start, the running output
        // count in message_delta.
        Some("message_start") => {
            if let Some(u) = v
                .pointer("/message/usage")
                .and_then(TokenUsage::from_anthropic)
            {
                *usage = Some(u);
            }
            if let Some(m) = v.pointer_mut("/message").and_then(|m| m.as_object_mut()) {
                m.insert("model".into(), model.into());
            }
        }
        Some("message_delta") => {
            if let Some(out) = v.pointer("/usage/output_tokens").and_then(|o| o.as_u64()) {
                let so_far = usage.unwrap_or_default();
                *usage = Some(TokenUsage {
                    output: out,
                    ..so_far
                });
            }
        }
        _ => {
            if let Some(u) = v.get("usage").and_then(TokenUsage::from_openai) {
                *usage = Some(u);
            }
            if let Some(obj) = v.as_object_mut().filter(|o| o.contains_key("model")) {
                obj.insert("model".into(), model.into());
            }
        }
    }
    let mut out = b"data: ".to_vec();
    out.extend_from_slice(&serde_json::to_vec(&v).unwrap_or_else(|_| data.to_vec()));
    out.push(b'\n');
    Bytes::from(out)
}

/// A call whose answer is still streaming: what settling it needs.
struct Pending {
    app: Arc<App>,
    b: Boundary,
    asked: String,
    reserve: u64,
    t0: std::time::Instant,
    worst_tokens: u64,
    /// An open stream is work that an inline audit commit would hold up; counted from
    /// before its relay is spawned until the relay ends.
    _open: crate::audit::InFlight,
}

/// Relays an upstream event stream to the client, then settles and audits the call. A
/// client that goes away ends the relay, which drops (cancels) the upstream request;
/// without a usage report the call is charged its reservation.
async fn relay(
    call: Pending,
    s: crate::llm::upstream::Stream,
    tx: tokio::sync::mpsc::Sender<Bytes>,
) {
    use http_body_util::BodyExt;
    let Pending {
        app,
        b,
        asked,
        reserve,
        t0,
        worst_tokens,
        _open,
    } = call;
    let mut body = s.body;
    let (mut pending, mut usage) = (Vec::new(), None);
    let (mut gone, mut failed) = (false, false);
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            failed = true;
            break;
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        // An event line longer than any answer may be is not an event stream.
        if pending.len() > MAX_EVENT_LINE {
            failed = true;
            break;
        }
        while let Some(end) = pending.iter().position(|&c| c == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let trimmed = line.strip_suffix(b"\n").unwrap_or(&line);
            if tx
                .send(rewrite_event(trimmed, &s.model, &mut usage))
                .await
                .is_err()
            {
                gone = true;
                break;
            }
        }
        if gone {
            break;
        }
    }
    drop(body);
    let (spent, tokens) = match (usage, app.llm.rate(&s.model)) {
        (Some(u), Some(r)) => (cost_micro(u, r), (u.input, u.output)),
        _ => (reserve, (0, 0)),
    };
    // A stream that did not finish may have been billed upstream for more than its
    // partial usage says (Anthropic reports output only at the end): at least the
    // reservation is charged.
    let spent = if gone || failed {
        spent.max(reserve)
    } else {
        spent
    };
    let settled = Settled {
        model: s.model.clone(),
        tokens,
        spent,
        attempts: s.attempts,
        outcome: if gone || failed { "error" } else { "ok" },
        reason: if gone {
            Some("client_gone")
        } else if failed {
            Some("upstream_unavailable")
        } else {
            None
        },
        worst_tokens,
    };
    // Queued before the stream ends, so that a shutdown waiting for the connection to
    // finish finds the line already queued.
    app.audit
        .record_detached(settle(&app, &b, &asked, reserve, t0, settled));
    if !gone {
        let tail = format!(": x-bulkhead-cost-usd {}\n\n", usd(spent));
        let _sent = tx.send(Bytes::from(tail)).await;
    }
    drop(tx);
}

/// A call's admission: its worst-case cost held against the budgets and its worst-case
/// tokens taken from the `tpm` bucket, until it settles.
struct Reservation {
    reserve: u64,
    worst_tokens: u64,
    t0: std::time::Instant,
}

/// Counts the call against `rpm` and `tpm` and reserves its worst-case cost against
/// every budget, so concurrent calls cannot overshoot a cap.
fn reserve(app: &App, b: &Boundary, c: &Call) -> Result<Reservation, ApiError> {
    let t0 = std::time::Instant::now();
    let limits = app.limits(b.tenant());
    let rate = app
        .llm
        .worst_rate(&c.model)
        .ok_or_else(|| ApiError::ModelNotFound(c.model.clone()))?;
    let request_bytes = serde_json::to_vec(&c.upstream_body)
        .map(|v| v.len() as u64)
        .unwrap_or(c.body_len as u64)
        .saturating_add(app.llm.name_growth(&c.model));
    let reserve = worst_case_micro(request_bytes, c.max_tokens, rate);
    let tenant = b.tenant().as_str();
    if let Some(rpm) = limits.rpm {
        app.meters
            .take_per_minute(&format!("rpm/{tenant}"), rpm, 1, "rpm")
            .map_err(ApiError::RateLimited)?;
    }
    let worst_tokens = request_bytes.saturating_add(c.max_tokens);
    if let Some(tpm) = limits.tpm {
        app.meters
            .take_per_minute(&format!("tpm/{tenant}"), tpm, worst_tokens, "tpm")
            .map_err(ApiError::RateLimited)?;
    }
    app.meters
        .reserve_spend(
            b.tenant().as_str(),
            b.actor().as_str(),
            reserve,
            crate::policy::limits::Budgets {
                daily: limits.daily_budget_usd.map(usd_to_micro),
                monthly: limits.monthly_budget_usd.map(usd_to_micro),
                actor_daily: limits.actor_daily_budget_usd.map(usd_to_micro),
                actor_monthly: limits.actor_monthly_budget_usd.map(usd_to_micro),
            },
        )
        .map_err(|which| {
            if let Some(tpm) = limits.tpm {
                app.meters
                    .give_back_per_minute(&format!("tpm/{tenant}"), tpm, worst_tokens);
            }
            let why = format!(
                "this call could cost up to {} USD, more than is left of {which}",
                usd(reserve)
            );
            if which.starts_with("actor_") {
                ApiError::ActorBudgetExceeded(why)
            } else {
                ApiError::BudgetExceeded(why)
            }
        })?;
    Ok(Reservation {
        reserve,
        worst_tokens,
        t0,
    })
}

/// How a whole answer ended for the caller, beyond what the provider said.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// The caller gets it.
    Delivered,
    /// A success the caller could not use: audited as `upstream_refused` and still
    /// charged, since the provider did the work.
    Unusable,
    /// Its admission line could not be made durable, so it is not answered; charged
    /// what the provider reported, like any other.
    Unaudited,
}

/// Settles a whole (not streamed) answer to what the provider reported and queues its
/// audit line; returns what was charged, in micro-USD. The line is not waited for: the
/// call's admission line is.
fn settle_answer(
    app: &App,
    b: &Boundary,
    c: &Call,
    r: &Reservation,
    answer: &Result<crate::llm::upstream::Answer, crate::llm::upstream::LlmError>,
    delivery: Delivery,
) -> u64 {
    let (spent, tokens) = match answer {
        Ok(a) => match (a.usage, app.llm.rate(&a.model)) {
            (Some(u), Some(rate)) => (cost_micro(u, rate), (u.input, u.output)),
            // A success without usage cannot be priced exactly: it is charged its
            // reservation, never less than it might have cost.
            (None, _) if (200..300).contains(&a.status) => (r.reserve, (0, 0)),
            _ => (0, (0, 0)),
        },
        Err(_) => (0, (0, 0)),
    };
    // Embeddings have no output: every input byte was reserved as a token, and no text
    // has more tokens than bytes, so a larger report is the provider's error and the
    // cap holds.
    let spent = if c.path == "embeddings" {
        spent.min(r.reserve)
    } else {
        spent
    };
    let (outcome, reason) = match answer {
        _ if delivery == Delivery::Unaudited => ("error", Some("audit_failed")),
        Ok(a) if (200..300).contains(&a.status) && delivery == Delivery::Unusable => {
            ("error", Some("upstream_refused"))
        }
        Ok(a) if (200..300).contains(&a.status) => ("ok", None),
        Ok(_) => ("error", Some("upstream_refused")),
        Err(e) => ("error", Some(ApiError::from_llm_ref(e).status_and_code().1)),
    };
    let settled = Settled {
        model: answer
            .as_ref()
            .map_or_else(|_| c.model.clone(), |a| a.model.clone()),
        tokens,
        spent,
        attempts: answer.as_ref().map_or(0, |a| a.attempts),
        outcome,
        reason,
        worst_tokens: r.worst_tokens,
    };
    app.audit
        .record_detached(settle(app, b, &c.model, r.reserve, r.t0, settled));
    spent
}

/// A stream whose admission line could not be made durable is dropped unread; like any
/// stream that ends early, it is charged its reservation, since the provider may bill
/// for what it had started.
fn unaudited_stream(app: &App, b: &Boundary, c: &Call, r: &Reservation, attempts: usize) {
    let settled = Settled {
        model: c.model.clone(),
        tokens: (0, 0),
        spent: r.reserve,
        attempts,
        outcome: "error",
        reason: Some("audit_failed"),
        worst_tokens: r.worst_tokens,
    };
    app.audit
        .record_detached(settle(app, b, &c.model, r.reserve, r.t0, settled));
}

/// Reserves the call's worst case, begins its admission line, makes it, settles to its
/// usage and answers, once the admission line is durable, with the provider's body (or
/// its event stream) and the cost; the settlement line follows without being waited for.
async fn call(app: &Arc<App>, b: &Boundary, c: Call) -> Result<Response<ApiBody>, ApiError> {
    let settings = app.settings(b.tenant());
    // Only where the tenant opted in, and only whole answers: a stream is relayed as
    // it comes.
    let cache = match settings.llm_cache_ttl_s {
        Some(ttl) if !c.stream => Some((llm_cache_key(b, &c, &settings), ttl)),
        _ => None,
    };
    let r = reserve(app, b, &c)?;
    if let Some((key, _)) = &cache
        && let Some(hit) = app.llm_cache.get(key)
    {
        let settled = Settled {
            model: hit.model.clone(),
            tokens: (0, 0),
            spent: 0,
            attempts: 0,
            outcome: "ok",
            reason: Some("cache_hit"),
            worst_tokens: r.worst_tokens,
        };
        app.audit
            .record(settle(app, b, &c.model, r.reserve, r.t0, settled))
            .await?;
        let status = StatusCode::from_u16(hit.status).unwrap_or(StatusCode::OK);
        let mut resp = response(status, "application/json", hit.body.to_vec(), b.trace_id());
        let headers = resp.headers_mut();
        headers.insert(
            "x-bulkhead-cost-usd",
            hyper::header::HeaderValue::from_static("0"),
        );
        headers.insert(
            "x-bulkhead-cache",
            hyper::header::HeaderValue::from_static("hit"),
        );
        return Ok(resp);
    }
    let admitted = admit(app, b, &c.model, r.reserve);
    let answer = if c.stream {
        match app
            .llm
            .open_stream(c.path, &c.model, &c.upstream_body)
            .await
        {
            Ok(Opened::Stream(s)) => {
                if let Err(e) = admitted.wait().await {
                    let attempts = s.attempts;
                    drop(s);
                    unaudited_stream(app, b, &c, &r, attempts);
                    return Err(e.into());
                }
                let (tx, body) = ChannelBody::new(16);
                let pending = Pending {
                    app: app.clone(),
                    b: b.clone(),
                    asked: c.model.clone(),
                    reserve: r.reserve,
                    t0: r.t0,
                    worst_tokens: r.worst_tokens,
                    _open: app.audit.in_flight(),
                };
                tokio::spawn(relay(pending, s, tx));
                let mut resp = Response::new(http_body_util::Either::Right(body));
                let headers = resp.headers_mut();
                headers.insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/event-stream"),
                );
                headers.insert(
                    hyper::header::CACHE_CONTROL,
                    hyper::header::HeaderValue::from_static("no-cache"),
                );
                if let Ok(v) = hyper::header::HeaderValue::from_str(b.trace_id()) {
                    headers.insert("x-trace-id", v);
                }
                return Ok(resp);
            }
            Ok(Opened::Whole(a)) => Ok(a),
            Err(e) => Err(e),
        }
    } else {
        app.llm.post(c.path, &c.model, &c.upstream_body).await
    };
    if let Err(e) = admitted.wait().await {
        settle_answer(app, b, &c, &r, &answer, Delivery::Unaudited);
        return Err(e.into());
    }
    let spent = settle_answer(app, b, &c, &r, &answer, Delivery::Delivered);
    let a = answer.map_err(ApiError::from)?;
    let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::BAD_GATEWAY);
    if let Some((key, ttl)) = cache
        && status.is_success()
    {
        app.llm_cache.put(
            key,
            b.tenant().as_str(),
            Arc::new(CachedAnswer {
                status: a.status,
                model: a.model.clone(),
                body: a.body.clone(),
            }),
            std::time::Duration::from_secs(u64::from(ttl)),
        );
    }
    let mut resp = response(status, "application/json", a.body.to_vec(), b.trace_id());
    if let Ok(v) = hyper::header::HeaderValue::from_str(&usd(spent)) {
        resp.headers_mut().insert("x-bulkhead-cost-usd", v);
    }
    if cache.is_some() {
        resp.headers_mut().insert(
            "x-bulkhead-cache",
            hyper::header::HeaderValue::from_static("miss"),
        );
    }
    Ok(resp)
}

/// Embeds `inputs` with the embeddings model the admin configured for retrieval
/// (`retrieval.embeddings_model`), charged to the caller's tenant like any call of
/// `/v1/embeddings`: the model must be in the tenant's allowlist, the call is reserved
/// against its budgets and audited. Returns one unit vector per input and what the
/// call cost (micro-USD).
pub(super) async fn embed_for_retrieval(
    app: &Arc<App>,
    b: &Boundary,
    model: &str,
    inputs: &[&str],
) -> Result<(Vec<Vec<f32>>, u64), ApiError> {
    allowed_model(app, b, model)?;
    let c = Call {
        path: "embeddings",
        model: model.to_string(),
        upstream_body: serde_json::json!({"model": model, "input": inputs}),
        max_tokens: 0,
        body_len: 0,
        stream: false,
    };
    let r = reserve(app, b, &c)?;
    tracing::info!(
        target: "bulkhead::trace",
        trace_id = b.trace_id(),
        tenant = %b.tenant(),
        namespace = %format!("{}/{}", b.tenant(), b.workspace()),
        actor = %b.actor(),
        tool = "llm",
        model,
        texts = inputs.len(),
        "embeddings for retrieval"
    );
    let admitted = admit(app, b, &c.model, r.reserve);
    let answer = app.llm.post(c.path, &c.model, &c.upstream_body).await;
    if let Err(e) = admitted.wait().await {
        settle_answer(app, b, &c, &r, &answer, Delivery::Unaudited);
        return Err(e.into());
    }
    let parsed = match &answer {
        Ok(a) if (200..300).contains(&a.status) => Some(parse_embeddings(&a.body, inputs.len())),
        _ => None,
    };
    let delivery = if matches!(parsed, Some(Err(_))) {
        Delivery::Unusable
    } else {
        Delivery::Delivered
    };
    let spent = settle_answer(app, b, &c, &r, &answer, delivery);
    let a = answer.map_err(ApiError::from)?;
    match parsed {
        Some(Ok(vectors)) => Ok((vectors, spent)),
        Some(Err(why)) => Err(ApiError::UpstreamRefused(format!(
            "embeddings model {model:?}: {why}"
        ))),
        None => Err(ApiError::UpstreamRefused(format!(
            "embeddings model {model:?} answered HTTP {}",
            a.status
        ))),
    }
}

/// An OpenAI embeddings answer.
#[derive(serde::Deserialize)]
struct EmbeddingsAnswer {
    data: Vec<EmbeddingItem>,
}

#[derive(serde::Deserialize)]
struct EmbeddingItem {
    index: usize,
    embedding: Vec<f64>,
}

/// The `n` vectors of an embeddings answer, in input order and at unit length: every
/// index once, every vector finite and not zero, of one length within the vector limit.
fn parse_embeddings(body: &[u8], n: usize) -> Result<Vec<Vec<f32>>, String> {
    let answer: EmbeddingsAnswer =
        serde_json::from_slice(body).map_err(|e| format!("not an embeddings answer: {e}"))?;
    if answer.data.len() != n {
        return Err(format!("{} vectors for {n} inputs", answer.data.len()));
    }
    let mut out: Vec<Option<Vec<f32>>> = vec![None; n];
    for item in answer.data {
        let dim = item.embedding.len();
        if dim == 0 || dim > crate::retrieval::vectors::MAX_DIM {
            return Err(format!(
                "a vector of {dim} numbers (1..={} expected)",
                crate::retrieval::vectors::MAX_DIM
            ));
        }
        let v: Vec<f32> = item.embedding.iter().map(|x| *x as f32).collect();
        if v.iter().any(|x| !x.is_finite()) {
            return Err("a vector with a number out of range".into());
        }
        match out.get_mut(item.index) {
            Some(slot @ None) => *slot = Some(v),
            _ => return Err(format!("index {} out of range or repeated", item.index)),
        }
    }
    let out: Vec<Vec<f32>> = out.into_iter().flatten().collect();
    if out.windows(2).any(|w| w[0].len() != w[1].len()) {
        return Err("vectors of different lengths".into());
    }
    out.iter()
        .map(|v| crate::retrieval::vectors::normalized(v).map_err(|e| e.to_string()))
        .collect()
}

/// A whole LLM answer kept for a tenant that opted in.
#[derive(Debug)]
pub struct CachedAnswer {
    status: u16,
    model: String,
    body: bytes::Bytes,
}

/// The LLM cache's key: the caller's whole boundary, the route, the model, the version
/// of the tenant's system prompt and the digest of the exact upstream request (which
/// already carries the prompt and the effective output bound).
fn llm_cache_key(
    b: &Boundary,
    c: &Call,
    settings: &crate::config::TenantSettings,
) -> crate::cache::CacheKey {
    let prompt = crate::cache::digest(settings.system_prompt.as_deref().unwrap_or("").as_bytes());
    let request = crate::cache::digest(&serde_json::to_vec(&c.upstream_body).unwrap_or_default());
    crate::cache::CacheKey::new(
        b,
        crate::cache::Kind::Llm,
        &[c.path.as_bytes(), c.model.as_bytes(), &prompt, &request],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_answers_are_checked_and_put_in_input_order() {
        let ok = br#"{"data":[{"index":1,"embedding":[0,2]},{"index":0,"embedding":[3,0]}]}"#;
        assert_eq!(
            parse_embeddings(ok, 2).unwrap(),
            vec![vec![1.0, 0.0], vec![0.0, 1.0]]
        );
        for (bad, why) in [
            (
                &br#"{"data":[{"index":0,"embedding":[1,0]}]}"#[..],
                "1 vectors for 2 inputs",
            ),
            (
                br#"{"data":[{"index":0,"embedding":[1]},{"index":0,"embedding":[1]}]}"#,
                "repeated",
            ),
            (
                br#"{"data":[{"index":0,"embedding":[1]},{"index":5,"embedding":[1]}]}"#,
                "out of range",
            ),
            (
                br#"{"data":[{"index":0,"embedding":[1]},{"index":1,"embedding":[1,2]}]}"#,
                "different lengths",
            ),
            (
                br#"{"data":[{"index":0,"embedding":[]},{"index":1,"embedding":[1]}]}"#,
                "0 numbers",
            ),
            (
                br#"{"data":[{"index":0,"embedding":[1e300]},{"index":1,"embedding":[1]}]}"#,
                "out of range",
            ),
            (br#"{"error":{"message":"no"}}"#, "not an embeddings answer"),
            (
                br#"{"data":[{"index":0,"embedding":[0,0]},{"index":1,"embedding":[1,0]}]}"#,
                "zero",
            ),
        ] {
            let err = parse_embeddings(bad, 2).unwrap_err();
            assert!(err.contains(why), "{}: {err}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn stream_lines_are_rewritten_and_usage_noted() {
        let mut usage = None;
        let line = br#"data: {"model":"up-fast","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}"#;
        let out = rewrite_event(line, "fast", &mut usage);
        let text = std::str::from_utf8(&out).unwrap();
        assert!(text.starts_with("data: ") && text.ends_with('\n'), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text[6..]).unwrap();
        assert_eq!(v["model"], "fast");
        assert_eq!(
            usage,
            Some(TokenUsage {
                input: 7,
                cached_input: 0,
                output: 3
            })
        );
        let mut u2 = None;
        let out = rewrite_event(
            br#"data:{"model":"up","usage":{"prompt_tokens":1}}"#,
            "fast",
            &mut u2,
        );
        assert!(
            std::str::from_utf8(&out)
                .unwrap()
                .contains(r#""model":"fast""#)
        );
        assert!(u2.is_some());
        for same in [&b""[..], b"data: [DONE]", b": comment", b"event: x"] {
            let mut u = None;
            let out = rewrite_event(same, "fast", &mut u);
            assert_eq!(&out[..same.len()], same);
            assert_eq!(out.len(), same.len() + 1);
            assert_eq!(u, None);
        }
    }
}
