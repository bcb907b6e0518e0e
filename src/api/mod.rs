//! `bulkhead serve`: the tenant and admin sockets.
//!
//! Our own accept loop on tokio `UnixListener`s (hyper 1.x `serve_connection`, one task
//! per connection), with a connection limit, body and header size limits, a header read
//! timeout, and graceful shutdown on SIGTERM/SIGINT that lets running requests finish.
#![forbid(unsafe_code)]

mod admin;
mod app;
mod error;
mod http;
mod idempotency;
mod llm;
mod retrieval;
mod tenant;

use http::ApiBody;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::UnixListener;
use tokio::sync::Semaphore;

pub use app::{AdminRecord, App};
pub use error::ApiError;
pub use tenant::{ExecRequest, usage_response};

use crate::audit::{AuditLog, Event};
use crate::config::AdminConfig;
use crate::spawner::SpawnerClient;
use crate::tenant::{HostIdPolicy, Registry};

/// Where the daemon keeps its state and sockets.
#[derive(Debug, Clone)]
pub struct Paths {
    /// State directory.
    pub state_dir: PathBuf,
    /// Directory of the two sockets.
    pub runtime_dir: PathBuf,
    /// Admin config file.
    pub config: PathBuf,
}

impl Paths {
    /// `--state-dir`, else `$STATE_DIRECTORY`, else `./.bulkhead`; sockets in
    /// `$RUNTIME_DIRECTORY` or the state dir.
    pub fn resolve(state_dir: Option<PathBuf>, config: Option<PathBuf>) -> Paths {
        let state_dir = state_dir
            .or_else(|| {
                std::env::var_os("STATE_DIRECTORY").map(|v| {
                    PathBuf::from(v.to_string_lossy().split(':').next().unwrap_or(".bulkhead"))
                })
            })
            .unwrap_or_else(|| PathBuf::from(".bulkhead"));
        let runtime_dir = std::env::var_os("RUNTIME_DIRECTORY")
            .map(|v| PathBuf::from(v.to_string_lossy().split(':').next().unwrap_or(".")))
            .unwrap_or_else(|| state_dir.clone());
        let config = config.unwrap_or_else(|| crate::config::default_path(&state_dir));
        Paths {
            state_dir,
            runtime_dir,
            config,
        }
    }

    /// The tenant socket.
    pub fn tenant_socket(&self) -> PathBuf {
        self.runtime_dir.join("bulkhead.sock")
    }

    /// The admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.runtime_dir.join("admin.sock")
    }

    /// The admin key file the CLI reads.
    pub fn admin_key(&self) -> PathBuf {
        self.state_dir.join("admin.key")
    }
}

/// Errors that stop the daemon at start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Something to report verbatim.
    #[error("{0}")]
    Start(String),
}

fn start_err(e: impl std::fmt::Display) -> ServeError {
    ServeError::Start(e.to_string())
}

/// Loads or makes the admin key (`admin.key` for the CLI, `admin.json` holding its digest).
fn admin_record(state_dir: &Path) -> Result<AdminRecord, ServeError> {
    let rec_path = state_dir.join("admin.json");
    if let Ok(text) = std::fs::read_to_string(&rec_path) {
        return serde_json::from_str(&text)
            .map_err(|e| ServeError::Start(format!("{}: {e}", rec_path.display())));
    }
    let key = crate::auth::issue_admin_key().map_err(start_err)?;
    crate::tenant::write_atomic(
        state_dir,
        "admin.key",
        format!("{}\n", key.key).as_bytes(),
        0o600,
    )
    .map_err(start_err)?;
    let rec = AdminRecord {
        id: key.id,
        digest: key.digest,
    };
    let json = serde_json::to_vec_pretty(&rec).map_err(start_err)?;
    crate::tenant::write_atomic(state_dir, "admin.json", &json, 0o600).map_err(start_err)?;
    Ok(rec)
}

/// Everything prepared before tokio starts.
pub struct Prepared {
    paths: Paths,
    config: AdminConfig,
    registry: Registry,
    overlays: std::collections::HashMap<String, crate::config::TenantSettings>,
    limits: std::collections::HashMap<String, crate::policy::limits::Limits>,
    usage: std::collections::HashMap<String, crate::policy::limits::Usage>,
    cgroups: crate::policy::cgroups::Cgroups,
    admin: AdminRecord,
    spawners: (PathBuf, Vec<(std::os::fd::OwnedFd, std::process::Child)>),
    listen_fds: Vec<(String, std::os::fd::OwnedFd)>,
    /// Held until the daemon exits (see [`lock_state_dir`]).
    state_lock: nix::fcntl::Flock<std::fs::File>,
}

/// Takes `<state>/daemon.lock` (an exclusive `flock`) for the daemon's lifetime: a second
/// daemon on the same state dir would interleave audit lines, cut each other's torn
/// lines at start and race on every file, so it is refused before it touches any.
fn lock_state_dir(state_dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, ServeError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.join("daemon.lock");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| ServeError::Start(format!("{}: {e}", path.display())))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        ServeError::Start(format!(
            "{}: another bulkhead daemon is using this state dir ({e})",
            state_dir.display()
        ))
    })
}

/// Start-up before any thread exists: takes socket-activation fds, starts the spawner,
/// loads config, registry and overlays (an overlay with an admin-only or unknown key stops
/// the daemon here).
pub fn prepare(paths: Paths) -> Result<Prepared, ServeError> {
    let listen_fds = crate::sandbox::channel::take_listen_fds();
    let exe =
        std::env::current_exe().map_err(|e| ServeError::Start(format!("current_exe: {e}")))?;
    let root = nix::unistd::geteuid().is_root();
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&paths.state_dir)
            .map_err(|e| ServeError::Start(format!("{}: {e}", paths.state_dir.display())))?;
        // Sandboxes of per-tenant uids must traverse it to their work dirs, no more.
        std::fs::set_permissions(&paths.state_dir, std::fs::Permissions::from_mode(0o711))
            .map_err(start_err)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&paths.runtime_dir)
            .map_err(start_err)?;
    }
    let state_lock = lock_state_dir(&paths.state_dir)?;
    // Before the spawner starts, so that it is placed with the daemon.
    let cgroups = crate::policy::cgroups::setup();
    let config = AdminConfig::load(&paths.config).map_err(start_err)?;
    let spawners = (0..config.exec.effective_spawners())
        .map(|_| crate::spawner::start_process(&exe).map_err(start_err))
        .collect::<Result<Vec<_>, _>>()?;
    let policy = if root {
        HostIdPolicy::PerTenant {
            base: config.host_ids.base,
            count: config.host_ids.count,
        }
    } else {
        HostIdPolicy::Caller {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        }
    };
    let registry = Registry::open(&paths.state_dir, policy).map_err(start_err)?;
    let mut overlays = std::collections::HashMap::new();
    let mut limits = std::collections::HashMap::new();
    let mut usage = std::collections::HashMap::new();
    for t in registry.list() {
        let dir = paths.state_dir.join("tenants").join(&t.name);
        let o =
            crate::config::load_overlay(&t.name, &dir.join("config.toml")).map_err(start_err)?;
        if let Ok(text) = std::fs::read_to_string(dir.join("limits.json")) {
            let l: crate::policy::limits::Limits = serde_json::from_str(&text)
                .map_err(|e| ServeError::Start(format!("tenant {}: limits.json: {e}", t.name)))?;
            l.validate()
                .map_err(|e| ServeError::Start(format!("tenant {}: limits.json: {e}", t.name)))?;
            limits.insert(t.name.clone(), l);
        }
        match std::fs::read_to_string(dir.join(USAGE_FILE)) {
            Ok(text) => {
                let u: crate::policy::limits::Usage = serde_json::from_str(&text).map_err(|e| {
                    ServeError::Start(format!(
                        "tenant {}: {USAGE_FILE}: {e} (move it aside to start the counters again)",
                        t.name
                    ))
                })?;
                usage.insert(t.name.clone(), u);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(ServeError::Start(format!(
                    "tenant {}: {USAGE_FILE}: {e}",
                    t.name
                )));
            }
        }
        overlays.insert(t.name, o);
    }
    let admin = admin_record(&paths.state_dir)?;
    Ok(Prepared {
        paths,
        config,
        registry,
        overlays,
        limits,
        usage,
        cgroups,
        admin,
        spawners: (exe, spawners),
        listen_fds,
        state_lock,
    })
}

fn bind(
    path: &Path,
    mode: u32,
    activated: Option<std::os::fd::OwnedFd>,
) -> Result<UnixListener, ServeError> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(fd) = activated {
        let std_listener = std::os::unix::net::UnixListener::from(fd);
        std_listener.set_nonblocking(true).map_err(start_err)?;
        return UnixListener::from_std(std_listener).map_err(start_err);
    }
    // A socket file left by a previous run that nobody listens on is replaced.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() && std::os::unix::net::UnixStream::connect(path).is_err() {
            std::fs::remove_file(path).map_err(start_err)?;
        }
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| ServeError::Start(format!("bind {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(start_err)?;
    Ok(listener)
}

/// `<state>/sockets.json`: where this daemon's sockets are, so that clients given only
/// the state dir find them when they live in `$RUNTIME_DIRECTORY`.
fn write_socket_pointer(paths: &Paths) -> Result<(), ServeError> {
    let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    let v = serde_json::json!({"tenant": abs(paths.tenant_socket()), "admin": abs(paths.admin_socket())});
    crate::tenant::write_atomic(
        &paths.state_dir,
        "sockets.json",
        v.to_string().as_bytes(),
        0o644,
    )
    .map_err(start_err)
}

impl Paths {
    /// For clients: the socket paths the daemon recorded in `<state>/sockets.json`, if
    /// any, else the defaults.
    pub fn for_client(state_dir: PathBuf, socket_dir: Option<PathBuf>) -> Paths {
        let mut p = Paths::resolve(Some(state_dir), None);
        if let Some(d) = socket_dir {
            p.runtime_dir = d;
            return p;
        }
        let recorded = std::fs::read(p.state_dir.join("sockets.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        if let Some(dir) = recorded
            .as_ref()
            .and_then(|v| v["admin"].as_str())
            .and_then(|a| Path::new(a).parent())
        {
            p.runtime_dir = dir.to_path_buf();
        }
        p
    }
}

fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), Path::new(&path))
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// Runs a tenant request in its own task, so that a client hanging up cannot cancel it
/// half-way (after the change, before its audit line). The task learns of the hang-up
/// through `gone` (an exec then kills its run).
async fn detached(
    app: Arc<App>,
    boundary: crate::auth::Boundary,
    req: Request<Incoming>,
) -> Result<Response<ApiBody>, ApiError> {
    let (connected, gone) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(
        app.audit
            .serving(tenant::route(app.clone(), boundary, req, gone)),
    );
    let r = task
        .await
        .unwrap_or_else(|e| Err(ApiError::Internal(format!("handler: {e}"))));
    drop(connected);
    r
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Tenant,
    Admin,
}

async fn handle(app: Arc<App>, side: Side, req: Request<Incoming>) -> Response<ApiBody> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let (result, trace_id, who) = match side {
        Side::Tenant => {
            let auth = req
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .or_else(|| req.headers().get("x-api-key"))
                .map(|v| v.as_bytes().to_vec());
            match crate::auth::parse_bearer(auth.as_deref())
                .and_then(|parts| app.registry.authenticate(parts))
            {
                Ok((boundary, frozen)) => {
                    let trace = boundary.trace_id().to_string();
                    let who = boundary.actor().to_string();
                    let r = if frozen {
                        Err(ApiError::Frozen)
                    } else {
                        detached(app.clone(), boundary, req).await
                    };
                    (r, trace, who)
                }
                Err(e) => (
                    Err(ApiError::from(e)),
                    crate::auth::trace_id(),
                    "anonymous".into(),
                ),
            }
        }
        Side::Admin => {
            let auth = req
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .map(|v| v.as_bytes().to_vec());
            match crate::auth::admin_session(auth.as_deref(), &app.admin.id, &app.admin.digest) {
                Ok(s) => {
                    let trace = s.trace_id().to_string();
                    let who = s.actor().to_string();
                    let app2 = app.clone();
                    let task = tokio::spawn(app.audit.serving(admin::route(app2, s, req)));
                    let r = task
                        .await
                        .unwrap_or_else(|e| Err(ApiError::Internal(format!("handler: {e}"))));
                    (r, trace, who)
                }
                Err(e) => (
                    Err(ApiError::from(e)),
                    crate::auth::trace_id(),
                    "anonymous".into(),
                ),
            }
        }
    };
    let response = match result {
        Ok(r) => r,
        Err(e) => e.response(&trace_id),
    };
    tracing::info!(side = ?side, %method, %path, status = response.status().as_u16(), actor = %who, trace_id = %trace_id, us = started.elapsed().as_micros() as u64, "request");
    response
}

async fn accept_loop(
    app: Arc<App>,
    listener: UnixListener,
    side: Side,
    limit: Arc<Semaphore>,
    graceful: Arc<hyper_util::server::graceful::GracefulShutdown>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.changed() => return,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let app = app.clone();
        let cfg = &app.config.server;
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_millis(cfg.header_read_timeout_ms))
            .max_buf_size(cfg.max_header_bytes.max(8192))
            .keep_alive(true);
        let app2 = app.clone();
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn(move |req| {
                let app = app2.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(app, side, req).await) }
            }),
        );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
}

/// Where a tenant's usage counters are kept, under its directory.
const USAGE_FILE: &str = "usage.json";

/// Writes the usage counters that changed. A tenant deleted meanwhile has no directory
/// any more and is skipped.
async fn flush_usage(app: &Arc<App>) {
    let dirty = app.meters.take_dirty();
    if dirty.is_empty() {
        return;
    }
    let tenants = app.state_dir.join("tenants");
    let written = tokio::task::spawn_blocking(move || {
        for (tenant, u) in dirty {
            let dir = tenants.join(&tenant);
            if !dir.is_dir() {
                continue;
            }
            let result = serde_json::to_vec(&u)
                .map_err(std::io::Error::other)
                .and_then(|bytes| {
                    crate::tenant::store::write_atomic(&dir, USAGE_FILE, &bytes, 0o600)
                });
            if let Err(e) = result {
                tracing::warn!(%tenant, error = %e, "writing usage counters");
            }
        }
    })
    .await;
    if let Err(e) = written {
        tracing::warn!(error = %e, "usage flush task");
    }
}

/// Runs the daemon until SIGTERM/SIGINT, then lets running requests finish.
pub fn serve(prepared: Prepared) -> Result<(), ServeError> {
    let workers = match prepared.config.server.worker_threads {
        0 => std::thread::available_parallelism()
            .map(|n| n.get() / 2)
            .unwrap_or(1)
            .max(1),
        n => n,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .map_err(start_err)?;
    rt.block_on(async move {
        let Prepared { paths, config, registry, overlays, limits, usage, cgroups, admin, spawners, mut listen_fds, state_lock: _held_until_exit } = prepared;
        let (exe, spawners) = spawners;
        let spawner = SpawnerClient::new(exe, spawners).map_err(start_err)?;
        let audit = AuditLog::open(&paths.state_dir).map_err(start_err)?;
        let root = nix::unistd::geteuid().is_root();
        let mut take = |name: &str| listen_fds.iter().position(|(n, _)| n == name).map(|i| listen_fds.remove(i).1);
        let tenant_fd = take("tenant").or_else(|| take("bulkhead.socket"));
        let admin_fd = take("admin");
        // Sockets handed over by systemd stay its to remove; only our own are cleaned up.
        let mut bound_here = Vec::new();
        if tenant_fd.is_none() {
            bound_here.push(paths.tenant_socket());
        }
        if admin_fd.is_none() {
            bound_here.push(paths.admin_socket());
        }
        let tenant_listener = bind(&paths.tenant_socket(), 0o666, tenant_fd)?;
        let admin_listener = bind(&paths.admin_socket(), 0o600, admin_fd)?;
        write_socket_pointer(&paths)?;
        let config_inflight_kib = config.server.max_inflight_bytes / 1024;
        let halted = paths.state_dir.join("halted").exists();
        // Every queued run holds a connection: one tenant's queue may fill at most half
        // of the tenant socket's connections, so the others can still reach the daemon.
        let llm = crate::llm::upstream::Router::new(
            config.llm(),
            config.llm().load_keys().map_err(start_err)?,
        )
        .map_err(start_err)?;
        // Loading a model takes a moment and fails for reasons the admin must fix, so it
        // happens (and stops the daemon) here rather than on the first request.
        let (retrieval_pool, cache_entries) =
            (config.retrieval.pool, config.retrieval.cache_entries);
        let embeddings = match (&config.retrieval.embedder, &config.retrieval.embeddings_model) {
            (Some(dir), _) => {
                let e = crate::retrieval::embed::Embedder::load(dir).map_err(start_err)?;
                tracing::info!(model = e.id(), dim = e.dim(), "embedder loaded");
                Some(retrieval::Embeddings::Local(Arc::new(e)))
            }
            (None, Some(model)) => {
                let id = config
                    .models
                    .get(model)
                    .map(|m| format!("llm:{model}={}/{}", m.provider, m.upstream))
                    .unwrap_or_default();
                tracing::info!(%model, "retrieval embeds through the provider model");
                Some(retrieval::Embeddings::Provider {
                    model: model.clone(),
                    id,
                })
            }
            (None, None) => None,
        };
        let scheduler = crate::policy::schedule::Scheduler::new(
            config.exec.effective_slots(),
            config
                .exec
                .queue_per_tenant
                .min((config.server.max_connections / 2).max(1)),
            config.exec.effective_tenant_slots(),
        );
        let app = Arc::new(App {
            state_dir: paths.state_dir.clone(),
            config,
            registry,
            audit,
            retrieval: crate::retrieval::Retrieval::new(retrieval_pool),
            embeddings,
            search_cache: crate::cache::Cache::new(cache_entries),
            llm_cache: crate::cache::Cache::new(cache_entries),
            spawner,
            admin,
            overlays: std::sync::Mutex::new(overlays),
            running: std::sync::Mutex::new(std::collections::HashMap::new()),
            root,
            started: Instant::now(),
            inflight: Semaphore::new((config_inflight_kib).max(1)),
            halted: std::sync::atomic::AtomicBool::new(halted),
            tenant_limits: std::sync::Mutex::new(limits),
            meters: Default::default(),
            scheduler,
            cgroups,
            idempotency: Default::default(),
            egress: Default::default(),
            llm,
        });
        for (tenant, u) in usage {
            app.meters.load(&tenant, u);
        }
        // Usage counters are written within a second of changing.
        {
            let app = app.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    flush_usage(&app).await;
                }
            });
        }
        // Expired idempotency records go at start and then hourly.
        let tenants_dir = paths.state_dir.join("tenants");
        tokio::spawn(async move {
            loop {
                let dir = tenants_dir.clone();
                let _swept = tokio::task::spawn_blocking(move || idempotency::sweep(&dir)).await;
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        });
        app.audit.record(Event { actor: "daemon".into(), action: "daemon.start".into(), outcome: "ok".into(), ..Default::default() }).await.map_err(start_err)?;
        let tenant_limit = Arc::new(Semaphore::new(app.config.server.max_connections));
        let admin_limit = Arc::new(Semaphore::new(app.config.server.admin_max_connections));
        let graceful = Arc::new(hyper_util::server::graceful::GracefulShutdown::new());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let t = tokio::spawn(accept_loop(app.clone(), tenant_listener, Side::Tenant, tenant_limit, graceful.clone(), stop_rx.clone()));
        let a = tokio::spawn(accept_loop(app.clone(), admin_listener, Side::Admin, admin_limit, graceful.clone(), stop_rx));
        match &app.cgroups {
            crate::policy::cgroups::Cgroups::Delegated { path } => tracing::info!(%path, "cgroup v2 subtree delegated: memory and pids limited per run by cgroup, CPU shared per tenant"),
            crate::policy::cgroups::Cgroups::Unavailable { reason } => tracing::info!(%reason, "cgroup v2 limits unavailable; memory, pids and CPU limited by rlimits"),
        }
        tracing::info!(tenant = %paths.tenant_socket().display(), admin = %paths.admin_socket().display(), state = %paths.state_dir.display(), host_ids = if root { "per-tenant" } else { "daemon user" }, "bulkhead serving");
        sd_notify("READY=1");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(start_err)?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).map_err(start_err)?;
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        sd_notify("STOPPING=1");
        tracing::info!("shutting down: no new connections; waiting for running requests");
        let _stopped = stop_tx.send(true);
        let _ = tokio::join!(t, a);
        let grace = Duration::from_millis(app.config.server.shutdown_grace_ms);
        let graceful = Arc::try_unwrap(graceful).map_err(|_| ServeError::Start("shutdown: connections still referenced".into()))?;
        if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
            tracing::warn!("grace period over; exiting with requests still running");
        }
        flush_usage(&app).await;
        // Streams cut by the grace period settle as their relays see the client gone.
        app.audit.flush(Instant::now() + Duration::from_secs(2)).await;
        for p in bound_here {
            let _removed = std::fs::remove_file(p);
        }
        Ok(())
    })
}
