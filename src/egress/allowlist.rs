//! Egress allowlists: `host:port` patterns an admin grants a tenant, and the address
//! rules applied after the host side resolves a name.

use std::net::IpAddr;

/// The longest pattern accepted (a DNS name is at most 253 bytes, plus `:port`).
const MAX_PATTERN: usize = 260;
/// Patterns per tenant.
pub const MAX_PATTERNS: usize = 256;

/// The host part of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    /// One name, lower-case, without a trailing dot.
    Name(String),
    /// `*.suffix`: any name ending in `.suffix` (not `suffix` itself).
    Subdomains(String),
    /// An address literal. Only a literal lets a connection reach a private, loopback or
    /// link-local address.
    Address(IpAddr),
}

/// One allowed destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    host: Host,
    port: u16,
}

/// A tenant's allowed destinations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    rules: Vec<Rule>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Splits `host:port` (`[v6]:port` for IPv6 literals).
fn split_host_port(s: &str) -> Option<(&str, &str)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, port) = rest.split_once("]:")?;
        return Some((host, port));
    }
    s.rsplit_once(':')
}

impl Rule {
    /// Parses `host:port`, `*.domain:port` or `address:port` (`[v6]:port`).
    pub fn parse(pattern: &str) -> Result<Rule, String> {
        let bad = |why: &str| format!("egress pattern {pattern:?}: {why}");
        if pattern.len() > MAX_PATTERN {
            return Err(bad("too long"));
        }
        let (host, port) = split_host_port(pattern).ok_or_else(|| bad("expected host:port"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| bad("the port must be 1..=65535"))?;
        let host = if let Ok(ip) = host.parse::<IpAddr>() {
            Host::Address(ip)
        } else if let Some(suffix) = host.strip_prefix("*.") {
            let suffix = suffix.to_ascii_lowercase();
            if !valid_name(&suffix) || !suffix.contains('.') {
                return Err(bad("a wildcard needs a domain of two or more labels"));
            }
            Host::Subdomains(suffix)
        } else {
            let name = host.to_ascii_lowercase();
            if !valid_name(&name) {
                return Err(bad("not a host name or address"));
            }
            Host::Name(name)
        };
        Ok(Rule { host, port })
    }

    fn matches(&self, host: &str, port: u16) -> bool {
        if self.port != port {
            return false;
        }
        match &self.host {
            Host::Name(n) => host == n,
            Host::Subdomains(s) => host
                .strip_suffix(s.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            Host::Address(a) => host.parse::<IpAddr>().is_ok_and(|h| h == *a),
        }
    }

    /// Whether the rule names `ip` itself (the only way to reach a non-public address).
    fn names_address(&self, ip: IpAddr) -> bool {
        self.host == Host::Address(ip)
    }
}

/// How a requested destination fares against the allowlist.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A rule lists `host:port` (the addresses it resolves to are checked next).
    Allowed,
    /// No rule matches `host:port`.
    NotListed,
}

impl Allowlist {
    /// Parses every pattern (at most [`MAX_PATTERNS`]).
    pub fn parse<S: AsRef<str>>(patterns: &[S]) -> Result<Allowlist, String> {
        if patterns.len() > MAX_PATTERNS {
            return Err(format!("egress: at most {MAX_PATTERNS} patterns"));
        }
        let rules = patterns
            .iter()
            .map(|p| Rule::parse(p.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(Allowlist { rules })
    }

    /// Whether `host:port` (host as the client named it) is listed.
    pub fn check(&self, host: &str, port: u16) -> Verdict {
        let host = normalize(host);
        if self.rules.iter().any(|r| r.matches(&host, port)) {
            Verdict::Allowed
        } else {
            Verdict::NotListed
        }
    }

    /// Whether a connection to `ip` may be made for `host:port`: public addresses always
    /// (the name was listed), others only when a matching rule names that very address.
    /// This is what stops a listed name that resolves to a private address (DNS
    /// rebinding) from reaching the host's or the LAN's services.
    pub fn may_connect(&self, host: &str, port: u16, ip: IpAddr) -> bool {
        if is_public(ip) && !is_local(ip) {
            return true;
        }
        let host = normalize(host);
        self.rules
            .iter()
            .any(|r| r.matches(&host, port) && r.names_address(ip))
    }
}

fn normalize(host: &str) -> String {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// A globally routable unicast address: not loopback, private, link-local, shared
/// (CGNAT), unspecified, multicast, broadcast, documentation, benchmarking, IETF protocol
/// assignments or 6to4 relay space, nor an IPv6 form that embeds or tunnels an IPv4
/// address (mapped, compatible, NAT64, 6to4, Teredo) or is site-local or unique-local.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b == 18 || b == 19))
                || (a == 192 && b == 0 && c == 0)
                || (a == 192 && b == 88 && c == 99)
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || s[..6] == [0; 6]
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
                || s[0] == 0x2002
                || (s[0] == 0x2001 && s[1] == 0)
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || (s[0] == 0x0064 && s[1] == 0xff9b))
        }
    }
}

/// Whether `ip` is one of this host's own addresses (any interface): a listed name that
/// resolves to the host itself must not reach the host's services, public address or
/// not. The set is read again at most every 5 seconds.
pub fn is_local(ip: IpAddr) -> bool {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    static CACHE: Mutex<Option<(Instant, Vec<IpAddr>)>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    let stale = cache
        .as_ref()
        .is_none_or(|(at, _)| at.elapsed() > Duration::from_secs(5));
    if stale {
        let addrs = nix::ifaddrs::getifaddrs()
            .map(|all| {
                all.filter_map(|i| i.address)
                    .filter_map(|a| {
                        a.as_sockaddr_in()
                            .map(|v4| IpAddr::V4(v4.ip()))
                            .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                    })
                    .collect()
            })
            .unwrap_or_default();
        *cache = Some((Instant::now(), addrs));
    }
    cache.as_ref().is_some_and(|(_, addrs)| addrs.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_parse_and_match() {
        let l = Allowlist::parse(&["pypi.org:443", "*.github.com:443", "127.0.0.1:8080"]).unwrap();
        assert_eq!(l.check("pypi.org", 443), Verdict::Allowed);
        assert_eq!(l.check("PyPI.org.", 443), Verdict::Allowed);
        assert_eq!(l.check("pypi.org", 80), Verdict::NotListed);
        assert_eq!(l.check("evilpypi.org", 443), Verdict::NotListed);
        assert_eq!(l.check("api.github.com", 443), Verdict::Allowed);
        assert_eq!(l.check("github.com", 443), Verdict::NotListed);
        assert_eq!(l.check("xgithub.com", 443), Verdict::NotListed);
        assert_eq!(l.check("127.0.0.1", 8080), Verdict::Allowed);
        for bad in [
            "pypi.org",
            "pypi.org:0",
            "pypi.org:65536",
            "*.com:443",
            "*:443",
            "a b:1",
            "-x.org:1",
            ":443",
            "[::1:443",
        ] {
            assert!(Rule::parse(bad).is_err(), "{bad}");
        }
        assert!(Rule::parse("[::1]:443").is_ok());
    }

    #[test]
    fn private_addresses_need_a_literal_rule() {
        let l = Allowlist::parse(&["localhost:8080", "127.0.0.1:9090", "pypi.org:443"]).unwrap();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        // A listed name resolving to loopback: refused (rebinding).
        assert!(!l.may_connect("localhost", 8080, lo));
        assert!(!l.may_connect("pypi.org", 443, "10.0.0.5".parse().unwrap()));
        assert!(l.may_connect("pypi.org", 443, "151.101.0.223".parse().unwrap()));
        // The literal itself: allowed, on its port only.
        assert!(l.may_connect("127.0.0.1", 9090, lo));
        assert!(!l.may_connect("127.0.0.1", 8080, lo));
        for ip in [
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "192.168.1.1",
            "172.16.0.1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "192.0.0.8",
            "192.88.99.1",
            "fec0::1",
            "2002:7f00:1::1",
            "2001:0:4136:e378::1",
            "::7f00:1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        assert!(is_public("2a00:1450::1".parse().unwrap()));
        assert!(is_local("127.0.0.1".parse().unwrap()));
    }
}
