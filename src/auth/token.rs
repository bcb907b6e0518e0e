//! Tokens: `tk_<tenant>_<32 hex>` for tenants, `ak_<id>_<32 hex>` for the admin. Only
//! SHA-256 digests are stored; comparisons are constant-time.

use std::fmt;

use rand::TryRng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AuthError;
use super::boundary::{AdminSession, Boundary, Role};
use super::names::TenantName;

/// SHA-256 of a whole token string.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenDigest([u8; 32]);

impl fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenDigest({}…)", &self.hex()[..8])
    }
}

impl TokenDigest {
    fn of(token: &str) -> TokenDigest {
        TokenDigest(Sha256::digest(token.as_bytes()).into())
    }

    /// Lowercase hex.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits (as stored in `tenant.json`).
    pub fn from_hex(s: &str) -> Option<TokenDigest> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let hi = (chunk[0] as char).to_digit(16)?;
            let lo = (chunk[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(TokenDigest(out))
    }

    fn ct_eq(&self, other: &TokenDigest) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl serde::Serialize for TokenDigest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

impl<'de> serde::Deserialize<'de> for TokenDigest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TokenDigest::from_hex(&s)
            .ok_or_else(|| serde::de::Error::custom("token digest must be 64 hex digits"))
    }
}

/// A token's public id and the actor it stands for: `tk_<tenant>_<first 8 hex of digest>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct TokenId(String);

impl TokenId {
    fn for_digest(tenant: &TenantName, digest: &TokenDigest) -> TokenId {
        TokenId(format!("tk_{}_{}", tenant, &digest.hex()[..8]))
    }
    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// Parses a token id given by an admin (`tenants token revoke ID`).
    pub fn parse(raw: &str) -> Option<(TenantName, TokenId)> {
        let rest = raw.strip_prefix("tk_")?;
        let (tenant, hex8) = rest.rsplit_once('_')?;
        let tenant = TenantName::parse(tenant).ok()?;
        (hex8.len() == 8
            && hex8
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| (tenant, TokenId(raw.to_string())))
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A freshly issued token: the plaintext is returned once and never stored.
pub struct IssuedToken {
    /// The token to hand to the client.
    pub token: String,
    /// What the registry stores.
    pub digest: TokenDigest,
    /// Its public id.
    pub id: TokenId,
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IssuedToken({})", self.id)
    }
}

fn random_hex16() -> Result<String, AuthError> {
    let mut bytes = [0u8; 16];
    rand::rngs::SysRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| AuthError::Random(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A fresh trace id for one request.
pub(crate) fn trace_id() -> String {
    random_hex16().unwrap_or_else(|_| "0".repeat(32))
}

/// Issues a new token for `tenant` from the OS random generator.
pub fn issue_token(tenant: &TenantName) -> Result<IssuedToken, AuthError> {
    let token = format!("tk_{}_{}", tenant, random_hex16()?);
    let digest = TokenDigest::of(&token);
    let id = TokenId::for_digest(tenant, &digest);
    Ok(IssuedToken { token, digest, id })
}

/// The parts of a presented bearer token.
#[derive(Debug)]
pub struct TokenParts {
    /// The tenant the token names (still to be verified).
    pub tenant: TenantName,
    digest: TokenDigest,
}

fn is_hex32(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parses `Authorization` header bytes (`Bearer tk_<tenant>_<32 hex>`), or an
/// `x-api-key` value (the token alone).
pub fn parse_bearer(header: Option<&[u8]>) -> Result<TokenParts, AuthError> {
    let raw = header.ok_or(AuthError::MissingToken)?;
    let raw = std::str::from_utf8(raw)
        .map_err(|_| AuthError::MalformedToken)?
        .trim();
    let token = raw.strip_prefix("Bearer ").unwrap_or(raw).trim();
    let rest = token.strip_prefix("tk_").ok_or(AuthError::MalformedToken)?;
    let (tenant, secret) = rest.rsplit_once('_').ok_or(AuthError::MalformedToken)?;
    if !is_hex32(secret) {
        return Err(AuthError::MalformedToken);
    }
    let tenant = TenantName::parse(tenant).map_err(|_| AuthError::MalformedToken)?;
    Ok(TokenParts {
        tenant,
        digest: TokenDigest::of(token),
    })
}

/// One stored credential of the tenant a token names.
pub struct Credential<'a> {
    /// Stored digest.
    pub digest: &'a TokenDigest,
    /// Workspace of the token.
    pub workspace: &'a str,
    /// Role of the token.
    pub role: Role,
    /// The token's tool allowlist (`None`: every tool its role allows).
    pub allowed_tools: Option<&'a [String]>,
    /// The token's datasource allowlist (`None`: every datasource of its workspace).
    pub allowed_datasources: Option<&'a [String]>,
}

impl TokenParts {
    /// Verifies the token against the tenant's stored credentials (every digest is
    /// compared, in constant time) and makes the request's Boundary.
    pub fn authenticate<'a>(
        self,
        creds: impl IntoIterator<Item = Credential<'a>>,
        incarnation: &str,
    ) -> Result<Boundary, AuthError> {
        type Found = (String, Role, Option<Vec<String>>, Option<Vec<String>>);
        let mut found: Option<Found> = None;
        for c in creds {
            if c.digest.ct_eq(&self.digest) {
                found = Some((
                    c.workspace.to_string(),
                    c.role,
                    c.allowed_tools.map(<[String]>::to_vec),
                    c.allowed_datasources.map(<[String]>::to_vec),
                ));
            }
        }
        let (workspace, role, allowed_tools, allowed_datasources) =
            found.ok_or(AuthError::UnknownToken)?;
        let actor = TokenId::for_digest(&self.tenant, &self.digest);
        Ok(Boundary {
            tenant: self.tenant,
            workspace,
            actor,
            role,
            allowed_tools,
            allowed_datasources,
            trace_id: trace_id(),
            incarnation: incarnation.to_string(),
        })
    }
}

/// A freshly made admin key.
pub struct AdminKey {
    /// `ak_<id>_<32 hex>`, written to `<state>/admin.key` (0600) for the CLI.
    pub key: String,
    /// `ak_<id>`.
    pub id: String,
    /// Stored digest.
    pub digest: TokenDigest,
}

/// Makes the admin key at first start.
pub fn issue_admin_key() -> Result<AdminKey, AuthError> {
    let id = random_hex16()?[..8].to_string();
    let key = format!("ak_{id}_{}", random_hex16()?);
    let digest = TokenDigest::of(&key);
    Ok(AdminKey {
        key,
        id: format!("ak_{id}"),
        digest,
    })
}

/// The digest of an admin key as presented (for comparing with the stored one).
pub fn admin_key_digest(presented: &str) -> TokenDigest {
    TokenDigest::of(presented)
}

/// Verifies an admin bearer header against the stored digest.
pub fn admin_session(
    header: Option<&[u8]>,
    id: &str,
    stored: &TokenDigest,
) -> Result<AdminSession, AuthError> {
    let raw = header.ok_or(AuthError::MissingToken)?;
    let raw = std::str::from_utf8(raw)
        .map_err(|_| AuthError::MalformedToken)?
        .trim();
    let key = raw.strip_prefix("Bearer ").unwrap_or(raw).trim();
    let rest = key.strip_prefix("ak_").ok_or(AuthError::MalformedToken)?;
    let (_, secret) = rest.rsplit_once('_').ok_or(AuthError::MalformedToken)?;
    if !is_hex32(secret) {
        return Err(AuthError::MalformedToken);
    }
    if !TokenDigest::of(key).ct_eq(stored) {
        return Err(AuthError::UnknownToken);
    }
    Ok(AdminSession {
        actor: id.to_string(),
        trace_id: trace_id(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_parse_and_authenticate() {
        let t = TenantName::parse("acme").unwrap();
        let issued = issue_token(&t).unwrap();
        assert!(
            issued.token.starts_with("tk_acme_") && issued.token.len() == "tk_acme_".len() + 32
        );
        assert_eq!(
            issued.id.as_str(),
            format!("tk_acme_{}", &issued.digest.hex()[..8])
        );
        let header = format!("Bearer {}", issued.token);
        let other = issue_token(&t).unwrap();
        let creds = || {
            vec![
                Credential {
                    digest: &other.digest,
                    workspace: "w2",
                    role: Role::Viewer,
                    allowed_tools: None,
                    allowed_datasources: None,
                },
                Credential {
                    digest: &issued.digest,
                    workspace: "default",
                    role: Role::Owner,
                    allowed_tools: None,
                    allowed_datasources: None,
                },
            ]
        };
        let b = parse_bearer(Some(header.as_bytes()))
            .unwrap()
            .authenticate(creds(), "")
            .unwrap();
        assert_eq!(
            (b.tenant().as_str(), b.workspace(), b.role()),
            ("acme", "default", Role::Owner)
        );
        assert_eq!(b.actor(), &issued.id);
        assert_eq!(b.trace_id().len(), 32);
        // One changed hex digit fails.
        let mut forged = issued.token.clone();
        let last = forged.pop().unwrap();
        forged.push(if last == '0' { '1' } else { '0' });
        assert_eq!(
            parse_bearer(Some(forged.as_bytes()))
                .unwrap()
                .authenticate(creds(), "")
                .unwrap_err(),
            AuthError::UnknownToken
        );
    }

    #[test]
    fn malformed_tokens() {
        assert_eq!(parse_bearer(None).unwrap_err(), AuthError::MissingToken);
        for bad in [
            "",
            "Bearer",
            "Bearer tk_acme",
            "Bearer tk_acme_123",
            "Bearer tk_ACME_0123456789abcdef0123456789abcdef",
            "Bearer tk_acme_0123456789ABCDEF0123456789abcdef",
            "Basic abc",
            "Bearer ak_x_0123456789abcdef0123456789abcdef",
        ] {
            assert_eq!(
                parse_bearer(Some(bad.as_bytes())).unwrap_err(),
                AuthError::MalformedToken,
                "{bad}"
            );
        }
        assert_eq!(
            parse_bearer(Some(&[0xff, 0xfe])).unwrap_err(),
            AuthError::MalformedToken
        );
    }

    #[test]
    fn digest_hex_round_trip() {
        let d = TokenDigest::of("x");
        assert_eq!(TokenDigest::from_hex(&d.hex()), Some(d));
        assert_eq!(TokenDigest::from_hex("zz"), None);
    }

    #[test]
    fn admin_keys() {
        let k = issue_admin_key().unwrap();
        let h = format!("Bearer {}", k.key);
        assert_eq!(
            admin_session(Some(h.as_bytes()), &k.id, &k.digest)
                .unwrap()
                .actor(),
            k.id
        );
        let other = issue_admin_key().unwrap();
        assert!(
            admin_session(
                Some(format!("Bearer {}", other.key).as_bytes()),
                &k.id,
                &k.digest
            )
            .is_err()
        );
    }
}
