//! The embedded backend: a bounded `quick_cache` (S3-FIFO eviction, which
//! keeps frequently read entries over one-hit wonders) with a TTL per entry.
//!
//! An expired entry is never returned: a read that finds one removes it.
//! Expired entries nobody reads are reclaimed by a sweep that runs after
//! every `max_entries / 4` writes, so they cost at most the bound's memory
//! for a short while, never more.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quick_cache::sync::Cache as Store;

use super::{Backend, Bytes};
use crate::error::Result;

/// Limits of the in-memory backend, see [`CacheBuilder::memory`](crate::CacheBuilder::memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryConfig {
    /// How many entries it holds at most; past that, the least valuable are
    /// evicted. Default 100 000.
    pub max_entries: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            max_entries: 100_000,
        }
    }
}

#[derive(Clone)]
struct Entry {
    bytes: Arc<[u8]>,
    expires_at: Instant,
}

pub(crate) struct MemoryBackend {
    entries: Store<String, Entry>,
    writes: AtomicU64,
    sweep_every: u64,
}

impl std::fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("entries", &self.entries.len())
            .field("capacity", &self.entries.capacity())
            .finish()
    }
}

impl MemoryBackend {
    pub(crate) fn new(config: MemoryConfig) -> Self {
        let capacity = config.max_entries.max(1);
        MemoryBackend {
            entries: Store::new(capacity),
            writes: AtomicU64::new(0),
            sweep_every: (capacity as u64 / 4).max(64),
        }
    }

    /// Removes every expired entry.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        self.entries.retain(|_, entry| entry.expires_at > now);
    }

    pub(crate) fn entry_count(&self) -> usize {
        self.entries.len()
    }
}

impl Backend for MemoryBackend {
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let Some(entry) = self.entries.get(key) else {
            return Ok(None);
        };
        if entry.expires_at > Instant::now() {
            return Ok(Some(Bytes::Shared(entry.bytes)));
        }
        // Remove only the entry we saw: a fresh write may have replaced it.
        self.entries
            .remove_if(key, |current| Arc::ptr_eq(&current.bytes, &entry.bytes));
        Ok(None)
    }

    async fn set(&self, key: &str, value: Arc<[u8]>, ttl: Duration) -> Result<()> {
        let now = Instant::now();
        // A TTL too long for the clock is as good as forever.
        let expires_at = now
            .checked_add(ttl)
            .unwrap_or(now + Duration::from_secs(100 * 365 * 86_400));
        self.entries.insert(
            key.to_owned(),
            Entry {
                bytes: value,
                expires_at,
            },
        );
        if self.writes.fetch_add(1, Ordering::Relaxed) % self.sweep_every == self.sweep_every - 1 {
            self.sweep();
        }
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.entries.remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(s: &str) -> Arc<[u8]> {
        Arc::from(s.as_bytes())
    }

    #[tokio::test]
    async fn entries_expire_and_are_swept() {
        let m = MemoryBackend::new(MemoryConfig { max_entries: 100 });
        m.set("short", bytes("a"), Duration::from_millis(20))
            .await
            .unwrap();
        m.set("long", bytes("b"), Duration::from_secs(60))
            .await
            .unwrap();
        assert!(m.get("short").await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(m.get("short").await.unwrap().is_none(), "expired");
        m.set("unread", bytes("c"), Duration::from_millis(1))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        m.sweep();
        assert_eq!(m.entry_count(), 1, "only the unexpired entry is left");
    }

    #[tokio::test]
    async fn a_rewrite_takes_the_new_ttl() {
        let m = MemoryBackend::new(MemoryConfig::default());
        m.set("k", bytes("a"), Duration::from_millis(10))
            .await
            .unwrap();
        m.set("k", bytes("b"), Duration::from_secs(60))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(m.get("k").await.unwrap().as_deref(), Some(&b"b"[..]));
    }

    #[tokio::test]
    async fn size_stays_bounded() {
        let m = MemoryBackend::new(MemoryConfig { max_entries: 1000 });
        for i in 0..20_000 {
            m.set(&format!("k{i}"), bytes("v"), Duration::from_secs(60))
                .await
                .unwrap();
        }
        assert!(m.entry_count() <= 1000, "{}", m.entry_count());
    }
}
