//! The tenant registry: records in memory, each change persisted before it takes effect.

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::auth::{
    self, AuthError, Boundary, Credential, IssuedToken, Role, TenantName, TokenDigest, TokenId,
    TokenParts,
};

use super::store::{sync_dir, write_atomic};

/// How sandboxes of each tenant map to host ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostIdPolicy {
    /// Run as root: each tenant gets its own uid = gid from `base..base+count`.
    PerTenant {
        /// First id of the range.
        base: u32,
        /// Size of the range.
        count: u32,
    },
    /// Run as an ordinary user: every sandbox maps to that user (the only mapping possible
    /// without a setuid helper).
    Caller {
        /// The daemon's uid.
        uid: u32,
        /// The daemon's gid.
        gid: u32,
    },
}

/// One token as stored: its digest, never the token.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    /// Public id (`tk_<tenant>_<8 hex>`).
    pub id: TokenId,
    /// SHA-256 of the token.
    pub digest: TokenDigest,
    /// Workspace the token acts in.
    pub workspace: String,
    /// Role of the token.
    pub role: Role,
    /// The token made by `tenants create` / `token rotate`.
    #[serde(default)]
    pub primary: bool,
    /// Tools this token may use; absent means every tool its role allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_tools: Option<Vec<String>>,
    /// Datasources of its workspace this token may read and write; absent means all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_datasources: Option<Vec<String>>,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
}

/// `tenant.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantRecord {
    /// Must equal the directory name.
    pub name: String,
    /// Host uid the tenant's sandboxes run as.
    pub host_uid: u32,
    /// Host gid the tenant's sandboxes run as.
    pub host_gid: u32,
    /// Frozen tenants get `423 tenant_frozen` on everything.
    pub frozen: bool,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
    /// Random id of this creation of the tenant: a request authenticated before a delete
    /// must not act on a new tenant of the same name (records from before it was kept
    /// read as empty, which no new creation has).
    #[serde(default)]
    pub incarnation: String,
    /// The tenant's tokens.
    pub tokens: Vec<TokenRecord>,
}

/// What `tenants list` shows.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct TenantSummary {
    /// Tenant name.
    pub name: String,
    /// Frozen?
    pub frozen: bool,
    /// Token ids, roles and workspaces.
    pub tokens: Vec<TokenSummary>,
    /// Host uid of its sandboxes.
    pub host_uid: u32,
}

/// A token as `tenants list` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct TokenSummary {
    /// Public id.
    pub id: String,
    /// Workspace.
    pub workspace: String,
    /// Role.
    pub role: Role,
}

/// Registry failures.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No such tenant.
    #[error("no tenant {0}")]
    NotFound(String),
    /// The tenant already exists.
    #[error("tenant {0} already exists")]
    AlreadyExists(String),
    /// No such token.
    #[error("no token {0}")]
    TokenNotFound(String),
    /// The host id range is used up.
    #[error("no free host uid left in {base}..{end}")]
    HostIdsExhausted {
        /// First id.
        base: u32,
        /// One past the last id.
        end: u32,
    },
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A `tenant.json` that does not parse or does not match its directory.
    #[error("{path}: {why}")]
    Corrupt {
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
    /// Token generation or validation.
    #[error(transparent)]
    Auth(#[from] AuthError),
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RegistryError + 'a {
    move |source| RegistryError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

/// `<state>/tenants/.next-host-id`: the next per-tenant host id to hand out.
const HIGH_WATER: &str = ".next-host-id";

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The registry of tenants under `<state>/tenants`.
#[derive(Debug)]
pub struct Registry {
    tenants_dir: PathBuf,
    policy: HostIdPolicy,
    records: RwLock<BTreeMap<TenantName, TenantRecord>>,
}

fn validate_workspace(ws: &str) -> Result<(), AuthError> {
    let b = ws.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_');
    if ok {
        Ok(())
    } else {
        Err(AuthError::InvalidWorkspace(ws.to_string()))
    }
}

impl Registry {
    /// Opens (creating if needed) `<state>/tenants`, sweeps half-made and half-deleted
    /// tenants left by a crash, and loads every record.
    pub fn open(state_dir: &Path, policy: HostIdPolicy) -> Result<Registry, RegistryError> {
        let tenants_dir = state_dir.join("tenants");
        if !tenants_dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(&tenants_dir)
                .map_err(io("mkdir", &tenants_dir))?;
        }
        // Sandboxes of per-tenant uids must traverse to their work dir, and nothing more.
        std::fs::set_permissions(&tenants_dir, std::fs::Permissions::from_mode(0o711))
            .map_err(io("chmod", &tenants_dir))?;
        let (names, leftovers) =
            auth::scan_tenant_dirs(&tenants_dir).map_err(io("readdir", &tenants_dir))?;
        for path in leftovers {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with(".tmp-") || name.starts_with(".trash-") {
                std::fs::remove_dir_all(&path).map_err(io("remove", &path))?;
            } else if name.starts_with("..next-host-id.tmp") {
                std::fs::remove_file(&path).map_err(io("remove", &path))?;
            }
        }
        let mut records = BTreeMap::new();
        for name in names {
            let path = tenants_dir.join(name.as_str()).join("tenant.json");
            let text = std::fs::read_to_string(&path).map_err(io("read", &path))?;
            let rec: TenantRecord =
                serde_json::from_str(&text).map_err(|e| RegistryError::Corrupt {
                    path: path.display().to_string(),
                    why: e.to_string(),
                })?;
            if rec.name != name.as_str() {
                return Err(RegistryError::Corrupt {
                    path: path.display().to_string(),
                    why: format!("names tenant {:?}", rec.name),
                });
            }
            records.insert(name, rec);
        }
        Ok(Registry {
            tenants_dir,
            policy,
            records: RwLock::new(records),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<TenantName, TenantRecord>> {
        self.records.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<TenantName, TenantRecord>> {
        self.records.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The tenant's root directory.
    pub fn tenant_dir(&self, name: &TenantName) -> PathBuf {
        self.tenants_dir.join(name.as_str())
    }

    /// The tenant's `work/`.
    pub fn work_dir(&self, name: &TenantName) -> PathBuf {
        self.tenant_dir(name).join("work")
    }

    /// Verifies a presented token. Returns the Boundary and whether the tenant is frozen.
    pub fn authenticate(&self, parts: TokenParts) -> Result<(Boundary, bool), AuthError> {
        let records = self.read();
        let rec = records.get(&parts.tenant).ok_or(AuthError::UnknownToken)?;
        let frozen = rec.frozen;
        let creds = rec.tokens.iter().map(|t| Credential {
            digest: &t.digest,
            workspace: &t.workspace,
            role: t.role,
            allowed_tools: t.allowed_tools.as_deref(),
            allowed_datasources: t.allowed_datasources.as_deref(),
        });
        Ok((parts.authenticate(creds, &rec.incarnation)?, frozen))
    }

    /// Whether the boundary's tenant is still the one its token was issued by (not
    /// deleted, nor deleted and made again under the same name) and not frozen. Checked
    /// again after every wait: queueing for a slot, reading a body, running.
    pub fn is_current(&self, b: &Boundary) -> bool {
        self.read()
            .get(b.tenant())
            .is_some_and(|r| r.incarnation == b.incarnation() && !r.frozen)
    }

    /// A copy of one tenant's record.
    pub fn record(&self, name: &TenantName) -> Option<TenantRecord> {
        self.read().get(name).cloned()
    }

    /// The name object for an existing tenant, looked up by string (admin paths).
    pub fn existing(&self, name: &str) -> Option<TenantName> {
        self.read().keys().find(|k| k.as_str() == name).cloned()
    }

    /// All tenants.
    pub fn list(&self) -> Vec<TenantSummary> {
        self.read()
            .values()
            .map(|r| TenantSummary {
                name: r.name.clone(),
                frozen: r.frozen,
                host_uid: r.host_uid,
                tokens: r
                    .tokens
                    .iter()
                    .map(|t| TokenSummary {
                        id: t.id.to_string(),
                        workspace: t.workspace.clone(),
                        role: t.role,
                    })
                    .collect(),
            })
            .collect()
    }

    /// Picks host ids for a new tenant. Per-tenant ids are handed out upwards from a
    /// persisted high-water mark, so a deleted tenant's uid is not given to the next tenant
    /// while anything of the old one might linger; only when the range is used up are
    /// freed ids reused.
    fn allocate_ids(
        &self,
        records: &BTreeMap<TenantName, TenantRecord>,
    ) -> Result<(u32, u32), RegistryError> {
        match self.policy {
            HostIdPolicy::Caller { uid, gid } => Ok((uid, gid)),
            HostIdPolicy::PerTenant { base, count } => {
                let used: std::collections::BTreeSet<u32> =
                    records.values().map(|r| r.host_uid).collect();
                let end = base.saturating_add(count);
                let mark = std::fs::read_to_string(self.tenants_dir.join(HIGH_WATER))
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok())
                    .unwrap_or(base);
                let uid = (mark.max(base)..end)
                    .find(|u| !used.contains(u))
                    .or_else(|| (base..end).find(|u| !used.contains(u)))
                    .ok_or(RegistryError::HostIdsExhausted { base, end })?;
                write_atomic(
                    &self.tenants_dir,
                    HIGH_WATER,
                    format!("{}\n", uid.saturating_add(1)).as_bytes(),
                    0o600,
                )
                .map_err(io("write", &self.tenants_dir))?;
                Ok((uid, uid))
            }
        }
    }

    fn persist(&self, rec: &TenantRecord) -> Result<(), RegistryError> {
        let dir = self.tenants_dir.join(&rec.name);
        let json = serde_json::to_vec_pretty(rec).map_err(|e| RegistryError::Corrupt {
            path: rec.name.clone(),
            why: e.to_string(),
        })?;
        write_atomic(&dir, "tenant.json", &json, 0o600).map_err(io("write", &dir))
    }

    fn new_token(
        name: &TenantName,
        workspace: &str,
        role: Role,
        primary: bool,
        tools: Option<Vec<String>>,
        datasources: Option<Vec<String>>,
    ) -> Result<(IssuedToken, TokenRecord), RegistryError> {
        validate_workspace(workspace)?;
        let issued = auth::issue_token(name)?;
        let rec = TokenRecord {
            id: issued.id.clone(),
            digest: issued.digest.clone(),
            workspace: workspace.to_string(),
            role,
            primary,
            allowed_tools: tools,
            allowed_datasources: datasources,
            created_unix: now_unix(),
        };
        Ok((issued, rec))
    }

    /// Creates a tenant with its work dir and a primary owner token, which is returned
    /// once. The tenant appears on disk by a single rename.
    pub fn create(&self, name: TenantName) -> Result<IssuedToken, RegistryError> {
        let mut records = self.write();
        if records.contains_key(&name) || self.tenant_dir(&name).exists() {
            return Err(RegistryError::AlreadyExists(name.to_string()));
        }
        let (host_uid, host_gid) = self.allocate_ids(&records)?;
        let (issued, token) = Self::new_token(&name, "default", Role::Owner, true, None, None)?;
        let rec = TenantRecord {
            name: name.to_string(),
            host_uid,
            host_gid,
            frozen: false,
            created_unix: now_unix(),
            incarnation: auth::trace_id(),
            tokens: vec![token],
        };
        let tmp = self
            .tenants_dir
            .join(format!(".tmp-{}-{}", name, auth::trace_id()));
        std::fs::DirBuilder::new()
            .mode(0o711)
            .create(&tmp)
            .map_err(io("mkdir", &tmp))?;
        // Explicit modes: the umask must not decide whether a sandbox can reach its work dir.
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o711))
            .map_err(io("chmod", &tmp))?;
        let work = tmp.join("work");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&work)
            .map_err(io("mkdir", &work))?;
        std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o700))
            .map_err(io("chmod", &work))?;
        if matches!(self.policy, HostIdPolicy::PerTenant { .. }) {
            std::os::unix::fs::chown(&work, Some(host_uid), Some(host_gid))
                .map_err(io("chown", &work))?;
        }
        let json = serde_json::to_vec_pretty(&rec).map_err(|e| RegistryError::Corrupt {
            path: rec.name.clone(),
            why: e.to_string(),
        })?;
        write_atomic(&tmp, "tenant.json", &json, 0o600).map_err(io("write", &tmp))?;
        let dest = self.tenant_dir(&name);
        std::fs::rename(&tmp, &dest).map_err(io("rename", &dest))?;
        sync_dir(&self.tenants_dir).map_err(io("fsync", &self.tenants_dir))?;
        records.insert(name, rec);
        Ok(issued)
    }

    /// Removes a tenant: its tokens stop working at once, then its root disappears by one
    /// rename and is deleted. (Killing its sandboxes is the caller's job, before this.)
    pub fn delete(&self, name: &TenantName) -> Result<(), RegistryError> {
        let mut records = self.write();
        if records.remove(name).is_none() {
            return Err(RegistryError::NotFound(name.to_string()));
        }
        let dir = self.tenant_dir(name);
        let trash = self
            .tenants_dir
            .join(format!(".trash-{}-{}", name, auth::trace_id()));
        std::fs::rename(&dir, &trash).map_err(io("rename", &dir))?;
        sync_dir(&self.tenants_dir).map_err(io("fsync", &self.tenants_dir))?;
        drop(records);
        std::fs::remove_dir_all(&trash).map_err(io("remove", &trash))
    }

    fn update<T>(
        &self,
        name: &TenantName,
        f: impl FnOnce(&mut TenantRecord) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let mut records = self.write();
        let current = records
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(name.to_string()))?;
        let mut next = current.clone();
        let out = f(&mut next)?;
        self.persist(&next)?;
        records.insert(name.clone(), next);
        Ok(out)
    }

    /// Freezes or unfreezes a tenant.
    pub fn set_frozen(&self, name: &TenantName, frozen: bool) -> Result<(), RegistryError> {
        self.update(name, |r| {
            r.frozen = frozen;
            Ok(())
        })
    }

    /// Replaces the tenant's primary token; the old one fails from the next request on.
    pub fn rotate(&self, name: &TenantName) -> Result<IssuedToken, RegistryError> {
        self.update(name, |r| {
            let (workspace, role, tools, datasources) = r
                .tokens
                .iter()
                .find(|t| t.primary)
                .map(|t| {
                    (
                        t.workspace.clone(),
                        t.role,
                        t.allowed_tools.clone(),
                        t.allowed_datasources.clone(),
                    )
                })
                .unwrap_or(("default".into(), Role::Owner, None, None));
            let (issued, token) =
                Self::new_token(name, &workspace, role, true, tools, datasources)?;
            r.tokens.retain(|t| !t.primary);
            r.tokens.push(token);
            Ok(issued)
        })
    }

    /// Adds a token (one more actor) to the tenant, optionally limited to `tools`.
    pub fn create_token(
        &self,
        name: &TenantName,
        workspace: &str,
        role: Role,
        tools: Option<Vec<String>>,
        datasources: Option<Vec<String>>,
    ) -> Result<IssuedToken, RegistryError> {
        self.update(name, |r| {
            let (issued, token) =
                Self::new_token(name, workspace, role, false, tools, datasources)?;
            r.tokens.push(token);
            Ok(issued)
        })
    }

    /// Revokes a token by id.
    pub fn revoke_token(&self, id: &str) -> Result<TenantName, RegistryError> {
        let (tenant, id) =
            TokenId::parse(id).ok_or_else(|| RegistryError::TokenNotFound(id.to_string()))?;
        let name = self
            .existing(tenant.as_str())
            .ok_or_else(|| RegistryError::TokenNotFound(id.to_string()))?;
        self.update(&name, |r| {
            let before = r.tokens.len();
            r.tokens.retain(|t| t.id != id);
            if r.tokens.len() == before {
                return Err(RegistryError::TokenNotFound(id.to_string()));
            }
            Ok(())
        })?;
        Ok(name)
    }
}
