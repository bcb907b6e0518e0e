//! The tenant socket: every handler takes the request's `Boundary`.

use super::http::ApiBody;
use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::app::App;
use super::error::ApiError;
use super::http::{blocking, json_response, parse_json, percent_decode, read_body, response};
use crate::audit::{Event, ExecDetails};
use crate::auth::Boundary;
use crate::policy::schedule::Admission;
use crate::spawner::protocol::RunLimits;
use crate::tenant::files::{Found, WorkDir, clean_path, read_file};

/// `POST /v1/exec`. No tenant field exists, and unknown fields are refused.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Command and arguments.
    pub argv: Vec<String>,
    /// Standard input.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Working directory (under /work).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Wall-clock limit.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

const MAX_ARGS: usize = 1024;
const MAX_ARGV_BYTES: usize = 64 * 1024;
const MAX_ENV: usize = 128;
const MAX_ENV_BYTES: usize = 32 * 1024;

/// Routes a tenant request; `boundary` came from the token. Runs detached from the
/// connection (see `api::handle`): `gone` fires if the client goes away.
pub async fn route(
    app: Arc<App>,
    boundary: Boundary,
    req: Request<Incoming>,
    gone: tokio::sync::oneshot::Receiver<()>,
) -> Result<Response<ApiBody>, ApiError> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if let Some((action, Err(denial))) =
        action_of(&method, &path).map(|a| (a, crate::policy::check(&boundary, a, app.is_halted())))
    {
        let e = ApiError::from(denial);
        app.audit
            .record(event(
                &boundary,
                action.tool(),
                Some(path.clone()),
                "denied",
                Some(e.status_and_code().1),
            ))
            .await?;
        return Err(e);
    }
    let action = action_of(&method, &path);
    // The trace names the tool a request used, never its arguments or data.
    if let Some(a) = action {
        tracing::info!(
            target: "bulkhead::trace",
            trace_id = boundary.trace_id(),
            tenant = %boundary.tenant(),
            namespace = %format!("{}/{}", boundary.tenant(), boundary.workspace()),
            actor = %boundary.actor(),
            tool = a.tool(),
            "tool"
        );
    }
    let limits = app.limits(boundary.tenant());
    if let Some(rate) = limits.requests_per_s {
        for key in [
            format!("rq/{}", boundary.tenant()),
            format!("rq/{}", boundary.actor()),
        ] {
            app.meters
                .take(&key, rate, "requests_per_s")
                .map_err(ApiError::RateLimited)?;
        }
    }
    let step = action.is_some();
    app.meters
        .count(boundary.tenant().as_str(), step, limits.steps_per_day)
        .map_err(ApiError::RateLimited)?;
    if (&method, path.as_str()) == (&Method::GET, "/v1/usage") {
        return Ok(usage_response(&app, boundary.tenant(), boundary.trace_id()));
    }
    let key = match req
        .headers()
        .get("idempotency-key")
        .map(|v| v.to_str().map(str::to_string))
    {
        None => None,
        Some(Ok(k)) if super::idempotency::valid_key(&k) => Some(k),
        Some(_) => {
            return Err(ApiError::BadRequest(
                "Idempotency-Key must be 1..=128 of [A-Za-z0-9._:-]".into(),
            ));
        }
    };
    let max = if path == "/v1/config" {
        64 * 1024
    } else {
        app.config.server.max_body_bytes
    };
    let (body, _budget) = if matches!(method, Method::POST | Method::PUT) {
        let (b, permit) = read_body(&app, req.into_body(), max).await?;
        (b, Some(permit))
    } else {
        (Bytes::new(), None)
    };
    // The tenant may have been frozen or deleted while the body arrived.
    if let Some(e) = app.refusal(&boundary) {
        return Err(e);
    }
    let mutating = matches!(
        action,
        Some(crate::policy::Action::Exec | crate::policy::Action::FilesWrite)
    );
    match key.filter(|_| mutating) {
        Some(key) => {
            let digest = super::idempotency::request_digest(method.as_str(), &path, &body);
            let dir = app.registry.tenant_dir(boundary.tenant());
            let work = dispatch(&app, &boundary, &method, &path, body, gone);
            app.idempotency
                .once(&dir, &key, digest, boundary.trace_id(), work)
                .await
        }
        None => dispatch(&app, &boundary, &method, &path, body, gone).await,
    }
}

async fn dispatch(
    app: &Arc<App>,
    boundary: &Boundary,
    method: &Method,
    path: &str,
    body: Bytes,
    gone: tokio::sync::oneshot::Receiver<()>,
) -> Result<Response<ApiBody>, ApiError> {
    let (app, boundary, method) = (app.clone(), boundary.clone(), method.clone());
    if path == "/v1/chat/completions" {
        if method != Method::POST {
            return Err(ApiError::Method);
        }
        return super::llm::chat_completions(&app, &boundary, &body).await;
    }
    if path == "/v1/messages" {
        if method != Method::POST {
            return Err(ApiError::Method);
        }
        return match super::llm::messages(&app, &boundary, &body).await {
            Err(e) => Ok(super::llm::anthropic_error(&e, boundary.trace_id())),
            ok => ok,
        };
    }
    if path == "/v1/embeddings" {
        if method != Method::POST {
            return Err(ApiError::Method);
        }
        return super::llm::embeddings(&app, &boundary, &body).await;
    }
    if path == "/v1/models" {
        if method != Method::GET {
            return Err(ApiError::Method);
        }
        return Ok(super::llm::models(&app, &boundary));
    }
    if path == "/v1/exec" {
        if method != Method::POST {
            return Err(ApiError::Method);
        }
        return exec(&app, &boundary, parse_json(&body)?, gone).await;
    }
    if path == "/v1/config" {
        return match method {
            Method::GET => {
                let s = app.settings(boundary.tenant());
                Ok(json_response(
                    StatusCode::OK,
                    &serde_json::to_value(s).unwrap_or_default(),
                    boundary.trace_id(),
                ))
            }
            Method::PUT => put_config(&app, &boundary, &body).await,
            _ => Err(ApiError::Method),
        };
    }
    if let Some(rest) = path
        .strip_prefix("/v1/files")
        .filter(|r| r.is_empty() || r.starts_with('/'))
    {
        let rel = clean_path(&percent_decode(rest)?)?;
        return match method {
            Method::GET => get_file(&app, &boundary, rel).await,
            Method::PUT => put_file(&app, &boundary, rel, body).await,
            Method::DELETE => delete_file(&app, &boundary, rel).await,
            _ => Err(ApiError::Method),
        };
    }
    if let Some(r) = super::retrieval::route(&app, &boundary, &method, path, &body).await {
        return r;
    }
    Err(ApiError::NotFound(format!("no route {method} {path}")))
}

/// The tenant's counters, limits and running sandboxes (also served to the admin).
pub fn usage_response(
    app: &App,
    tenant: &crate::auth::TenantName,
    trace_id: &str,
) -> Response<ApiBody> {
    let running = app
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(tenant.as_str())
        .map_or(0, |m| m.len());
    let body = serde_json::json!({
        "tenant": tenant,
        "usage": app.meters.usage(tenant.as_str()),
        "running_sandboxes": running,
        "queued_runs": app.scheduler.tenant_load(tenant.as_str()).queued,
        "disk_bytes": app.meters.disk_used(tenant.as_str()),
        "limits": app.limits(tenant),
    });
    json_response(StatusCode::OK, &body, trace_id)
}

/// The policy action a route performs (`None`: no such route; the router says so).
fn action_of(method: &Method, path: &str) -> Option<crate::policy::Action> {
    use crate::policy::Action;
    let files = path
        .strip_prefix("/v1/files")
        .is_some_and(|r| r.is_empty() || r.starts_with('/'));
    match (method, path) {
        (&Method::POST, "/v1/exec") => Some(Action::Exec),
        (&Method::POST, "/v1/chat/completions" | "/v1/embeddings" | "/v1/messages")
        | (&Method::GET, "/v1/models") => Some(Action::Llm),
        (&Method::GET, "/v1/config") => Some(Action::ConfigRead),
        (&Method::PUT, "/v1/config") => Some(Action::ConfigWrite),
        (&Method::GET, _) if files => Some(Action::FilesRead),
        (&Method::PUT | &Method::DELETE, _) if files => Some(Action::FilesWrite),
        _ => super::retrieval::action_of(method, path),
    }
}

/// Records a successful state change of the tenant's (durable before the answer).
pub(super) async fn audit_ok(
    app: &App,
    b: &Boundary,
    action: &str,
    target: Option<String>,
) -> Result<(), ApiError> {
    app.audit
        .record(event(b, action, target, "ok", None))
        .await?;
    Ok(())
}

/// Entries a disk measurement counts before it stops.
const MAX_USAGE_ENTRIES: usize = 1_000_000;

/// Measures the tenant's work/ when it has not been measured yet, or always when `fresh`
/// (after a run, which may have written anything), and returns the bytes in use.
async fn measure_disk(app: &Arc<App>, b: &Boundary, fresh: bool) -> Result<u64, ApiError> {
    if !fresh && let Some(used) = app.meters.disk_used(b.tenant().as_str()) {
        return Ok(used);
    }
    let wd = work_dir(app, b)?;
    let tenant = b.tenant().as_str();
    app.meters.begin_walk(tenant);
    let walked = blocking(move || Ok(wd.usage(MAX_USAGE_ENTRIES)?)).await;
    app.meters.end_walk(tenant, walked.as_ref().ok().copied());
    let used = walked?;
    Ok(app.meters.disk_used(tenant).unwrap_or(used))
}

fn work_dir(app: &App, b: &Boundary) -> Result<WorkDir, ApiError> {
    let rec = app
        .registry
        .record(b.tenant())
        .filter(|r| r.incarnation == b.incarnation())
        .ok_or(ApiError::Auth(crate::auth::AuthError::UnknownToken))?;
    let owner = app.root.then_some((rec.host_uid, rec.host_gid));
    Ok(WorkDir::open(&app.registry.work_dir(b.tenant()), owner)?)
}

fn event(
    b: &Boundary,
    action: &str,
    target: Option<String>,
    outcome: &str,
    reason: Option<&str>,
) -> Event {
    Event {
        actor: b.actor().to_string(),
        tenant: Some(b.tenant().to_string()),
        action: action.into(),
        target,
        outcome: outcome.into(),
        reason_code: reason.map(String::from),
        trace_id: Some(b.trace_id().to_string()),
        exec: None,
        egress: None,
        llm: None,
    }
}

async fn get_file(
    app: &Arc<App>,
    b: &Boundary,
    rel: std::path::PathBuf,
) -> Result<Response<ApiBody>, ApiError> {
    let max = app.config.files.max_file_bytes;
    let wd = work_dir(app, b)?;
    let found = blocking(move || Ok(wd.get(&rel, max)?)).await?;
    Ok(match found {
        Found::File(file, size) => {
            // The file is held in memory while it is sent: count it against the budget.
            let _budget = super::http::reserve_bytes(app, size as usize).await?;
            let bytes = blocking(move || Ok(read_file(file, max)?)).await?;
            response(
                StatusCode::OK,
                "application/octet-stream",
                bytes,
                b.trace_id(),
            )
        }
        Found::Dir(entries, truncated) => json_response(
            StatusCode::OK,
            &serde_json::json!({ "entries": entries, "truncated": truncated }),
            b.trace_id(),
        ),
    })
}

async fn put_file(
    app: &Arc<App>,
    b: &Boundary,
    rel: std::path::PathBuf,
    body: Bytes,
) -> Result<Response<ApiBody>, ApiError> {
    let wd = work_dir(app, b)?;
    let target = rel.display().to_string();
    let size = body.len();
    let limit = app.limits(b.tenant()).disk_bytes;
    let tenant = b.tenant().as_str();
    let r = async {
        if limit.is_some() {
            measure_disk(app, b, false).await?;
        } else {
            app.meters.forget_disk(tenant);
        }
        // Replacing a file needs room only for the growth; the write is settled to what
        // it really replaced afterwards.
        let (wd, before) = {
            let rel = rel.clone();
            blocking(move || {
                let before = wd.file_size(&rel);
                Ok((wd, before))
            })
            .await?
        };
        let reserved = (size as u64).saturating_sub(before);
        app.meters
            .reserve_disk(tenant, limit, reserved)
            .map_err(ApiError::QuotaExceeded)?;
        let rel = rel.clone();
        match blocking(move || Ok(wd.put(&rel, &body)?)).await {
            Ok(replaced) => {
                app.meters
                    .settle_disk(tenant, reserved, size as u64, replaced);
                Ok(())
            }
            Err(e) => {
                app.meters.release_disk(tenant, reserved);
                Err(e)
            }
        }
    }
    .await;
    let (outcome, reason) = match &r {
        Ok(()) => ("ok", None),
        Err(e) => ("error", Some(e.status_and_code().1)),
    };
    app.audit
        .record(event(b, "files.put", Some(target.clone()), outcome, reason))
        .await?;
    r?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"path": target, "size": size}),
        b.trace_id(),
    ))
}

async fn delete_file(
    app: &Arc<App>,
    b: &Boundary,
    rel: std::path::PathBuf,
) -> Result<Response<ApiBody>, ApiError> {
    let wd = work_dir(app, b)?;
    let target = rel.display().to_string();
    let r = blocking(move || Ok(wd.delete(&rel)?)).await;
    if let Ok(removed) = &r {
        app.meters.release_disk(b.tenant().as_str(), *removed);
    }
    let (outcome, reason) = match &r {
        Ok(_) => ("ok", None),
        Err(e) => ("error", Some(e.status_and_code().1)),
    };
    app.audit
        .record(event(b, "files.delete", Some(target), outcome, reason))
        .await?;
    r?;
    Ok(response(
        StatusCode::NO_CONTENT,
        "application/json",
        Vec::new(),
        b.trace_id(),
    ))
}

async fn put_config(
    app: &Arc<App>,
    b: &Boundary,
    body: &[u8],
) -> Result<Response<ApiBody>, ApiError> {
    let parsed = crate::config::parse_overlay_json(b.tenant().as_str(), body);
    let overlay = match parsed {
        Ok(o) => o,
        Err(e) => {
            let e = ApiError::from(e);
            app.audit
                .record(event(
                    b,
                    "config.put",
                    None,
                    "denied",
                    Some(e.status_and_code().1),
                ))
                .await?;
            return Err(e);
        }
    };
    let text = toml::to_string(&overlay).map_err(|e| ApiError::Internal(e.to_string()))?;
    let dir = app.registry.tenant_dir(b.tenant());
    blocking(move || {
        crate::tenant::write_atomic(&dir, "config.toml", text.as_bytes(), 0o600)
            .map_err(|e| ApiError::Internal(format!("config.toml: {e}")))
    })
    .await?;
    app.overlays
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(b.tenant().to_string(), overlay);
    app.audit
        .record(event(b, "config.put", None, "ok", None))
        .await?;
    let s = app.settings(b.tenant());
    Ok(json_response(
        StatusCode::OK,
        &serde_json::to_value(s).unwrap_or_default(),
        b.trace_id(),
    ))
}

/// Keeps a run in the daemon's count of running sandboxes for as long as it is alive.
struct Tracked<'a> {
    app: &'a App,
    tenant: &'a crate::auth::TenantName,
    id: u64,
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        self.app.untrack(self.tenant, self.id);
    }
}

async fn read_capped(fd: std::os::fd::OwnedFd, cap: usize) -> (Vec<u8>, bool) {
    let Ok(mut rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return (Vec::new(), false);
    };
    let mut out = Vec::new();
    let mut truncated = false;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match rx.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let keep = cap.saturating_sub(out.len()).min(n);
                out.extend_from_slice(&chunk[..keep]);
                truncated |= keep < n;
                // Past the cap the rest is still drained, so the command can finish, but
                // slowly (at most 64 KiB per 10 ms): a flood then blocks its own writer
                // instead of costing the daemon a core that other tenants need.
                if truncated {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    }
    (out, truncated)
}

fn validate(
    req: &ExecRequest,
    app: &App,
    limits: &crate::policy::limits::Limits,
) -> Result<u64, ApiError> {
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return Err(ApiError::BadRequest("argv must name a command".into()));
    }
    if req.argv.len() > MAX_ARGS || req.argv.iter().map(String::len).sum::<usize>() > MAX_ARGV_BYTES
    {
        return Err(ApiError::TooLarge(format!(
            "argv is limited to {MAX_ARGS} arguments and {MAX_ARGV_BYTES} bytes"
        )));
    }
    if req.argv.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::BadRequest("argv holds NUL".into()));
    }
    if req.env.len() > MAX_ENV
        || req
            .env
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
            > MAX_ENV_BYTES
    {
        return Err(ApiError::TooLarge(format!(
            "env is limited to {MAX_ENV} entries and {MAX_ENV_BYTES} bytes"
        )));
    }
    if req
        .env
        .iter()
        .any(|(k, v)| k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0'))
    {
        return Err(ApiError::BadRequest(
            "env names must be non-empty without '=' or NUL, values without NUL".into(),
        ));
    }
    if req.cwd.as_ref().is_some_and(|c| c.len() > 4096) {
        return Err(ApiError::BadRequest("cwd is limited to 4096 bytes".into()));
    }
    if req
        .stdin
        .as_ref()
        .is_some_and(|s| s.len() > app.config.exec.max_stdin_bytes)
    {
        return Err(ApiError::TooLarge(format!(
            "stdin is limited to {} bytes",
            app.config.exec.max_stdin_bytes
        )));
    }
    let max = limits
        .max_wall_ms
        .map_or(app.config.exec.max_timeout_ms, |l| {
            l.min(app.config.exec.max_timeout_ms)
        });
    let timeout = req
        .timeout_ms
        .unwrap_or(app.config.exec.default_timeout_ms.min(max));
    if timeout == 0 || timeout > max {
        return Err(ApiError::BadRequest(format!(
            "timeout_ms must be 1..={max} (max_wall_ms)"
        )));
    }
    Ok(timeout)
}

async fn exec(
    app: &Arc<App>,
    b: &Boundary,
    req: ExecRequest,
    mut gone: tokio::sync::oneshot::Receiver<()>,
) -> Result<Response<ApiBody>, ApiError> {
    let t0 = std::time::Instant::now();
    let limits = app.limits(b.tenant());
    let timeout_ms = validate(&req, app, &limits)?;
    if let Some(rate) = limits.exec_per_s {
        for key in [format!("ex/{}", b.tenant()), format!("ex/{}", b.actor())] {
            app.meters
                .take(&key, rate, "exec_per_s")
                .map_err(ApiError::RateLimited)?;
        }
    }
    // At or over the disk quota, nothing more runs until files are deleted. Without a
    // limit no figure is kept: one set later starts from a fresh walk.
    if let Some(limit) = limits.disk_bytes {
        let mut used = measure_disk(app, b, false).await?;
        // Over by the running figure: look again, files may have gone since.
        if used >= limit {
            used = measure_disk(app, b, true).await?;
        }
        if used >= limit {
            return Err(ApiError::QuotaExceeded(crate::policy::limits::OverQuota {
                used,
                limit,
                adding: 0,
            }));
        }
    } else {
        app.meters.forget_disk(b.tenant().as_str());
    }
    // A run waits in its tenant's queue for a fair turn at a slot; a client that goes
    // away while waiting leaves the queue.
    let _slot = match app
        .scheduler
        .admit(b.tenant().as_str(), limits.max_concurrent)
        .map_err(ApiError::RateLimited)?
    {
        Admission::Now(p) => p,
        Admission::Queued(w) => tokio::select! {
            p = w.granted() => p,
            _ = &mut gone => return Err(ApiError::ClientGone),
        },
    };
    // Frozen, deleted or halted while queued.
    if let Some(e) = app.refusal(b) {
        return Err(e);
    }
    let cpu_s = app
        .meters
        .cpu_left(b.tenant().as_str(), limits.cpu_s_per_day)
        .map_err(ApiError::RateLimited)?;
    let rec = app
        .registry
        .record(b.tenant())
        .filter(|r| r.incarnation == b.incarnation())
        .ok_or(ApiError::Auth(crate::auth::AuthError::UnknownToken))?;
    let (program, argv_sha256) = ExecDetails::describe(&req.argv);
    let pipe = || {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| ApiError::Internal(format!("pipe2: {e}")))
    };
    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    // Egress needs the tenant's cell: its proxy listens in the cell's network namespace.
    let egress = app.config.exec.cells && limits.egress.as_ref().is_some_and(|e| !e.is_empty());
    let run_limits = RunLimits {
        timeout_ms,
        pids: limits.pids.unwrap_or(app.config.exec.pids),
        memory_bytes: limits.memory_bytes.unwrap_or(app.config.exec.memory_bytes),
        cpu_s,
        cgroup: crate::policy::cgroups::placement(&app.cgroups, b.tenant().as_str()),
        cell_idle_ms: app
            .config
            .exec
            .cells
            .then_some(app.config.exec.cell_idle_ms),
        nice: app.config.exec.nice,
        egress_proxy_port: egress.then_some(crate::egress::PROXY_PORT),
    };
    let mut env: Vec<(String, String)> = req.env.into_iter().collect();
    if egress {
        for (k, v) in crate::egress::proxy_env() {
            if !env.iter().any(|(have, _)| *have == k) {
                env.push((k, v));
            }
        }
    }
    let started = app
        .spawner
        .run(
            req.argv,
            env,
            req.cwd,
            &app.registry.work_dir(b.tenant()),
            (rec.host_uid, rec.host_gid),
            run_limits,
            [in_r, out_w, err_w],
        )
        .await;
    let mut handle = match started {
        Ok(h) => h,
        Err(e) => {
            let e = ApiError::from(e);
            let mut ev = event(b, "exec", None, "error", Some(e.status_and_code().1));
            ev.exec = Some(ExecDetails {
                program,
                argv_sha256,
                exit_code: None,
                signal: None,
                duration_ms: 0,
            });
            app.audit.record(ev).await?;
            return Err(e);
        }
    };
    if let Some(listener) = handle.take_proxy_listener() {
        app.serve_egress(b.tenant(), listener);
    }
    let id = handle.id();
    let t_started = t0.elapsed();
    let killer = handle.killer();
    app.track(b.tenant(), id, killer.clone());
    let _tracked = Tracked {
        app,
        tenant: b.tenant(),
        id,
    };
    // Frozen or deleted while this run was being started: the kill for the tenant may
    // have reached the spawner before this run did.
    if !app.may_run(b) {
        killer.kill().await;
    }
    let stdin = req.stdin.unwrap_or_default();
    let feed = async move {
        if let Ok(mut tx) = tokio::net::unix::pipe::Sender::from_owned_fd(in_w) {
            // The command may exit without reading its input; that is not an error.
            let _written = tx.write_all(stdin.as_bytes()).await;
        }
    };
    let cap = limits
        .max_output_bytes
        .map_or(app.config.exec.max_output_bytes, |l| {
            (l as usize).min(app.config.exec.max_output_bytes)
        });
    let work = async {
        tokio::join!(
            handle.wait(),
            feed,
            read_capped(out_r, cap),
            read_capped(err_r, cap)
        )
    };
    tokio::pin!(work);
    // A client that goes away ends its run; the run is still waited for and audited.
    let (exit, (), (stdout, out_trunc), (stderr, err_trunc)) = tokio::select! {
        r = &mut work => r,
        _ = &mut gone => {
            killer.kill().await;
            work.await
        }
    };
    let t_exited = t0.elapsed();
    let exit = exit.map_err(ApiError::from);
    let mut ev = event(
        b,
        "exec",
        None,
        if exit.is_ok() { "ok" } else { "error" },
        exit.as_ref().err().map(|e| e.status_and_code().1),
    );
    let (exit_code, signal, timed_out, duration_ms, cpu_us) = match &exit {
        Ok(x) => (x.exit_code, x.signal, x.timed_out, x.duration_ms, x.cpu_us),
        Err(_) => (None, None, false, 0, 0),
    };
    ev.exec = Some(ExecDetails {
        program,
        argv_sha256,
        exit_code,
        signal,
        duration_ms,
    });
    // A run of a tenant deleted meanwhile is not counted against a new one of that name.
    if app.registry.is_current(b) {
        app.meters
            .record_exec(b.tenant().as_str(), duration_ms, cpu_us);
    }
    if limits.disk_bytes.is_some() {
        // What the run wrote counts from the next request on. A failed measurement keeps
        // the last figure; the run itself has happened and is still answered and audited.
        if let Err(e) = measure_disk(app, b, true).await {
            tracing::warn!(tenant = %b.tenant(), error = %e, "measuring work/ after a run");
        }
    }
    app.audit.record(ev).await?;
    tracing::debug!(
        started_us = t_started.as_micros() as u64,
        exited_us = t_exited.as_micros() as u64,
        audited_us = t0.elapsed().as_micros() as u64,
        "exec phases"
    );
    exit?;
    let body = serde_json::json!({
        "exit_code": exit_code,
        "signal": signal,
        "stdout": String::from_utf8_lossy(&stdout),
        "stderr": String::from_utf8_lossy(&stderr),
        "stdout_truncated": out_trunc,
        "stderr_truncated": err_trunc,
        "output_cap_bytes": cap,
        "timed_out": timed_out,
        "duration_ms": duration_ms,
        "cpu_ms": cpu_us.div_ceil(1000),
    });
    Ok(json_response(StatusCode::OK, &body, b.trace_id()))
}
