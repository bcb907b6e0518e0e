//! In-memory caches shared by all tenants, made safe to share by their keys: a
//! [`CacheKey`] can only be built by [`CacheKey::new`], from the caller's [`Boundary`]
//! (tenant, the tenant's incarnation, workspace and actor) plus what the entry depends
//! on. Two callers in different boundaries therefore never compute the same key, however
//! identical their requests are.
//!
//! Embeddings are not cached here: they live in each tenant's own database (see
//! `retrieval`), keyed by model and content digest, so they are per tenant by where they
//! are stored.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::auth::Boundary;

/// What a cached entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Search results.
    Search,
    /// An LLM response.
    Llm,
    /// A text's embedding (kept in the tenant's own database).
    Embedding,
}

/// A cache key: SHA-256 over the boundary, the kind and the entry's parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// The one way to make a key. Every field is length-prefixed, so no two different
    /// sequences of fields hash the same input.
    pub fn new(b: &Boundary, kind: Kind, parts: &[&[u8]]) -> CacheKey {
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(b.tenant().as_str().as_bytes());
        field(b.incarnation().as_bytes());
        field(b.workspace().as_bytes());
        field(b.actor().as_str().as_bytes());
        field(match kind {
            Kind::Search => b"search",
            Kind::Llm => b"llm",
            Kind::Embedding => b"embedding",
        });
        for p in parts {
            field(p);
        }
        CacheKey(h.finalize().into())
    }

    /// The key's bytes, where it is stored rather than held in memory.
    pub fn bytes(&self) -> [u8; 32] {
        self.0
    }
}

struct Entry<V> {
    value: V,
    tenant: String,
    expires: Instant,
    used: u64,
}

struct Inner<V> {
    entries: HashMap<CacheKey, Entry<V>>,
    /// Last use → key, least recent first.
    order: BTreeMap<u64, CacheKey>,
    clock: u64,
    hits: u64,
    misses: u64,
}

/// A bounded, least-recently-used cache with a lifetime per entry.
pub struct Cache<V> {
    cap: usize,
    inner: Mutex<Inner<V>>,
}

impl<V> std::fmt::Debug for Cache<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cache(cap={})", self.cap)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<V: Clone> Cache<V> {
    /// A cache of at most `cap` entries (0: caches nothing).
    pub fn new(cap: usize) -> Cache<V> {
        Cache {
            cap,
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                order: BTreeMap::new(),
                clock: 0,
                hits: 0,
                misses: 0,
            }),
        }
    }

    /// The live entry for `key`, if any.
    pub fn get(&self, key: &CacheKey) -> Option<V> {
        let mut g = lock(&self.inner);
        let inner = &mut *g;
        inner.clock += 1;
        let now = Instant::now();
        let Some(e) = inner.entries.get_mut(key) else {
            inner.misses += 1;
            return None;
        };
        if e.expires <= now {
            inner.order.remove(&e.used);
            inner.entries.remove(key);
            inner.misses += 1;
            return None;
        }
        inner.order.remove(&e.used);
        e.used = inner.clock;
        inner.order.insert(e.used, *key);
        inner.hits += 1;
        Some(e.value.clone())
    }

    /// Stores `value` for `ttl`, on behalf of `tenant` (so it can be purged with it).
    pub fn put(&self, key: CacheKey, tenant: &str, value: V, ttl: Duration) {
        if self.cap == 0 {
            return;
        }
        let mut g = lock(&self.inner);
        let inner = &mut *g;
        inner.clock += 1;
        if let Some(old) = inner.entries.remove(&key) {
            inner.order.remove(&old.used);
        }
        while inner.entries.len() >= self.cap {
            let Some((_, oldest)) = inner.order.pop_first() else {
                break;
            };
            inner.entries.remove(&oldest);
        }
        inner.order.insert(inner.clock, key);
        inner.entries.insert(
            key,
            Entry {
                value,
                tenant: tenant.to_string(),
                expires: Instant::now() + ttl,
                used: inner.clock,
            },
        );
    }

    /// Drops every entry stored for `tenant` (it is being deleted).
    pub fn purge(&self, tenant: &str) {
        let mut g = lock(&self.inner);
        let inner = &mut *g;
        let gone: Vec<(CacheKey, u64)> = inner
            .entries
            .iter()
            .filter(|(_, e)| e.tenant == tenant)
            .map(|(k, e)| (*k, e.used))
            .collect();
        for (k, used) in gone {
            inner.entries.remove(&k);
            inner.order.remove(&used);
        }
    }

    /// Entries held, hits and misses so far.
    pub fn stats(&self) -> (usize, u64, u64) {
        let g = lock(&self.inner);
        (g.entries.len(), g.hits, g.misses)
    }
}

/// SHA-256 of `bytes`, for the parts of a key.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> CacheKey {
        CacheKey([n; 32])
    }

    #[test]
    fn least_recently_used_goes_first_and_expired_entries_are_misses() {
        let c: Cache<u32> = Cache::new(2);
        let long = Duration::from_secs(60);
        c.put(key(1), "a", 1, long);
        c.put(key(2), "a", 2, long);
        assert_eq!(c.get(&key(1)), Some(1));
        c.put(key(3), "b", 3, long);
        assert_eq!(c.get(&key(2)), None, "2 was least recently used");
        assert_eq!(c.get(&key(1)), Some(1));
        assert_eq!(c.get(&key(3)), Some(3));
        c.put(key(4), "a", 4, Duration::ZERO);
        assert_eq!(c.get(&key(4)), None);
        c.purge("a");
        assert_eq!(c.get(&key(1)), None);
        assert_eq!(c.get(&key(3)), Some(3));
        assert_eq!(c.stats().0, 1);
        let none: Cache<u32> = Cache::new(0);
        none.put(key(1), "a", 1, long);
        assert_eq!(none.get(&key(1)), None);
    }
}
