//! Write-behind: writes made visible in the cache at once, journaled in a
//! Redis Stream before they are acknowledged, and flushed to the user's
//! [`Sink`] in batches by one flusher at a time.
//!
//! Ordering rests on two things. The journal is read in id order by the
//! one process holding the flusher lease, and a batch holds one write per
//! key (the last), so a later write of a key never reaches the sink before
//! an earlier one. The cache entry a write leaves is versioned by its
//! journal id, so two processes writing one key leave the cache at the
//! later write whatever order their cache updates land in.

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::backend::{JournalKeys, Journaled, RedisBackend};
use crate::cache::Cache;
use crate::codec::Entry;
use crate::core::Inner;
use crate::error::{Error, Result};
use crate::key::{check_user_key, companion_key, internal_key};
use crate::token::{lock_token, now_unix_ms};

/// Where write-behind writes end up: a batch writer, usually one database
/// transaction per batch.
///
/// A batch holds at most one write per key, the last one journaled, in
/// journal order. It may be given again after a crash or a lost lease (at
/// least once): applying it twice must leave the same rows, which upserts
/// and deletes do. A sink that must also refuse a batch overtaken by a
/// newer one (see [`WriteBehind`]'s guarantee) compares [`Write::id`]s.
///
/// ```
/// # extern crate cached_runtime as redis_cached;
/// use redis_cached::{Change, Sink, Write};
///
/// struct Users;
///
/// impl Sink<u64, String> for Users {
///     type Error = std::io::Error;
///
///     async fn write_batch(&self, batch: Vec<Write<u64, String>>) -> Result<(), Self::Error> {
///         for write in batch {
///             match write.change {
///                 Change::Upsert(name) => { /* INSERT … ON CONFLICT DO UPDATE */ let _ = name; }
///                 Change::Delete => { /* DELETE … WHERE id = write.key */ }
///             }
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait Sink<K, V>: Send + Sync + 'static {
    /// Why a batch failed; logged and kept with a dead letter.
    type Error: std::fmt::Display + Send + 'static;

    /// Applies `batch`; an `Err` leaves every write of it in the journal,
    /// to be tried again.
    fn write_batch(
        &self,
        batch: Vec<Write<K, V>>,
    ) -> impl Future<Output = std::result::Result<(), Self::Error>> + Send;
}

/// One change for the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write<K, V> {
    /// The key written.
    pub key: K,
    /// What happened to it.
    pub change: Change<V>,
    /// The journal id of the write; later writes have greater ids.
    pub id: JournalId,
}

/// An upsert or a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change<V> {
    /// The key now holds this value.
    Upsert(V),
    /// The key holds nothing.
    Delete,
}

/// A write's id in the journal (its Redis Stream entry id): when it was
/// accepted (ms, by the Redis server's clock) and a sequence number within
/// that millisecond. Ordered as the journal is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JournalId {
    /// Unix time in ms at which Redis journaled the write.
    pub ms: u64,
    /// Its place among the writes of that millisecond.
    pub seq: u64,
}

impl JournalId {
    fn parse(id: &str) -> Option<JournalId> {
        let (ms, seq) = id.split_once('-')?;
        Some(JournalId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// When the write was journaled.
    pub fn accepted_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.ms)
    }
}

impl std::fmt::Display for JournalId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// A snapshot of a [`WriteBehind`]'s counters (this process's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriteBehindStats {
    /// Writes journaled through this handle.
    pub accepted: u64,
    /// Writes refused because the journal was full ([`Error::Backlog`]).
    pub refused: u64,
    /// Writes that failed because Redis did (an error to the caller).
    pub failed: u64,
    /// Journaled writes whose cache update failed; the key was invalidated
    /// instead when Redis allowed.
    pub cache_update_failures: u64,
    /// Writes the sink took (after coalescing).
    pub flushed: u64,
    /// Journaled writes folded into a later write of the same key.
    pub coalesced: u64,
    /// Batches the sink took.
    pub batches: u64,
    /// Sink calls that failed and were retried.
    pub retries: u64,
    /// Entries added to the dead-letter stream (each the last write of a
    /// key, with the ids of the writes of that key it stands for).
    pub dead_letters: u64,
    /// Pending writes taken over from a flusher that stopped.
    pub claimed: u64,
    /// Writes in the journal when the flusher last looked.
    pub queue_depth: u64,
    /// Age of the oldest write of the last batch when the sink took it.
    pub last_flush_lag: Duration,
    /// The largest such age seen.
    pub max_flush_lag: Duration,
}

/// This process's counters, and (feature `metrics`) their exported twins,
/// `redis_cached_write_behind_<name>_total{journal, cache}`.
macro_rules! write_behind_counters {
    ($($name:ident),* $(,)?) => {
        #[derive(Default)]
        struct Counters {
            $( $name: AtomicU64, )*
            queue_depth: AtomicU64,
            last_lag_ms: AtomicU64,
            max_lag_ms: AtomicU64,
            #[cfg(feature = "metrics")]
            exported: Option<Exported>,
        }

        /// One of the counters, by name.
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy)]
        enum Tally {
            $( $name, )*
        }

        impl Counters {
            fn add(&self, tally: Tally, by: u64) {
                let counter = match tally {
                    $( Tally::$name => &self.$name, )*
                };
                counter.fetch_add(by, Ordering::Relaxed);
                #[cfg(feature = "metrics")]
                if let Some(exported) = &self.exported {
                    match tally {
                        $( Tally::$name => exported.$name.increment(by), )*
                    }
                }
            }
        }

        #[cfg(feature = "metrics")]
        struct Exported {
            $( $name: metrics::Counter, )*
            queue_depth: metrics::Gauge,
            flush_lag: metrics::Histogram,
        }

        #[cfg(feature = "metrics")]
        impl Exported {
            fn register(journal: &str, cache: &str) -> Exported {
                let labels = || {
                    vec![
                        metrics::Label::new("journal", journal.to_owned()),
                        metrics::Label::new("cache", cache.to_owned()),
                    ]
                };
                Exported {
                    $( $name: metrics::counter!(
                        concat!("redis_cached_write_behind_", stringify!($name), "_total"),
                        labels()
                    ), )*
                    queue_depth: metrics::gauge!("redis_cached_write_behind_queue_depth", labels()),
                    flush_lag: metrics::histogram!("redis_cached_write_behind_flush_lag_seconds", labels()),
                }
            }
        }
    };
}

write_behind_counters!(
    accepted,
    refused,
    failed,
    cache_update_failures,
    flushed,
    coalesced,
    batches,
    retries,
    dead_letters,
    claimed,
);

impl Counters {
    /// Counters exported under `journal` and `cache` (with the `metrics`
    /// feature; registered now, with the recorder installed by then).
    fn for_journal(journal: &str, cache: &str) -> Counters {
        let _ = (journal, cache);
        Counters {
            #[cfg(feature = "metrics")]
            exported: Some(Exported::register(journal, cache)),
            ..Counters::default()
        }
    }

    fn depth(&self, depth: u64) {
        self.queue_depth.store(depth, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(exported) = &self.exported {
            exported.queue_depth.set(depth as f64);
        }
    }

    fn lag(&self, lag_ms: u64) {
        self.last_lag_ms.store(lag_ms, Ordering::Relaxed);
        self.max_lag_ms.fetch_max(lag_ms, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(exported) = &self.exported {
            exported.flush_lag.record(lag_ms as f64 / 1e3);
        }
    }
}

/// The settings of a [`WriteBehind`]; see [`WriteBehindBuilder`].
#[derive(Debug, Clone)]
struct Limits {
    ttl: Duration,
    batch_size: usize,
    max_delay: Duration,
    max_len: u64,
    lease: Duration,
    max_attempts: u32,
    retry_base: Duration,
    retry_max: Duration,
    sink_timeout: Duration,
    flusher: bool,
}

/// The journaled writes' cache key rule.
type KeyFn<K> = Arc<dyn Fn(&K) -> String + Send + Sync>;

/// Builds a [`WriteBehind`]; from [`WriteBehind::builder`].
pub struct WriteBehindBuilder<K, V, S> {
    name: String,
    cache: Cache,
    sink: S,
    key: Option<KeyFn<K>>,
    limits: Limits,
    _values: PhantomData<fn(V)>,
}

impl<K, V, S> WriteBehindBuilder<K, V, S>
where
    K: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    S: Sink<K, V>,
{
    /// The cache key of a key's entry (required), as the getter that reads
    /// it renders it: `|id: &u64| format!("user:{id}")`.
    pub fn key(mut self, key: impl Fn(&K) -> String + Send + Sync + 'static) -> Self {
        self.key = Some(Arc::new(key));
        self
    }

    /// How long a written entry stays in the cache (default: the cache's
    /// `default_ttl`). Keep it well above the flush lag: a read that
    /// misses before the flush reads the database's older row.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.limits.ttl = ttl;
        self
    }

    /// The most writes one sink call gets (default 256, at most 4096).
    pub fn batch_size(mut self, size: usize) -> Self {
        self.limits.batch_size = size;
        self
    }

    /// How long a write may wait for more to fill its batch (default
    /// 100 ms); a full batch goes at once.
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.limits.max_delay = delay;
        self
    }

    /// The most writes the journal holds (default 100,000): beyond it,
    /// writes are refused with [`Error::Backlog`] until the sink catches
    /// up. Nothing is ever trimmed from the journal unflushed.
    pub fn max_len(mut self, max_len: u64) -> Self {
        self.limits.max_len = max_len;
        self
    }

    /// The flusher lease's time to live (default 10 s): how long after a
    /// flusher dies another process takes its pending writes over. The
    /// holder extends it every third of that, also while the sink works.
    pub fn takeover_after(mut self, lease: Duration) -> Self {
        self.limits.lease = lease;
        self
    }

    /// How often one write may fail alone before it goes to the dead
    /// letters (default 10; see [`WriteBehind`]).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.limits.max_attempts = attempts;
        self
    }

    /// The back-off between failed sink calls: from `base`, doubling, at
    /// most `max` (default 100 ms to 10 s).
    pub fn retry(mut self, base: Duration, max: Duration) -> Self {
        self.limits.retry_base = base;
        self.limits.retry_max = max;
        self
    }

    /// How long one sink call may take (default 30 s): a call still
    /// running then is abandoned (its future dropped) and counts as a
    /// failure, so that a hung database cannot hold the lease for ever.
    /// An async database driver rolls back a transaction whose future is
    /// dropped.
    pub fn sink_timeout(mut self, timeout: Duration) -> Self {
        self.limits.sink_timeout = timeout;
        self
    }

    /// Whether this process flushes (default `true`). With `false` it only
    /// journals writes, and a process with a flusher applies them.
    pub fn flusher(mut self, flusher: bool) -> Self {
        self.limits.flusher = flusher;
        self
    }

    /// Checks the settings and starts the flusher (in the current Tokio
    /// runtime).
    ///
    /// # Errors
    /// [`Error::Config`] when the cache is not on Redis (a journal in
    /// process memory would lose writes on a crash), the name or a limit
    /// is invalid, no key rule was given, or the flusher has no runtime.
    pub fn start(self) -> Result<WriteBehind<K, V>> {
        let limits = &self.limits;
        let problem = if !self.cache.inner.backend.is_redis() {
            Some("write-behind needs a Redis cache: its journal must outlive this process")
        } else if self.name.is_empty()
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b))
        {
            Some("a write-behind name is ASCII letters, digits and `_-.:`")
        } else if self.key.is_none() {
            Some("a write-behind needs a key rule: `.key(|k| format!(\"user:{k}\"))`")
        } else if !(1..=4096).contains(&limits.batch_size) {
            Some("batch_size must be 1 to 4096")
        } else if limits.max_len == 0 || limits.max_attempts == 0 {
            Some("max_len and max_attempts must be at least 1")
        } else if limits.lease < Duration::from_millis(100) {
            Some("takeover_after must be at least 100 ms")
        } else if limits.max_delay > limits.lease / 2 {
            Some("max_delay must be at most half of takeover_after")
        } else if limits.ttl.is_zero() || limits.sink_timeout.is_zero() {
            Some("ttl and sink_timeout must not be zero")
        } else if limits.retry_base.is_zero() || limits.retry_max < limits.retry_base {
            Some("the retry base must not be zero, nor above the retry maximum")
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(Error::Config(problem.into()));
        }
        let runtime = match tokio::runtime::Handle::try_current() {
            Ok(runtime) => Some(runtime),
            Err(_) if limits.flusher => {
                return Err(Error::Config(
                    "a write-behind flusher starts inside a Tokio runtime".into(),
                ))
            }
            Err(_) => None,
        };
        let namespace = self.cache.inner.settings.namespace.as_deref();
        let tag = format!("{{{}}}", self.name);
        let counters = Counters::for_journal(&self.name, self.cache.inner.cache_label());
        let shared = Arc::new(Shared {
            journal: JournalKeys {
                stream: internal_key(namespace, "wb", &tag),
                dead: internal_key(namespace, "wb-dead", &tag),
                lease: internal_key(namespace, "wb-lease", &tag),
                group: "flushers".into(),
            },
            consumer: lock_token(),
            key: self.key.expect("checked above"),
            cache: self.cache,
            sink: self.sink,
            limits: self.limits,
            counters,
            wake: tokio::sync::Notify::new(),
            urgent: tokio::sync::Notify::new(),
            draining: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            running: AtomicBool::new(false),
            ended: tokio::sync::Notify::new(),
            _types: PhantomData,
        });
        if let Some(runtime) = runtime.filter(|_| shared.limits.flusher) {
            spawn_flusher(&shared, &runtime);
        }
        Ok(WriteBehind {
            handle: Arc::new(Handle(shared)),
        })
    }
}

/// Write-behind over a [`Cache`] on Redis: [`WriteBehind::write`] and
/// [`WriteBehind::delete`] change the cache at once and return once the
/// write is journaled in a Redis Stream; a flusher applies the journal to
/// a [`Sink`] in batches, and removes writes only after the sink took them.
///
/// **Guarantee.** Every write acknowledged with `Ok` reaches the sink at
/// least once, in key order (a later write of a key never lands before an
/// earlier one), or lands in the dead-letter stream (`<ns>:~wb-dead:{name}`,
/// counted), as long as Redis keeps the journal: with `appendonly yes` and
/// `appendfsync always` through a Redis crash, with `everysec` up to about
/// a second of writes can be lost, and with persistence off a Redis restart
/// loses every write not flushed yet. A flusher that crashes mid-batch
/// leaves its writes pending; the next lease holder (any process, after
/// `takeover_after`) claims them and flushes them again, before newer ones.
///
/// One process flushes at a time (a lease in Redis). If the holder is cut
/// off from Redis for longer than `takeover_after` while its sink call
/// still runs, that call may land after the new holder's: a sink that must
/// rule this out keeps each row's [`Write::id`] and ignores older ones.
///
/// **Failures.** A failed sink call is retried with back-off; a batch that
/// keeps failing is split in halves, down to single writes. A write that
/// fails alone `max_attempts` times while the sink takes other writes goes
/// to the dead letters; while the sink takes nothing (an outage), after
/// three times as many. When Redis cannot journal a write, `write` returns
/// the error: there is no silent fallback, and no automatic synchronous
/// write to the sink, since that could be overtaken by an older journaled
/// write of the same key; a caller that prefers the database to an error
/// can write it directly and accept that risk.
///
/// ```no_run
/// # extern crate cached_runtime as redis_cached;
/// # use redis_cached::{Cache, Sink, Write, WriteBehind};
/// # struct Users;
/// # impl Sink<u64, String> for Users {
/// #     type Error = std::io::Error;
/// #     async fn write_batch(&self, _: Vec<Write<u64, String>>) -> Result<(), Self::Error> { Ok(()) }
/// # }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), redis_cached::Error> {
/// use std::time::Duration;
///
/// let cache = Cache::redis("redis://127.0.0.1:6379/")?;
/// let users = WriteBehind::builder("users", &cache, Users)
///     .key(|id: &u64| format!("user:{id}"))
///     .ttl(Duration::from_secs(3600))
///     .start()?;
/// users.write(7, &"Ada".to_string()).await?; // in the cache now, in the database soon
/// users.delete(8).await?;
/// users.shutdown(Duration::from_secs(5)).await?; // flushes what is left
/// # Ok(())
/// # }
/// ```
pub struct WriteBehind<K, V> {
    handle: Arc<Handle<K, V>>,
}

impl<K, V> Clone for WriteBehind<K, V> {
    fn clone(&self) -> Self {
        WriteBehind {
            handle: Arc::clone(&self.handle),
        }
    }
}

impl<K, V> std::fmt::Debug for WriteBehind<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBehind")
            .field("stream", &self.handle.0.journal().stream)
            .finish_non_exhaustive()
    }
}

/// Stops the flusher when the last [`WriteBehind`] clone is dropped.
struct Handle<K, V>(Arc<dyn Journal<K, V>>);

impl<K, V> Drop for Handle<K, V> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

impl WriteBehind<(), ()> {
    /// Starts building a write-behind named `name` (its journal's name in
    /// Redis; processes that share it share the journal) over `cache`,
    /// flushing to `sink`.
    pub fn builder<K, V, S>(name: &str, cache: &Cache, sink: S) -> WriteBehindBuilder<K, V, S>
    where
        K: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        S: Sink<K, V>,
    {
        WriteBehindBuilder {
            name: name.to_owned(),
            cache: cache.clone(),
            sink,
            key: None,
            limits: Limits {
                ttl: cache.default_ttl(),
                batch_size: 256,
                max_delay: Duration::from_millis(100),
                max_len: 100_000,
                lease: Duration::from_secs(10),
                max_attempts: 10,
                retry_base: Duration::from_millis(100),
                retry_max: Duration::from_secs(10),
                sink_timeout: Duration::from_secs(30),
                flusher: true,
            },
            _values: PhantomData,
        }
    }
}

impl<K, V> WriteBehind<K, V>
where
    K: Serialize + Send + Sync + 'static,
    V: Serialize + Send + Sync + 'static,
{
    /// Writes `value` at `key`: in the cache at once, in the sink after
    /// the flush. Returns once the write is journaled.
    ///
    /// A caller that gives up waiting (its future dropped) does not stop
    /// the write half-way: the journal entry and the cache update finish
    /// together, or the write never happened.
    ///
    /// # Errors
    /// [`Error::Backlog`] when the journal is full; a Redis error, timeout
    /// or open breaker when it could not be journaled (then it may still
    /// have been journaled if Redis answered too late: writing again is
    /// safe); an invalid key or an unserializable value.
    pub async fn write(&self, key: K, value: &V) -> Result<JournalId> {
        let entry = self.handle.0.inner().settings.codec.encode(value, None)?;
        self.submit(&key, entry).await
    }

    /// Deletes `key`: the cache holds a cached absence at once (a getter
    /// returning `Option` sees `None`), the sink gets [`Change::Delete`].
    ///
    /// # Errors
    /// As [`WriteBehind::write`].
    pub async fn delete(&self, key: K) -> Result<JournalId> {
        let entry = self.handle.0.inner().settings.codec.encode_absent(None);
        self.submit(&key, entry).await
    }

    async fn submit(&self, key: &K, entry: Vec<u8>) -> Result<JournalId> {
        let journal = Arc::clone(&self.handle.0);
        let inner = journal.inner();
        let rendered = journal.render(key);
        check_user_key(&rendered)?;
        inner.check_size(&entry)?;
        let key_bytes = inner.settings.codec.encode(key, None)?;
        let full = inner.full_key(rendered);
        let accept = async move {
            let id = journal.accept(&full, &key_bytes, &entry).await;
            journal.ensure_flusher();
            id
        };
        // A task of its own, so that a dropped caller cannot leave a write
        // journaled but missing from the cache.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => runtime
                .spawn(accept)
                .await
                .map_err(|_| Error::Redis("the write's task ended early".into()))?,
            Err(_) => accept.await,
        }
    }
}

impl<K, V> WriteBehind<K, V> {
    /// This process's counters.
    pub fn stats(&self) -> WriteBehindStats {
        self.handle.0.stats()
    }

    /// How many writes the journal holds (not yet flushed, all processes).
    ///
    /// # Errors
    /// When Redis fails, times out or is skipped by the open breaker.
    pub async fn pending(&self) -> Result<u64> {
        self.handle.0.pending().await
    }

    /// Flushes what is pending without waiting for batches to fill, waits
    /// until the journal is empty or `within` passed, then stops this
    /// process's flusher: a sink call in progress finishes first (the
    /// flusher is waited for until `within` ends, at least 1 s), then the
    /// lease is given up and another process takes over at once. Returns
    /// how many writes were still pending: they stay journaled for the
    /// next flusher.
    ///
    /// # Errors
    /// When Redis fails while it looks at the journal (the flusher is
    /// stopped all the same).
    pub async fn shutdown(&self, within: Duration) -> Result<u64> {
        let journal = &self.handle.0;
        journal.drain();
        let deadline = Instant::now()
            .checked_add(within)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));
        let left = loop {
            match journal.pending().await {
                Ok(left) if left > 0 && Instant::now() < deadline => {}
                done => break done,
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        journal.stop();
        let wait = deadline.saturating_duration_since(Instant::now());
        journal.ended(wait.max(Duration::from_secs(1))).await;
        left
    }
}

/// What a handle needs of its shared state, without the sink's type.
trait Journal<K, V>: Send + Sync {
    fn inner(&self) -> &Inner;
    fn journal(&self) -> &JournalKeys;
    fn render(&self, key: &K) -> String;
    fn accept<'a>(
        &'a self,
        full: &'a str,
        key: &'a [u8],
        entry: &'a [u8],
    ) -> futures_util::future::BoxFuture<'a, Result<JournalId>>;
    fn stats(&self) -> WriteBehindStats;
    fn pending(&self) -> futures_util::future::BoxFuture<'_, Result<u64>>;
    fn drain(&self);
    fn stop(&self);
    /// Starts the flusher again if its task ended (the runtime that ran it
    /// shut down) while the handle lives.
    fn ensure_flusher(self: Arc<Self>);
    /// Waits, at most `within`, until the flusher task has ended.
    fn ended(&self, within: Duration) -> futures_util::future::BoxFuture<'_, ()>;
}

struct Shared<K, V, S> {
    journal: JournalKeys,
    /// This flusher's consumer name in the group.
    consumer: String,
    key: KeyFn<K>,
    cache: Cache,
    sink: S,
    limits: Limits,
    counters: Counters,
    /// Woken by local writes, a drain or a stop.
    wake: tokio::sync::Notify,
    /// Woken by a drain or a stop only.
    urgent: tokio::sync::Notify,
    /// Flush without waiting for batches to fill.
    draining: AtomicBool,
    stop: AtomicBool,
    /// Whether a flusher task is alive.
    running: AtomicBool,
    ended: tokio::sync::Notify,
    _types: PhantomData<fn() -> V>,
}

impl<K, V, S> Journal<K, V> for Shared<K, V, S>
where
    K: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    S: Sink<K, V>,
{
    fn inner(&self) -> &Inner {
        &self.cache.inner
    }

    fn journal(&self) -> &JournalKeys {
        &self.journal
    }

    fn render(&self, key: &K) -> String {
        (self.key)(key)
    }

    fn accept<'a>(
        &'a self,
        full: &'a str,
        key: &'a [u8],
        entry: &'a [u8],
    ) -> futures_util::future::BoxFuture<'a, Result<JournalId>> {
        Box::pin(Shared::accept(self, full, key, entry))
    }

    fn stats(&self) -> WriteBehindStats {
        let c = &self.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        WriteBehindStats {
            accepted: get(&c.accepted),
            refused: get(&c.refused),
            failed: get(&c.failed),
            cache_update_failures: get(&c.cache_update_failures),
            flushed: get(&c.flushed),
            coalesced: get(&c.coalesced),
            batches: get(&c.batches),
            retries: get(&c.retries),
            dead_letters: get(&c.dead_letters),
            claimed: get(&c.claimed),
            queue_depth: get(&c.queue_depth),
            last_flush_lag: Duration::from_millis(get(&c.last_lag_ms)),
            max_flush_lag: Duration::from_millis(get(&c.max_lag_ms)),
        }
    }

    fn pending(&self) -> futures_util::future::BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            let redis = self.redis()?;
            let inner = &self.cache.inner;
            let depth = inner
                .guarded(redis.stream_len(&self.journal.stream))
                .await?;
            self.counters.depth(depth);
            Ok(depth)
        })
    }

    fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.wake.notify_one();
        self.urgent.notify_one();
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake.notify_one();
        self.urgent.notify_one();
    }

    fn ensure_flusher(self: Arc<Self>) {
        if self.limits.flusher && !self.stopping() && !self.running.load(Ordering::Acquire) {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                spawn_flusher(&self, &runtime);
            }
        }
    }

    fn ended(&self, within: Duration) -> futures_util::future::BoxFuture<'_, ()> {
        Box::pin(async move {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.running.load(Ordering::Acquire) {
                let _ = tokio::time::timeout(within, ended).await;
            }
        })
    }
}

/// One key's writes in a batch: the last one, and the ids of all.
struct Slot<K, V> {
    write: Write<K, V>,
    key: Vec<u8>,
    entry: Vec<u8>,
    ids: Vec<String>,
}

/// Part of a batch that the sink has not taken yet.
struct Part<K, V> {
    slots: Vec<Slot<K, V>>,
    failures: u32,
    failing_since: Option<Instant>,
    error: String,
}

impl<K, V, S> Shared<K, V, S>
where
    K: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    S: Sink<K, V>,
{
    fn redis(&self) -> Result<&RedisBackend> {
        self.cache
            .inner
            .backend
            .redis()
            .ok_or_else(|| Error::Config("write-behind needs a Redis cache".into()))
    }

    async fn accept(&self, full: &str, key: &[u8], entry: &[u8]) -> Result<JournalId> {
        let inner = &self.cache.inner;
        let redis = self.redis()?;
        let appended = inner
            .guarded(redis.journal_append(&self.journal, self.limits.max_len, key, entry))
            .await;
        let id = match appended {
            Ok(Some(id)) => id,
            Ok(None) => {
                self.counters.add(Tally::refused, 1);
                return Err(Error::Backlog(self.limits.max_len));
            }
            Err(err) => {
                self.counters.add(Tally::failed, 1);
                // Redis may have journaled it all the same (a reply too
                // late, a connection reset after the send): the cache must
                // not go on serving what the write replaces.
                let _ = inner.tombstone(full).await;
                return Err(err);
            }
        };
        self.counters.add(Tally::accepted, 1);
        let version = companion_key(inner.settings.namespace.as_deref(), full, "wbv");
        let put = redis.journal_put(full, &version, &id, entry, self.limits.ttl);
        if let Err(err) = inner.guarded(put).await {
            self.counters.add(Tally::cache_update_failures, 1);
            tracing::warn!(target: "redis_cached", error = %err, "a journaled write could not update the cache; invalidating it");
            let _ = inner.tombstone(full).await;
        }
        // Newer than anything computed here before: later callers must
        // not join such a computation or take its lock notification.
        inner.wrote(full);
        self.wake.notify_one();
        JournalId::parse(&id).ok_or_else(|| Error::Redis(format!("unexpected stream id {id}")))
    }

    /// Waits for a local write, a drain or a stop, at most `period`.
    async fn idle(&self, period: Duration) {
        if self.stopping() {
            return;
        }
        let _ = tokio::time::timeout(period, self.wake.notified()).await;
    }

    /// Waits at most `period`, less if a drain or a stop begins.
    async fn pause(&self, period: Duration) {
        if self.stopping() {
            return;
        }
        let _ = tokio::time::timeout(period, self.urgent.notified()).await;
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn hurry(&self) -> bool {
        self.draining.load(Ordering::Acquire) || self.stopping()
    }

    /// Extends the lease, or with `take` takes it if it is free; whether
    /// this process holds it.
    async fn lease(&self, take: bool) -> Result<bool> {
        let redis = self.redis()?;
        let lease = redis.lease(&self.journal.lease, &self.consumer, self.limits.lease, take);
        self.cache.inner.guarded(lease).await
    }

    /// Becomes the flusher: makes sure the group exists, claims what other
    /// flushers left pending (all of it: none of them can read or flush
    /// without the lease), and forgets the consumers left with nothing.
    async fn take_over(&self) -> Result<()> {
        let inner = &self.cache.inner;
        let redis = self.redis()?;
        inner.guarded(redis.journal_group(&self.journal)).await?;
        let claim = redis.journal_claim(&self.journal, &self.consumer);
        let claimed = inner.guarded_within(self.limits.lease, claim).await?;
        if claimed > 0 {
            tracing::info!(target: "redis_cached", claimed, stream = %self.journal.stream, "took over pending writes");
            self.counters.add(Tally::claimed, claimed as u64);
        }
        let forget = redis.journal_forget(&self.journal, &self.consumer);
        if let Err(err) = inner.guarded(forget).await {
            tracing::debug!(target: "redis_cached", error = %err, "stopped flushers not removed from the group");
        }
        Ok(())
    }

    /// Up to `count` writes, if this process still holds the lease (which
    /// the read extends): its pending ones first unless `new_only`.
    async fn read(&self, count: usize, new_only: bool) -> Result<Option<Vec<Journaled>>> {
        let redis = self.redis()?;
        let read = redis.journal_read(
            &self.journal,
            &self.consumer,
            &self.consumer,
            self.limits.lease,
            count,
            new_only,
        );
        self.cache.inner.guarded(read).await
    }

    /// The next writes to flush: this flusher's pending ones first (a
    /// takeover, a failed acknowledgement), then new ones; a batch that is
    /// not full waits until its oldest write is `max_delay` old. `None`
    /// when the lease is lost.
    async fn next_batch(&self) -> Result<Option<Vec<Journaled>>> {
        let size = self.limits.batch_size;
        let Some(mut batch) = self.read(size, false).await? else {
            return Ok(None);
        };
        let Some(first) = batch.first().and_then(|w| JournalId::parse(&w.id)) else {
            return Ok(Some(batch));
        };
        let age = Duration::from_millis(now_unix_ms().saturating_sub(first.ms));
        if batch.len() < size && age < self.limits.max_delay && !self.hurry() {
            // Not woken by each write meanwhile: one read at the end.
            self.pause(self.limits.max_delay - age).await;
            match self.read(size - batch.len(), true).await? {
                Some(more) => batch.extend(more),
                None => return Ok(None),
            }
        }
        Ok(Some(batch))
    }

    /// Coalesces `batch` into one write per key (the last), in journal
    /// order; entries removed meanwhile are acknowledged, undecodable ones
    /// buried.
    async fn coalesce(&self, batch: Vec<Journaled>) -> Result<Vec<Slot<K, V>>> {
        let codec = self.cache.inner.settings.codec;
        let mut slots: Vec<Slot<K, V>> = Vec::new();
        let mut index: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut gone = Vec::new();
        for journaled in batch {
            let (Some(key), Some(entry)) = (journaled.key, journaled.entry) else {
                gone.push(journaled.id);
                continue;
            };
            let decoded = decode_write(codec, &key, &entry, &journaled.id);
            let write = match decoded {
                Ok(write) => write,
                Err(err) => {
                    self.bury(&key, &entry, &err.to_string(), 0, &[journaled.id.as_str()])
                        .await?;
                    continue;
                }
            };
            match index.get(&key) {
                Some(&at) => {
                    self.counters.add(Tally::coalesced, 1);
                    let slot = &mut slots[at];
                    slot.write = write;
                    slot.entry = entry;
                    slot.ids.push(journaled.id);
                }
                None => {
                    index.insert(key.clone(), slots.len());
                    slots.push(Slot {
                        write,
                        key,
                        entry,
                        ids: vec![journaled.id],
                    });
                }
            }
        }
        let gone: Vec<&str> = gone.iter().map(String::as_str).collect();
        self.ack(&gone).await?;
        slots.sort_by_key(|slot| slot.write.id);
        Ok(slots)
    }

    async fn ack(&self, ids: &[&str]) -> Result<()> {
        let redis = self.redis()?;
        self.cache
            .inner
            .guarded(redis.journal_ack(&self.journal, ids))
            .await
    }

    async fn bury(
        &self,
        key: &[u8],
        entry: &[u8],
        error: &str,
        attempts: u32,
        ids: &[&str],
    ) -> Result<()> {
        let redis = self.redis()?;
        let bury = redis.journal_bury(&self.journal, key, entry, error, attempts, ids);
        self.cache.inner.guarded(bury).await?;
        self.counters.add(Tally::dead_letters, 1);
        tracing::error!(target: "redis_cached", error, attempts, stream = %self.journal.dead, "a write the sink keeps refusing was moved to the dead letters");
        Ok(())
    }

    /// Runs the sink on `slots` if the lease still holds, extending it
    /// while the sink works and abandoning the call (dropping its future)
    /// once the lease is lost or `sink_timeout` passed. The sink's outcome
    /// (`None`: not called, or abandoned for the lease), and whether the
    /// lease held.
    async fn call_sink(
        &self,
        slots: &[Slot<K, V>],
    ) -> (Option<std::result::Result<(), String>>, bool) {
        // A Redis error counts as a lost lease: the sink is never called
        // while another process may hold it.
        if !matches!(self.lease(false).await, Ok(true)) {
            return (None, false);
        }
        let batch: Vec<Write<K, V>> = slots.iter().map(|slot| slot.write.clone()).collect();
        let call = AssertUnwindSafe(self.sink.write_batch(batch)).catch_unwind();
        let call = tokio::time::timeout(self.limits.sink_timeout, call);
        tokio::pin!(call);
        let period = self.limits.lease / 3;
        loop {
            tokio::select! {
                outcome = &mut call => {
                    let outcome = match outcome {
                        Ok(Ok(Ok(()))) => Ok(()),
                        Ok(Ok(Err(err))) => Err(err.to_string()),
                        Ok(Err(_)) => Err("the sink panicked".to_owned()),
                        Err(_) => Err(format!("the sink took longer than {:?}", self.limits.sink_timeout)),
                    };
                    return (Some(outcome), true);
                }
                () = tokio::time::sleep(period) => {
                    if let Ok(false) = self.lease(false).await {
                        tracing::warn!(target: "redis_cached", stream = %self.journal.stream, "write-behind lease lost during a sink call; call abandoned");
                        return (None, false);
                    }
                }
            }
        }
    }

    /// Flushes `slots` until the sink took each or it was buried; whether
    /// the lease held throughout. A stop or a lost lease leaves the rest
    /// pending in the journal, for whoever flushes next.
    async fn flush(&self, slots: Vec<Slot<K, V>>) -> Result<bool> {
        let mut parts = vec![Part {
            slots,
            failures: 0,
            failing_since: None,
            error: String::new(),
        }];
        let mut backoff = self.limits.retry_base;
        let mut last_success: Option<Instant> = None;
        while !parts.is_empty() {
            let mut failing = Vec::new();
            let mut progressed = false;
            let mut parts_left = parts.into_iter();
            for mut part in parts_left.by_ref() {
                let (outcome, held) = self.call_sink(&part.slots).await;
                match outcome {
                    Some(Ok(())) => {
                        progressed = true;
                        last_success = Some(Instant::now());
                        self.flushed(&part.slots).await?;
                    }
                    Some(Err(error)) => {
                        self.counters.add(Tally::retries, 1);
                        tracing::warn!(target: "redis_cached", %error, writes = part.slots.len(), "the write-behind sink failed; retrying");
                        part.failures += 1;
                        let since = *part.failing_since.get_or_insert_with(Instant::now);
                        part.error = error;
                        failing.extend(self.after_failure(part, since, last_success).await?);
                    }
                    None => {}
                }
                if !held {
                    return Ok(false);
                }
            }
            parts = failing;
            if parts.is_empty() || self.stopping() {
                break;
            }
            backoff = if progressed {
                self.limits.retry_base
            } else {
                backoff.saturating_mul(2).min(self.limits.retry_max)
            };
            self.pause(backoff).await;
        }
        Ok(true)
    }

    /// What becomes of a part that just failed: kept, split, or (a single
    /// write) buried.
    async fn after_failure(
        &self,
        mut part: Part<K, V>,
        since: Instant,
        last_success: Option<Instant>,
    ) -> Result<Vec<Part<K, V>>> {
        let attempts = self.limits.max_attempts;
        if part.slots.len() == 1 {
            let others_pass = last_success.is_some_and(|at| at > since);
            let limit = if others_pass {
                attempts
            } else {
                attempts.saturating_mul(3)
            };
            if part.failures < limit {
                return Ok(vec![part]);
            }
            let slot = &part.slots[0];
            let ids: Vec<&str> = slot.ids.iter().map(String::as_str).collect();
            self.bury(&slot.key, &slot.entry, &part.error, part.failures, &ids)
                .await?;
            return Ok(Vec::new());
        }
        if part.failures < SPLIT_AFTER {
            return Ok(vec![part]);
        }
        let second = part.slots.split_off(part.slots.len() / 2);
        let half = |slots| Part {
            slots,
            failures: 0,
            failing_since: part.failing_since,
            error: part.error.clone(),
        };
        Ok(vec![half(std::mem::take(&mut part.slots)), half(second)])
    }

    /// Records that the sink took `slots`, and removes them from the journal.
    async fn flushed(&self, slots: &[Slot<K, V>]) -> Result<()> {
        let ids: Vec<&str> = slots
            .iter()
            .flat_map(|slot| slot.ids.iter().map(String::as_str))
            .collect();
        let oldest = slots.iter().map(|slot| slot.write.id).min();
        self.ack(&ids).await?;
        let c = &self.counters;
        c.add(Tally::batches, 1);
        c.add(Tally::flushed, slots.len() as u64);
        if let Some(oldest) = oldest {
            c.lag(now_unix_ms().saturating_sub(oldest.ms));
        }
        Ok(())
    }
}

/// Failures of a part before it is split in halves.
const SPLIT_AFTER: u32 = 3;

fn decode_write<K: DeserializeOwned, V: DeserializeOwned>(
    codec: crate::codec::Codec,
    key: &[u8],
    entry: &[u8],
    id: &str,
) -> Result<Write<K, V>> {
    let id = JournalId::parse(id).ok_or_else(|| Error::Codec(format!("journal id {id}")))?;
    let key = match codec.decode::<K>(key)? {
        Entry::Value(Some(key), _) => key,
        _ => return Err(Error::Codec("journaled key is not a value".into())),
    };
    let change = match codec.decode::<V>(entry)? {
        Entry::Value(Some(value), _) => Change::Upsert(value),
        Entry::Value(None, _) => Change::Delete,
        Entry::Tombstone => return Err(Error::Codec("journaled entry is a tombstone".into())),
    };
    Ok(Write { key, change, id })
}

fn spawn_flusher<K, V, S>(shared: &Arc<Shared<K, V, S>>, runtime: &tokio::runtime::Handle)
where
    K: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    S: Sink<K, V>,
{
    if shared.running.swap(true, Ordering::AcqRel) {
        return;
    }
    // Made before the task, so that a task dropped unstarted (its runtime
    // shutting down) clears `running` too.
    let running = Running(Arc::clone(shared));
    runtime.spawn(async move {
        let running = running;
        run(&running.0).await;
    });
}

/// Clears `running` and wakes `shutdown` however the flusher ends.
struct Running<K, V, S>(Arc<Shared<K, V, S>>);

impl<K, V, S> Drop for Running<K, V, S> {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Release);
        self.0.ended.notify_waiters();
    }
}

/// The flusher: while the handle lives, takes the lease when it is free
/// and flushes the journal batch by batch.
async fn run<K, V, S>(shared: &Shared<K, V, S>)
where
    K: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    S: Sink<K, V>,
{
    let limits = &shared.limits;
    // Each read extends the lease, so an idle holder reads at least three
    // times per lease.
    let poll = limits
        .max_delay
        .min(limits.lease / 4)
        .max(Duration::from_millis(5));
    let mut leader = false;
    let mut pause = limits.retry_base;
    while !shared.stopping() {
        if !leader {
            match shared.lease(true).await {
                Ok(true) => match shared.take_over().await {
                    Ok(()) => leader = true,
                    Err(err) => {
                        tracing::warn!(target: "redis_cached", error = %err, "write-behind takeover failed");
                        shared.pause(pause).await;
                        pause = pause.saturating_mul(2).min(limits.retry_max);
                        continue;
                    }
                },
                Ok(false) => {
                    shared.pause(limits.lease / 4).await;
                    continue;
                }
                Err(_) => {
                    shared.pause(pause).await;
                    pause = pause.saturating_mul(2).min(limits.retry_max);
                    continue;
                }
            }
        }
        let batch = match shared.next_batch().await {
            Ok(Some(batch)) => batch,
            Ok(None) => {
                leader = false;
                continue;
            }
            Err(err) => {
                tracing::debug!(target: "redis_cached", error = %err, "write-behind read failed");
                shared.pause(pause).await;
                pause = pause.saturating_mul(2).min(limits.retry_max);
                continue;
            }
        };
        pause = limits.retry_base;
        if batch.is_empty() {
            shared.draining.store(false, Ordering::Release);
            shared.idle(poll).await;
            continue;
        }
        let flushed = match shared.coalesce(batch).await {
            Ok(slots) if slots.is_empty() => Ok(true),
            Ok(slots) => shared.flush(slots).await,
            Err(err) => Err(err),
        };
        match flushed {
            Ok(held) => leader = held,
            // The writes stay pending and are read again.
            Err(err) => {
                tracing::debug!(target: "redis_cached", error = %err, "write-behind acknowledgement failed");
                shared.pause(pause).await;
            }
        }
        if let Ok(redis) = shared.redis() {
            let depth = redis.stream_len(&shared.journal.stream);
            if let Ok(depth) = shared.cache.inner.guarded(depth).await {
                shared.counters.depth(depth);
            }
        }
    }
    if leader {
        if let Ok(redis) = shared.redis() {
            let _ = shared
                .cache
                .inner
                .guarded(redis.unlease(&shared.journal.lease, &shared.consumer))
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_ids_order_as_the_stream_does() {
        let a = JournalId::parse("1700000000000-5").expect("valid");
        let b = JournalId::parse("1700000000000-12").expect("valid");
        let c = JournalId::parse("1700000000001-0").expect("valid");
        assert!(a < b && b < c);
        assert_eq!(b.to_string(), "1700000000000-12");
        assert!(JournalId::parse("17-x").is_none());
        assert!(JournalId::parse("17").is_none());
    }
}
