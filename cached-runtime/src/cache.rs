//! The [`Cache`] handle, its builder, and the cache-aside algorithm.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::aside::Lookup;
use crate::backend::{AnyBackend, Backend, MemoryBackend, MemoryConfig, RedisBackend};
use crate::breaker::{Breaker, BreakerConfig, Transition};
use crate::codec::Codec;
use crate::error::{Error, Result};
use crate::flight::Flights;
use crate::fresh::Refreshing;
use crate::key::full_key;
use crate::lock::{Notifier, Scripts};
use crate::private::Policy;
use crate::shape::Plain;
use crate::stats::{Counters, Stats};

/// The URL that selects the in-memory backend in [`Cache::builder`].
pub const MEMORY_URL: &str = "memory://";

/// A cache: a backend (Redis or in-memory) plus the policy around it.
///
/// Cheap to clone (an `Arc` inside), `Send + Sync`. Redis failures never
/// surface from the lookup methods: they count as misses, are counted in
/// [`Cache::stats`], and open a circuit breaker when they repeat.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::time::Duration;
/// use cached_runtime::Cache;
///
/// let cache = Cache::in_memory();
/// cache.set("greeting", &"hello", Duration::from_secs(60)).await.unwrap();
/// assert_eq!(cache.get::<String>("greeting").await.as_deref(), Some("hello"));
/// # }
/// ```
#[derive(Clone)]
pub struct Cache {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) backend: AnyBackend,
    pub(crate) namespace: Option<String>,
    pub(crate) default_ttl: Duration,
    pub(crate) op_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) invalidation_window: Duration,
    pub(crate) max_value_bytes: usize,
    /// Read at most `max_value_bytes + 1` bytes of an entry (GETRANGE) rather
    /// than all of it (GET).
    pub(crate) bounded_reads: bool,
    pub(crate) codec: Codec,
    pub(crate) breaker: Breaker,
    pub(crate) counters: Counters,
    pub(crate) flights: Flights,
    pub(crate) scripts: Scripts,
    pub(crate) refreshing: Refreshing,
    pub(crate) notifier: Arc<Notifier>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("backend", &self.inner.backend)
            .field("namespace", &self.inner.namespace)
            .field("default_ttl", &self.inner.default_ttl)
            .field("op_timeout", &self.inner.op_timeout)
            .finish_non_exhaustive()
    }
}

/// Configures a [`Cache`]; from [`Cache::builder`].
#[derive(Clone)]
#[must_use]
pub struct CacheBuilder {
    url: String,
    namespace: Option<String>,
    default_ttl: Duration,
    op_timeout: Duration,
    connect_timeout: Duration,
    invalidation_window: Duration,
    max_value_bytes: usize,
    bounded_reads: bool,
    tls_root: Option<Vec<u8>>,
    codec: Codec,
    breaker: BreakerConfig,
    memory: MemoryConfig,
}

impl Cache {
    /// A Redis-backed cache with default settings.
    ///
    /// Lazy: only the URL is checked here (`redis://`, `rediss://`,
    /// `unix://`, with an optional `user:password@`), so this never fails
    /// because Redis is down; the connection is made on first use.
    pub fn redis(url: &str) -> Result<Cache> {
        Cache::builder(url).build()
    }

    /// An embedded in-memory cache with the same semantics as Redis
    /// (per-entry TTL, bounded size), for tests, development and single
    /// processes.
    pub fn in_memory() -> Cache {
        Cache::from_builder(
            Cache::builder(MEMORY_URL),
            AnyBackend::Memory(MemoryBackend::new(MemoryConfig::default())),
        )
    }

    /// Starts configuring a cache at `url`: a Redis URL, or
    /// [`MEMORY_URL`] (`memory://`) for the in-memory backend.
    ///
    /// ```
    /// use std::time::Duration;
    /// use cached_runtime::Cache;
    ///
    /// let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "memory://".into());
    /// let cache = Cache::builder(&url)
    ///     .namespace("shop")
    ///     .default_ttl(Duration::from_secs(600))
    ///     .op_timeout(Duration::from_millis(100))
    ///     .build()?;
    /// # Ok::<(), cached_runtime::Error>(())
    /// ```
    pub fn builder(url: &str) -> CacheBuilder {
        CacheBuilder {
            url: url.to_owned(),
            namespace: None,
            default_ttl: Duration::from_secs(3600),
            op_timeout: Duration::from_millis(200),
            connect_timeout: Duration::from_secs(1),
            invalidation_window: Duration::from_secs(60),
            tls_root: None,
            max_value_bytes: 16 * 1024 * 1024,
            bounded_reads: false,
            codec: Codec::Json,
            breaker: BreakerConfig::default(),
            memory: MemoryConfig::default(),
        }
    }

    fn from_builder(b: CacheBuilder, backend: AnyBackend) -> Cache {
        Cache {
            inner: Arc::new(Inner {
                backend,
                namespace: b.namespace.clone(),
                default_ttl: b.default_ttl,
                op_timeout: b.op_timeout,
                connect_timeout: b.connect_timeout,
                invalidation_window: b.invalidation_window,
                max_value_bytes: b.max_value_bytes,
                bounded_reads: b.bounded_reads,
                codec: b.codec,
                breaker: Breaker::new(b.breaker),
                counters: Counters::default(),
                flights: Flights::default(),
                scripts: Scripts::default(),
                refreshing: Refreshing::default(),
                notifier: Notifier::new(b.namespace.as_deref()),
            }),
        }
    }

    /// The value at `key`, or `None` when it is absent, undecodable as a
    /// `T`, or Redis is unavailable (all counted as misses).
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        match self.lookup(&self.full_key(key.to_owned())).await {
            Lookup::Hit(hit) => hit.value,
            Lookup::Miss(_) => None,
        }
    }

    /// Stores `value` at `key` for `ttl`.
    ///
    /// # Errors
    /// When the value cannot be serialized or is over `max_value_bytes`, or
    /// Redis fails, times out or is skipped by the open breaker.
    pub async fn set<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<()> {
        let entry = self.inner.codec.encode(value, None)?;
        self.store(&self.full_key(key.to_owned()), entry.into(), ttl)
            .await
    }

    /// Invalidates `key`: the next lookup misses, and a computation of it
    /// that began before this call does not store its (older) result.
    ///
    /// The key is replaced by a small tombstone that lives for the cache's
    /// `invalidation_window` (60 s by default); a computation that takes
    /// longer than that may still store its result.
    ///
    /// # Errors
    /// When Redis fails, times out or is skipped by the open breaker: the
    /// old value may then still be served until its TTL ends.
    pub async fn invalidate(&self, key: &str) -> Result<()> {
        self.tombstone(&self.full_key(key.to_owned())).await
    }

    /// Invalidates every key cached under `tag` (the `tags = [...]` of
    /// `#[redis_cached]`), as [`Cache::invalidate`] does for one key.
    ///
    /// # Errors
    /// When Redis fails, times out or is skipped by the open breaker.
    pub async fn invalidate_tag(&self, tag: &str) -> Result<()> {
        let tag_key = self.tag_key(tag);
        let tombstone = self.inner.codec.encode_tombstone();
        let window = self.inner.invalidation_window;
        let count = self
            .guarded(
                self.inner
                    .backend
                    .invalidate_tag(&tag_key, tombstone.into(), window),
            )
            .await?;
        for _ in 0..count {
            Counters::bump(&self.inner.counters.invalidations);
        }
        Ok(())
    }

    /// The set of keys cached under `tag`.
    fn tag_key(&self, tag: &str) -> String {
        self.full_key(format!("redis-cached:tag:{tag}"))
    }

    /// Records `key` under each of `tags` for at least `ttl`.
    pub(crate) async fn tag(&self, key: &str, tags: &[String], ttl: Duration) -> Result<()> {
        let tag_keys: Vec<String> = tags.iter().map(|tag| self.tag_key(tag)).collect();
        self.guarded(self.inner.backend.tag(key, &tag_keys, ttl))
            .await
    }

    /// The value at `key`; on a miss, runs `compute`, stores its result for
    /// `ttl` and returns it. Concurrent misses for one key in this process
    /// share one computation.
    pub async fn get_or_compute<T, F, Fut>(&self, key: &str, ttl: Duration, compute: F) -> T
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let policy = Policy {
            ttl: Some(ttl),
            ..Policy::default()
        };
        self.fill::<Plain, T, _, _>(self.full_key(key.to_owned()), &[], &policy, compute)
            .await
    }

    /// Connects now rather than at the first call: the Redis connection
    /// (loading the cache's Lua scripts), and the subscriber connection that
    /// wakes `lock = true` waiters when a value lands. Optional, since every
    /// call connects on demand; a service calls it at start-up to find a
    /// wrong URL or password at once and to keep connection set-up out of
    /// its first requests. Does nothing on the in-memory backend.
    ///
    /// # Errors
    /// When Redis cannot be reached, refuses the credentials, or the
    /// subscription is not confirmed within `connect_timeout`. The cache
    /// stays usable either way: calls fall back, and it keeps reconnecting.
    pub async fn connect(&self) -> Result<()> {
        let AnyBackend::Redis(redis) = &self.inner.backend else {
            return Ok(());
        };
        self.guarded(redis.prepare(&crate::lock::SCRIPTS)).await?;
        let timeout = self.inner.connect_timeout;
        self.inner
            .notifier
            .subscribed(redis.client().clone(), timeout)
            .await
    }

    /// A snapshot of this cache's counters.
    pub fn stats(&self) -> Stats {
        self.inner.counters.snapshot()
    }

    /// The default TTL of entries whose function gives none.
    pub fn default_ttl(&self) -> Duration {
        self.inner.default_ttl
    }

    /// Whether the circuit breaker currently skips Redis.
    pub fn is_degraded(&self) -> bool {
        self.inner.breaker.is_open()
    }

    /// How many unexpired entries the in-memory backend holds (expired
    /// ones are swept first); `None` for Redis.
    pub fn memory_entry_count(&self) -> Option<usize> {
        match &self.inner.backend {
            AnyBackend::Memory(m) => {
                m.sweep();
                Some(m.entry_count())
            }
            AnyBackend::Redis(_) => None,
        }
    }

    pub(crate) fn full_key(&self, key: String) -> String {
        full_key(self.inner.namespace.as_deref(), key)
    }

    pub(crate) async fn store(&self, key: &str, entry: Arc<[u8]>, ttl: Duration) -> Result<()> {
        self.check_size(&entry)?;
        self.guarded(self.inner.backend.set(key, entry, ttl))
            .await?;
        Counters::bump(&self.inner.counters.writes);
        Ok(())
    }

    pub(crate) fn check_size(&self, entry: &[u8]) -> Result<()> {
        if entry.len() > self.inner.max_value_bytes {
            Counters::bump(&self.inner.counters.oversized);
            return Err(Error::Config(format!(
                "value of {} bytes is over max_value_bytes ({})",
                entry.len(),
                self.inner.max_value_bytes
            )));
        }
        Ok(())
    }

    /// Replaces `key` by a unique tombstone (see [`Cache::invalidate`]).
    pub(crate) async fn tombstone(&self, key: &str) -> Result<()> {
        let tombstone = self.inner.codec.encode_tombstone();
        self.guarded(
            self.inner
                .backend
                .set(key, tombstone.into(), self.inner.invalidation_window),
        )
        .await?;
        Counters::bump(&self.inner.counters.invalidations);
        Ok(())
    }

    /// Runs one backend operation under the breaker and `op_timeout`,
    /// counting what happens. The in-memory backend cannot fail or block, so
    /// it runs bare.
    pub(crate) async fn guarded<T>(&self, op: impl Future<Output = Result<T>>) -> Result<T> {
        let inner = &*self.inner;
        if !inner.backend.is_redis() {
            return op.await;
        }
        if !inner.breaker.allow() {
            Counters::bump(&inner.counters.breaker_skips);
            return Err(Error::BreakerOpen);
        }
        let err = match tokio::time::timeout(inner.op_timeout, op).await {
            Ok(Ok(value)) => {
                if inner.breaker.success() {
                    tracing::info!("Redis reachable again; caching resumed");
                }
                return Ok(value);
            }
            Ok(Err(err @ Error::Refused(_))) => {
                // Redis answered: it is up, only this command was refused.
                inner.breaker.success();
                Counters::bump(&inner.counters.refused);
                tracing::debug!(error = %err, "Redis refused a command");
                return Err(err);
            }
            Ok(Err(err)) => {
                Counters::bump(&inner.counters.errors);
                err
            }
            Err(_) => {
                Counters::bump(&inner.counters.timeouts);
                Error::Timeout(inner.op_timeout)
            }
        };
        tracing::debug!(error = %err, "Redis operation failed");
        if inner.breaker.failure() == Transition::Opened {
            Counters::bump(&inner.counters.breaker_opens);
            tracing::warn!(
                error = %err,
                "Redis failing; skipping it for the breaker cool-down, values are computed uncached"
            );
            if let AnyBackend::Redis(redis) = &inner.backend {
                redis.reset();
            }
        }
        Err(err)
    }
}

impl std::fmt::Debug for CacheBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("url", &redact(&self.url))
            .field("namespace", &self.namespace)
            .field("default_ttl", &self.default_ttl)
            .field("op_timeout", &self.op_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}

/// `url` with any `user:password@` replaced, for logs and `Debug`.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

impl CacheBuilder {
    /// Prefixes every key with `<namespace>:`. Letters, digits and
    /// `- _ . : /` only.
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = Some(namespace.to_owned());
        self
    }

    /// TTL of entries whose function or call gives none. Default 3600 s.
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// Upper bound of each Redis operation; a slower one counts as a failure
    /// and the caller computes instead. Default 200 ms.
    pub fn op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// Upper bound of one connection attempt (made in the background of
    /// the operations, which stay bounded by `op_timeout`). Default 1 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Circuit-breaker settings.
    pub fn breaker(mut self, config: BreakerConfig) -> Self {
        self.breaker = config;
        self
    }

    /// Serialization format of stored values. Default JSON.
    pub fn codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// Limits of the in-memory backend (ignored for Redis).
    pub fn memory(mut self, config: MemoryConfig) -> Self {
        self.memory = config;
        self
    }

    /// Trusts this CA certificate (PEM) for `rediss://` instead of the
    /// system's roots: for servers with a private CA.
    #[cfg(feature = "tls")]
    pub fn tls_root_cert(mut self, pem: &[u8]) -> Self {
        self.tls_root = Some(pem.to_vec());
        self
    }

    /// How long an invalidation blocks the computations that began before
    /// it from storing their results. Default 60 s.
    pub fn invalidation_window(mut self, window: Duration) -> Self {
        self.invalidation_window = window;
        self
    }

    /// Largest stored value, in bytes (header included); larger values are
    /// neither stored nor read. Default 16 MiB.
    pub fn max_value_bytes(mut self, bytes: usize) -> Self {
        self.max_value_bytes = bytes;
        self
    }

    /// Whether a lookup reads at most `max_value_bytes + 1` bytes of an
    /// entry (`GETRANGE key 0 max`), so that a huge value at a key (another
    /// program's, or a hostile writer's) costs no more memory than the limit
    /// to reject. Off by default: a lookup is then a plain `GET`, which on a
    /// busy 2-core machine gave 0 to 9% more hit throughput, and a value
    /// over the limit is rejected after it was read (Redis caps a value at
    /// 512 MB). Turn it on when programs you do not trust can write to the
    /// cache's Redis.
    pub fn bounded_reads(mut self, bounded: bool) -> Self {
        self.bounded_reads = bounded;
        self
    }

    /// Checks the settings and builds the cache. Connects nothing.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] for a malformed URL, [`Error::Config`] for a
    /// zero TTL or timeout or a namespace with characters outside
    /// `A-Z a-z 0-9 - _ . : /`.
    pub fn build(self) -> Result<Cache> {
        if let Some(ns) = &self.namespace {
            let valid = !ns.is_empty()
                && ns
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b));
            if !valid {
                return Err(Error::Config(format!(
                    "namespace {ns:?} must be non-empty and use only A-Z a-z 0-9 - _ . : /"
                )));
            }
        }
        for (name, value) in [
            ("default_ttl", self.default_ttl),
            ("op_timeout", self.op_timeout),
            ("connect_timeout", self.connect_timeout),
            ("invalidation_window", self.invalidation_window),
            ("breaker cooldown", self.breaker.cooldown),
        ] {
            if value.is_zero() {
                return Err(Error::Config(format!("{name} must be greater than zero")));
            }
        }
        if self.breaker.failure_threshold == 0 {
            return Err(Error::Config(
                "breaker failure_threshold must be at least 1".into(),
            ));
        }
        let backend = if self.url == MEMORY_URL {
            AnyBackend::Memory(MemoryBackend::new(self.memory))
        } else {
            AnyBackend::Redis(RedisBackend::new(
                &self.url,
                self.connect_timeout,
                self.tls_root.as_deref(),
            )?)
        };
        Ok(Cache::from_builder(self, backend))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_password() {
        let builder = Cache::builder("redis://app:hunter2@db.internal:6379/0");
        let shown = format!("{builder:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redis://***@db.internal:6379/0"), "{shown}");
        assert_eq!(redact("redis://localhost/"), "redis://localhost/");
    }
}
