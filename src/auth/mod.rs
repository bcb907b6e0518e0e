//! Identity: the only code that turns a credential into a tenant [`Boundary`].
//!
//! `TenantName` and `Boundary` have private constructors reachable only from this module:
//! a tenant name comes from a verified token, from an authenticated admin call, or from
//! the daemon's own state directory at start-up — never from a request body.
//!
//! ```compile_fail
//! // Outside the auth module a TenantName cannot be made from a raw string...
//! let t = bulkhead::auth::TenantName::parse("acme");
//! ```
//!
//! ```compile_fail
//! // ...nor can a Boundary be assembled by hand.
//! fn forge(t: bulkhead::auth::TenantName) -> bulkhead::auth::Boundary {
//!     bulkhead::auth::Boundary { tenant: t }
//! }
//! ```
#![forbid(unsafe_code)]

mod boundary;
mod names;
mod token;

pub use boundary::{AdminSession, Boundary, Role};
pub use names::{TenantName, scan_tenant_dirs};
pub(crate) use token::trace_id;
pub use token::{
    AdminKey, Credential, IssuedToken, TokenDigest, TokenId, TokenParts, admin_key_digest,
    admin_session, issue_admin_key, issue_token, parse_bearer,
};

/// Why a credential was refused. Every variant maps to `401 invalid_token` (or, for an
/// admin name, `400 bad_request`) at the API edge.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error("missing bearer token")]
    MissingToken,
    /// The token is not of the form `tk_<tenant>_<32 hex>` (or `ak_<id>_<32 hex>`).
    #[error("malformed token")]
    MalformedToken,
    /// No tenant token matches.
    #[error("unknown or revoked token")]
    UnknownToken,
    /// A tenant name that does not match `^[a-z][a-z0-9-]{0,31}$`.
    #[error("invalid tenant name {0:?}: use a lowercase letter then up to 31 of [a-z0-9-]")]
    InvalidTenantName(String),
    /// A workspace name outside `^[a-z0-9][a-z0-9_-]{0,63}$`.
    #[error("invalid workspace name {0:?}")]
    InvalidWorkspace(String),
    /// The OS random generator failed.
    #[error("random generator: {0}")]
    Random(String),
}
