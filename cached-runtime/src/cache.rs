//! The public [`Cache`] handle. It holds the core in an `Arc` and
//! delegates to it; its constructors and builder are in `builder.rs`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use tracing::Span;

use crate::backend::{AnyBackend, Seen};
use crate::call::miss::Outcome;
use crate::encoding::key::check_user_key;
use crate::encoding::shape::{Plain, ResultOf};
use crate::engine::flight::TryEnd;
use crate::engine::policy::Policy;
use crate::engine::store::{Inner, Lookup};
#[cfg(doc)]
use crate::error::Error;
use crate::error::Result;
use crate::observe::redis_time::InSpan;
use crate::observe::stats::{Event, Stats};

/// A cache: a backend (Redis or in-memory) plus the policy around it.
///
/// Cheap to clone (an `Arc` inside), `Send + Sync`. Redis failures never
/// surface from the lookup methods: they count as misses, are counted in
/// [`Cache::stats`], and open a circuit breaker when they repeat.
///
/// ```
/// # extern crate cached_runtime as redis_cached;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::time::Duration;
/// use redis_cached::Cache;
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

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let settings = &self.inner.settings;
        f.debug_struct("Cache")
            .field("backend", &self.inner.backend)
            .field("namespace", &settings.namespace)
            .field("default_ttl", &settings.default_ttl)
            .field("op_timeout", &settings.op_timeout)
            .finish_non_exhaustive()
    }
}

/// The span of one runtime API call (`cache_op`, target `redis_cached`,
/// level `debug`), on `keys` keys when they are known before it runs.
fn op_span(op: &'static str, keys: Option<usize>) -> Span {
    let span = tracing::debug_span!(
        target: "redis_cached",
        "cache_op",
        op,
        keys = tracing::field::Empty,
        outcome = tracing::field::Empty,
        hits = tracing::field::Empty,
        redis_ms = tracing::field::Empty,
        key = tracing::field::Empty,
    );
    if let Some(keys) = keys {
        span.record("keys", keys);
    }
    span
}

/// Records how a runtime API write ended (`ok` or `error`) in its span.
fn ended<T>(result: Result<T>, span: &Span) -> Result<T> {
    span.record("outcome", if result.is_ok() { "ok" } else { "error" });
    result
}

impl Cache {
    pub(crate) fn from_inner(inner: Inner) -> Cache {
        Cache {
            inner: Arc::new(inner),
        }
    }

    /// The value at `key`, or `None` when it is absent, undecodable as a
    /// `T`, or Redis is unavailable (all counted as misses).
    ///
    /// A key with the reserved byte `~` is never looked up: `None`.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        self.read_one("get", key, None, |_, _| None).await
    }

    /// The value at `key`, as [`Cache::get`], kept in this process's near
    /// tier for at most `near` (and never past the Redis entry's TTL): a
    /// later call answers from memory, without a round trip, until Redis
    /// says the key changed (see the README's "Near tier"). On a cluster,
    /// in memory, or with `near_capacity(0)`, the same as [`Cache::get`].
    ///
    /// ```
    /// # extern crate cached_runtime as redis_cached;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use std::time::Duration;
    /// let cache = redis_cached::Cache::in_memory();
    /// cache.set("greeting", &"hello", Duration::from_secs(60)).await.unwrap();
    /// let near = Duration::from_secs(30);
    /// assert_eq!(cache.get_near::<String>("greeting", near).await.as_deref(), Some("hello"));
    /// # }
    /// ```
    pub async fn get_near<T>(&self, key: &str, near: Duration) -> Option<T>
    where
        T: DeserializeOwned + Clone + Send + Sync + 'static,
    {
        let near_value = |inner: &Inner, key: &str| inner.near_get::<T>(key);
        self.read_one("get_near", key, Some(near), near_value).await
    }

    /// One lookup of the runtime API (`op`) in its span: from the near
    /// tier if `near_value` finds it there, else read (through the
    /// tracking connection with `near`) and decoded.
    async fn read_one<T: DeserializeOwned>(
        &self,
        op: &'static str,
        key: &str,
        near: Option<Duration>,
        near_value: impl FnOnce(&Inner, &str) -> Option<Option<T>>,
    ) -> Option<T> {
        let span = op_span(op, Some(1));
        let traced = span.clone();
        let get = async move {
            if let Err(err) = check_user_key(key) {
                tracing::warn!(target: "redis_cached", error = %err, "lookup of a reserved key refused");
                traced.record("outcome", "refused");
                return None;
            }
            let inner = &self.inner;
            let key = inner.full_key(key.to_owned());
            inner.record_key(&traced, &key);
            if let Some(value) = near_value(inner, &key) {
                inner.count(None, Event::hits);
                inner.count(None, Event::near_hits);
                traced.record("outcome", "near");
                return value;
            }
            let read = match near {
                Some(bound) => inner.read_near(&key, bound, None).await,
                None => inner.read(&key).await,
            };
            let found = match read {
                Ok(bytes) => inner.decode::<T>(bytes, None),
                Err(seen) => Lookup::Miss(seen),
            };
            let (outcome, value) = match inner.count_lookup(found, None) {
                Lookup::Hit(hit) => (Outcome::Hit, hit.value),
                Lookup::Miss(Seen::Unknown) => (Outcome::Fallback, None),
                Lookup::Miss(_) => (Outcome::Miss, None),
            };
            traced.record("outcome", outcome.as_str());
            value
        };
        InSpan::new(span, get).await
    }

    /// Stores `value` at `key` for `ttl`.
    ///
    /// # Errors
    /// When the key holds the reserved byte `~` ([`Error::InvalidKey`]),
    /// the value cannot be serialized or is over `max_value_bytes`, or
    /// Redis fails, times out or is skipped by the open breaker.
    pub async fn set<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<()> {
        let span = op_span("set", Some(1));
        let traced = span.clone();
        let set = async move {
            check_user_key(key)?;
            let entry = self.inner.settings.codec.encode(value, None)?;
            let key = self.inner.full_key(key.to_owned());
            self.inner.record_key(&traced, &key);
            let stored = self.inner.store(&key, entry.into(), ttl, None).await;
            // A write is the newest state: later callers must not get an older
            // one, from a computation here or a late lock notification.
            self.inner.wrote(&key);
            stored
        };
        ended(InSpan::new(span.clone(), set).await, &span)
    }

    /// The values at `keys`, in order: one round trip for all of them (on
    /// a cluster, one `MGET` per slot, in parallel). Each is `None` as for
    /// [`Cache::get`]: absent, undecodable as a `T`, a reserved key, or
    /// Redis unavailable (all counted as misses).
    ///
    /// ```
    /// # extern crate cached_runtime as redis_cached;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), redis_cached::Error> {
    /// use std::time::Duration;
    /// let cache = redis_cached::Cache::in_memory();
    /// cache.set_many(&[("user:1", &"Ada"), ("user:2", &"Grace")], Duration::from_secs(60)).await?;
    /// let names = cache.get_many::<String>(&["user:1", "user:3", "user:2"]).await;
    /// assert_eq!(names, [Some("Ada".into()), None, Some("Grace".into())]);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn get_many<T: DeserializeOwned>(&self, keys: &[impl AsRef<str>]) -> Vec<Option<T>> {
        let span = op_span("get_many", Some(keys.len()));
        InSpan::new(span.clone(), self.read_many(keys, span)).await
    }

    /// [`Cache::get_many`] within its span.
    async fn read_many<T: DeserializeOwned>(
        &self,
        keys: &[impl AsRef<str>],
        span: Span,
    ) -> Vec<Option<T>> {
        let inner = &self.inner;
        let mut wanted = Vec::with_capacity(keys.len());
        let mut found: Vec<Option<T>> = Vec::with_capacity(keys.len());
        for (at, key) in keys.iter().enumerate() {
            found.push(None);
            match check_user_key(key.as_ref()) {
                Ok(()) => wanted.push((at, inner.full_key(key.as_ref().to_owned()))),
                Err(err) => {
                    tracing::warn!(target: "redis_cached", error = %err, "lookup of a reserved key refused")
                }
            }
        }
        let full: Vec<String> = wanted.iter().map(|(_, key)| key.clone()).collect();
        let read = inner.read_many(&full).await;
        let (mut hits, mut unread) = (0, false);
        for ((at, _), read) in wanted.into_iter().zip(read) {
            unread |= matches!(read, Err(Seen::Unknown));
            let lookup = match read {
                Ok(bytes) => inner.decode::<T>(bytes, None),
                Err(seen) => Lookup::Miss(seen),
            };
            if let Lookup::Hit(hit) = inner.count_lookup(lookup, None) {
                found[at] = hit.value;
                hits += 1;
            }
        }
        let outcome = match (unread, hits == keys.len()) {
            (true, _) => Outcome::Fallback,
            (false, true) => Outcome::Hit,
            (false, false) => Outcome::Miss,
        };
        span.record("hits", hits);
        span.record("outcome", outcome.as_str());
        found
    }

    /// Stores each value at its key for `ttl`: one round trip for all of
    /// them (on a cluster, one `SET` per key, in parallel).
    ///
    /// # Errors
    /// As [`Cache::set`]; nothing is stored when a key is reserved or a
    /// value cannot be serialized or is over `max_value_bytes`.
    pub async fn set_many<K, T>(&self, entries: &[(K, &T)], ttl: Duration) -> Result<()>
    where
        K: AsRef<str>,
        T: Serialize + ?Sized,
    {
        let span = op_span("set_many", Some(entries.len()));
        let set = async move {
            let inner = &self.inner;
            let mut encoded = Vec::with_capacity(entries.len());
            for (key, value) in entries {
                check_user_key(key.as_ref())?;
                let entry = inner.settings.codec.encode(*value, None)?;
                inner.check_size(&entry)?;
                encoded.push((inner.full_key(key.as_ref().to_owned()), entry.into()));
            }
            let stored = inner.store_many(&encoded, ttl).await;
            for (key, _) in &encoded {
                // A write is the newest state: later callers must not get an older one.
                inner.wrote(key);
            }
            stored
        };
        ended(InSpan::new(span.clone(), set).await, &span)
    }

    /// Invalidates `key`: the next lookup misses, and a computation of it
    /// that began before this call neither stores its (older) result nor
    /// hands it to a caller that starts after this call returned.
    ///
    /// The key is replaced by a small tombstone that lives for the cache's
    /// `invalidation_window` (60 s by default); a computation that takes
    /// longer than that may still store its result.
    ///
    /// # Errors
    /// When the key holds the reserved byte `~` ([`Error::InvalidKey`]), or
    /// Redis fails, times out or is skipped by the open breaker: the old
    /// value may then still be served until its TTL ends.
    pub async fn invalidate(&self, key: &str) -> Result<()> {
        let span = op_span("invalidate", Some(1));
        let traced = span.clone();
        let invalidate = async move {
            check_user_key(key)?;
            let key = self.inner.full_key(key.to_owned());
            self.inner.record_key(&traced, &key);
            self.inner.tombstone(&key).await
        };
        ended(InSpan::new(span.clone(), invalidate).await, &span)
    }

    /// Invalidates each of `keys` as [`Cache::invalidate`] does, in
    /// pipelines of at most 512 keys (a few in flight at once), so that a
    /// long list never becomes one long Redis command.
    ///
    /// # Errors
    /// When a key holds the reserved byte `~` (nothing is invalidated
    /// then), or Redis fails, times out or is skipped by the open breaker
    /// for some of the pipelines: the others' keys are invalidated, and
    /// the failed ones' may be in part.
    pub async fn invalidate_many(&self, keys: &[impl AsRef<str>]) -> Result<()> {
        let span = op_span("invalidate_many", Some(keys.len()));
        let invalidate = async {
            let mut full = Vec::with_capacity(keys.len());
            for key in keys {
                check_user_key(key.as_ref())?;
                full.push(self.inner.full_key(key.as_ref().to_owned()));
            }
            self.inner.tombstone_many(&full).await
        };
        ended(InSpan::new(span.clone(), invalidate).await, &span)
    }

    /// Invalidates every key cached under `tag` (the `tags = [...]` of
    /// `#[redis_cached]` and `#[cache_put]`), as [`Cache::invalidate`] does
    /// for one key; returns how many keys that was.
    ///
    /// `tag` is the tag as the attribute rendered it: placeholder values
    /// are escaped like keys' (`tenant:<t>` with `"acme corp"` is
    /// `tenant:acme%20corp`). Render it the same way with [`tag`](crate::tag):
    ///
    /// ```
    /// # extern crate cached_runtime as redis_cached;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), redis_cached::Error> {
    /// let cache = redis_cached::Cache::in_memory();
    /// let tag = redis_cached::tag("tenant:<t>", &[&"acme corp"])?;
    /// assert_eq!(tag, "tenant:acme%20corp");
    /// let invalidated = cache.invalidate_tag(&tag).await?;
    /// # assert_eq!(invalidated, 0);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// A large tag is invalidated in batches of 500 keys, each a few short
    /// Redis commands, so that Redis is never blocked for long.
    ///
    /// # Errors
    /// [`Error::InvalidKey`](crate::Error::InvalidKey) for a tag holding
    /// the reserved `~` (no template renders one); when Redis fails, times
    /// out or is skipped by the open breaker, the keys of the batches done
    /// by then are invalidated.
    pub async fn invalidate_tag(&self, tag: &str) -> Result<u64> {
        check_user_key(tag)?;
        let span = op_span("invalidate_tag", None);
        // A tag holds placeholder values, as keys do: named only on request.
        self.inner.record_key(&span, tag);
        let invalidated = InSpan::new(span.clone(), self.inner.invalidate_tag(tag)).await;
        if let Ok(keys) = invalidated {
            span.record("keys", keys);
        }
        ended(invalidated, &span)
    }

    /// The value at `key`; on a miss, runs `compute`, stores its result for
    /// `ttl` and returns it. Concurrent misses for one key in this process
    /// share one computation. A key with the reserved byte `~` is computed
    /// every time, uncached.
    ///
    /// It stores whatever `compute` returns, as is: an `Err` of a
    /// `Result` too, which every caller then reads until `ttl` passes. For
    /// a computation that can fail, use
    /// [`Cache::try_get_or_compute`], which stores `Ok` values only.
    pub async fn get_or_compute<T, F, Fut>(&self, key: &str, ttl: Duration, compute: F) -> T
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        if let Err(err) = check_user_key(key) {
            tracing::warn!(target: "redis_cached", error = %err, "computed uncached");
            return compute().await;
        }
        let policy = Policy {
            ttl: Some(ttl),
            ..Policy::default()
        };
        let unset = || {};
        crate::call::hit::cached::<Plain, T, _>(
            Some(&self.inner),
            unset,
            key.to_owned(),
            &[],
            policy,
            async move { compute().await },
        )
        .await
    }

    /// The value at `key`; on a miss, runs the fallible `compute`, stores an
    /// `Ok` value for `ttl` and returns it. An `Err` is never stored: it
    /// goes to this caller and to the callers of this process that waited
    /// for the same computation (as moka's `try_get_with`), shared in an
    /// `Arc`; the next call computes again. Concurrent misses for one key
    /// in this process share one computation.
    ///
    /// ```
    /// # extern crate cached_runtime as redis_cached;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use std::time::Duration;
    ///
    /// let cache = redis_cached::Cache::in_memory();
    /// let ttl = Duration::from_secs(60);
    /// let failed = cache
    ///     .try_get_or_compute("user:7", ttl, || async { Err::<String, _>("database down") })
    ///     .await;
    /// assert_eq!(failed.map_err(|e| *e), Err("database down"));
    /// // Not stored: the next call computes again.
    /// let name = cache
    ///     .try_get_or_compute("user:7", ttl, || async { Ok::<_, &str>("Ada".to_owned()) })
    ///     .await;
    /// assert_eq!(name.as_deref(), Ok("Ada"));
    /// # }
    /// ```
    ///
    /// # Errors
    /// `compute`'s error, this caller's or the one it waited for.
    pub async fn try_get_or_compute<T, E, F, Fut>(
        &self,
        key: &str,
        ttl: Duration,
        compute: F,
    ) -> std::result::Result<T, Arc<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
    {
        let run = |compute: F| async move { compute().await.map_err(Arc::new) };
        if let Err(err) = check_user_key(key) {
            tracing::warn!(target: "redis_cached", error = %err, "computed uncached");
            return run(compute).await;
        }
        if let Some(value) = self.get::<T>(key).await {
            return Ok(value);
        }
        let policy = Policy {
            ttl: Some(ttl),
            ..Policy::default()
        };
        let unset = || {};
        loop {
            match self.inner.try_flights.join(key) {
                Ok(leader) => {
                    let result =
                        crate::call::hit::cached::<ResultOf, std::result::Result<T, Arc<E>>, _>(
                            Some(&self.inner),
                            unset,
                            key.to_owned(),
                            &[],
                            policy,
                            run(compute),
                        )
                        .await;
                    leader.end(match &result {
                        Ok(_) => TryEnd::Stored,
                        Err(err) => TryEnd::Failed(Arc::new(Arc::clone(err))),
                    });
                    return result;
                }
                Err(waiting) => match crate::engine::flight::follow_try(waiting).await {
                    Some(TryEnd::Failed(shared)) => {
                        if let Some(err) = shared.downcast_ref::<Arc<E>>() {
                            return Err(Arc::clone(err));
                        }
                    }
                    // Stored: read it (computing it again if it could not
                    // be kept). Gave up: one of the waiters leads next.
                    Some(TryEnd::Stored) => {
                        return crate::call::hit::cached::<
                            ResultOf,
                            std::result::Result<T, Arc<E>>,
                            _,
                        >(
                            Some(&self.inner),
                            unset,
                            key.to_owned(),
                            &[],
                            policy,
                            run(compute),
                        )
                        .await;
                    }
                    _ => {}
                },
            }
        }
    }

    /// Connects now rather than at the first call: the Redis connection
    /// (loading the cache's Lua scripts), and the subscriber connection that
    /// wakes `lock = true` waiters when a value lands. Optional, since every
    /// call connects on demand; a service calls it at start-up to find a
    /// wrong URL or password at once and to keep connection set-up out of
    /// its first requests. Each of the two is bounded by `connect_timeout`
    /// plus `op_timeout` (not `op_timeout` alone: a first TLS handshake can
    /// take longer than one operation may). Does nothing on the in-memory
    /// backend.
    ///
    /// # Errors
    /// When Redis cannot be reached, refuses the credentials, or the
    /// subscription is not confirmed in time. The cache stays usable either
    /// way: calls fall back, and it keeps reconnecting.
    pub async fn connect(&self) -> Result<()> {
        let inner = &self.inner;
        let Some(redis) = inner.backend.redis() else {
            return Ok(());
        };
        let bound = inner.settings.connect_timeout + inner.settings.op_timeout;
        inner.guarded_within(bound, redis.prepare()).await?;
        redis.subscribed(bound).await
    }

    /// A snapshot of this cache's counters.
    pub fn stats(&self) -> Stats {
        self.inner.counters.snapshot()
    }

    /// The default TTL of entries whose function gives none.
    pub fn default_ttl(&self) -> Duration {
        self.inner.settings.default_ttl
    }

    /// Whether a circuit breaker currently skips Redis (on a cluster, for
    /// the keys of one master or more).
    pub fn is_degraded(&self) -> bool {
        self.inner.health.open_count() > 0
    }

    /// How many entries the near tier holds (expired ones included until
    /// evicted); `None` without a near tier.
    pub fn near_entry_count(&self) -> Option<usize> {
        self.inner.backend.tracker().map(|t| t.store.len())
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
}
