//! The embedded backend: a bounded moka cache (TinyLFU admission, LRU
//! eviction) with a TTL per entry. Expired entries are never returned and
//! are reclaimed by moka's housekeeping.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::sync::Cache as Moka;
use moka::Expiry;

use super::{Backend, Bytes};
use crate::error::Result;

/// Limits of the in-memory backend, see [`CacheBuilder::memory`](crate::CacheBuilder::memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryConfig {
    /// How many entries it holds at most; past that, the least valuable are
    /// evicted. Default 100 000.
    pub max_entries: u64,
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
    ttl: Duration,
}

/// Each entry expires after its own TTL, counted from its latest write.
struct PerEntryTtl;

impl Expiry<String, Entry> for PerEntryTtl {
    fn expire_after_create(&self, _key: &String, entry: &Entry, _at: Instant) -> Option<Duration> {
        Some(entry.ttl)
    }

    fn expire_after_update(
        &self,
        _key: &String,
        entry: &Entry,
        _at: Instant,
        _remaining: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

pub(crate) struct MemoryBackend {
    entries: Moka<String, Entry>,
}

impl std::fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("entries", &self.entries.entry_count())
            .finish()
    }
}

impl MemoryBackend {
    pub(crate) fn new(config: MemoryConfig) -> Self {
        MemoryBackend {
            entries: Moka::builder()
                .max_capacity(config.max_entries)
                .expire_after(PerEntryTtl)
                .build(),
        }
    }

    /// Runs moka's pending housekeeping now (evictions, expirations); used
    /// by memory measurements that want a settled count.
    #[doc(hidden)]
    pub(crate) fn run_pending_tasks(&self) {
        self.entries.run_pending_tasks();
    }

    pub(crate) fn entry_count(&self) -> u64 {
        self.entries.entry_count()
    }
}

impl Backend for MemoryBackend {
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        Ok(self.entries.get(key).map(|e| Bytes::Shared(e.bytes)))
    }

    async fn set(&self, key: &str, value: Arc<[u8]>, ttl: Duration) -> Result<()> {
        self.entries
            .insert(key.to_owned(), Entry { bytes: value, ttl });
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.entries.invalidate(key);
        Ok(())
    }
}
