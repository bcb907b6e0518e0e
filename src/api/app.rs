//! The daemon's shared state, handed to every request.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::audit::AuditLog;
use crate::auth::{AuthError, Boundary, TenantName, TokenDigest};
use crate::config::{AdminConfig, TenantSettings};
use crate::spawner::{Killer, SpawnerClient};
use crate::tenant::Registry;

/// The stored admin key: its public id and digest.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminRecord {
    /// `ak_<8 hex>`.
    pub id: String,
    /// SHA-256 of the key.
    pub digest: TokenDigest,
}

/// Everything a request handler may use.
pub struct App {
    /// The state directory.
    pub state_dir: PathBuf,
    /// Admin configuration.
    pub config: AdminConfig,
    /// Tenants and tokens.
    pub registry: Registry,
    /// The audit log.
    pub audit: AuditLog,
    /// Per-tenant retrieval databases (a bounded pool of open ones).
    pub retrieval: crate::retrieval::Retrieval,
    /// Where documents and queries without vectors get them, if anywhere.
    pub embeddings: Option<super::retrieval::Embeddings>,
    /// Search results, keyed from the caller's boundary.
    pub search_cache: crate::cache::Cache<Arc<Vec<crate::retrieval::Hit>>>,
    /// LLM answers of tenants that opted in, keyed from the caller's boundary.
    pub llm_cache: crate::cache::Cache<Arc<super::llm::CachedAnswer>>,
    /// The sandbox spawner.
    pub spawner: SpawnerClient,
    /// The admin key.
    pub admin: AdminRecord,
    /// Tenant overlays by tenant name.
    pub overlays: Mutex<HashMap<String, TenantSettings>>,
    /// Runs in flight per tenant, so delete/freeze can kill them.
    pub running: Mutex<HashMap<String, HashMap<u64, Killer>>>,
    /// The daemon runs as root (per-tenant host uids).
    pub root: bool,
    /// Start time.
    pub started: Instant,
    /// Budget of bytes held for request bodies and file reads (permits are KiB).
    pub inflight: tokio::sync::Semaphore,
    /// Daemon-wide kill switch (`bulkhead halt`), persisted as `<state>/halted`.
    pub halted: std::sync::atomic::AtomicBool,
    /// Per-tenant limits set on the admin API (`<tenant>/limits.json`).
    pub tenant_limits: Mutex<HashMap<String, crate::policy::limits::Limits>>,
    /// Rate buckets and concurrency counters.
    pub meters: crate::policy::limits::Meters,
    /// Idempotency keys in flight.
    pub idempotency: super::idempotency::Keys,
    /// Daemon-wide sandbox slots shared fairly between tenant queues.
    pub scheduler: std::sync::Arc<crate::policy::schedule::Scheduler>,
    /// Whether cgroup v2 limits could be used (detected at start).
    pub cgroups: crate::policy::cgroups::Cgroups,
    /// The egress proxy served for each tenant's current cell.
    pub egress: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    /// LLM upstreams, shared by every tenant.
    pub llm: crate::llm::upstream::Router,
}

/// The egress proxy's view of one tenant: its allowlist and byte limit as they are now,
/// and the audit log.
struct EgressTenant {
    app: std::sync::Weak<App>,
    tenant: TenantName,
}

impl crate::egress::Tenant for EgressTenant {
    fn allowlist(&self) -> Option<crate::egress::Allowlist> {
        let app = self.app.upgrade()?;
        if app.is_halted() || app.registry.record(&self.tenant).is_none_or(|r| r.frozen) {
            return None;
        }
        let patterns = app.limits(&self.tenant).egress?;
        // Validated when set; a pattern that no longer parses allows nothing.
        crate::egress::Allowlist::parse(&patterns)
            .ok()
            .filter(|_| !patterns.is_empty())
    }

    fn take_bytes(&self, want: u64) -> u64 {
        let Some(app) = self.app.upgrade() else {
            return 0;
        };
        let limit = app.limits(&self.tenant).egress_bytes_per_day;
        app.meters.take_egress(self.tenant.as_str(), want, limit)
    }

    fn has_bytes(&self) -> bool {
        self.app.upgrade().is_some_and(|app| {
            let limit = app.limits(&self.tenant).egress_bytes_per_day;
            app.meters.egress_left(self.tenant.as_str(), limit)
        })
    }

    fn admit(&self) -> bool {
        self.app.upgrade().is_some_and(|app| {
            app.meters
                .take(
                    &format!("eg/{}", self.tenant),
                    crate::egress::CONNECTIONS_PER_S,
                    "egress connections",
                )
                .is_ok()
        })
    }

    fn audit(&self, record: crate::egress::Connection) {
        let Some(app) = self.app.upgrade() else {
            return;
        };
        let event = crate::audit::Event {
            actor: "sandbox".into(),
            tenant: Some(self.tenant.to_string()),
            action: "egress".into(),
            target: Some(record.destination.clone()),
            outcome: record.outcome.clone(),
            reason_code: record.reason_code.clone(),
            egress: Some(record),
            ..Default::default()
        };
        tokio::spawn(async move {
            if let Err(e) = app.audit.record(event).await {
                tracing::error!(error = %e, "audit of an egress connection failed");
            }
        });
    }
}

impl App {
    /// Kills every run of `tenant` now: the spawner kills each sandbox of the tenant's
    /// work dir, tracked here or not. Callers first mark the tenant frozen or gone, so a run
    /// that starts after this message sees that and kills itself (see `tenant::exec`).
    pub async fn kill_tenant_runs(&self, tenant: &TenantName) {
        self.stop_egress(tenant.as_str());
        self.spawner
            .kill_tenant(&self.registry.work_dir(tenant))
            .await;
    }

    /// Serves the egress proxy listening in `tenant`'s new cell (replacing the one of its
    /// previous cell).
    pub fn serve_egress(
        self: &std::sync::Arc<Self>,
        tenant: &TenantName,
        listener: std::os::fd::OwnedFd,
    ) {
        let std_listener = std::net::TcpListener::from(listener);
        let listener = match std_listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(std_listener))
        {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(tenant = %tenant, error = %e, "egress proxy listener unusable");
                return;
            }
        };
        let view = std::sync::Arc::new(EgressTenant {
            app: std::sync::Arc::downgrade(self),
            tenant: tenant.clone(),
        });
        let task = tokio::spawn(crate::egress::serve(listener, view));
        let previous = self
            .egress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.to_string(), task.abort_handle());
        if let Some(old) = previous {
            old.abort();
        }
    }

    /// Stops serving `tenant`'s egress proxy (its cell is being killed).
    pub fn stop_egress(&self, tenant: &str) {
        if let Some(task) = self
            .egress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant)
        {
            task.abort();
        }
    }

    /// Whether `tenant` may still run: it exists, is not frozen, and the daemon is not
    /// halted.
    pub fn may_run(&self, b: &Boundary) -> bool {
        !self.is_halted() && self.registry.is_current(b)
    }

    /// Why `b` may no longer act after a wait: halted, frozen, or its tenant deleted (or
    /// deleted and made again, which its token does not belong to). `None`: it may.
    pub fn refusal(&self, b: &Boundary) -> Option<super::ApiError> {
        if self.is_halted() {
            return Some(super::ApiError::Policy(crate::policy::Denial::Halted));
        }
        match self.registry.record(b.tenant()) {
            Some(r) if r.incarnation != b.incarnation() => {
                Some(super::ApiError::Auth(AuthError::UnknownToken))
            }
            Some(r) if r.frozen => Some(super::ApiError::Frozen),
            Some(_) => None,
            None => Some(super::ApiError::Auth(AuthError::UnknownToken)),
        }
    }

    /// The tenant's effective limits: admin defaults with its own values on top.
    pub fn limits(&self, tenant: &TenantName) -> crate::policy::limits::Limits {
        let own = self
            .tenant_limits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant.as_str())
            .cloned()
            .unwrap_or_default();
        self.config.limits.overlaid(&own)
    }

    /// The kill switch's state.
    pub fn is_halted(&self) -> bool {
        self.halted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Registers a run of `tenant`.
    pub fn track(&self, tenant: &TenantName, id: u64, killer: Killer) {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(tenant.to_string())
            .or_default()
            .insert(id, killer);
    }

    /// Forgets a finished run.
    pub fn untrack(&self, tenant: &TenantName, id: u64) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = running.get_mut(tenant.as_str()) {
            m.remove(&id);
            if m.is_empty() {
                running.remove(tenant.as_str());
            }
        }
    }

    /// The tenant's effective settings (admin defaults with its overlay on top).
    pub fn settings(&self, tenant: &TenantName) -> TenantSettings {
        let overlays = self.overlays.lock().unwrap_or_else(|p| p.into_inner());
        match overlays.get(tenant.as_str()) {
            Some(o) => self.config.defaults.overlaid(o),
            None => self.config.defaults.clone(),
        }
    }
}
