//! Tenants on disk: the registry of tenant records and tokens, and each tenant's files.
//!
//! ```text
//! <state>/tenants/<name>/tenant.json   record: host ids, frozen flag, token digests
//! <state>/tenants/<name>/config.toml   tenant overlay
//! <state>/tenants/<name>/work/         the sandbox's /work
//! ```
//! A tenant directory appears and disappears by one `rename`, so after a crash a tenant
//! is either fully there or absent; leftovers (`.tmp-*`, `.trash-*`) are swept at start.
#![forbid(unsafe_code)]

pub mod files;
mod registry;
pub mod store;

pub use registry::{
    HostIdPolicy, Registry, RegistryError, TenantRecord, TenantSummary, TokenRecord,
};
pub use store::write_atomic;
