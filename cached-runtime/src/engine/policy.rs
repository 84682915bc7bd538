//! The per-function settings of a cached function, as the attribute
//! writes them.

use std::time::Duration;

use crate::observe::site::Site;

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

impl Policy {
    /// Lists the calling function among those called so far (see
    /// [`cached_functions`](crate::cached_functions)).
    pub(crate) fn register(&self) {
        if let Some(site) = self.site {
            site.register();
        }
    }
}
