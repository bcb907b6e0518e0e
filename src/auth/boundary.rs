//! The Boundary every tenant-facing handler receives.

use super::names::TenantName;
use super::token::TokenId;

/// What a token may do (issue "Tenant policy" gives the roles their full meaning).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything the tenant can do.
    Owner,
    /// Tenant administration.
    Admin,
    /// Runs tools.
    Member,
    /// Reads only.
    Viewer,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "owner" => Ok(Role::Owner),
            "admin" => Ok(Role::Admin),
            "member" => Ok(Role::Member),
            "viewer" => Ok(Role::Viewer),
            other => Err(format!(
                "unknown role {other:?} (owner|admin|member|viewer)"
            )),
        }
    }
}

/// The tenant boundary of one request, made by the auth code from a verified token.
/// Fields are private: nothing outside `auth` can construct or alter one.
#[derive(Debug, Clone)]
pub struct Boundary {
    pub(in crate::auth) tenant: TenantName,
    pub(in crate::auth) workspace: String,
    pub(in crate::auth) actor: TokenId,
    pub(in crate::auth) role: Role,
    pub(in crate::auth) allowed_tools: Option<Vec<String>>,
    pub(in crate::auth) allowed_datasources: Option<Vec<String>>,
    pub(in crate::auth) trace_id: String,
    pub(in crate::auth) incarnation: String,
}

impl Boundary {
    /// Which creation of the tenant issued the token (see `Registry::is_current`).
    pub fn incarnation(&self) -> &str {
        &self.incarnation
    }
    /// The token's tool allowlist; `None` means every tool its role allows.
    pub fn allowed_tools(&self) -> Option<&[String]> {
        self.allowed_tools.as_deref()
    }
    /// The token's datasource allowlist within its workspace; `None` means all of them.
    pub fn allowed_datasources(&self) -> Option<&[String]> {
        self.allowed_datasources.as_deref()
    }
    /// The tenant.
    pub fn tenant(&self) -> &TenantName {
        &self.tenant
    }
    /// The token's workspace (`default` unless set at token creation).
    pub fn workspace(&self) -> &str {
        &self.workspace
    }
    /// The actor: `tk_<tenant>_` + the first 8 hex of the token's digest; safe to log.
    pub fn actor(&self) -> &TokenId {
        &self.actor
    }
    /// The token's role.
    pub fn role(&self) -> Role {
        self.role
    }
    /// This request's trace id (echoed as `x-trace-id`).
    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }
}

/// Proof that the caller presented the admin key on the admin socket.
#[derive(Debug, Clone)]
pub struct AdminSession {
    pub(in crate::auth) actor: String,
    pub(in crate::auth) trace_id: String,
}

impl AdminSession {
    /// `ak_<id>`: the admin key's public part; safe to log.
    pub fn actor(&self) -> &str {
        &self.actor
    }
    /// This request's trace id.
    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }
}
