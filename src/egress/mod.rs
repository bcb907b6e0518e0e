//! Governed egress: a tenant's sandboxes reach the network only through an HTTP(S) proxy
//! the daemon serves inside the tenant's cell, and only to destinations an admin listed.
//!
//! The cell's holder makes a socket listening on `127.0.0.1:3128` in the cell's network
//! namespace (a socket keeps the namespace it was made in) and the spawner hands it to
//! the daemon, which serves it on its own runtime: no proxy process runs where tenant
//! code does. The namespace has no other interface than loopback and Landlock lets runs
//! connect to that one port only.
#![forbid(unsafe_code)]

mod allowlist;
mod proxy;

pub use allowlist::{Allowlist, MAX_PATTERNS, Rule, is_public};
pub use proxy::{Connection, Tenant, serve};

/// The proxy's port inside every cell that has one.
pub const PROXY_PORT: u16 = 3128;

/// New proxy connections one tenant may open per second (bursts of as many); more are
/// answered 429 and counted, not audited one by one.
pub const CONNECTIONS_PER_S: f64 = 50.0;

/// The proxy's URL as sandboxes see it.
pub const PROXY_URL: &str = "http://127.0.0.1:3128";

/// The environment naming the proxy (upper and lower case: curl reads only
/// `http_proxy` in lower case).
pub fn proxy_env() -> Vec<(String, String)> {
    [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ]
    .iter()
    .map(|k| (k.to_string(), PROXY_URL.to_string()))
    .collect()
}
