//! The cross-process stampede lock of `lock = true`.
//!
//! On a miss, this process's computing caller either finds that a value
//! has landed meanwhile, or takes the lock (`SET lock token NX PX lock_ttl`,
//! the token 128 random bits), or finds it held and waits ([`LockWait`]).
//! The holder computes while a watchdog task extends the lock every
//! `lock_ttl / 3`, then releases it, storing the value by compare-and-set
//! and telling the waiters in one step ([`LockGuard`]). Waiters are woken by
//! that notification (one subscriber connection per cache), which carries a
//! small value, says "fetch" for a large one, "try again" when nothing was
//! stored, or "compute yourselves" when the holder's computation failed, so
//! that followers of a failing database do not queue behind one another.
//! As pub/sub can lose messages, a waiter also retries on a short jittered
//! timer, and after `lock_wait` it computes by itself. A crashed holder's
//! lock expires after `lock_ttl`; a holder whose future is dropped
//! releases its lock at once from a task of its own.
//!
//! Nothing here is generic: the per-function code decodes what a wait
//! returns and encodes what the holder computed.

use std::time::{Duration, Instant};

use crate::backend::{Acquire, Bytes, Landing, RedisBackend, Release, Seen};
use crate::engine::policy::LockPolicy;
use crate::engine::store::{Encoded, Inner, StoreOutcome};
use crate::error::Error;
use crate::observe::site::Site;
use crate::observe::stats::Event;
use crate::token::{lock_token, unit_interval};

/// What waiting for a key's lock ended with.
pub(crate) enum Waited<'a> {
    /// The lock is ours; the key holds this now.
    Hold(LockGuard<'a>, Seen),
    /// An entry landed (it may be a tombstone or undecodable).
    Landed(Bytes),
    /// Compute without the lock: `lock_wait` passed, Redis is failing, or
    /// (`failed`) the holder's computation failed.
    Compute { seen: Seen, failed: bool },
}

/// One caller's wait for a key's lock, across attempts.
pub(crate) struct LockWait {
    token: String,
    deadline: Instant,
    /// The backup retry period, since pub/sub can drop a message.
    retry: Duration,
    waited: bool,
    /// The function counted.
    site: Option<&'static Site>,
}

impl LockWait {
    pub(crate) fn new(policy: &LockPolicy, site: Option<&'static Site>) -> Self {
        LockWait {
            site,
            token: lock_token(),
            deadline: Instant::now() + policy.wait,
            retry: (policy.wait / 20).clamp(Duration::from_millis(5), Duration::from_millis(100)),
            waited: false,
        }
    }

    /// Takes the lock for `key`, which held `seen` when read, or waits for
    /// the holder's value, or gives up (see [`Waited`]).
    pub(crate) async fn next<'a>(
        &mut self,
        inner: &'a Inner,
        key: &str,
        mut seen: Seen,
        policy: &LockPolicy,
    ) -> Waited<'a> {
        let Some(redis) = inner.backend.redis() else {
            return Waited::Compute {
                seen,
                failed: false,
            };
        };
        let lock = inner.lock_key(key);
        let watch = redis.watch(key);
        loop {
            // Register for the notification before looking, so that a value
            // landing in between still wakes us.
            let notified = watch.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if matches!(seen, Seen::Unknown) {
                return Waited::Compute {
                    seen,
                    failed: false,
                };
            }
            let attempt = Attempt::new(inner, redis, key, &lock, &self.token, policy.ttl);
            let reply = inner
                .guarded_at(
                    key,
                    redis.acquire(key, &lock, &seen, &self.token, policy.ttl),
                )
                .await;
            attempt.answered(&reply);
            let holder = match reply {
                Ok(Acquire::Acquired(now)) => {
                    inner.count(self.site, Event::lock_acquired);
                    let guard =
                        LockGuard::new(inner, redis, key, lock, &self.token, policy, self.site);
                    return Waited::Hold(guard, now);
                }
                Ok(Acquire::Landed(Seen::Bytes(bytes))) => return Waited::Landed(bytes),
                // A value too large to read: it counts as seen.
                Ok(Acquire::Landed(now)) => {
                    seen = now;
                    continue;
                }
                Ok(Acquire::Held(holder)) => {
                    if !self.waited {
                        self.waited = true;
                        inner.count(self.site, Event::lock_waits);
                    }
                    holder
                }
                // The key's cluster slot is moving to another node: a
                // command on the value and its lock cannot run until the
                // move ends (milliseconds per slot). Wait as for a holder
                // (there may be one), then try again.
                Err(err) if err.is_migrating() => None,
                // Redis is failing: compute without the lock, like any miss.
                Err(_) => {
                    return Waited::Compute {
                        seen,
                        failed: false,
                    }
                }
            };
            let now = Instant::now();
            if now >= self.deadline {
                inner.count(self.site, Event::lock_wait_timeouts);
                return Waited::Compute {
                    seen,
                    failed: false,
                };
            }
            // Jittered, so that waiters started together do not all retry
            // at once (possibly just as the value lands).
            let pause = self.retry.mul_f64(0.5 + unit_interval());
            let _ = tokio::time::timeout(pause.min(self.deadline - now), notified).await;
            match watch.landed() {
                // Only the value of the holder found is taken from a
                // message: another's (a late message from an earlier one),
                // or one for a key invalidated here lately, may have been
                // computed before an invalidation made anywhere: read what
                // the key holds instead.
                Some(Landing::Value(bytes, Some(by)))
                    if holder.as_deref() == Some(&*by)
                        && !inner.recent.within(key, inner.settings.invalidation_window) =>
                {
                    return Waited::Landed(bytes)
                }
                Some(Landing::Value(..) | Landing::Fetch) => match inner.read(key).await {
                    Ok(bytes) => return Waited::Landed(bytes),
                    Err(now) => seen = now,
                },
                Some(Landing::Failed) => return Waited::Compute { seen, failed: true },
                Some(Landing::Retry) | None => {}
            }
        }
    }

    /// One attempt at the lock, without waiting: for a background refresh,
    /// which another process's holder makes unnecessary.
    pub(crate) async fn try_once<'a>(
        inner: &'a Inner,
        key: &str,
        seen: &Seen,
        policy: &LockPolicy,
        site: Option<&'static Site>,
    ) -> Option<(LockGuard<'a>, Seen)> {
        let redis = inner.backend.redis()?;
        let token = lock_token();
        let lock = inner.lock_key(key);
        let attempt = Attempt::new(inner, redis, key, &lock, &token, policy.ttl);
        let reply = inner
            .guarded_at(key, redis.acquire(key, &lock, seen, &token, policy.ttl))
            .await;
        attempt.answered(&reply);
        match reply {
            Ok(Acquire::Acquired(now)) => {
                inner.count(site, Event::lock_acquired);
                Some((
                    LockGuard::new(inner, redis, key, lock, &token, policy, site),
                    now,
                ))
            }
            Ok(_) | Err(_) => None,
        }
    }
}

/// An acquire in flight. If it ends without a reply (a timeout, a dropped
/// connection) or is dropped unanswered (its caller's future was dropped),
/// Redis may have run it and given us the lock: then whatever this token
/// holds is released at once, so nobody waits for a holder that is not
/// computing.
struct Attempt<'a> {
    inner: &'a Inner,
    redis: &'a RedisBackend,
    key: &'a str,
    lock: &'a str,
    token: &'a str,
    /// How long the lock lives if the attempt took it.
    ttl: Duration,
    answered: bool,
}

impl<'a> Attempt<'a> {
    fn new(
        inner: &'a Inner,
        redis: &'a RedisBackend,
        key: &'a str,
        lock: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> Self {
        Attempt {
            inner,
            redis,
            key,
            lock,
            token,
            ttl,
            answered: false,
        }
    }

    /// The attempt's outcome is known: a reply, or an error that says the
    /// script never ran (the breaker skipped it, Redis rejected it).
    fn answered<T>(mut self, reply: &Result<T, Error>) {
        self.answered = !matches!(reply, Err(Error::Timeout(_) | Error::Redis(_)));
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.answered {
            let timeout = self.inner.settings.op_timeout;
            self.redis.release_detached(
                self.key,
                self.lock,
                self.token,
                false,
                (timeout, self.ttl),
                self.inner.counting(),
            );
        }
    }
}

/// A held lock. Dropped unreleased (its holder was cancelled or panicked,
/// or [`LockGuard::release`] failed: Redis slow, or the key's cluster slot
/// migrating), it releases the lock from a task of its own.
pub(crate) struct LockGuard<'a> {
    inner: &'a Inner,
    redis: &'a RedisBackend,
    key: String,
    lock: String,
    token: String,
    /// How long the lock lives after its last extension.
    ttl: Duration,
    released: bool,
    /// Extends the lock while it is held; stopped with the guard.
    watchdog: Option<tokio::task::JoinHandle<()>>,
    site: Option<&'static Site>,
}

impl<'a> LockGuard<'a> {
    fn new(
        inner: &'a Inner,
        redis: &'a RedisBackend,
        key: &str,
        lock: String,
        token: &str,
        policy: &LockPolicy,
        site: Option<&'static Site>,
    ) -> Self {
        let watchdog = redis.spawn_watchdog(
            &lock,
            token,
            policy.ttl,
            inner.settings.op_timeout,
            inner.counting(),
        );
        LockGuard {
            inner,
            redis,
            key: key.to_owned(),
            lock,
            token: token.to_owned(),
            ttl: policy.ttl,
            released: false,
            watchdog,
            site,
        }
    }

    fn stop_watchdog(&mut self) {
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.abort();
        }
    }

    /// Releases the lock, storing `encoded` by compare-and-set against
    /// `seen`, and wakes the waiters.
    pub(crate) async fn release(mut self, seen: &Seen, encoded: &Encoded) -> StoreOutcome {
        self.stop_watchdog();
        let inner = self.inner;
        let release = match encoded {
            (entry, _) if inner.check_size(entry).is_err() => Release::Failed,
            (entry, Some(ttl)) => Release::Store(entry, *ttl),
            // An absence that is not cached: the waiters get it all the same.
            (entry, None) => Release::Share(entry),
        };
        let released = self
            .redis
            .release(&self.key, &self.lock, &self.token, seen, release);
        inner.forget_near(&self.key);
        let released = inner.guarded_at(&self.key, released).await;
        inner.forget_near(&self.key);
        match released {
            Ok(stored) => {
                self.released = true;
                match release {
                    Release::Store(..) => inner.count_store(stored, self.site),
                    _ => StoreOutcome::Failed,
                }
            }
            Err(_) => StoreOutcome::Failed,
        }
    }

    /// Releases the lock in the background after a failed computation:
    /// waiters compute by themselves rather than wait for one another.
    pub(crate) fn fail(mut self) {
        self.stop_watchdog();
        self.released = true;
        let timeout = self.inner.settings.op_timeout;
        self.redis.release_detached(
            &self.key,
            &self.lock,
            &self.token,
            true,
            (timeout, self.ttl),
            self.inner.counting(),
        );
    }
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        self.stop_watchdog();
        if !self.released {
            // A panicking holder failed: its waiters compute side by side.
            // A cancelled one did not: they try the lock again.
            let failed = std::thread::panicking();
            let timeout = self.inner.settings.op_timeout;
            self.redis.release_detached(
                &self.key,
                &self.lock,
                &self.token,
                failed,
                (timeout, self.ttl),
                self.inner.counting(),
            );
        }
    }
}
