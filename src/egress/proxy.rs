//! The egress proxy: an HTTP proxy (`CONNECT` for TLS, absolute-form requests for plain
//! HTTP) served by the daemon on a socket that listens inside a tenant's network
//! namespace. Each connection is checked against the tenant's allowlist, the name is
//! resolved here on the host and the addresses checked again, bytes are counted against
//! the tenant's limit both ways, and one audit record is made per connection. Payloads
//! are never looked at past the request head and never logged.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::allowlist::{Allowlist, Verdict};

/// The largest request head read.
const MAX_HEAD: usize = 16 * 1024;
/// Time for the client to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for the name to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for the upstream connection to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A tunnel with no bytes either way for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Connections one tenant's proxy serves at once; more are answered 429.
const MAX_CONNECTIONS: usize = 256;
/// Name lookups in flight for one tenant, and for all tenants: each holds a thread of the
/// runtime's blocking pool until the resolver answers, which a slow resolver can make
/// long, and that pool also serves the daemon's own file and admin work.
const MAX_LOOKUPS: usize = 8;
static ALL_LOOKUPS: Semaphore = Semaphore::const_new(32);
/// How often an open connection checks that its destination is still allowed (egress
/// removed or narrowed, tenant frozen, daemon halted).
const RECHECK: Duration = Duration::from_secs(1);

/// What the proxy needs from the daemon for one tenant.
pub trait Tenant: Send + Sync + 'static {
    /// The tenant's allowlist now (limits may change while the proxy runs); `None`:
    /// egress is off.
    fn allowlist(&self) -> Option<Allowlist>;
    /// Grants up to `want` more bytes under the tenant's egress byte limit (all of them
    /// when it has none); fewer means the limit is reached.
    fn take_bytes(&self, want: u64) -> u64;
    /// Whether any bytes are left under that limit.
    fn has_bytes(&self) -> bool;
    /// Takes one new connection from the tenant's connection rate; `false`: over it.
    fn admit(&self) -> bool;
    /// Records one connection.
    fn audit(&self, record: Connection);
}

/// One audited connection: no payload, no headers.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Connection {
    /// `connect` (a tunnel) or `http` (one plain request).
    pub kind: String,
    /// `host:port` as the sandbox asked for it.
    pub destination: String,
    /// The address connected to.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub address: Option<String>,
    /// Bytes from the sandbox to the destination.
    pub bytes_up: u64,
    /// Bytes from the destination to the sandbox.
    pub bytes_down: u64,
    /// `ok`, `denied`, `error` or `cut` (the byte limit ended it).
    pub outcome: String,
    /// Why it was refused or ended.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason_code: Option<String>,
    /// Connections refused over the tenant's connection rate since the last audited one
    /// (not audited one by one, so that a flood cannot fill the disk with audit lines).
    #[serde(skip_serializing_if = "is_zero", default)]
    pub suppressed: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A refusal, answered to the sandbox as an HTTP error.
struct Refusal {
    status: u16,
    code: &'static str,
    message: String,
}

fn refuse(status: u16, code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        code,
        message: message.into(),
    }
}

/// Serves `listener` until the task is aborted (the tenant's cell went away, or its
/// egress was revoked and a new cell made); aborting it ends every connection it serves.
pub async fn serve(listener: TcpListener, tenant: Arc<dyn Tenant>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let lookups = Arc::new(Semaphore::new(MAX_LOOKUPS));
    let suppressed = Arc::new(AtomicU64::new(0));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "egress proxy: accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            // Reap finished connections as they end.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let refusal = if !tenant.admit() {
            Some(refuse(
                429,
                "rate_limited",
                "too many new egress connections per second",
            ))
        } else {
            None
        };
        let permit = match refusal {
            None => slots.clone().try_acquire_owned().ok(),
            Some(_) => None,
        };
        let Some(permit) = permit else {
            suppressed.fetch_add(1, Ordering::Relaxed);
            let r = refusal.unwrap_or_else(|| {
                refuse(429, "rate_limited", "too many egress connections at once")
            });
            connections.spawn(async move {
                let mut stream = stream;
                answer(&mut stream, &r).await;
            });
            continue;
        };
        let (tenant, lookups, suppressed) = (tenant.clone(), lookups.clone(), suppressed.clone());
        connections.spawn(async move {
            handle(stream, &*tenant, &lookups, &suppressed).await;
            drop(permit);
        });
    }
}

/// The request head: what the sandbox asked for.
struct Head {
    connect: bool,
    host: String,
    port: u16,
    /// For plain HTTP: the request to send upstream (origin-form, `Connection: close`).
    forward: Vec<u8>,
    /// Bytes after the head (a body, or the start of a TLS handshake).
    rest: Vec<u8>,
}

async fn handle(
    mut client: TcpStream,
    tenant: &dyn Tenant,
    lookups: &Semaphore,
    suppressed: &AtomicU64,
) {
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let mut record = Connection {
        kind: "connect".into(),
        outcome: "ok".into(),
        ..Default::default()
    };
    let result = proxy(&mut client, tenant, lookups, &mut record, &up, &down).await;
    record.bytes_up = up.load(Ordering::Relaxed);
    record.bytes_down = down.load(Ordering::Relaxed);
    match result {
        Ok(Ended::Eof) => {}
        Ok(Ended::Cut(code)) => {
            record.outcome = "cut".into();
            record.reason_code = Some(code.into());
        }
        Ok(Ended::Failed) => {
            record.outcome = "error".into();
            record.reason_code = Some("egress_connection_failed".into());
        }
        Err(None) => return,
        Err(Some(r)) => {
            record.outcome = if r.status == 403 { "denied" } else { "error" }.into();
            record.reason_code = Some(r.code.into());
            answer(&mut client, &r).await;
        }
    }
    record.suppressed = suppressed.swap(0, Ordering::Relaxed);
    tenant.audit(record);
}

/// Runs one connection; `Err(None)`: the client went away before asking for anything
/// (nothing to audit).
async fn proxy(
    client: &mut TcpStream,
    tenant: &dyn Tenant,
    lookups: &Semaphore,
    record: &mut Connection,
    up: &AtomicU64,
    down: &AtomicU64,
) -> Result<Ended, Option<Refusal>> {
    let head = read_head(client).await?;
    if !head.connect {
        record.kind = "http".into();
    }
    record.destination = if head.host.contains(':') {
        format!("[{}]:{}", head.host, head.port)
    } else {
        format!("{}:{}", head.host, head.port)
    };
    let allow = tenant
        .allowlist()
        .ok_or_else(|| refuse(403, "egress_off", "egress is not enabled for this tenant"))?;
    if allow.check(&head.host, head.port) == Verdict::NotListed {
        return Err(Some(refuse(
            403,
            "egress_denied",
            format!(
                "{} is not in this tenant's egress allowlist",
                record.destination
            ),
        )));
    }
    if !tenant.has_bytes() {
        return Err(Some(refuse(
            403,
            "egress_quota_exceeded",
            "the tenant's egress byte limit is used up",
        )));
    }
    let addresses = resolve(&head.host, head.port, lookups).await?;
    let allowed: Vec<SocketAddr> = addresses
        .iter()
        .copied()
        .filter(|a| allow.may_connect(&head.host, head.port, a.ip()))
        .collect();
    let Some(first) = allowed.first() else {
        let shown = addresses
            .first()
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        return Err(Some(refuse(
            403,
            "egress_private_address",
            format!(
                "{} resolves to {shown}, a private, loopback or link-local address; only an allowlist entry naming that address allows it",
                head.host
            ),
        )));
    };
    let mut upstream = None;
    for addr in &allowed {
        if let Ok(Ok(s)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            record.address = Some(addr.to_string());
            upstream = Some((s, *addr));
            break;
        }
    }
    let Some((upstream, addr)) = upstream else {
        return Err(Some(refuse(
            502,
            "egress_connect_failed",
            format!("cannot connect to {} ({first})", record.destination),
        )));
    };
    let _nodelay = upstream.set_nodelay(true);
    let first_up = if head.connect {
        // The tunnel is open; the client's TLS starts now.
        let ok = b"HTTP/1.1 200 Connection established\r\n\r\n";
        if client.write_all(ok).await.is_err() {
            return Ok(Ended::Failed);
        }
        head.rest
    } else {
        let mut f = head.forward;
        f.extend_from_slice(&head.rest);
        f
    };
    // Still allowed: the tenant's allowlist (or the tenant) may change while this runs.
    let still = || {
        tenant.allowlist().is_some_and(|a| {
            a.check(&head.host, head.port) == Verdict::Allowed
                && a.may_connect(&head.host, head.port, addr.ip())
        })
    };
    Ok(tunnel(client, upstream, tenant, first_up, up, down, &still).await)
}

async fn read_head(client: &mut TcpStream) -> Result<Head, Option<Refusal>> {
    let mut buf = Vec::with_capacity(2048);
    let read = async {
        loop {
            if buf.len() >= MAX_HEAD {
                return Err(Some(refuse(431, "too_large", "request head too large")));
            }
            let mut chunk = [0u8; 2048];
            let n = client.read(&mut chunk).await.map_err(|_| None)?;
            if n == 0 {
                return Err(None);
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(());
            }
        }
    };
    match tokio::time::timeout(HEAD_TIMEOUT, read).await {
        Ok(r) => r?,
        Err(_) => return Err(Some(refuse(408, "timeout", "request head too slow"))),
    }
    let bad = |why: &str| Some(refuse(400, "bad_request", why.to_string()));
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(&buf) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err(bad("malformed request head")),
    };
    let method = req.method.unwrap_or_default();
    let target = req.path.unwrap_or_default();
    let rest = buf[len..].to_vec();
    if method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = authority(target, None).ok_or_else(|| bad("CONNECT needs host:port"))?;
        return Ok(Head {
            connect: true,
            host,
            port,
            forward: Vec::new(),
            rest,
        });
    }
    let Some(after) = target
        .get(..7)
        .filter(|s| s.eq_ignore_ascii_case("http://"))
        .map(|_| &target[7..])
    else {
        return Err(bad(
            "only CONNECT and absolute http:// URLs are proxied (use CONNECT for https)",
        ));
    };
    let (auth, path) = match after.find(['/', '?']) {
        Some(i) => (&after[..i], &after[i..]),
        None => (after, "/"),
    };
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    if auth.contains('@') {
        return Err(bad("credentials in the URL are not proxied"));
    }
    let (host, port) = authority(auth, Some(80)).ok_or_else(|| bad("bad URL authority"))?;
    let mut forward = format!("{method} {path} HTTP/1.1\r\n").into_bytes();
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        if matches!(
            name.as_str(),
            "proxy-connection"
                | "proxy-authorization"
                | "connection"
                | "keep-alive"
                | "te"
                | "upgrade"
        ) {
            continue;
        }
        forward.extend_from_slice(h.name.as_bytes());
        forward.extend_from_slice(b": ");
        forward.extend_from_slice(h.value);
        forward.extend_from_slice(b"\r\n");
    }
    if !req
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("host"))
    {
        forward.extend_from_slice(format!("Host: {auth}\r\n").as_bytes());
    }
    forward.extend_from_slice(b"Connection: close\r\n\r\n");
    Ok(Head {
        connect: false,
        host,
        port,
        forward,
        rest,
    })
}

/// `host:port`, `[v6]:port`, or a bare host when `default_port` is given.
fn authority(s: &str, default_port: Option<u16>) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port?,
            None => return None,
        };
        (h, port)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().ok()?),
            None => (s, default_port?),
        }
    };
    if host.is_empty() || port == 0 || host.len() > 253 {
        return None;
    }
    if !host.contains(':')
        && !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    {
        return None;
    }
    Some((host.to_ascii_lowercase(), port))
}

async fn resolve(
    host: &str,
    port: u16,
    lookups: &Semaphore,
) -> Result<Vec<SocketAddr>, Option<Refusal>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let failed = |why: String| {
        Some(refuse(
            502,
            "egress_dns_failed",
            format!("cannot resolve {host}: {why}"),
        ))
    };
    let lookup = async {
        let _mine = lookups.acquire().await;
        let _all = ALL_LOOKUPS.acquire().await;
        // The lookup keeps its blocking thread until the resolver answers even if this
        // wait ends first; the permits go with this future, so at most 32 can linger.
        tokio::net::lookup_host((host, port)).await
    };
    match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
        Ok(Ok(addrs)) => {
            let v: Vec<SocketAddr> = addrs.collect();
            if v.is_empty() {
                Err(failed("no addresses".into()))
            } else {
                Ok(v)
            }
        }
        Ok(Err(e)) => Err(failed(e.to_string())),
        Err(_) => Err(failed("timed out".into())),
    }
}

/// Copies both ways until both sides finish, one fails, the byte limit is reached, or
/// the destination stops being allowed; the counters hold what went through either way.
async fn tunnel(
    client: &mut TcpStream,
    upstream: TcpStream,
    tenant: &dyn Tenant,
    first_up: Vec<u8>,
    up: &AtomicU64,
    down: &AtomicU64,
    still_allowed: &(dyn Fn() -> bool + Sync),
) -> Ended {
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.into_split();
    let to_upstream = copy_counted(&mut cr, &mut uw, tenant, first_up, up);
    let to_client = copy_counted(&mut ur, &mut cw, tenant, Vec::new(), down);
    tokio::pin!(to_upstream, to_client);
    let mut recheck = tokio::time::interval(RECHECK);
    recheck.tick().await;
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        let ended = tokio::select! {
            e = &mut to_upstream, if !up_done => { up_done = true; e }
            e = &mut to_client, if !down_done => { down_done = true; e }
            _ = recheck.tick() => {
                if still_allowed() {
                    continue;
                }
                Ended::Cut("egress_revoked")
            }
        };
        match ended {
            Ended::Eof => {}
            other => return other,
        }
    }
    Ended::Eof
}

/// How one direction (or the whole connection) ended.
enum Ended {
    Eof,
    Failed,
    Cut(&'static str),
}

async fn copy_counted<R, W>(
    r: &mut R,
    w: &mut W,
    tenant: &dyn Tenant,
    first: Vec<u8>,
    count: &AtomicU64,
) -> Ended
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if !first.is_empty()
        && let Some(e) = send_counted(w, &first, tenant, count).await
    {
        return e;
    }
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match tokio::time::timeout(IDLE_TIMEOUT, r.read(&mut buf)).await {
            Ok(Ok(0)) => {
                let _closed = w.shutdown().await;
                return Ended::Eof;
            }
            Ok(Ok(n)) => n,
            Ok(Err(_)) | Err(_) => return Ended::Failed,
        };
        if let Some(e) = send_counted(w, &buf[..n], tenant, count).await {
            return e;
        }
    }
}

/// Writes as much of `bytes` as the byte limit grants; `Some` when that was not all, or
/// the write failed.
async fn send_counted<W: AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
    tenant: &dyn Tenant,
    count: &AtomicU64,
) -> Option<Ended> {
    let granted = (tenant.take_bytes(bytes.len() as u64) as usize).min(bytes.len());
    if granted > 0 {
        if w.write_all(&bytes[..granted]).await.is_err() {
            return Some(Ended::Failed);
        }
        count.fetch_add(granted as u64, Ordering::Relaxed);
    }
    (granted < bytes.len()).then_some(Ended::Cut("egress_quota_exceeded"))
}

/// Answers a refusal as a small HTTP response and closes.
async fn answer(client: &mut TcpStream, r: &Refusal) {
    let body = format!("bulkhead egress proxy: {}\n", r.message);
    let reason = match r.status {
        400 => "Bad Request",
        403 => "Forbidden",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        _ => "Bad Gateway",
    };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nX-Bulkhead-Reason: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        r.code,
        body.len()
    );
    let _sent = client.write_all(head.as_bytes()).await;
    let _sent = client.write_all(body.as_bytes()).await;
    let _closed = client.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        assert_eq!(
            authority("pypi.org:443", None),
            Some(("pypi.org".into(), 443))
        );
        assert_eq!(
            authority("Example.COM", Some(80)),
            Some(("example.com".into(), 80))
        );
        assert_eq!(authority("[::1]:8080", None), Some(("::1".into(), 8080)));
        assert_eq!(authority("pypi.org", None), None);
        assert_eq!(authority("a b:1", None), None);
        assert_eq!(authority("x:0", None), None);
        assert_eq!(authority("x:99999", None), None);
    }
}
