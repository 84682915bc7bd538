//! The counters exported through the `metrics` facade (feature `metrics`),
//! to whatever recorder the program installs (Prometheus, OpenTelemetry
//! bridges, …). Without the feature every method here is empty.
//!
//! Handles are registered once per cache and once per cached function and
//! cache, on their first event, and then found without any lookup (for the
//! first cache a function counts on) or under a read lock (for others); so
//! a recorder must be installed before the first cached call (as every
//! recorder's documentation asks).

use crate::observe::stats::Event;

/// The name and extra label under which `event` is exported.
#[cfg(feature = "metrics")]
pub(crate) fn metric_of(event: Event) -> (&'static str, Option<&'static str>) {
    match event {
        Event::errors => ("redis_cached_redis_errors_total", Some("error")),
        Event::refused => ("redis_cached_redis_errors_total", Some("refused")),
        Event::rejected => ("redis_cached_redis_errors_total", Some("rejected")),
        Event::timeouts => ("redis_cached_redis_errors_total", Some("timeout")),
        other => (other.metric_name(), None),
    }
}

/// The `fn` label of events counted outside a cached function (the
/// runtime API, and cache-wide events such as Redis errors).
pub(crate) const NO_FUNCTION: &str = "";

/// A cache's counters and exported metrics, for work that outlives the
/// call that started it (a lock's watchdog, a background release, the
/// near tier's invalidations): counts events of the cache as a whole.
pub(crate) struct Counting {
    pub(crate) counters: std::sync::Arc<crate::observe::stats::Counters>,
    pub(crate) meters: std::sync::Arc<Meters>,
    /// The cache's label in exported metrics (empty when none are).
    pub(crate) cache: String,
}

impl Counting {
    pub(crate) fn count(&self, event: Event) {
        self.counters.add(event);
        if EXPORTED {
            self.meters.count(event, || NO_FUNCTION, &self.cache);
        }
    }
}

#[cfg(feature = "metrics")]
mod on {
    use std::sync::{OnceLock, PoisonError, RwLock};
    use std::time::Duration;

    use metrics::{Counter, Gauge, Histogram, Label};

    use super::{metric_of, NO_FUNCTION};
    use crate::observe::stats::Event;

    /// The labels of a series of `function` on `cache`.
    fn labels(function: &str, cache: &str, kind: Option<&'static str>) -> Vec<Label> {
        let mut labels = vec![
            Label::new("fn", function.to_owned()),
            Label::new("cache", cache.to_owned()),
        ];
        if let Some(kind) = kind {
            labels.push(Label::new("kind", kind));
        }
        labels
    }

    /// One cache's handles (`fn=""`: every event, Redis times, the
    /// breaker) or one function's on one cache (its own events and compute
    /// time); the others are no-ops, so that no series is exported that
    /// never moves.
    struct Handles {
        cache: String,
        counters: Vec<Counter>,
        compute: Histogram,
        redis: Histogram,
        breaker: Gauge,
    }

    impl Handles {
        fn register(function: &str, cache: &str) -> Handles {
            let whole_cache = function == NO_FUNCTION;
            let only_cache = || vec![Label::new("cache", cache.to_owned())];
            Handles {
                cache: cache.to_owned(),
                counters: Event::ALL
                    .iter()
                    .map(|event| {
                        if whole_cache || event.per_function() {
                            let (name, kind) = metric_of(*event);
                            metrics::counter!(name, labels(function, cache, kind))
                        } else {
                            Counter::noop()
                        }
                    })
                    .collect(),
                compute: if whole_cache {
                    Histogram::noop()
                } else {
                    metrics::histogram!(
                        "redis_cached_compute_seconds",
                        labels(function, cache, None)
                    )
                },
                redis: if whole_cache {
                    metrics::histogram!("redis_cached_redis_operation_seconds", only_cache())
                } else {
                    Histogram::noop()
                },
                breaker: if whole_cache {
                    metrics::gauge!("redis_cached_breaker_open", only_cache())
                } else {
                    Gauge::noop()
                },
            }
        }
    }

    /// The handles of one cache (`fn=""`) or one cached function: those of
    /// the first cache it counts on, found without a lock, and those of any
    /// other, under a read lock.
    #[derive(Default)]
    pub(crate) struct Meters {
        first: OnceLock<Handles>,
        others: RwLock<Vec<Handles>>,
    }

    impl std::fmt::Debug for Meters {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Meters").finish_non_exhaustive()
        }
    }

    impl Meters {
        pub(crate) const fn new() -> Meters {
            Meters {
                first: OnceLock::new(),
                others: RwLock::new(Vec::new()),
            }
        }

        /// Runs `use_them` with the handles for the function `function()`
        /// names on `cache`, registered on first use (the name is only made
        /// then).
        fn with<'a>(
            &self,
            function: impl Fn() -> &'a str,
            cache: &str,
            use_them: impl FnOnce(&Handles),
        ) {
            let first = self
                .first
                .get_or_init(|| Handles::register(function(), cache));
            if first.cache == cache {
                return use_them(first);
            }
            let others = self.others.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(handles) = others.iter().find(|h| h.cache == cache) {
                return use_them(handles);
            }
            drop(others);
            let mut others = self.others.write().unwrap_or_else(PoisonError::into_inner);
            if !others.iter().any(|h| h.cache == cache) {
                others.push(Handles::register(function(), cache));
            }
            if let Some(handles) = others.iter().find(|h| h.cache == cache) {
                use_them(handles);
            }
        }

        pub(crate) fn count<'a>(&self, event: Event, function: impl Fn() -> &'a str, cache: &str) {
            self.with(function, cache, |h| h.counters[event as usize].increment(1));
        }

        pub(crate) fn compute_time<'a>(
            &self,
            took: Duration,
            function: impl Fn() -> &'a str,
            cache: &str,
        ) {
            self.with(function, cache, |h| h.compute.record(took.as_secs_f64()));
        }

        pub(crate) fn redis_time(&self, took: Duration, cache: &str) {
            self.with(
                || NO_FUNCTION,
                cache,
                |h| h.redis.record(took.as_secs_f64()),
            );
        }

        /// How many of the cache's breakers are open (0 or 1 on one
        /// server; on a cluster, one per master may be).
        pub(crate) fn breakers_open(&self, open: usize, cache: &str) {
            self.with(|| NO_FUNCTION, cache, |h| h.breaker.set(open as f64));
        }
    }
}

#[cfg(feature = "metrics")]
pub(crate) use on::Meters;

/// Without the `metrics` feature: nothing to register, nothing to do.
#[cfg(not(feature = "metrics"))]
#[derive(Debug, Default)]
pub(crate) struct Meters;

#[cfg(not(feature = "metrics"))]
impl Meters {
    pub(crate) const fn new() -> Meters {
        Meters
    }

    #[inline(always)]
    pub(crate) fn count<'a>(&self, _: Event, _: impl Fn() -> &'a str, _: &str) {}

    #[inline(always)]
    pub(crate) fn compute_time<'a>(
        &self,
        _: std::time::Duration,
        _: impl Fn() -> &'a str,
        _: &str,
    ) {
    }

    #[inline(always)]
    pub(crate) fn redis_time(&self, _: std::time::Duration, _: &str) {}

    #[inline(always)]
    pub(crate) fn breakers_open(&self, _: usize, _: &str) {}
}

/// Whether metrics are exported (feature `metrics`): without it, no label
/// is made, no clock read and no handle looked up.
pub(crate) const EXPORTED: bool = cfg!(feature = "metrics");
