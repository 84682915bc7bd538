//! The per-function settings of a cached function, as the attribute
//! writes them.

use std::time::Duration;

use crate::observe::meters::Series;
use crate::observe::site::Site;
use crate::observe::stats::Event;

/// The settings of one cached function.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    /// TTL of stored values; `None`: the cache's default.
    pub ttl: Option<Duration>,
    /// TTL of a stored absence; `None`: absences are not stored.
    pub cache_none: Option<Duration>,
    /// The cross-process lock, for `lock = true`.
    pub lock: Option<LockPolicy>,
    /// How long a value is served stale after its TTL while it is refreshed.
    pub stale: Option<Duration>,
    /// The XFetch beta of early refresh.
    pub early: Option<f64>,
    /// How long a value may be kept in the near tier (`near = "…"`).
    pub near: Option<Duration>,
    /// The function's own counters; `None` for the runtime API.
    pub site: Option<&'static Site>,
}

/// Lock settings of one cached function.
#[derive(Debug, Clone, Copy)]
pub struct LockPolicy {
    /// How long a lock lives without its holder extending it.
    pub ttl: Duration,
    /// How long a caller waits for another's computation before computing itself.
    pub wait: Duration,
}

impl LockPolicy {
    /// `lock_ttl` when the attribute gives none.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
    /// `lock_wait` when the attribute gives none.
    pub const DEFAULT_WAIT: Duration = Duration::from_secs(5);
}

/// What a cached function does with its cache: with its [`Policy`], what
/// it can count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// `#[redis_cached]`: looks up, computes on a miss, stores.
    Cached,
    /// `#[redis_cached]` with `<ids[]>`: the same for many elements at once.
    Batch,
    /// `#[cache_put]`: computes, then stores.
    Put,
}

impl Policy {
    /// Lists the calling function among those called so far (see
    /// [`cached_functions`](crate::cached_functions)), with the series it
    /// can export in its `role`.
    pub(crate) fn register(&self, role: Role) {
        if let Some(site) = self.site {
            site.register(|| self.series(role));
        }
    }

    /// The events a function in `role` with this policy can count.
    fn series(&self, role: Role) -> Series {
        use Event::*;
        let lookups = Series::of(&[
            hits,
            misses,
            computes,
            coalesced,
            coalesce_timeouts,
            writes,
            stale_sets_refused,
            decode_errors,
            encode_errors,
        ]);
        match role {
            Role::Put => Series::of(&[writes, encode_errors]),
            Role::Batch => lookups,
            Role::Cached => {
                let mut series = lookups.and_compute_time();
                let mut add = |events: &[Event]| {
                    series = events.iter().fold(series, |s, e| s.and(*e));
                };
                if self.lock.is_some() {
                    add(&[lock_acquired, lock_waits, lock_wait_timeouts]);
                }
                if self.stale.is_some() {
                    add(&[stale_serves]);
                }
                if self.early.is_some() {
                    add(&[early_refreshes]);
                }
                if self.stale.is_some() || self.early.is_some() {
                    add(&[refreshes, refresh_failures]);
                }
                if self.near.is_some() {
                    add(&[near_hits, near_misses]);
                }
                series
            }
        }
    }
}
