//! The cache's core: its backend, codec, breaker and counters, and the
//! operations every algorithm is made of: read and decode a key, store an
//! entry (plainly or by compare-and-set), leave a tombstone, run a backend
//! operation under `op_timeout` and the breaker.
//!
//! Everything here works on bytes except the thin decode and encode steps,
//! so that little code is compiled once per cached function.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesOrdered, StreamExt};
use serde::de::DeserializeOwned;

use crate::backend::{AnyBackend, Backend, Bytes, RedisBackend, Seen, StoreIf};
use crate::encoding::codec::{Codec, Entry, Timing};
use crate::encoding::key::{companion_key, full_key, with_full_key};
use crate::encoding::shape::{Shape, Stored};
use crate::engine::breaker::{Breaker, Health, Outage, Transition};
use crate::engine::flight::Flights;
use crate::engine::policy::Policy;
use crate::error::{Error, Result};
use crate::observe::meters::{self, Meters, NO_FUNCTION};
use crate::observe::redis_time;
use crate::observe::site::Site;
use crate::observe::stats::{Counters, Event};
use crate::token::now_unix_ms;

/// The most keys one batch read or store sends in one command or pipeline,
/// so that no single command holds Redis's one thread for long, however
/// many elements a call asks for.
pub(crate) const BATCH_CHUNK: usize = 512;
/// How many chunks of one batch call are in flight at once.
const CHUNKS_IN_FLIGHT: usize = 4;

/// Runs `chunks` with at most `limit` of them at once; their outputs in
/// order.
async fn in_flight<F: Future>(mut chunks: impl Iterator<Item = F>, limit: usize) -> Vec<F::Output> {
    let mut running = FuturesOrdered::new();
    let mut outputs = Vec::new();
    loop {
        while running.len() < limit.max(1) {
            match chunks.next() {
                Some(chunk) => running.push_back(chunk),
                None => break,
            }
        }
        match running.next().await {
            Some(output) => outputs.push(output),
            None => return outputs,
        }
    }
}
/// The settings of a cache, fixed when it is built.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) namespace: Option<String>,
    pub(crate) default_ttl: Duration,
    pub(crate) op_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) invalidation_window: Duration,
    /// How long a caller waits for this process's computation of its key.
    pub(crate) coalesce_wait: Duration,
    pub(crate) max_value_bytes: usize,
    /// Read at most `max_value_bytes + 1` bytes of an entry (GETRANGE)
    /// rather than all of it (GET).
    pub(crate) bounded_reads: bool,
    pub(crate) codec: Codec,
    /// Name each call's key in its tracing span (opt-in).
    pub(crate) log_keys: bool,
}

/// What a cache is made of; the public handle holds it in an `Arc`.
pub(crate) struct Inner {
    pub(crate) backend: AnyBackend,
    pub(crate) settings: Settings,
    /// The breakers: the whole one, and on a cluster one per master.
    pub(crate) health: Health,
    /// Shared with the tasks a call starts (a lock's watchdog).
    pub(crate) counters: Arc<Counters>,
    pub(crate) flights: Flights,
    /// `try_get_or_compute`'s computations in flight, whose errors their
    /// waiting callers share.
    pub(crate) try_flights: crate::engine::flight::TryFlights,
    /// The keys this process is refreshing in the background.
    pub(crate) refreshing: crate::engine::refresh_claims::Claims,
    /// The keys this process invalidated lately (for lock waiters).
    pub(crate) recent: crate::engine::recent_invalidations::Recent,
    /// Whether a value over `max_value_bytes` was reported at `warn`.
    pub(crate) oversized_warned: AtomicBool,
    /// Whether a `near` function on a cache without a near tier was
    /// reported at `warn`.
    pub(crate) near_off_warned: AtomicBool,
    /// The cache's exported metrics (feature `metrics`).
    pub(crate) meters: Arc<Meters>,
}

/// What a lookup found.
pub(crate) enum Lookup<T> {
    Hit(Hit<T>),
    /// Nothing usable; what was there, for the compare-and-set.
    Miss(Seen),
}

/// A usable entry.
pub(crate) struct Hit<T> {
    /// The value; `None` for a cached absence.
    pub(crate) value: Option<T>,
    pub(crate) timing: Option<Timing>,
    /// The entry as stored, for a refresh's compare-and-set.
    pub(crate) raw: Bytes,
}

/// An encoded result: the entry, and how long to store it (`None`: share
/// it with this process's followers but do not store it).
pub(crate) type Encoded = (Arc<[u8]>, Option<Duration>);

/// How a compare-and-set ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreOutcome {
    Stored,
    /// The key changed since it was read: an invalidation or a newer write won.
    Refused,
    /// Nothing was stored: Redis failed, the value is too large, or what the
    /// key held is unknown.
    Failed,
}

impl Inner {
    /// The key sent to the backend for `key`.
    pub(crate) fn full_key(&self, key: String) -> String {
        full_key(self.settings.namespace.as_deref(), key)
    }

    /// Runs `with` on the key sent to the backend for `key`, built without
    /// allocating (for a lookup in this process).
    pub(crate) fn with_full_key<T>(&self, key: &str, with: impl FnOnce(&str) -> T) -> T {
        with_full_key(self.settings.namespace.as_deref(), key, with)
    }

    /// Names `key` (as sent to the backend) in `span`'s field `key`, if
    /// the cache was built with `log_keys(true)` and the span is listened to.
    pub(crate) fn record_key(&self, span: &tracing::Span, key: &str) {
        if self.settings.log_keys && !span.is_disabled() {
            span.record("key", key);
        }
    }

    /// Runs one backend operation under the breaker and `op_timeout`,
    /// counting what happens. The in-memory backend cannot fail or block, so
    /// it runs bare. For an operation that names no key: on a cluster, see
    /// [`Inner::guarded_at`].
    pub(crate) async fn guarded<T>(&self, op: impl Future<Output = Result<T>>) -> Result<T> {
        self.guarded_within(self.settings.op_timeout, op).await
    }

    /// [`Inner::guarded`] for an operation on `key` (or on keys of its
    /// master): on a cluster, under the breaker of the master serving it,
    /// so that a sick master's keys skip Redis while the others' do not.
    pub(crate) async fn guarded_at<T>(
        &self,
        key: &str,
        op: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let breaker = self.health.of(self.backend.node_of(key));
        self.run_guarded(breaker, self.settings.op_timeout, op)
            .await
    }

    /// [`Inner::guarded_at`] for each of `op`'s attempts, one more after a
    /// pause while the operation is refused because its cluster slot is
    /// moving between nodes, until `deadline`.
    pub(crate) async fn guarded_through_migration<T, F, Fut>(
        &self,
        key: &str,
        deadline: Instant,
        op: F,
    ) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut pause = Duration::from_millis(10);
        loop {
            match self.guarded_at(key, op()).await {
                Err(err) if err.is_migrating() && Instant::now() + pause < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                done => return done,
            }
        }
    }

    /// [`Inner::guarded`] with another bound than `op_timeout`.
    pub(crate) async fn guarded_within<T>(
        &self,
        bound: Duration,
        op: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        self.run_guarded(self.health.of(None), bound, op).await
    }

    async fn run_guarded<T>(
        &self,
        (breaker, master): (&Breaker, Option<usize>),
        bound: Duration,
        op: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        if !self.backend.is_redis() {
            return op.await;
        }
        if !breaker.allow() {
            self.count(None, Event::breaker_skips);
            return Err(Error::BreakerOpen);
        }
        let stuck_links = self.backend.redis().map(RedisBackend::stuck_links);
        let started = (meters::EXPORTED || redis_time::wanted()).then(Instant::now);
        let outcome = if self.backend.is_cluster() {
            self.watched(master, bound, op).await
        } else {
            tokio::time::timeout(bound, op).await
        };
        if let Some(started) = started {
            let took = started.elapsed();
            self.meters.redis_time(took, self.cache_label());
            redis_time::add(took);
        }
        let err = match outcome {
            Ok(Ok(value)) => {
                if let Some(outage) = breaker.success() {
                    self.recovered(master, outage);
                }
                return Ok(value);
            }
            Ok(Err(err @ (Error::Refused(_) | Error::Rejected(_)))) => {
                // Redis answered: it is up, only this command was refused.
                if let Some(outage) = breaker.success() {
                    self.recovered(master, outage);
                }
                self.count(
                    None,
                    match err {
                        Error::Refused(_) => Event::refused,
                        _ => Event::rejected,
                    },
                );
                tracing::debug!(target: "redis_cached", error = %err, "Redis refused a command");
                return Err(err);
            }
            // A bound inside the operation (a merged read's `MGET`) ran out.
            Ok(Err(err @ Error::Timeout(_))) => {
                self.count(None, Event::timeouts);
                err
            }
            Ok(Err(err)) => {
                self.count(None, Event::errors);
                err
            }
            Err(_) => {
                self.count(None, Event::timeouts);
                Error::Timeout(bound)
            }
        };
        tracing::debug!(target: "redis_cached", error = %err, "Redis operation failed");
        if self.backend.redis().map(RedisBackend::stuck_links) != stuck_links {
            // Sent on a cluster connection since found stuck and replaced:
            // not the master's failure.
            return Err(err);
        }
        let transition = breaker.failure();
        if transition != Transition::None {
            // An outage is counted once; each probe that failed in it apart.
            self.count(
                None,
                match transition {
                    Transition::Opened => Event::breaker_opens,
                    _ => Event::breaker_failed_probes,
                },
            );
            self.health
                .publish_open_count(|open| self.meters.breakers_open(open, self.cache_label()));
            if let Some(redis) = self.backend.redis() {
                redis.failing(master, transition == Transition::Reopened);
            }
        }
        match (transition, master) {
            // Once per outage at `warn`; each failed probe at `debug`.
            (Transition::Reopened, _) => {
                tracing::debug!(target: "redis_cached", error = %err, "probe failed; Redis still skipped");
            }
            (Transition::Opened, None) => tracing::warn!(target: "redis_cached",
                error = %err,
                "Redis failing; skipping it for the breaker cool-down, values are computed uncached"
            ),
            (Transition::Opened, Some(node)) => tracing::warn!(target: "redis_cached",
                error = %err,
                master = %self.master_name(node),
                "a Redis Cluster master failing; skipping it for the breaker cool-down, \
                 the values of its slots are computed uncached"
            ),
            (Transition::None, _) => {}
        }
        Err(err)
    }

    /// Runs a cluster operation within `bound`. One still out after a
    /// quarter of it has the backend check that the cluster connection
    /// answers at all (see `RedisBackend::check_cluster_link`), so that a
    /// stuck connection is replaced before the operations on it time out,
    /// and their failures are not held against the masters.
    async fn watched<T>(
        &self,
        master: Option<usize>,
        bound: Duration,
        op: impl Future<Output = Result<T>>,
    ) -> std::result::Result<Result<T>, tokio::time::error::Elapsed> {
        tokio::pin!(op);
        let early = bound / 4;
        if let Ok(done) = tokio::time::timeout(early, &mut op).await {
            return Ok(done);
        }
        if let Some(redis) = self.backend.redis() {
            let healthy = |other| !self.health.of(Some(other)).0.is_open();
            redis.check_cluster_link(master, healthy, early);
        }
        tokio::time::timeout(bound - early, op).await
    }

    /// Reports that the breaker of `master` (or the whole one) closed after
    /// `outage`.
    fn recovered(&self, master: Option<usize>, outage: Outage) {
        self.health
            .publish_open_count(|open| self.meters.breakers_open(open, self.cache_label()));
        let master = match master {
            None => String::new(),
            Some(node) => format!(" (cluster master {})", self.master_name(node)),
        };
        tracing::info!(
            target: "redis_cached",
            outage = ?outage.lasted,
            failed_probes = outage.failed_probes,
            "Redis reachable again{master} after {:?} ({} failed probes); caching resumed",
            outage.lasted,
            outage.failed_probes
        );
    }

    /// `host:port` of cluster master number `node`, for the logs.
    fn master_name(&self, node: usize) -> String {
        self.backend
            .redis()
            .and_then(|redis| redis.master_address(node))
            .map_or_else(
                || format!("#{node}"),
                |(host, port)| format!("{host}:{port}"),
            )
    }

    /// Runs `op` on each part of `items` that one cluster master serves
    /// (all of them at once on one server, or while the slot map is not
    /// known), each part under its master's breaker and cut in chunks of at
    /// most [`BATCH_CHUNK`] items; every master's first chunk runs at once,
    /// and no more than [`CHUNKS_IN_FLIGHT`] chunks beyond. Each item's
    /// outcome, in order. `op` answers one value per item it is given.
    async fn per_master<I, T, F, Fut>(
        &self,
        items: &[I],
        key_of: impl for<'i> Fn(&'i I) -> &'i str,
        op: F,
    ) -> Vec<Result<T>>
    where
        I: Clone,
        F: Fn(Vec<I>) -> Fut,
        Fut: Future<Output = Result<Vec<T>>>,
    {
        let mut parts: Vec<(Option<usize>, Vec<usize>)> = Vec::new();
        for (n, item) in items.iter().enumerate() {
            let master = self.backend.node_of(key_of(item));
            match parts.iter_mut().find(|(m, _)| *m == master) {
                Some((_, positions)) => positions.push(n),
                None => parts.push((master, vec![n])),
            }
        }
        // Round-robin over the masters, so that each one's first chunk is
        // among the first sent.
        let mut per_part: Vec<_> = parts
            .iter()
            .map(|(_, positions)| positions.chunks(BATCH_CHUNK))
            .collect();
        let mut chunks: Vec<&[usize]> = Vec::new();
        loop {
            let before = chunks.len();
            chunks.extend(per_part.iter_mut().filter_map(Iterator::next));
            if chunks.len() == before {
                break;
            }
        }
        let op = &op;
        let key_of = &key_of;
        let runs = chunks.iter().filter_map(|positions| {
            let first = items.get(*positions.first()?)?;
            let part: Vec<I> = positions.iter().map(|&n| items[n].clone()).collect();
            let key = key_of(first);
            Some(async move { self.guarded_at(key, op(part)).await })
        });
        let outcomes = in_flight(runs, CHUNKS_IN_FLIGHT.max(parts.len())).await;
        let mut results: Vec<Option<Result<T>>> = (0..items.len()).map(|_| None).collect();
        for (positions, outcome) in chunks.iter().zip(outcomes) {
            match outcome {
                Ok(values) if values.len() == positions.len() => {
                    for (&n, value) in positions.iter().zip(values) {
                        results[n] = Some(Ok(value));
                    }
                }
                outcome => {
                    let err = outcome.err().unwrap_or_else(|| {
                        Error::Redis("a multi-key operation answered with the wrong count".into())
                    });
                    for &n in positions.iter() {
                        results[n] = Some(Err(err.clone()));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|result| result.unwrap_or_else(|| Err(Error::Redis("not sent".into()))))
            .collect()
    }

    /// Stores each entry at its key for `ttl`, per master (see
    /// [`Inner::per_master`]); each entry's outcome.
    pub(crate) async fn set_many(
        &self,
        entries: &[(String, Arc<[u8]>)],
        ttl: Duration,
    ) -> Vec<Result<()>> {
        let store = |part: Vec<(String, Arc<[u8]>)>| async move {
            self.backend.set_many(&part, ttl).await?;
            Ok(vec![(); part.len()])
        };
        self.per_master(entries, |(key, _)| key.as_str(), store)
            .await
    }

    /// Reads `key`: its bytes, or what a later compare-and-set expects.
    pub(crate) async fn read(&self, key: &str) -> std::result::Result<Bytes, Seen> {
        let limit = self
            .settings
            .bounded_reads
            .then_some(self.settings.max_value_bytes);
        match self.guarded_at(key, self.backend.get(key, limit)).await {
            Ok(Some(bytes)) => Ok(bytes),
            Ok(None) => Err(Seen::Nothing),
            Err(_) => Err(Seen::Unknown),
        }
    }

    /// Reads `keys`, in one round trip for up to [`BATCH_CHUNK`] keys (a
    /// few in parallel beyond): for each, its bytes or what a later
    /// compare-and-set expects. A chunk that fails leaves its keys unknown.
    pub(crate) async fn read_many(&self, keys: &[String]) -> Vec<std::result::Result<Bytes, Seen>> {
        if keys.is_empty() {
            // Nothing to ask: no round trip, and no breaker probe spent.
            return Vec::new();
        }
        let limit = self
            .settings
            .bounded_reads
            .then_some(self.settings.max_value_bytes);
        let read = |part: Vec<String>| async move { self.backend.get_many(&part, limit).await };
        self.per_master(keys, String::as_str, read)
            .await
            .into_iter()
            .map(|found| match found {
                Ok(Some(bytes)) => Ok(bytes),
                Ok(None) => Err(Seen::Nothing),
                Err(_) => Err(Seen::Unknown),
            })
            .collect()
    }

    /// What a later compare-and-set expects of a key read as `read`,
    /// whatever it holds (a `refresh(…)` does not decode it): an entry over
    /// `max_value_bytes` compares as oversized, as a lookup's does.
    pub(crate) fn seen(&self, read: std::result::Result<Bytes, Seen>) -> Seen {
        match read {
            Ok(bytes) if bytes.len() > self.settings.max_value_bytes => Seen::Oversized,
            Ok(bytes) => Seen::Bytes(bytes),
            Err(seen) => seen,
        }
    }

    /// Counts `event` for the cache and, if it is a cached function's,
    /// for the function (`site`); exported under the function's name, or
    /// the cache's alone.
    pub(crate) fn count(&self, site: Option<&Site>, event: Event) {
        self.counters.add(event);
        match site {
            Some(site) => {
                site.counters().add(event);
                if meters::EXPORTED {
                    site.meters()
                        .count(event, || site.name(), self.cache_label());
                }
            }
            None if meters::EXPORTED => {
                self.meters.count(event, || NO_FUNCTION, self.cache_label())
            }
            None => {}
        }
    }

    /// This cache's counters and metrics, for work that outlives a call.
    pub(crate) fn counting(&self) -> meters::Counting {
        meters::Counting {
            counters: Arc::clone(&self.counters),
            meters: Arc::clone(&self.meters),
            // The label is only made when metrics are exported.
            cache: if meters::EXPORTED {
                self.cache_label().to_owned()
            } else {
                String::new()
            },
        }
    }

    /// How exported metrics name this cache: its namespace, or `default`.
    pub(crate) fn cache_label(&self) -> &str {
        self.settings.namespace.as_deref().unwrap_or("default")
    }

    /// Records how long a cached function's body ran.
    pub(crate) fn computed(&self, site: Option<&Site>, took: Duration) {
        if let (true, Some(site)) = (meters::EXPORTED, site) {
            site.meters()
                .compute_time(took, || site.name(), self.cache_label());
        }
    }

    /// Counts what a lookup found as a hit or a miss.
    pub(crate) fn count_lookup<T>(&self, found: Lookup<T>, site: Option<&Site>) -> Lookup<T> {
        match found {
            Lookup::Miss(_) => self.count(site, Event::misses),
            Lookup::Hit(_) => self.count(site, Event::hits),
        }
        found
    }

    pub(crate) fn decode<T: DeserializeOwned>(
        &self,
        bytes: Bytes,
        site: Option<&Site>,
    ) -> Lookup<T> {
        if bytes.len() > self.settings.max_value_bytes {
            self.count(None, Event::oversized);
            return Lookup::Miss(Seen::Oversized);
        }
        match self.settings.codec.decode::<T>(&bytes) {
            Ok(Entry::Value(value, timing)) => Lookup::Hit(Hit {
                value,
                timing,
                raw: bytes,
            }),
            Ok(Entry::Tombstone) => Lookup::Miss(Seen::Bytes(bytes)),
            Err(err) => {
                self.count(site, Event::decode_errors);
                match site {
                    // Most often the value's type changed under entries
                    // stored before a deploy: every read now goes to the
                    // database, which must not go unnoticed.
                    Some(site) if site.first_drift() => tracing::warn!(target: "redis_cached",
                        function = site.name(),
                        error = %err,
                        "a stored value of this function does not decode as its return type (its type changed?): \
                         such reads are recomputed (counted in decode_errors); give the function `version = N` \
                         (or bump it) when its type changes, so that old entries are not read"
                    ),
                    _ => {
                        tracing::debug!(target: "redis_cached", error = %err, "stored value undecodable; treated as a miss")
                    }
                }
                Lookup::Miss(Seen::Bytes(bytes))
            }
        }
    }

    pub(crate) fn check_size(&self, entry: &[u8]) -> Result<()> {
        let max = self.settings.max_value_bytes;
        if entry.len() > max {
            self.count(None, Event::oversized);
            // Once per cache at `warn` (a value that never fits would
            // otherwise go uncached unseen), then at `debug`.
            let bytes = entry.len();
            if !self.oversized_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(target: "redis_cached", bytes, max,
                    "a value is not cached: it is over max_value_bytes (counted in stats().oversized); \
                     serde writes a Vec<u8> as a list of numbers, up to 4 bytes per byte: \
                     store bytes with serde_bytes, or use Codec::Postcard"
                );
            } else {
                tracing::debug!(target: "redis_cached", bytes, max, "a value over max_value_bytes is not cached");
            }
            return Err(Error::Config(format!(
                "value of {} bytes is over max_value_bytes ({max})",
                entry.len()
            )));
        }
        Ok(())
    }

    /// Stores `entry` at `key`, replacing what is there.
    pub(crate) async fn store(
        &self,
        key: &str,
        entry: Arc<[u8]>,
        ttl: Duration,
        site: Option<&Site>,
    ) -> Result<()> {
        self.check_size(&entry)?;
        // Before and after: a caller that gives up mid-write leaves no
        // older near copy than Redis's next message would.
        self.forget_near(key);
        let stored = self
            .guarded_at(key, self.backend.set(key, entry, ttl))
            .await;
        // Whether or not it landed: the near copy may be older now.
        self.forget_near(key);
        stored?;
        self.count(site, Event::writes);
        Ok(())
    }

    /// A write of `key` by this process returned (or may have landed): it
    /// is the newest state, so later callers must not get an older one,
    /// from a computation here, a late lock notification, or the near tier.
    pub(crate) fn wrote(&self, key: &str) {
        self.flights.detach(key);
        self.recent.mark(key);
        self.forget_near(key);
    }

    /// Drops `key`'s near copy, if any: this process wrote the key.
    /// (Redis's invalidation would drop it too, a message later.)
    pub(crate) fn forget_near(&self, key: &str) {
        if let Some(tracker) = self.backend.tracker() {
            tracker.store.invalidate(key);
        }
    }

    /// The value of `key` in the near tier, if it holds it and may serve
    /// it now (`Some(None)`: a cached absence).
    pub(crate) fn near_get<T>(&self, key: &str) -> Option<Option<T>>
    where
        T: DeserializeOwned + Clone + Send + Sync + 'static,
    {
        self.backend
            .tracker()?
            .store
            .get::<T>(key, self.settings.codec)
    }

    /// The value of `key` (as sent to the backend) in the in-memory
    /// backend, cloned from its decoded copy (see
    /// `MemoryBackend::get_decoded`); `None` on Redis, and for anything
    /// but a usable entry of a `T`.
    pub(crate) fn memory_get<T>(&self, key: &str) -> Option<Option<T>>
    where
        T: DeserializeOwned + Clone + Send + Sync + 'static,
    {
        let AnyBackend::Memory(memory) = &self.backend else {
            return None;
        };
        let settings = &self.settings;
        memory.get_decoded::<T>(key, settings.codec, settings.max_value_bytes)
    }

    /// Reads `key` for a call of a function with `policy`: through the
    /// near tier's tracking connection if it has `near`.
    pub(crate) async fn read_for(
        &self,
        key: &str,
        policy: &Policy,
    ) -> std::result::Result<Bytes, Seen> {
        match policy.near {
            Some(bound) => self.read_near(key, bound, policy.site).await,
            None => self.read(key).await,
        }
    }

    /// Reads `key` for a function with a near tier kept at most `bound`:
    /// on the tracking connection, keeping what it found in the tier
    /// unless the key changes meanwhile; as [`Inner::read`] while the tier
    /// is not serving (or this cache has none).
    pub(crate) async fn read_near(
        &self,
        key: &str,
        bound: Duration,
        site: Option<&Site>,
    ) -> std::result::Result<Bytes, Seen> {
        let Some(tracker) = self.backend.tracker() else {
            if self.backend.is_redis() && !self.near_off_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(target: "redis_cached",
                    "a function with `near` runs on a cache that keeps no near tier (a Redis Cluster, \
                     or near_capacity(0)): its values are read from Redis on every call"
                );
            }
            return self.read(key).await;
        };
        tracker.ensure_running();
        self.count(site, Event::near_misses);
        if self.health.whole.is_open() {
            return self.read(key).await;
        }
        let Some(fill) = tracker.store.begin_fill(key) else {
            return self.read(key).await;
        };
        let limit = self
            .settings
            .bounded_reads
            .then_some(self.settings.max_value_bytes);
        let Some(read) = tracker.read(key, limit) else {
            return self.read(key).await;
        };
        let sent = Instant::now();
        // Not under the breaker: a failure here says nothing the data
        // connection's read below will not say.
        let read = tokio::time::timeout(self.settings.op_timeout, read).await;
        if read.is_err() {
            // Out of time: no second wait on the data connection.
            self.count(None, Event::timeouts);
            return Err(Seen::Unknown);
        }
        if meters::EXPORTED || redis_time::wanted() {
            let took = sent.elapsed();
            self.meters.redis_time(took, self.cache_label());
            redis_time::add(took);
        }
        match read {
            Ok(Ok(Some((bytes, pttl)))) => {
                if bytes.len() <= self.settings.max_value_bytes {
                    if let Some(soft_expiry) = Codec::near_kept(&bytes) {
                        fill.finish(Arc::from(&*bytes), sent, bound, pttl, soft_expiry);
                    }
                }
                Ok(bytes)
            }
            Ok(Ok(None)) => Err(Seen::Nothing),
            // The tracking connection failed (its keep-alive replaces it):
            // the data connection answers.
            _ => {
                drop(fill);
                self.read(key).await
            }
        }
    }

    /// Stores each entry at its key, replacing what is there, in chunks of
    /// [`BATCH_CHUNK`]; sizes checked by the caller.
    pub(crate) async fn store_many(
        &self,
        entries: &[(String, Arc<[u8]>)],
        ttl: Duration,
    ) -> Result<()> {
        for (key, _) in entries {
            self.forget_near(key);
        }
        let stored = self.set_many(entries, ttl).await;
        for (key, _) in entries {
            self.forget_near(key);
        }
        let mut failed = None;
        for outcome in stored {
            match outcome {
                Ok(()) => self.count(None, Event::writes),
                Err(err) => failed = Some(err),
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// [`Inner::store_if`] for each of `stores`, in one round trip for up
    /// to [`BATCH_CHUNK`] stores (a few in parallel beyond).
    pub(crate) async fn store_many_if(
        &self,
        stores: Vec<StoreIf>,
        site: Option<&Site>,
    ) -> Vec<StoreOutcome> {
        let mut outcomes = vec![StoreOutcome::Failed; stores.len()];
        let mut sent = Vec::with_capacity(stores.len());
        let mut at = Vec::with_capacity(stores.len());
        for (n, store) in stores.into_iter().enumerate() {
            if self.check_size(&store.value).is_ok() && !matches!(store.seen, Seen::Unknown) {
                sent.push(store);
                at.push(n);
            }
        }
        if sent.is_empty() {
            return outcomes;
        }
        for store in &sent {
            self.forget_near(&store.key);
        }
        let store = |part: Vec<StoreIf>| async move { self.backend.set_many_if(&part).await };
        let stored = self
            .per_master(&sent, |store| store.key.as_str(), store)
            .await;
        for store in &sent {
            self.forget_near(&store.key);
        }
        for (n, stored) in at.into_iter().zip(stored) {
            if let Ok(stored) = stored {
                outcomes[n] = self.count_store(stored, site);
            }
        }
        outcomes
    }

    /// Stores `entry` at `key` if the key still holds what was `seen`.
    pub(crate) async fn store_if(
        &self,
        key: &str,
        seen: &Seen,
        entry: Arc<[u8]>,
        ttl: Duration,
        site: Option<&Site>,
    ) -> StoreOutcome {
        if self.check_size(&entry).is_err() || matches!(seen, Seen::Unknown) {
            return StoreOutcome::Failed;
        }
        self.forget_near(key);
        let stored = self
            .guarded_at(key, self.backend.set_if(key, seen, entry, ttl))
            .await;
        self.forget_near(key);
        match stored {
            Ok(stored) => self.count_store(stored, site),
            Err(_) => StoreOutcome::Failed,
        }
    }

    /// Counts a compare-and-set's result.
    pub(crate) fn count_store(&self, stored: bool, site: Option<&Site>) -> StoreOutcome {
        if stored {
            self.count(site, Event::writes);
            StoreOutcome::Stored
        } else {
            self.count(site, Event::stale_sets_refused);
            StoreOutcome::Refused
        }
    }

    /// Replaces `key` by a unique tombstone (see `Cache::invalidate`), and
    /// detaches this process's computation of it.
    pub(crate) async fn tombstone(&self, key: &str) -> Result<()> {
        let tombstone = self.settings.codec.encode_tombstone();
        let window = self.settings.invalidation_window;
        self.forget_near(key);
        let written = self
            .guarded_at(key, self.backend.set(key, tombstone.into(), window))
            .await;
        // Even if the write failed: this process's later callers must not
        // join a computation that read the key before, nor take a lock
        // notification's value computed before.
        self.wrote(key);
        written?;
        self.count(None, Event::invalidations);
        Ok(())
    }

    /// [`Inner::tombstone`] for each of `keys`, per master and in chunks
    /// (see [`Inner::per_master`]), each master under its own breaker; the
    /// first failure. A chunk that fails may have landed in part.
    pub(crate) async fn tombstone_many(&self, keys: &[String]) -> Result<()> {
        let tombstone: Arc<[u8]> = self.settings.codec.encode_tombstone().into();
        let entries: Vec<(String, Arc<[u8]>)> = keys
            .iter()
            .map(|key| {
                self.forget_near(key);
                (key.clone(), tombstone.clone())
            })
            .collect();
        let written = self
            .set_many(&entries, self.settings.invalidation_window)
            .await;
        let mut result = Ok(());
        for ((key, _), written) in entries.iter().zip(written) {
            // Even if the write failed, as for one key.
            self.wrote(key);
            match written {
                Ok(()) => self.count(None, Event::invalidations),
                Err(err) if result.is_ok() => result = Err(err),
                Err(_) => {}
            }
        }
        result
    }

    /// The key of `key`'s lock, in the same hash slot.
    pub(crate) fn lock_key(&self, key: &str) -> String {
        companion_key(self.settings.namespace.as_deref(), key, "lock")
    }

    /// The entry to store for `result` and how long to store it, or nothing
    /// for an error or a value that cannot be serialized. `delta` is how
    /// long the computation took; with `stale` or `early` the entry carries
    /// its freshness data, and with `stale` it is kept that much longer
    /// than its TTL.
    pub(crate) fn encode_result<S: Shape<R>, R>(
        &self,
        result: &R,
        policy: &Policy,
        delta: Duration,
    ) -> Option<Encoded> {
        let codec = self.settings.codec;
        let view = S::view(result);
        let fresh_for = match view {
            Stored::Value(_) => Some(policy.ttl.unwrap_or(self.settings.default_ttl)),
            Stored::Absent => policy.cache_none,
            Stored::Skip => return None,
        };
        let timing = fresh_for
            .filter(|_| policy.stale.is_some() || policy.early.is_some())
            .map(|ttl| Timing {
                soft_expiry_ms: now_unix_ms()
                    .saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
                delta_ms: u32::try_from(delta.as_millis()).unwrap_or(u32::MAX),
            });
        let keep_for = fresh_for.map(|ttl| ttl.saturating_add(policy.stale.unwrap_or_default()));
        let entry = match view {
            Stored::Value(value) => match codec.encode(value, timing) {
                Ok(entry) => entry,
                Err(err) => {
                    self.count(policy.site, Event::encode_errors);
                    tracing::warn!(target: "redis_cached", error = %err, "value not cached: it cannot be serialized");
                    return None;
                }
            },
            _ => codec.encode_absent(timing),
        };
        Some((entry.into(), keep_for))
    }
}
