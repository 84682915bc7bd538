//! The cache-aside algorithm behind `#[redis_cached]` and `get_or_compute`:
//! look up the key; on a miss, lead or follow this process's computation;
//! store the result only if the key has not changed since it was read.
//!
//! That last rule is the "no stale set" of memcache leases: a computation
//! that began before an invalidation (which leaves a unique tombstone) or a
//! write-through (which leaves a new value) finds the key changed, and its
//! older result is not stored. The compare and the write are one atomic
//! step in the backend (`set_if`).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::backend::{Backend, Bytes};
use crate::cache::Cache;
use crate::codec::{Entry, Timing};
use crate::flight::{self, Leader, Role};
use crate::lock::{lock_key, Acquire, LockPolicy};
use crate::private::Policy;
use crate::shape::{Shape, Stored};
use crate::stats::Counters;
use crate::token::{lock_token, now_unix_ms, unit_interval};

/// How long a lock holder lets its release (and so the other processes'
/// wake-up) go ahead of waking its own process's followers.
const RELEASE_FIRST: Duration = Duration::from_millis(2);

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

/// What a key held when it was read: a later store of this key only
/// happens if it still holds exactly that.
#[derive(Debug, Clone)]
pub(crate) enum Seen {
    Nothing,
    Bytes(Bytes),
    /// The read failed: the store is skipped, since a stale set cannot be
    /// ruled out.
    Unknown,
    /// A value over `max_value_bytes`, read only in part: none of ours
    /// (ours are bounded), so it is overwritten without comparing.
    Oversized,
}

impl Seen {
    /// The bytes a compare-and-set expects (`None`: no entry).
    pub(crate) fn bytes(&self) -> Option<&[u8]> {
        match self {
            Seen::Bytes(bytes) => Some(bytes),
            Seen::Nothing | Seen::Unknown | Seen::Oversized => None,
        }
    }

    /// Whether a compare-and-set against it can be trusted.
    fn comparable(&self) -> bool {
        matches!(self, Seen::Nothing | Seen::Bytes(_))
    }
}

/// How joining this process's computation of a key ended.
enum Joined<'a, R> {
    Leader(Leader<'a>),
    Done(R),
    Undecodable,
}

/// The result a hit stands for, or (for an absence stored for a type that
/// has none) what to overwrite.
fn rebuild<S: Shape<R>, R>(hit: Hit<S::Value>) -> Result<R, Seen> {
    match hit.value {
        Some(value) => Ok(S::from_value(value)),
        None => S::absent().ok_or(Seen::Bytes(hit.raw)),
    }
}

/// What a follower of another caller's computation got.
enum Followed<R> {
    Value(R),
    /// The leader published nothing (an error, a panic, a cancellation).
    Retry,
    /// The leader's entry does not decode as this function's type.
    Undecodable,
}

impl Cache {
    /// The cache-aside algorithm; `key` is the full key.
    ///
    /// This and [`Cache::fill_hot`] return `async move` blocks rather than
    /// being `async fn`s: an `async fn` keeps a second copy of its
    /// arguments (the caller's whole unstarted body among them) in its
    /// state, and every call carries that state.
    #[allow(clippy::manual_async_fn)] // deliberate: see above
    pub(crate) fn fill<'a, S, R, Fut, C>(
        &'a self,
        key: String,
        tags: &'a [String],
        policy: &'a Policy,
        compute: C,
    ) -> impl Future<Output = R> + 'a
    where
        S: Shape<R> + 'a,
        R: 'a,
        C: FnOnce() -> Fut + 'a,
        Fut: Future<Output = R> + 'a,
    {
        async move {
            if policy.lock.is_some() && self.inner.backend.is_redis() {
                return self
                    .fill_hot::<S, R, Fut, C>(key, tags, policy, compute)
                    .await;
            }
            let seen = match self.lookup::<S::Value>(&key).await {
                Lookup::Hit(hit) => match rebuild::<S, R>(hit) {
                    Ok(result) => return result,
                    Err(seen) => seen,
                },
                Lookup::Miss(seen) => seen,
            };
            self.fill_missed::<S, R, _>(key, tags, seen, policy, compute)
                .await
        }
    }

    /// `lock = true` marks a hot or costly key: its callers in this process
    /// also share one read, so that a crowd arriving at a cold key sends
    /// one `GET` (and one lock attempt) per process rather than one each.
    #[allow(clippy::manual_async_fn)] // deliberate: see `Cache::fill`
    fn fill_hot<'a, S, R, Fut, C>(
        &'a self,
        key: String,
        tags: &'a [String],
        policy: &'a Policy,
        compute: C,
    ) -> impl Future<Output = R> + 'a
    where
        S: Shape<R> + 'a,
        R: 'a,
        C: FnOnce() -> Fut + 'a,
        Fut: Future<Output = R> + 'a,
    {
        async move {
            let leader = match self.join::<S, R>(&key).await {
                Joined::Leader(leader) => leader,
                Joined::Done(result) => return result,
                Joined::Undecodable => {
                    Counters::bump(&self.inner.counters.computes);
                    return compute().await;
                }
            };
            let seen = match self.lookup::<S::Value>(&key).await {
                Lookup::Hit(hit) => {
                    let raw = Arc::from(&*hit.raw);
                    match rebuild::<S, R>(hit) {
                        Ok(result) => {
                            leader.publish(raw);
                            return result;
                        }
                        Err(seen) => seen,
                    }
                }
                Lookup::Miss(seen) => seen,
            };
            Box::pin(self.lead::<S, R, _>(&key, &leader, tags, seen, policy, compute)).await
        }
    }

    /// The miss path: lead or follow this process's computation of `key`,
    /// which held `seen` when it was read.
    pub(crate) async fn fill_missed<S, R, Fut>(
        &self,
        key: String,
        tags: &[String],
        seen: Seen,
        policy: &Policy,
        compute: impl FnOnce() -> Fut,
    ) -> R
    where
        S: Shape<R>,
        Fut: Future<Output = R>,
    {
        match self.join::<S, R>(&key).await {
            Joined::Leader(leader) => {
                Box::pin(self.lead::<S, R, _>(&key, &leader, tags, seen, policy, compute)).await
            }
            Joined::Done(result) => result,
            Joined::Undecodable => {
                Counters::bump(&self.inner.counters.computes);
                compute().await
            }
        }
    }

    /// Becomes this process's leader for `key`, or follows the current one
    /// to its result (trying again when it ends without one).
    async fn join<S: Shape<R>, R>(&self, key: &str) -> Joined<'_, R> {
        loop {
            match self.inner.flights.join(key) {
                Role::Leader(leader) => return Joined::Leader(leader),
                Role::Follower(receiver) => {
                    Counters::bump(&self.inner.counters.coalesced);
                    match self.follow::<S, R>(receiver).await {
                        Followed::Value(result) => return Joined::Done(result),
                        Followed::Retry => {}
                        // The leader's value does not read back as this type
                        // (a serde impl that does not round-trip): joining
                        // again would find the same entry.
                        Followed::Undecodable => return Joined::Undecodable,
                    }
                }
            }
        }
    }

    /// The leader's part: tag the key, then compute (under the lock with
    /// `lock = true`) and store.
    ///
    /// Callers box this future: it holds the lock machinery, several times
    /// the size of the rest, and only a miss's one leader needs it, while
    /// every call (a hit, a follower) would otherwise carry its space.
    async fn lead<S, R, Fut>(
        &self,
        key: &str,
        leader: &Leader<'_>,
        tags: &[String],
        seen: Seen,
        policy: &Policy,
        compute: impl FnOnce() -> Fut,
    ) -> R
    where
        S: Shape<R>,
        Fut: Future<Output = R>,
    {
        if !tags.is_empty() {
            // Before computing: an invalidation of a tag from now on reaches
            // this key, and so also refuses this fill's store if it lands first.
            let ttl =
                policy.ttl.unwrap_or(self.inner.default_ttl) + policy.stale.unwrap_or_default();
            let _ = self.tag(key, tags, ttl).await;
        }
        match policy.lock {
            Some(lock) if self.inner.backend.is_redis() => {
                self.fill_locked::<S, R, _>(key, seen, &lock, policy, leader, compute)
                    .await
            }
            _ => {
                self.compute_and_store::<S, R, _>(key, &seen, policy, leader, compute)
                    .await
            }
        }
    }

    /// Computes, shares the result with this process's followers, and
    /// stores it if the key still holds what was `seen`.
    async fn compute_and_store<S, R, Fut>(
        &self,
        key: &str,
        seen: &Seen,
        policy: &Policy,
        leader: &Leader<'_>,
        compute: impl FnOnce() -> Fut,
    ) -> R
    where
        S: Shape<R>,
        Fut: Future<Output = R>,
    {
        Counters::bump(&self.inner.counters.computes);
        let started = Instant::now();
        let result = compute().await;
        if let Some((entry, ttl)) = self.encode_result::<S, R>(&result, policy, started.elapsed()) {
            leader.publish(entry.clone());
            if let Some(ttl) = ttl {
                // Failures are counted inside; the caller gets its value anyway.
                let _ = self.store_if(key, seen, entry, ttl).await;
            }
        }
        result
    }

    /// The miss path of `lock = true`: take the cross-process lock and
    /// compute, or wait for the holder's value, or after `lock_wait` (or
    /// when Redis fails) compute without the lock.
    async fn fill_locked<S, R, Fut>(
        &self,
        key: &str,
        mut seen: Seen,
        lock: &LockPolicy,
        policy: &Policy,
        leader: &Leader<'_>,
        compute: impl FnOnce() -> Fut,
    ) -> R
    where
        S: Shape<R>,
        Fut: Future<Output = R>,
    {
        let lock_key = lock_key(key);
        let token = lock_token();
        let watch = self.watch(key);
        let deadline = Instant::now() + lock.wait;
        // Pub/sub can drop a message; a waiter also retries on this timer.
        let retry = (lock.wait / 20).clamp(Duration::from_millis(5), Duration::from_millis(100));
        let mut waited = false;
        let holding = loop {
            // Register for the notification before looking, so that a value
            // landing in between still wakes us.
            let notified = watch.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !seen.comparable() {
                break false;
            }
            let expected = seen.bytes();
            match self
                .try_acquire(key, &lock_key, expected, &token, lock)
                .await
            {
                Some(Ok(Acquire::Acquired(now))) => {
                    Counters::bump(&self.inner.counters.lock_acquired);
                    seen = now.map_or(Seen::Nothing, Seen::Bytes);
                    break true;
                }
                Some(Ok(Acquire::Landed(bytes))) => match self.decode::<S::Value>(bytes) {
                    Lookup::Hit(hit) => match hit.value.map(S::from_value).or_else(S::absent) {
                        Some(result) => {
                            leader.publish(Arc::from(&*hit.raw));
                            return result;
                        }
                        None => seen = Seen::Bytes(hit.raw),
                    },
                    // A tombstone or garbage: the key changed, but holds no value.
                    Lookup::Miss(now) => seen = now,
                },
                Some(Ok(Acquire::Held)) => {
                    if !waited {
                        waited = true;
                        Counters::bump(&self.inner.counters.lock_waits);
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        Counters::bump(&self.inner.counters.lock_wait_timeouts);
                        break false;
                    }
                    // Jittered, so that waiters started together do not
                    // all retry at once (possibly just as the value lands).
                    let pause = retry.mul_f64(0.5 + unit_interval());
                    let _ = tokio::time::timeout(pause.min(deadline - now), notified).await;
                    // The notification carries the stored entry: no read needed.
                    if let Some(bytes) = watch.landed() {
                        if let Lookup::Hit(hit) = self.decode::<S::Value>(bytes) {
                            if let Some(result) = hit.value.map(S::from_value).or_else(S::absent) {
                                leader.publish(Arc::from(&*hit.raw));
                                return result;
                            }
                        }
                    }
                }
                // Redis is failing: compute without the lock, like any miss.
                Some(Err(_)) | None => break false,
            }
        };
        drop(watch);
        if !holding {
            return self
                .compute_and_store::<S, R, _>(key, &seen, policy, leader, compute)
                .await;
        }
        Counters::bump(&self.inner.counters.computes);
        let started = Instant::now();
        let result = self.with_watchdog(compute(), &lock_key, &token, lock).await;
        let encoded = self.encode_result::<S, R>(&result, policy, started.elapsed());
        // The release carries the other processes' wake-up: let it go first,
        // before this process's followers wake and take the cores, but not
        // for long, since they could have the value already.
        let release = self.release_and_store(key, &lock_key, &token, &seen, encoded.as_ref());
        let mut release = std::pin::pin!(release);
        let released = tokio::time::timeout(RELEASE_FIRST, release.as_mut())
            .await
            .is_ok();
        if let Some((entry, _)) = &encoded {
            leader.publish(entry.clone());
        }
        if !released {
            release.await;
        }
        result
    }

    /// Releases a held lock, storing `encoded` (entry, TTL) by
    /// compare-and-set against `seen`, and counts what happened.
    pub(crate) async fn release_and_store(
        &self,
        key: &str,
        lock_key: &str,
        token: &str,
        seen: &Seen,
        encoded: Option<&(Arc<[u8]>, Option<Duration>)>,
    ) {
        let store = encoded
            .and_then(|(entry, ttl)| ttl.map(|ttl| (&**entry, ttl)))
            .filter(|(entry, _)| self.check_size(entry).is_ok());
        if let Ok(stored) = self
            .release_lock(key, lock_key, token, seen.bytes(), store)
            .await
        {
            if store.is_some() {
                let counters = &self.inner.counters;
                Counters::bump(if stored {
                    &counters.writes
                } else {
                    &counters.stale_sets_refused
                });
            }
        }
    }

    /// Runs `computation`, extending the lock every `ttl / 3` until it ends.
    pub(crate) async fn with_watchdog<F: Future>(
        &self,
        computation: F,
        lock_key: &str,
        token: &str,
        lock: &LockPolicy,
    ) -> F::Output {
        let mut computation = std::pin::pin!(computation);
        let period = (lock.ttl / 3).max(Duration::from_millis(1));
        loop {
            match tokio::time::timeout(period, computation.as_mut()).await {
                Ok(result) => return result,
                Err(_) => self.extend_lock(lock_key, token, lock).await,
            }
        }
    }

    /// The entry to store for `result` and how long to store it (`None`:
    /// share with followers but do not store), or nothing for an error.
    /// `delta` is how long the computation took; with `stale` or `early`
    /// the entry carries its freshness data, and with `stale` it is kept
    /// that much longer than its TTL.
    pub(crate) fn encode_result<S: Shape<R>, R>(
        &self,
        result: &R,
        policy: &Policy,
        delta: Duration,
    ) -> Option<(Arc<[u8]>, Option<Duration>)> {
        let codec = self.inner.codec;
        let view = S::view(result);
        let fresh_for = match view {
            Stored::Value(_) => Some(policy.ttl.unwrap_or(self.inner.default_ttl)),
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
                    Counters::bump(&self.inner.counters.encode_errors);
                    tracing::warn!(error = %err, "value not cached: it cannot be serialized");
                    return None;
                }
            },
            _ => codec.encode_absent(timing),
        };
        Some((entry.into(), keep_for))
    }

    async fn follow<S: Shape<R>, R>(&self, receiver: flight::Receiver) -> Followed<R> {
        let Some(entry) = flight::follow(receiver).await else {
            return Followed::Retry;
        };
        match self.inner.codec.decode::<S::Value>(&entry) {
            Ok(Entry::Value(Some(value), _)) => Followed::Value(S::from_value(value)),
            Ok(Entry::Value(None, _)) => S::absent().map_or(Followed::Undecodable, Followed::Value),
            Ok(Entry::Tombstone) => Followed::Retry,
            Err(err) => {
                Counters::bump(&self.inner.counters.decode_errors);
                tracing::debug!(error = %err, "shared value undecodable; computing instead");
                Followed::Undecodable
            }
        }
    }

    /// Reads and decodes `key`, counting a hit or a miss.
    pub(crate) async fn lookup<T: DeserializeOwned>(&self, key: &str) -> Lookup<T> {
        let limit = if self.inner.bounded_reads {
            Some(self.inner.max_value_bytes)
        } else {
            None
        };
        let found = match self.guarded(self.inner.backend.get(key, limit)).await {
            Ok(Some(bytes)) => self.decode::<T>(bytes),
            Ok(None) => Lookup::Miss(Seen::Nothing),
            Err(_) => Lookup::Miss(Seen::Unknown),
        };
        let counters = &self.inner.counters;
        match found {
            Lookup::Miss(_) => Counters::bump(&counters.misses),
            Lookup::Hit(_) => Counters::bump(&counters.hits),
        }
        found
    }

    pub(crate) fn decode<T: DeserializeOwned>(&self, bytes: Bytes) -> Lookup<T> {
        if bytes.len() > self.inner.max_value_bytes {
            Counters::bump(&self.inner.counters.oversized);
            return Lookup::Miss(Seen::Oversized);
        }
        match self.inner.codec.decode::<T>(&bytes) {
            Ok(Entry::Value(value, timing)) => Lookup::Hit(Hit {
                value,
                timing,
                raw: bytes,
            }),
            Ok(Entry::Tombstone) => Lookup::Miss(Seen::Bytes(bytes)),
            Err(err) => {
                Counters::bump(&self.inner.counters.decode_errors);
                tracing::debug!(error = %err, "stored value undecodable; treated as a miss");
                Lookup::Miss(Seen::Bytes(bytes))
            }
        }
    }

    /// Stores `entry` at `key` if the key still holds what was `seen`.
    pub(crate) async fn store_if(
        &self,
        key: &str,
        seen: &Seen,
        entry: Arc<[u8]>,
        ttl: std::time::Duration,
    ) -> crate::Result<bool> {
        self.check_size(&entry)?;
        let expected = match seen {
            Seen::Nothing => None,
            Seen::Bytes(bytes) => Some(&**bytes),
            Seen::Unknown => return Ok(false),
            Seen::Oversized => return self.store(key, entry, ttl).await.map(|()| true),
        };
        let stored = self
            .guarded(self.inner.backend.set_if(key, expected, entry, ttl))
            .await?;
        let counters = &self.inner.counters;
        Counters::bump(if stored {
            &counters.writes
        } else {
            &counters.stale_sets_refused
        });
        Ok(stored)
    }
}
