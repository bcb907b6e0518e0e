//! Validated names.

use std::fmt;
use std::path::Path;

use super::AuthError;
use super::boundary::AdminSession;

/// A tenant's name: `^[a-z][a-z0-9-]{0,31}$` (no `_`, so `tk_<name>_<hex>` parses one way).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct TenantName(String);

fn valid_tenant(raw: &str) -> bool {
    let b = raw.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

impl TenantName {
    pub(in crate::auth) fn parse(raw: &str) -> Result<TenantName, AuthError> {
        if valid_tenant(raw) {
            Ok(TenantName(raw.to_string()))
        } else {
            Err(AuthError::InvalidTenantName(raw.to_string()))
        }
    }

    /// A name an authenticated admin asked for (e.g. `tenants create NAME`).
    pub fn for_admin(_admin: &AdminSession, raw: &str) -> Result<TenantName, AuthError> {
        TenantName::parse(raw)
    }

    /// The name as a string (safe to log and to use as a directory name).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The tenants present under `<state>/tenants`, read by the daemon at start-up. Entries
/// that are not valid tenant names (such as in-progress `.tmp-*` directories) are
/// returned separately so the caller can clean them up.
pub fn scan_tenant_dirs(
    tenants_dir: &Path,
) -> std::io::Result<(Vec<TenantName>, Vec<std::path::PathBuf>)> {
    let mut names = Vec::new();
    let mut other = Vec::new();
    match std::fs::read_dir(tenants_dir) {
        Ok(rd) => {
            for e in rd {
                let e = e?;
                match e
                    .file_name()
                    .to_str()
                    .and_then(|n| TenantName::parse(n).ok())
                {
                    Some(n) if e.file_type()?.is_dir() => names.push(n),
                    _ => other.push(e.path()),
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    names.sort();
    Ok((names, other))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_names() {
        for ok in ["a", "acme", "northstar-dental", "a1-b2", &"a".repeat(32)] {
            assert!(TenantName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "A",
            "1abc",
            "-x",
            "a_b",
            "a.b",
            "a/b",
            "..",
            &"a".repeat(33),
            "ä",
            "a b",
        ] {
            assert!(TenantName::parse(bad).is_err(), "{bad}");
        }
    }
}
