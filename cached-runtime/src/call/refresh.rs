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

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::{Bytes, Seen};
use crate::call::miss::{marked, rebuild, Fill};
use crate::encoding::codec::Timing;
use crate::encoding::shape::{Shape, Stored};
use crate::engine::policy::Policy;
use crate::engine::store::{Inner, Lookup};
use crate::observe::stats::Event;
use crate::token::{now_unix_ms, unit_interval};

/// The shortest time bound of a background refresh.
const MIN_REFRESH_BOUND: Duration = Duration::from_secs(1);

/// Why a hit starts a refresh.
#[derive(Debug, PartialEq)]
pub(crate) enum Due {
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

/// How long a background refresh may run before it is abandoned (and its
/// key may be refreshed again): the stale window, or with `early` the TTL.
/// A refresh slower than that serves nobody: the old value has expired.
fn refresh_bound(policy: &Policy, default_ttl: Duration) -> Duration {
    policy
        .stale
        .unwrap_or(policy.ttl.unwrap_or(default_ttl))
        .max(MIN_REFRESH_BOUND)
}

/// The body of a function, boxed to run as a background refresh.
pub(crate) type Detached<R> = Pin<Box<dyn Future<Output = R> + Send>>;

impl Inner {
    /// Decodes an entry as a result (a hit, counted), with the refresh it
    /// is due (for `stale` or `early`) and the entry as stored, for the
    /// refresh's compare-and-set; or says what the key held.
    pub(crate) fn decode_hit<S: Shape<R>, R>(
        &self,
        bytes: Bytes,
        policy: &Policy,
    ) -> Result<(R, Option<(Due, Bytes)>), Seen> {
        let hit = match self.decode::<S::Value>(bytes, policy.site) {
            Lookup::Hit(hit) => hit,
            Lookup::Miss(seen) => return Err(seen),
        };
        // Only an entry of a `stale` or `early` function is timed: no clock
        // read for others.
        let due = hit
            .timing
            .and_then(|timing| refresh_due(Some(timing), policy, now_unix_ms(), unit_interval))
            // Copied only for a refresh.
            .map(|due| (due, hit.raw.clone()));
        let result = rebuild::<S, R>(hit)?;
        self.count(policy.site, Event::hits);
        Ok((result, due))
    }

    /// Starts the refresh a hit is `due`, counting why; `make` makes the
    /// body, only once the refresh is sure to start (it clones what the
    /// function borrows).
    pub(crate) fn start_refresh<S, R>(
        self: &Arc<Self>,
        due: Due,
        key: &str,
        tags: &[String],
        policy: Policy,
        raw: Bytes,
        make: &mut dyn FnMut() -> Option<Detached<R>>,
    ) where
        S: Shape<R> + 'static,
        R: 'static,
    {
        if due == Due::Stale {
            self.count(policy.site, Event::stale_serves);
        }
        if self.spawn_refresh::<S, R>(key, tags, policy, raw, make) && due == Due::Early {
            self.count(policy.site, Event::early_refreshes);
        }
    }

    /// Starts a background refresh of `key` unless one runs already;
    /// returns whether it started. The refresh holds a claim on the key
    /// that its end releases, however it ends, and it is abandoned after
    /// its time bound.
    fn spawn_refresh<S, R>(
        self: &Arc<Self>,
        key: &str,
        tags: &[String],
        policy: Policy,
        seen: Bytes,
        make: &mut dyn FnMut() -> Option<Detached<R>>,
    ) -> bool
    where
        S: Shape<R> + 'static,
        R: 'static,
    {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        let Some(claim) = self.refreshing.claim(key) else {
            return false;
        };
        let Some(body) = make() else {
            return false;
        };
        let inner = Arc::clone(self);
        let (key, tags) = (key.to_owned(), tags.to_vec());
        let bound = refresh_bound(&policy, self.settings.default_ttl);
        let task: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
            let _claim = claim;
            let refresh = inner.refresh::<S, R>(key, &tags, &policy, seen, body);
            if tokio::time::timeout(bound, refresh).await.is_err() {
                inner.count(policy.site, Event::refresh_failures);
                tracing::warn!(target: "redis_cached",
                    "background refresh still running after {bound:?}; abandoned, the key may be refreshed again"
                );
            }
        });
        // Boxed as one type: the runtime's task machinery is compiled once,
        // not once per cached function.
        runtime.spawn(task);
        true
    }

    /// Recomputes `key` in the background; `seen` is the entry it replaces.
    async fn refresh<S, R>(
        &self,
        key: String,
        tags: &[String],
        policy: &Policy,
        seen: Bytes,
        body: Detached<R>,
    ) where
        S: Shape<R>,
    {
        let mut fill = Fill::for_refresh(self, key, tags, *policy, Seen::Bytes(seen));
        // With `lock = true`: refreshed by someone else, being refreshed,
        // or Redis failing: nothing to do.
        if !fill.lock_once().await {
            return;
        }
        // The refreshed key lives on: so must its tag records. If they
        // cannot be renewed, the old value expires as it would have.
        if !fill.record_tags().await {
            return;
        }
        self.count(policy.site, Event::refreshes);
        // In a scope of its own: the result is not held across the
        // `.await`s below (it need not be `Send`).
        fill.computing();
        let encoded = {
            let result = marked(fill.key(), body).await;
            if matches!(S::view(&result), Stored::Skip) {
                self.count(policy.site, Event::refresh_failures);
                tracing::debug!(target: "redis_cached",
                    "background refresh failed; the stale value is served until it expires"
                );
            }
            fill.encode::<S, R>(&result)
        };
        let encoded = encoded.map(|(entry, ttl)| match ttl {
            Some(_) => (entry, ttl),
            // The row is gone and absences are not cached: the stale value
            // must not be served on. A tombstone, by compare-and-set like
            // any refresh, makes the next call compute.
            None => (
                self.settings.codec.encode_tombstone().into(),
                Some(self.settings.invalidation_window),
            ),
        });
        match encoded {
            Some(encoded) => {
                fill.finish(encoded).await;
            }
            None => fill.fail(),
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
