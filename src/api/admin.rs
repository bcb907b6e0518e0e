//! The admin socket: `/admin/...`, admin key required.

use super::http::ApiBody;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};

use super::app::App;
use super::error::ApiError;
use super::http::{blocking, json_response, parse_json, read_body, response};
use crate::audit::Event;
use crate::auth::{AdminSession, Role, TenantName};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTenant {
    name: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    #[serde(default)]
    workspace: Option<String>,
    #[serde(default)]
    role: Option<Role>,
    /// Tool allowlist; absent: every tool the role allows.
    #[serde(default)]
    tools: Option<Vec<String>>,
    /// Datasource allowlist within the workspace; absent: all of them.
    #[serde(default)]
    datasources: Option<Vec<String>>,
}

fn event(
    s: &AdminSession,
    action: &str,
    tenant: Option<&str>,
    target: Option<String>,
    outcome: &str,
    reason: Option<&str>,
) -> Event {
    Event {
        actor: s.actor().to_string(),
        tenant: tenant.map(String::from),
        action: action.into(),
        target,
        outcome: outcome.into(),
        reason_code: reason.map(String::from),
        trace_id: Some(s.trace_id().to_string()),
        exec: None,
        egress: None,
        llm: None,
    }
}

/// Audits an admin action whatever its outcome, then passes the result on.
async fn audited<T>(
    app: &App,
    s: &AdminSession,
    action: &str,
    tenant: Option<&str>,
    target: Option<String>,
    r: Result<T, ApiError>,
) -> Result<T, ApiError> {
    let (outcome, reason) = match &r {
        Ok(_) => ("ok", None),
        Err(e) => ("error", Some(e.status_and_code().1)),
    };
    app.audit
        .record(event(s, action, tenant, target, outcome, reason))
        .await?;
    r
}

fn existing(app: &App, name: &str) -> Result<TenantName, ApiError> {
    app.registry
        .existing(name)
        .ok_or_else(|| ApiError::TenantMissing(name.to_string()))
}

/// Routes an admin request.
pub async fn route(
    app: Arc<App>,
    s: AdminSession,
    req: Request<Incoming>,
) -> Result<Response<ApiBody>, ApiError> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let t = s.trace_id().to_string();
    match (method, &parts[..]) {
        (Method::GET, ["", "admin", "status"]) => {
            let cells: Vec<serde_json::Value> = app
                .spawner
                .cells()
                .await
                .into_iter()
                .map(|c| {
                    // <state>/tenants/<name>/work: the tenant is the work dir's parent.
                    let tenant = std::path::Path::new(&c.work_dir)
                        .parent()
                        .and_then(|p| p.file_name())
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    serde_json::json!({
                        "tenant": tenant,
                        "holder_pid": c.holder_pid,
                        "age_ms": c.age_ms,
                        "idle_ms": c.idle_ms,
                        "runs": c.runs,
                        "running": c.running,
                        "rss_kib": c.rss_kib,
                        "pss_kib": c.pss_kib,
                        "uss_kib": c.uss_kib,
                    })
                })
                .collect();
            let running: usize = app
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .map(|m| m.len())
                .sum();
            Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({
                    "tenants": app.registry.list().len(),
                    "running_sandboxes": running,
                    "slots": app.scheduler.load(),
                    "cells": cells,
                    "spawners": app.spawner.spawners(),
                    "spawner_restarts": app.spawner.restarts(),
                    "uptime_s": app.started.elapsed().as_secs(),
                    "host_ids": if app.root { "per-tenant" } else { "daemon user" },
                    "halted": app.is_halted(),
                    "cgroups": app.cgroups,
                    "limits_enforced_by": match app.cgroups {
                        crate::policy::cgroups::Cgroups::Delegated { .. } => "cgroup v2",
                        crate::policy::cgroups::Cgroups::Unavailable { .. } => "rlimits",
                    },
                }),
                &t,
            ))
        }
        (Method::GET, ["", "admin", "tenants"]) => Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({"tenants": app.registry.list()}),
            &t,
        )),
        (Method::POST, ["", "admin", "tenants"]) => {
            let (body, _budget) = read_body(&app, req.into_body(), 4096).await?;
            let create: CreateTenant = parse_json(&body)?;
            let name = TenantName::for_admin(&s, &create.name).map_err(ApiError::from);
            let shown = create.name.clone();
            let r = match name {
                Ok(name) => {
                    let app2 = app.clone();
                    let key = name.as_str().to_string();
                    let r = blocking(move || Ok(app2.registry.create(name)?)).await;
                    // Counters a run of a deleted namesake recorded late do not carry over.
                    if r.is_ok() {
                        app.meters.forget(&key);
                    }
                    r
                }
                Err(e) => Err(e),
            };
            let issued = audited(
                &app,
                &s,
                "tenant.create",
                Some(&shown),
                Some(shown.clone()),
                r,
            )
            .await?;
            Ok(json_response(
                StatusCode::CREATED,
                &serde_json::json!({"name": shown, "token": issued.token, "token_id": issued.id.to_string()}),
                &t,
            ))
        }
        (Method::DELETE, ["", "admin", "tenants", name]) => {
            let name_s = name.to_string();
            let r = match existing(&app, name) {
                Ok(tenant) => {
                    // Frozen first, so a run racing with the delete stops itself; then kill.
                    let app2 = app.clone();
                    let t2 = tenant.clone();
                    let frozen = blocking(move || Ok(app2.registry.set_frozen(&t2, true)?)).await;
                    app.kill_tenant_runs(&tenant).await;
                    // Its retrieval files may not be opened again under this incarnation
                    // (an in-flight request would open the next tenant's by path).
                    let pool_key = app
                        .registry
                        .record(&tenant)
                        .map(|r| crate::retrieval::pool_key(tenant.as_str(), &r.incarnation));
                    if let Some(k) = &pool_key {
                        app.retrieval.retire(k, &app.registry.tenant_dir(&tenant));
                    }
                    let app2 = app.clone();
                    let t2 = tenant.clone();
                    let r = frozen.and(blocking(move || Ok(app2.registry.delete(&t2)?)).await);
                    if let (Err(_), Some(k)) = (&r, &pool_key) {
                        app.retrieval.unretire(k);
                    }
                    app.overlays
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(tenant.as_str());
                    app.tenant_limits
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(tenant.as_str());
                    app.meters.forget(tenant.as_str());
                    app.retrieval
                        .forget_under(&app.registry.tenant_dir(&tenant));
                    app.search_cache.purge(tenant.as_str());
                    app.llm_cache.purge(tenant.as_str());
                    r
                }
                Err(e) => Err(e),
            };
            audited(
                &app,
                &s,
                "tenant.delete",
                Some(&name_s),
                Some(name_s.clone()),
                r,
            )
            .await?;
            Ok(response(
                StatusCode::NO_CONTENT,
                "application/json",
                Vec::new(),
                &t,
            ))
        }
        (
            Method::POST,
            [
                "",
                "admin",
                "tenants",
                name,
                action @ ("freeze" | "unfreeze"),
            ],
        ) => {
            let frozen = *action == "freeze";
            let name_s = name.to_string();
            let r = match existing(&app, name) {
                Ok(tenant) => {
                    let app2 = app.clone();
                    let t2 = tenant.clone();
                    let r = blocking(move || Ok(app2.registry.set_frozen(&t2, frozen)?)).await;
                    if frozen && r.is_ok() {
                        app.kill_tenant_runs(&tenant).await;
                    }
                    r
                }
                Err(e) => Err(e),
            };
            audited(
                &app,
                &s,
                &format!("tenant.{action}"),
                Some(&name_s),
                Some(name_s.clone()),
                r,
            )
            .await?;
            Ok(response(
                StatusCode::NO_CONTENT,
                "application/json",
                Vec::new(),
                &t,
            ))
        }
        (Method::POST, ["", "admin", "tenants", name, "tokens", "rotate"]) => {
            let name_s = name.to_string();
            let r = match existing(&app, name) {
                Ok(tenant) => {
                    let app2 = app.clone();
                    blocking(move || Ok(app2.registry.rotate(&tenant)?)).await
                }
                Err(e) => Err(e),
            };
            let target = r.as_ref().ok().map(|i| i.id.to_string());
            let issued = audited(&app, &s, "token.rotate", Some(&name_s), target, r).await?;
            Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({"token": issued.token, "token_id": issued.id.to_string()}),
                &t,
            ))
        }
        (Method::POST, ["", "admin", "tenants", name, "tokens"]) => {
            let (body, _budget) = read_body(&app, req.into_body(), 4096).await?;
            let create: CreateToken = parse_json(&body)?;
            if let Some(tools) = &create.tools {
                crate::policy::validate_tools(tools).map_err(ApiError::BadRequest)?;
            }
            if let Some(names) = &create.datasources {
                if names.len() > 256 {
                    return Err(ApiError::BadRequest(
                        "datasources: at most 256 names".into(),
                    ));
                }
                for n in names {
                    crate::retrieval::check_name(n)
                        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
                }
            }
            let name_s = name.to_string();
            let r = match existing(&app, name) {
                Ok(tenant) => {
                    let app2 = app.clone();
                    let ws = create.workspace.unwrap_or_else(|| "default".into());
                    let role = create.role.unwrap_or(Role::Member);
                    let (tools, sources) = (create.tools, create.datasources);
                    blocking(move || {
                        Ok(app2
                            .registry
                            .create_token(&tenant, &ws, role, tools, sources)?)
                    })
                    .await
                }
                Err(e) => Err(e),
            };
            let target = r.as_ref().ok().map(|i| i.id.to_string());
            let issued = audited(&app, &s, "token.create", Some(&name_s), target, r).await?;
            Ok(json_response(
                StatusCode::CREATED,
                &serde_json::json!({"token": issued.token, "token_id": issued.id.to_string()}),
                &t,
            ))
        }
        (Method::GET, ["", "admin", "tenants", name, "usage"]) => {
            let tenant = existing(&app, name)?;
            Ok(super::usage_response(&app, &tenant, &t))
        }
        (Method::GET, ["", "admin", "tenants", name, "limits"]) => {
            let tenant = existing(&app, name)?;
            let own = app
                .tenant_limits
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(tenant.as_str())
                .cloned()
                .unwrap_or_default();
            Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({"effective": app.limits(&tenant), "tenant": own, "defaults": app.config.limits}),
                &t,
            ))
        }
        (Method::PUT, ["", "admin", "tenants", name, "limits"]) => {
            let (body, _budget) = read_body(&app, req.into_body(), 16 * 1024).await?;
            let patch: serde_json::Map<String, serde_json::Value> = parse_json(&body)?;
            let name_s = name.to_string();
            let r = match existing(&app, name) {
                Ok(tenant) => {
                    let own = app
                        .tenant_limits
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(tenant.as_str())
                        .cloned()
                        .unwrap_or_default();
                    match own.apply_patch(&patch) {
                        Ok(next) => {
                            let dir = app.registry.tenant_dir(&tenant);
                            let json = serde_json::to_vec_pretty(&next)
                                .map_err(|e| ApiError::Internal(e.to_string()))?;
                            let written = blocking(move || {
                                crate::tenant::write_atomic(&dir, "limits.json", &json, 0o600)
                                    .map_err(|e| ApiError::Internal(format!("limits.json: {e}")))
                            })
                            .await;
                            written.map(|()| {
                                app.tenant_limits
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .insert(tenant.to_string(), next);
                                app.limits(&tenant)
                            })
                        }
                        Err(why) => Err(ApiError::BadRequest(why)),
                    }
                }
                Err(e) => Err(e),
            };
            let keys: Vec<&String> = patch.keys().collect();
            let effective = audited(
                &app,
                &s,
                "limits.set",
                Some(&name_s),
                Some(format!("{keys:?}")),
                r,
            )
            .await?;
            Ok(json_response(
                StatusCode::OK,
                &serde_json::to_value(effective).unwrap_or_default(),
                &t,
            ))
        }
        (Method::POST, ["", "admin", "tenants", name, "stop"]) => {
            let name_s = name.to_string();
            let r = match existing(&app, name) {
                Ok(tenant) => {
                    app.kill_tenant_runs(&tenant).await;
                    Ok(())
                }
                Err(e) => Err(e),
            };
            audited(
                &app,
                &s,
                "tenant.stop",
                Some(&name_s),
                Some(name_s.clone()),
                r,
            )
            .await?;
            Ok(response(
                StatusCode::NO_CONTENT,
                "application/json",
                Vec::new(),
                &t,
            ))
        }
        (Method::POST, ["", "admin", action @ ("halt" | "resume")]) => {
            let halt = *action == "halt";
            let marker = app.state_dir.join("halted");
            // Persisted first, so a restart keeps the switch where the admin left it.
            let r = blocking(move || {
                let done = if halt {
                    crate::tenant::write_atomic(
                        marker.parent().unwrap_or(std::path::Path::new(".")),
                        "halted",
                        b"1\n",
                        0o600,
                    )
                } else {
                    std::fs::remove_file(&marker).or_else(|e| {
                        if e.kind() == std::io::ErrorKind::NotFound {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                };
                done.map_err(|e| ApiError::Internal(format!("halted marker: {e}")))
            })
            .await;
            if r.is_ok() {
                app.halted.store(halt, std::sync::atomic::Ordering::SeqCst);
                if halt {
                    let proxies: Vec<_> = app
                        .egress
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .drain()
                        .collect();
                    for (_, task) in proxies {
                        task.abort();
                    }
                    app.spawner.kill_all().await;
                }
            }
            audited(&app, &s, &format!("daemon.{action}"), None, None, r).await?;
            Ok(response(
                StatusCode::NO_CONTENT,
                "application/json",
                Vec::new(),
                &t,
            ))
        }
        (Method::DELETE, ["", "admin", "tokens", id]) => {
            let id_s = id.to_string();
            let app2 = app.clone();
            let r = blocking(move || Ok(app2.registry.revoke_token(&id_s)?)).await;
            let tenant = r.as_ref().ok().map(|t| t.to_string());
            audited(
                &app,
                &s,
                "token.revoke",
                tenant.as_deref(),
                Some(id.to_string()),
                r,
            )
            .await?;
            Ok(response(
                StatusCode::NO_CONTENT,
                "application/json",
                Vec::new(),
                &t,
            ))
        }
        (m, _) if path.starts_with("/admin/") => Err(
            if matches!(m, Method::GET | Method::POST | Method::DELETE | Method::PUT) {
                ApiError::NotFound(format!("no route {path}"))
            } else {
                ApiError::Method
            },
        ),
        _ => Err(ApiError::NotFound(format!("no route {path}"))),
    }
}
