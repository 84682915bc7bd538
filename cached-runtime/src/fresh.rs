//! Freshness: `stale` (serve the old value while one caller refreshes it)
//! and `early` (XFetch: refresh ahead of expiry, with a probability that
//! grows as expiry nears and with the cost of the computation).
//!
//! Both store freshness data with the value: its soft expiry (`now + ttl`)
//! and how long it took to compute (`delta`). With `stale`, Redis keeps the
//! value `ttl + stale`; after the soft expiry a lookup returns it at once and
//! starts one background refresh. If the refresh fails, the old value keeps
//! being served until the hard expiry (stale-if-error). With `early = beta`,
//! a lookup refreshes in the background when
//! `now - delta * beta * ln(rand()) >= expiry` (Vattani, Chierichetti,
//! Lowenstein, VLDB 2015), so one caller refreshes a hot key shortly before
//! it expires and nobody waits.
//!
//! A refresh runs once per key in a process at a time; with `lock = true` it
//! runs under the cross-process lock and is skipped if another process holds
//! it. It stores by compare-and-set against the entry it refreshes, so an
//! invalidation during the refresh wins.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use crate::aside::{Lookup, Seen};
use crate::backend::Bytes;
use crate::cache::Cache;
use crate::codec::Timing;
use crate::lock::{lock_key, Acquire};
use crate::private::Policy;
use crate::shape::{Shape, Stored};
use crate::stats::Counters;
use crate::token::{lock_token, now_unix_ms, unit_interval};

/// The keys this process is refreshing.
#[derive(Debug, Default)]
pub(crate) struct Refreshing {
    keys: Mutex<HashSet<String>>,
}

impl Refreshing {
    /// Claims `key`; `false` if it is being refreshed already.
    fn claim(&self, key: &str) -> bool {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        !keys.contains(key) && keys.insert(key.to_owned())
    }

    fn release(&self, key: &str) {
        self.keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }
}

/// Why a hit starts a refresh.
#[derive(Debug, PartialEq)]
enum Due {
    Stale,
    Early,
}

fn refresh_due(
    timing: Option<Timing>,
    policy: &Policy,
    now_ms: u64,
    draw: impl FnOnce() -> f64,
) -> Option<Due> {
    let timing = timing?;
    if policy.stale.is_some() && now_ms >= timing.soft_expiry_ms {
        return Some(Due::Stale);
    }
    let beta = policy.early?;
    // XFetch: -delta * beta * ln(rand) is a random head start that grows
    // with the cost of recomputing.
    let head_start = -(f64::from(timing.delta_ms)) * beta * draw().ln();
    (now_ms as f64 + head_start >= timing.soft_expiry_ms as f64).then_some(Due::Early)
}

impl Cache {
    /// Cache-aside with background refresh, for `stale` and `early`.
    pub(crate) async fn fill_refreshing<S, R, Fut>(
        &self,
        key: String,
        tags: &[String],
        policy: Policy,
        body: Fut,
    ) -> R
    where
        S: Shape<R> + 'static,
        R: Send + 'static,
        Fut: Future<Output = R> + Send + 'static,
    {
        let seen = match self.lookup::<S::Value>(&key).await {
            Lookup::Hit(hit) => match hit.value.map(S::from_value).or_else(S::absent) {
                Some(result) => {
                    match refresh_due(hit.timing, &policy, now_unix_ms(), unit_interval) {
                        Some(due) => {
                            let counters = &self.inner.counters;
                            if due == Due::Stale {
                                Counters::bump(&counters.stale_serves);
                            }
                            if self.spawn_refresh::<S, R, Fut>(key, policy, hit.raw, body)
                                && due == Due::Early
                            {
                                Counters::bump(&counters.early_refreshes);
                            }
                        }
                        None => drop(body),
                    }
                    return result;
                }
                None => Seen::Bytes(hit.raw),
            },
            Lookup::Miss(seen) => seen,
        };
        self.fill_missed::<S, R, _>(key, tags, seen, &policy, || body)
            .await
    }

    /// Starts a background refresh of `key` unless one runs already;
    /// returns whether it started.
    fn spawn_refresh<S, R, Fut>(&self, key: String, policy: Policy, seen: Bytes, body: Fut) -> bool
    where
        S: Shape<R> + 'static,
        R: Send + 'static,
        Fut: Future<Output = R> + Send + 'static,
    {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        if !self.inner.refreshing.claim(&key) {
            return false;
        }
        let cache = self.clone();
        runtime.spawn(async move {
            cache.refresh::<S, R, Fut>(&key, &policy, seen, body).await;
            cache.inner.refreshing.release(&key);
        });
        true
    }

    /// Recomputes `key` in the background; `seen` is the entry it replaces.
    async fn refresh<S, R, Fut>(&self, key: &str, policy: &Policy, seen: Bytes, body: Fut)
    where
        S: Shape<R>,
        Fut: Future<Output = R>,
    {
        let counters = &self.inner.counters;
        let lock = policy.lock.filter(|_| self.inner.backend.is_redis());
        let token = lock_token();
        let lock_key = lock_key(key);
        let mut seen = Seen::Bytes(seen);
        if let Some(lock) = &lock {
            match self
                .try_acquire(key, &lock_key, seen.bytes(), &token, lock)
                .await
            {
                Some(Ok(Acquire::Acquired(now))) => {
                    Counters::bump(&counters.lock_acquired);
                    seen = now.map_or(Seen::Nothing, Seen::Bytes);
                }
                // Refreshed by someone else, being refreshed, or Redis failing.
                _ => return,
            }
        }
        Counters::bump(&counters.refreshes);
        Counters::bump(&counters.computes);
        let started = Instant::now();
        let result = match &lock {
            Some(lock) => self.with_watchdog(body, &lock_key, &token, lock).await,
            None => body.await,
        };
        if matches!(S::view(&result), Stored::Skip) {
            Counters::bump(&counters.refresh_failures);
            tracing::debug!(
                "background refresh failed; the stale value is served until it expires"
            );
        }
        let encoded = self.encode_result::<S, R>(&result, policy, started.elapsed());
        match (&lock, &encoded) {
            (Some(_), encoded) => {
                self.release_and_store(key, &lock_key, &token, &seen, encoded.as_ref())
                    .await;
            }
            (None, Some((entry, Some(ttl)))) => {
                // Failures are counted inside.
                let _ = self.store_if(key, &seen, entry.clone(), *ttl).await;
            }
            (None, _) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn policy(stale: bool, early: Option<f64>) -> Policy {
        Policy {
            stale: stale.then_some(Duration::from_secs(60)),
            early,
            ..Policy::default()
        }
    }

    const TIMING: Timing = Timing {
        soft_expiry_ms: 10_000,
        delta_ms: 100,
    };

    #[test]
    fn stale_after_the_soft_expiry() {
        assert_eq!(
            refresh_due(Some(TIMING), &policy(true, None), 9_999, || 0.5),
            None
        );
        assert_eq!(
            refresh_due(Some(TIMING), &policy(true, None), 10_000, || 0.5),
            Some(Due::Stale)
        );
        assert_eq!(refresh_due(None, &policy(true, None), 20_000, || 0.5), None);
    }

    #[test]
    fn xfetch_refreshes_closer_to_expiry_more_often() {
        let p = policy(false, Some(1.0));
        // -100 * ln(0.5) = 69 ms of head start.
        assert_eq!(refresh_due(Some(TIMING), &p, 9_900, || 0.5), None);
        assert_eq!(
            refresh_due(Some(TIMING), &p, 9_940, || 0.5),
            Some(Due::Early)
        );
        // A draw of 1 gives no head start; a tiny draw a large one.
        assert_eq!(refresh_due(Some(TIMING), &p, 9_999, || 1.0), None);
        assert_eq!(
            refresh_due(Some(TIMING), &p, 9_000, || 1e-6),
            Some(Due::Early)
        );
        // A larger beta refreshes earlier.
        let eager = policy(false, Some(10.0));
        assert_eq!(
            refresh_due(Some(TIMING), &eager, 9_400, || 0.5),
            Some(Due::Early)
        );
    }
}
