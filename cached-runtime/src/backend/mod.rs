//! Where entries live: Redis, or an embedded in-memory store with the same
//! semantics. Both speak [`Backend`]; [`AnyBackend`] picks one at run time.
//!
//! May import `near` (the Redis backend fills the near tier from its
//! tracking connection), `encoding`, `observe` and the leaves.

mod memory;
mod redis;

use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use self::memory::MemoryBackend;
pub use self::memory::MemoryConfig;
pub(crate) use self::redis::{
    Buried, ClusterTarget, DeadLetter, JournalKeys, JournalPut, Journaled, Landing, RedisBackend,
    Release, SentinelTarget, Signed, Target, Tracker, MASTER_NUMBERS,
};
use crate::error::Result;

/// An entry's bytes as a backend hands them out.
#[derive(Debug, Clone)]
pub(crate) enum Bytes {
    Owned(Vec<u8>),
    Shared(Arc<[u8]>),
}

impl Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Owned(v) => v,
            Bytes::Shared(v) => v,
        }
    }
}

/// What a key held when it was read: a later store of the key only
/// happens if it still holds that (compare-and-set).
#[derive(Debug, Clone)]
pub(crate) enum Seen {
    Nothing,
    Bytes(Bytes),
    /// A value over the cache's `max_value_bytes`, not read whole: none of
    /// the cache's own (those are bounded), so a store replaces it only if
    /// the key still holds such a value.
    Oversized,
    /// The read failed: no store, since a stale set cannot be ruled out.
    Unknown,
}

/// One store of a conditional multi-store: `value` at `key` for `ttl`, if
/// the key still holds what was `seen`.
#[derive(Debug, Clone)]
pub(crate) struct StoreIf {
    pub(crate) key: String,
    pub(crate) seen: Seen,
    pub(crate) value: Arc<[u8]>,
    pub(crate) ttl: Duration,
}

/// What an attempt at a key's lock found.
#[derive(Debug)]
pub(crate) enum Acquire {
    /// Another entry landed at the key since it was read.
    Landed(Seen),
    /// The lock is ours; the key holds this now.
    Acquired(Seen),
    /// Another caller holds the lock: its token, if it still held it when
    /// the reply was made.
    Held(Option<Box<[u8]>>),
}

/// The operations the cache needs from a store. Errors are reported, never
/// retried here: the cache decides what a failure means.
pub(crate) trait Backend: Send + Sync {
    /// The entry at `key`, if any. With a `limit`, at most `limit + 1` of
    /// its bytes, so a stored value larger than `limit` is seen (and
    /// rejected) without being read whole.
    fn get(
        &self,
        key: &str,
        limit: Option<usize>,
    ) -> impl Future<Output = Result<Option<Bytes>>> + Send;
    /// Stores `value` at `key` for `ttl`, replacing what was there.
    fn set(
        &self,
        key: &str,
        value: Arc<[u8]>,
        ttl: Duration,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Stores `value` at `key` for `ttl` only if `key` still holds what
    /// was `seen` (never for [`Seen::Unknown`]); returns whether it stored.
    /// The compare and the write are one atomic step.
    fn set_if(
        &self,
        key: &str,
        seen: &Seen,
        value: Arc<[u8]>,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool>> + Send;
    /// [`Backend::set_if`] for each of `stores`, in one round trip (on a
    /// cluster, one script call per key, in parallel); whether each stored.
    fn set_many_if(&self, stores: &[StoreIf]) -> impl Future<Output = Result<Vec<bool>>> + Send;
    /// Adds each of `keys` to each tag set in `tag_keys`, each kept at
    /// least `ttl` (one round trip; on a cluster, one per tag set, in
    /// parallel).
    fn tag(
        &self,
        keys: &[String],
        tag_keys: &[String],
        ttl: Duration,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Up to `limit` members of the tag set with their record's expiry
    /// (Unix ms), soonest first (the in-memory backend: all of them).
    fn tagged(
        &self,
        tag_key: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(String, u64)>>> + Send;
    /// The entries at `keys`, in order (one round trip; on a cluster, one
    /// `MGET` per slot, in parallel). `limit` as for [`Backend::get`].
    fn get_many(
        &self,
        keys: &[String],
        limit: Option<usize>,
    ) -> impl Future<Output = Result<Vec<Option<Bytes>>>> + Send;
    /// Stores each entry at its key for `ttl`, replacing what was there
    /// (one round trip; on a cluster, one `SET` per key, in parallel).
    fn set_many(
        &self,
        entries: &[(String, Arc<[u8]>)],
        ttl: Duration,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Moves the tag set `tag_key` to `drain_key`, for an invalidation to
    /// drain, unless `drain_key` is still being drained (by an
    /// invalidation that started earlier, or one that failed): whether it
    /// moved (`true` too when there was nothing to move). Constant time,
    /// whatever the set's size.
    fn drain_tag(
        &self,
        tag_key: &str,
        drain_key: &str,
    ) -> impl Future<Output = Result<bool>> + Send;
    /// Removes from the tag set each member whose expiry is still the one
    /// given (a member recorded again meanwhile stays).
    fn untag(
        &self,
        tag_key: &str,
        members: &[(String, u64)],
    ) -> impl Future<Output = Result<()>> + Send;
}

// One per cache, inside its `Arc`: boxing the larger variant would only add
// an indirection to every Redis operation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum AnyBackend {
    Redis(RedisBackend),
    Memory(MemoryBackend),
}

impl AnyBackend {
    pub(crate) fn is_redis(&self) -> bool {
        matches!(self, AnyBackend::Redis(_))
    }

    /// The number of the cluster master serving `key`, as last read (see
    /// the Redis backend's topology); `None` on one server, in memory, or
    /// while the cluster's slot map is not known.
    pub(crate) fn node_of(&self, key: &str) -> Option<usize> {
        self.redis().and_then(|redis| redis.node_of(key))
    }

    /// Whether this is a Redis Cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        self.redis().is_some_and(RedisBackend::is_cluster)
    }

    /// The near tier's tracking: on Redis (not a cluster), if on.
    pub(crate) fn tracker(&self) -> Option<&Arc<Tracker>> {
        self.redis().and_then(RedisBackend::tracker)
    }

    /// The Redis backend, which alone has cross-process locks.
    pub(crate) fn redis(&self) -> Option<&RedisBackend> {
        match self {
            AnyBackend::Redis(redis) => Some(redis),
            AnyBackend::Memory(_) => None,
        }
    }
}

impl Backend for AnyBackend {
    async fn tag(&self, keys: &[String], tag_keys: &[String], ttl: Duration) -> Result<()> {
        match self {
            AnyBackend::Redis(b) => b.tag(keys, tag_keys, ttl).await,
            AnyBackend::Memory(b) => b.tag(keys, tag_keys, ttl).await,
        }
    }

    async fn tagged(&self, tag_key: &str, limit: usize) -> Result<Vec<(String, u64)>> {
        match self {
            AnyBackend::Redis(b) => b.tagged(tag_key, limit).await,
            AnyBackend::Memory(b) => b.tagged(tag_key, limit).await,
        }
    }

    async fn get_many(&self, keys: &[String], limit: Option<usize>) -> Result<Vec<Option<Bytes>>> {
        match self {
            AnyBackend::Redis(b) => b.get_many(keys, limit).await,
            AnyBackend::Memory(b) => b.get_many(keys, limit).await,
        }
    }

    async fn set_many_if(&self, stores: &[StoreIf]) -> Result<Vec<bool>> {
        match self {
            AnyBackend::Redis(b) => b.set_many_if(stores).await,
            AnyBackend::Memory(b) => b.set_many_if(stores).await,
        }
    }

    async fn set_many(&self, entries: &[(String, Arc<[u8]>)], ttl: Duration) -> Result<()> {
        match self {
            AnyBackend::Redis(b) => b.set_many(entries, ttl).await,
            AnyBackend::Memory(b) => b.set_many(entries, ttl).await,
        }
    }

    async fn drain_tag(&self, tag_key: &str, drain_key: &str) -> Result<bool> {
        match self {
            AnyBackend::Redis(b) => b.drain_tag(tag_key, drain_key).await,
            AnyBackend::Memory(b) => b.drain_tag(tag_key, drain_key).await,
        }
    }

    async fn untag(&self, tag_key: &str, members: &[(String, u64)]) -> Result<()> {
        match self {
            AnyBackend::Redis(b) => b.untag(tag_key, members).await,
            AnyBackend::Memory(b) => b.untag(tag_key, members).await,
        }
    }

    async fn get(&self, key: &str, limit: Option<usize>) -> Result<Option<Bytes>> {
        match self {
            AnyBackend::Redis(b) => b.get(key, limit).await,
            AnyBackend::Memory(b) => b.get(key, limit).await,
        }
    }

    async fn set(&self, key: &str, value: Arc<[u8]>, ttl: Duration) -> Result<()> {
        match self {
            AnyBackend::Redis(b) => b.set(key, value, ttl).await,
            AnyBackend::Memory(b) => b.set(key, value, ttl).await,
        }
    }

    async fn set_if(
        &self,
        key: &str,
        seen: &Seen,
        value: Arc<[u8]>,
        ttl: Duration,
    ) -> Result<bool> {
        match self {
            AnyBackend::Redis(b) => b.set_if(key, seen, value, ttl).await,
            AnyBackend::Memory(b) => b.set_if(key, seen, value, ttl).await,
        }
    }
}
