//! The cache-aside algorithm behind `#[redis_cached]` and `get_or_compute`:
//! look up the key; on a miss, lead or follow this process's computation;
//! store the result only if the key has not changed since it was read.
//!
//! That last rule is the "no stale set" of memcache leases: a computation
//! that began before an invalidation (which leaves a unique tombstone) or a
//! write-through (which leaves a new value) finds the key changed, and its
//! older result is not stored, nor handed to this process's followers.
//!
//! This is the per-function (generic) layer: it decodes, encodes and
//! computes; reading, storing and locking work on bytes in `core` and
//! `lock`. No result is held across an `.await` (only its stored part), so
//! a cached function's future is `Send` whenever its body's is, whatever
//! its error type.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use crate::backend::Seen;
use crate::codec::Entry;
use crate::core::{Hit, Inner, Lookup, StoreOutcome};
use crate::flight::{self, Followed, Leader, Role};
use crate::lock::{LockWait, Waited};
use crate::policy::{LockPolicy, Policy};
use crate::shape::{Shape, Split};
use crate::stats::Counters;

tokio::task_local! {
    /// The keys the current task is computing, innermost first: a body
    /// that asks for its own key computes it rather than wait for itself.
    static COMPUTING: Computing;
}

#[derive(Clone)]
struct Computing(Arc<Frame>);

struct Frame {
    key: String,
    outer: Option<Computing>,
}

/// Whether the current task is computing `key` already.
fn reentrant(key: &str) -> bool {
    COMPUTING
        .try_with(|computing| {
            let mut frame = Some(computing);
            while let Some(Computing(f)) = frame {
                if f.key == key {
                    return true;
                }
                frame = f.outer.as_ref();
            }
            false
        })
        .unwrap_or(false)
}

/// Runs `body` marked as computing `key`.
pub(crate) fn marked<F: Future>(key: &str, body: F) -> impl Future<Output = F::Output> {
    let outer = COMPUTING.try_with(Computing::clone).ok();
    let frame = Computing(Arc::new(Frame {
        key: key.to_owned(),
        outer,
    }));
    COMPUTING.scope(frame, body)
}

/// How joining this process's computation of a key ended.
enum Joined<'a, R> {
    /// This caller leads; `true` if an earlier leader ended without a
    /// value (the key may have changed meanwhile: read it again).
    Leader(Leader<'a>, bool),
    Done(R),
    /// Compute without sharing: the leader failed, its value does not
    /// decode as this type, or this task is the leader.
    Alone,
}

/// The result a hit stands for, or (for an absence stored for a type that
/// has none) what to overwrite.
pub(crate) fn rebuild<S: Shape<R>, R>(hit: Hit<S::Value>) -> Result<R, Seen> {
    match hit.value {
        Some(value) => Ok(S::from_value(value)),
        None => S::absent().ok_or(Seen::Bytes(hit.raw)),
    }
}

/// A result's stored part, kept across an `.await` in place of the result.
type Kept<V, R> = Result<V, fn() -> R>;

/// Takes `result` apart; `Err` gives back a result that is not stored.
fn keep<S: Shape<R>, R>(result: R) -> Result<Kept<S::Value, R>, R> {
    match S::split(result) {
        Split::Value(value) => Ok(Ok(value)),
        Split::Absent(absent) => Ok(Err(absent)),
        Split::Other(result) => Err(result),
    }
}

fn unkeep<S: Shape<R>, R>(kept: Kept<S::Value, R>) -> R {
    match kept {
        Ok(value) => S::from_value(value),
        Err(absent) => absent(),
    }
}

impl Inner {
    /// The cache-aside algorithm; `key` is the full key.
    ///
    /// This and [`Inner::fill_hot`] return `async move` blocks rather than
    /// being `async fn`s: an `async fn` keeps a second copy of its
    /// arguments (the caller's whole unstarted body among them) in its
    /// state, and every call carries that state.
    #[allow(clippy::manual_async_fn)] // deliberate: see above
    pub(crate) fn fill<'a, S, R, Fut>(
        &'a self,
        key: String,
        tags: &'a [String],
        policy: &'a Policy,
        body: Fut,
    ) -> impl Future<Output = R> + 'a
    where
        S: Shape<R> + 'a,
        R: 'a,
        Fut: Future<Output = R> + 'a,
    {
        async move {
            if policy.lock.is_some() && self.backend.is_redis() {
                return self.fill_hot::<S, R, Fut>(key, tags, policy, body).await;
            }
            let seen = match self.lookup::<S::Value>(&key).await {
                Lookup::Hit(hit) => match rebuild::<S, R>(hit) {
                    Ok(result) => return result,
                    Err(seen) => seen,
                },
                Lookup::Miss(seen) => seen,
            };
            self.fill_missed::<S, R, Fut>(key, tags, seen, policy, body)
                .await
        }
    }

    /// `lock = true` marks a hot or costly key: its callers in this process
    /// also share one read, so that a crowd arriving at a cold key sends
    /// one `GET` (and one lock attempt) per process rather than one each.
    #[allow(clippy::manual_async_fn)] // deliberate: see `Inner::fill`
    fn fill_hot<'a, S, R, Fut>(
        &'a self,
        key: String,
        tags: &'a [String],
        policy: &'a Policy,
        body: Fut,
    ) -> impl Future<Output = R> + 'a
    where
        S: Shape<R> + 'a,
        R: 'a,
        Fut: Future<Output = R> + 'a,
    {
        async move {
            // No `.await` inside the match: its scrutinee holds a result.
            let leader = match self.join::<S, R>(&key).await {
                Joined::Leader(leader, _) => Some(leader),
                Joined::Done(result) => return result,
                Joined::Alone => None,
            };
            let Some(leader) = leader else {
                return self.compute_alone(&key, body).await;
            };
            let seen = match self.lead_lookup::<S, R>(&key, &leader).await {
                Ok(result) => return result,
                Err(seen) => seen,
            };
            Box::pin(self.lead::<S, R, Fut>(&key, &leader, tags, seen, policy, body)).await
        }
    }

    /// The leader's read of `key`: a hit is shared with its followers.
    async fn lead_lookup<S: Shape<R>, R>(&self, key: &str, leader: &Leader<'_>) -> Result<R, Seen> {
        match self.lookup::<S::Value>(key).await {
            Lookup::Hit(hit) => share_hit::<S, R>(hit, leader),
            Lookup::Miss(seen) => Err(seen),
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
        body: Fut,
    ) -> R
    where
        S: Shape<R>,
        Fut: Future<Output = R>,
    {
        // No `.await` inside the match: its scrutinee holds a result.
        let (leader, retried) = match self.join::<S, R>(&key).await {
            Joined::Leader(leader, retried) => (Some(leader), retried),
            Joined::Done(result) => return result,
            Joined::Alone => (None, false),
        };
        let Some(leader) = leader else {
            return self.compute_alone(&key, body).await;
        };
        let seen = if retried {
            // The earlier leader's store was refused: another writer (a
            // fill in another process, an invalidation) got there first.
            // Read what it left before computing again.
            match self.lead_lookup::<S, R>(&key, &leader).await {
                Ok(result) => return result,
                Err(seen) => seen,
            }
        } else {
            seen
        };
        Box::pin(self.lead::<S, R, Fut>(&key, &leader, tags, seen, policy, body)).await
    }

    /// Runs `body` for a caller that shares nothing with others.
    async fn compute_alone<Fut: Future>(&self, key: &str, body: Fut) -> Fut::Output {
        Counters::bump(&self.counters.computes);
        marked(key, body).await
    }

    /// Becomes this process's leader for `key`, or follows the current one
    /// to its result (trying again when it ends without one).
    async fn join<S: Shape<R>, R>(&self, key: &str) -> Joined<'_, R> {
        let mut retried = false;
        loop {
            let receiver = match self.flights.join(key) {
                Role::Leader(leader) => return Joined::Leader(leader, retried),
                Role::Follower(receiver) => receiver,
            };
            if reentrant(key) {
                // This task leads that computation: waiting would be forever.
                return Joined::Alone;
            }
            Counters::bump(&self.counters.coalesced);
            match flight::follow(receiver).await {
                Followed::Value(entry) => {
                    return match self.settings.codec.decode::<S::Value>(&entry) {
                        Ok(Entry::Value(Some(value), _)) => Joined::Done(S::from_value(value)),
                        Ok(Entry::Value(None, _)) => {
                            S::absent().map_or(Joined::Alone, Joined::Done)
                        }
                        // A serde impl that does not round-trip: joining
                        // again would find the same entry.
                        Ok(Entry::Tombstone) | Err(_) => {
                            Counters::bump(&self.counters.decode_errors);
                            Joined::Alone
                        }
                    };
                }
                // Followers of a failure compute at once, side by side.
                Followed::Failed => return Joined::Alone,
                Followed::Nothing => retried = true,
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
        body: Fut,
    ) -> R
    where
        S: Shape<R>,
        Fut: Future<Output = R>,
    {
        if !tags.is_empty() {
            // Before computing: an invalidation of a tag from now on reaches
            // this key, and so also refuses this fill's store if it lands first.
            let ttl =
                policy.ttl.unwrap_or(self.settings.default_ttl) + policy.stale.unwrap_or_default();
            let _ = self.tag(key, tags, ttl).await;
        }
        match &policy.lock {
            Some(lock) if self.backend.is_redis() => {
                self.fill_locked::<S, R, Fut>(key, seen, lock, policy, leader, body)
                    .await
            }
            _ => {
                self.compute_and_store::<S, R, Fut>(key, &seen, policy, Some(leader), body)
                    .await
            }
        }
    }

    /// Computes and stores the result if the key still holds what was
    /// `seen`; shares it with the leader's followers unless the key
    /// changed meanwhile, or tells them it failed.
    async fn compute_and_store<S, R, Fut>(
        &self,
        key: &str,
        seen: &Seen,
        policy: &Policy,
        leader: Option<&Leader<'_>>,
        body: Fut,
    ) -> R
    where
        S: Shape<R>,
        Fut: Future<Output = R>,
    {
        Counters::bump(&self.counters.computes);
        // In a scope of its own: only the stored part of the result is held
        // across the `.await` below.
        let (entry, ttl, kept) = {
            let started = Instant::now();
            let result = marked(key, body).await;
            let encoded = self.encode_result::<S, R>(&result, policy, started.elapsed());
            let Some((entry, ttl)) = encoded else {
                if let Some(leader) = leader {
                    leader.fail();
                }
                return result;
            };
            match keep::<S, R>(result) {
                Ok(kept) => (entry, ttl, kept),
                Err(result) => return result,
            }
        };
        let outcome = match ttl {
            Some(ttl) => self.store_if(key, seen, entry.clone(), ttl).await,
            None => StoreOutcome::Failed,
        };
        if let Some(leader) = leader {
            share(leader, outcome, entry);
        }
        unkeep::<S, R>(kept)
    }

    /// The miss path of `lock = true`: take the cross-process lock and
    /// compute, or wait for the holder's value, or (after `lock_wait`, when
    /// Redis fails, or when the holder failed) compute without the lock.
    async fn fill_locked<S, R, Fut>(
        &self,
        key: &str,
        mut seen: Seen,
        lock: &LockPolicy,
        policy: &Policy,
        leader: &Leader<'_>,
        body: Fut,
    ) -> R
    where
        S: Shape<R>,
        Fut: Future<Output = R>,
    {
        let mut wait = LockWait::new(lock);
        let (guard, seen) = loop {
            match wait.next(self, key, seen, lock).await {
                Waited::Hold(guard, now) => break (guard, now),
                Waited::Landed(bytes) => match self.decode::<S::Value>(bytes) {
                    Lookup::Hit(hit) => match share_hit::<S, R>(hit, leader) {
                        Ok(result) => return result,
                        Err(now) => seen = now,
                    },
                    // A tombstone or garbage: the key changed, but holds no value.
                    Lookup::Miss(now) => seen = now,
                },
                Waited::Compute { seen, failed } => {
                    // After a failure, this process's followers compute
                    // beside this caller rather than after it.
                    let leader = if failed {
                        leader.fail();
                        None
                    } else {
                        Some(leader)
                    };
                    return self
                        .compute_and_store::<S, R, Fut>(key, &seen, policy, leader, body)
                        .await;
                }
            }
        };
        Counters::bump(&self.counters.computes);
        let (encoded, kept) = {
            let started = Instant::now();
            let result = guard.hold(lock, marked(key, body)).await;
            let encoded = self.encode_result::<S, R>(&result, policy, started.elapsed());
            let Some(encoded) = encoded else {
                leader.fail();
                guard.fail();
                return result;
            };
            match keep::<S, R>(result) {
                Ok(kept) => (encoded, kept),
                Err(result) => {
                    guard.fail();
                    return result;
                }
            }
        };
        let outcome = guard.release(&seen, &encoded).await;
        share(leader, outcome, encoded.0);
        unkeep::<S, R>(kept)
    }
}

/// The result a hit stands for, shared with the leader's followers.
fn share_hit<S: Shape<R>, R>(hit: Hit<S::Value>, leader: &Leader<'_>) -> Result<R, Seen> {
    let raw = Arc::from(&*hit.raw);
    let result = rebuild::<S, R>(hit)?;
    leader.publish(raw);
    Ok(result)
}

/// Hands a computed entry to the leader's followers, unless the key
/// changed while it was computed: then they join again and read anew.
fn share(leader: &Leader<'_>, outcome: StoreOutcome, entry: Arc<[u8]>) {
    if outcome != StoreOutcome::Refused {
        leader.publish(entry);
    }
}
