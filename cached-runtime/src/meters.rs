//! The counters exported through the `metrics` facade (feature `metrics`),
//! to whatever recorder the program installs (Prometheus, OpenTelemetry
//! bridges, …). Without the feature every method here is empty.
//!
//! Handles are registered once per cache and once per cached function, on
//! their first event, and then used without any lookup; so a recorder must
//! be installed before the first cached call (as every recorder's
//! documentation asks). A function is labelled with the namespace of the
//! cache it first counted on; its events on another cache are registered
//! per event (rare: one function, two caches).

use crate::stats::Event;

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

#[cfg(feature = "metrics")]
mod on {
    use std::sync::OnceLock;
    use std::time::Duration;

    use metrics::{Counter, Gauge, Histogram, Label};

    use super::metric_of;
    use crate::stats::Event;

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

    fn counter(event: Event, function: &str, cache: &str) -> Counter {
        let (name, kind) = metric_of(event);
        metrics::counter!(name, labels(function, cache, kind))
    }

    /// One cache's or function's handles.
    struct Handles {
        /// The cache (its core's address) they were registered for.
        owner: usize,
        /// Its label.
        cache: String,
        counters: Vec<Counter>,
        compute: Histogram,
        redis: Histogram,
        breaker: Gauge,
    }

    impl Handles {
        fn register(function: &str, owner: usize, cache: &str) -> Handles {
            let only_cache = || vec![Label::new("cache", cache.to_owned())];
            Handles {
                owner,
                cache: cache.to_owned(),
                counters: Event::ALL
                    .iter()
                    .map(|event| counter(*event, function, cache))
                    .collect(),
                compute: metrics::histogram!(
                    "redis_cached_compute_seconds",
                    labels(function, cache, None)
                ),
                redis: metrics::histogram!("redis_cached_redis_operation_seconds", only_cache()),
                breaker: metrics::gauge!("redis_cached_breaker_open", only_cache()),
            }
        }
    }

    /// The handles of one cache (`fn=""`) or one cached function.
    #[derive(Default)]
    pub(crate) struct Meters {
        handles: OnceLock<Handles>,
    }

    impl std::fmt::Debug for Meters {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Meters").finish_non_exhaustive()
        }
    }

    impl Meters {
        pub(crate) const fn new() -> Meters {
            Meters {
                handles: OnceLock::new(),
            }
        }

        /// The handles for the function `function()` names, on the cache
        /// whose core is at `owner`, labelled `cache`: registered on first
        /// use (the name is only made then); `None` when they were
        /// registered for another cache.
        fn handles<'a>(
            &self,
            function: impl FnOnce() -> &'a str,
            owner: usize,
            cache: &str,
        ) -> Option<&Handles> {
            let handles = self
                .handles
                .get_or_init(|| Handles::register(function(), owner, cache));
            (handles.owner == owner || handles.cache == cache).then_some(handles)
        }

        pub(crate) fn count<'a>(
            &self,
            event: Event,
            function: impl Fn() -> &'a str,
            owner: usize,
            cache: &str,
        ) {
            match self.handles(&function, owner, cache) {
                Some(handles) => handles.counters[event as usize].increment(1),
                None => counter(event, function(), cache).increment(1),
            }
        }

        pub(crate) fn compute_time<'a>(
            &self,
            took: Duration,
            function: impl Fn() -> &'a str,
            owner: usize,
            cache: &str,
        ) {
            match self.handles(&function, owner, cache) {
                Some(handles) => handles.compute.record(took.as_secs_f64()),
                None => metrics::histogram!(
                    "redis_cached_compute_seconds",
                    labels(function(), cache, None)
                )
                .record(took.as_secs_f64()),
            }
        }

        pub(crate) fn redis_time(&self, took: Duration, owner: usize, cache: &str) {
            if let Some(handles) = self.handles(|| super::NO_FUNCTION, owner, cache) {
                handles.redis.record(took.as_secs_f64());
            }
        }

        pub(crate) fn breaker(&self, open: bool, owner: usize, cache: &str) {
            if let Some(handles) = self.handles(|| super::NO_FUNCTION, owner, cache) {
                handles.breaker.set(if open { 1.0 } else { 0.0 });
            }
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
    pub(crate) fn count<'a>(&self, _: Event, _: impl Fn() -> &'a str, _: usize, _: &str) {}

    #[inline(always)]
    pub(crate) fn compute_time<'a>(
        &self,
        _: std::time::Duration,
        _: impl Fn() -> &'a str,
        _: usize,
        _: &str,
    ) {
    }

    #[inline(always)]
    pub(crate) fn redis_time(&self, _: std::time::Duration, _: usize, _: &str) {}

    #[inline(always)]
    pub(crate) fn breaker(&self, _: bool, _: usize, _: &str) {}
}

/// Whether Redis operations are timed (only when exported).
pub(crate) const TIMED: bool = cfg!(feature = "metrics");
