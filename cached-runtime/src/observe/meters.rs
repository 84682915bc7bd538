//! The counters exported through the `metrics` facade (feature `metrics`),
//! to whatever recorder the program installs (Prometheus, OpenTelemetry
//! bridges, …). Without the feature every method here is empty.
//!
//! Handles are registered once per cache and once per cached function and
//! cache, on their first event, and then found without any lookup (for the
//! first cache a function counts on) or under a read lock (for others); so
//! a recorder must be installed before the first cached call (as every
//! recorder's documentation asks). Only the series a function or cache can
//! produce ([`Series`]) are registered then, at zero; any other (an event
//! the runtime API counts under `fn=""`) on its first occurrence. Every
//! metric is described (help text, unit) to the recorder as they are.

use crate::observe::stats::Event;

/// The bucket bounds, in seconds, under which each histogram of this crate
/// is best rendered as a Prometheus histogram: `(metric name, bounds)`.
///
/// `metrics-exporter-prometheus` renders a histogram as a summary (quantiles
/// of this process alone, which cannot be aggregated across instances)
/// unless it is given buckets for it. These cover:
///
/// - `redis_cached_redis_operation_seconds` (one Redis operation, `cache`
///   label): 100 µs to 1 s, a round trip on a LAN to a slow command or an
///   `op_timeout`;
/// - `redis_cached_compute_seconds` (one body run, `fn` and `cache`
///   labels): 1 ms to 30 s, a fast query to a slow remote call;
/// - `redis_cached_write_behind_flush_lag_seconds` (age of a flushed
///   batch's oldest write, `journal` and `cache` labels): 10 ms to 15 min,
///   a `max_delay` to a sink that was down for minutes.
///
/// Every other metric is a counter or a gauge; each is described (a
/// `# HELP` line, its unit) when first registered.
///
/// ```no_run
/// # extern crate cached_runtime as redis_cached;
/// use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut builder = PrometheusBuilder::new();
/// for (name, bounds) in redis_cached::HISTOGRAM_BUCKETS {
///     builder = builder.set_buckets_for_metric(Matcher::Full((*name).to_owned()), bounds)?;
/// }
/// // Before the first cached call: handles are registered on first use.
/// let prometheus = builder.install_recorder()?;
/// // … serve `prometheus.render()` on `/metrics`, and call
/// // `prometheus.run_upkeep()` now and then (or before each render).
/// # Ok(())
/// # }
/// ```
pub const HISTOGRAM_BUCKETS: &[(&str, &[f64])] = &[
    (
        "redis_cached_redis_operation_seconds",
        &[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
        ],
    ),
    (
        "redis_cached_compute_seconds",
        &[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ],
    ),
    (
        "redis_cached_write_behind_flush_lag_seconds",
        &[
            0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
        ],
    ),
];

/// The series a cached function, or a cache as a whole, can produce: a set
/// of events, and whether its compute time, or its Redis operations' times
/// and breakers' state, are recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Series(u64);

impl Series {
    /// No series: one registers each on its first event.
    pub(crate) const NONE: Series = Series(0);
    const COMPUTE_TIME: u64 = 1 << 63;
    const REDIS: u64 = 1 << 62;

    /// These `events`.
    pub(crate) fn of(events: &[Event]) -> Series {
        events.iter().fold(Series::NONE, |series, e| series.and(*e))
    }

    /// These series and `event`'s.
    pub(crate) fn and(self, event: Event) -> Series {
        Series(self.0 | 1 << event as u32)
    }

    /// These series and the compute time's histogram.
    pub(crate) fn and_compute_time(self) -> Series {
        Series(self.0 | Series::COMPUTE_TIME)
    }

    /// A cache's own series: on Redis, its failures, its breakers and its
    /// operations' times; with a near tier, the tier's invalidations.
    pub(crate) fn of_cache(redis: bool, near: bool) -> Series {
        let mut series = Series::of(&[Event::invalidations, Event::oversized]);
        if redis {
            series = Series(series.0 | Series::REDIS);
            for event in [
                Event::errors,
                Event::refused,
                Event::rejected,
                Event::timeouts,
                Event::breaker_skips,
                Event::breaker_opens,
                Event::breaker_failed_probes,
            ] {
                series = series.and(event);
            }
        }
        if near {
            series = series.and(Event::near_invalidations);
            series = series.and(Event::near_flushes);
        }
        series
    }

    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    fn has(self, event: Event) -> bool {
        self.0 & 1 << event as u32 != 0
    }
}

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
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{OnceLock, PoisonError, RwLock};
    use std::time::Duration;

    use metrics::{Counter, Gauge, Histogram, Label, Unit};

    use super::{metric_of, Series, NO_FUNCTION};
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

    /// Tells the recorder what each metric of a cache measures, and in
    /// which unit (a `# HELP` line in Prometheus's text). Called as handles
    /// are registered (once per function and cache): a recorder keeps the
    /// first description of a name, and the program may have installed it
    /// after an earlier registration.
    fn describe() {
        for event in Event::ALL {
            if let (name, None) = metric_of(*event) {
                metrics::describe_counter!(name, Unit::Count, event.help());
            }
        }
        metrics::describe_counter!(
            "redis_cached_redis_errors_total",
            Unit::Count,
            "Redis operations that failed, by kind: error (error reply, I/O error, refused \
             connection or authentication), timeout (abandoned after op_timeout), refused \
             (refused while up: out of memory, read-only replica), rejected (for one key or \
             user: WRONGTYPE, NOPERM, a slot moved for too long)."
        );
        metrics::describe_histogram!(
            "redis_cached_compute_seconds",
            Unit::Seconds,
            "How long a cached function's body ran, each time it ran (a miss, a refresh)."
        );
        metrics::describe_histogram!(
            "redis_cached_redis_operation_seconds",
            Unit::Seconds,
            "How long each Redis operation of the cache took, failed ones included."
        );
        metrics::describe_gauge!(
            "redis_cached_breaker_open",
            Unit::Count,
            "How many of the cache's circuit breakers skip Redis now: 0 or 1 on one server; \
             on a Redis Cluster, one per master may."
        );
    }

    /// One cache's handles (`fn=""`: the cache's own events, and those
    /// the runtime API counts; Redis times, the breaker) or one function's
    /// on one cache (its own events and compute time). Those of its
    /// [`Series`] are registered with it; any other on its first use, so
    /// that no series is exported that cannot move, and none is lost.
    struct Handles {
        function: String,
        cache: String,
        counters: Box<[OnceLock<Counter>]>,
        compute: OnceLock<Histogram>,
        redis: OnceLock<Histogram>,
        breaker: OnceLock<Gauge>,
    }

    impl Handles {
        fn register(function: &str, cache: &str, series: Series) -> Handles {
            describe();
            let handles = Handles {
                function: function.to_owned(),
                cache: cache.to_owned(),
                counters: Event::ALL.iter().map(|_| OnceLock::new()).collect(),
                compute: OnceLock::new(),
                redis: OnceLock::new(),
                breaker: OnceLock::new(),
            };
            for event in Event::ALL.iter().filter(|event| series.has(**event)) {
                handles.counter(*event);
            }
            if series.0 & Series::COMPUTE_TIME != 0 {
                handles.compute();
            }
            if series.0 & Series::REDIS != 0 {
                handles.redis();
                handles.breaker();
            }
            handles
        }

        fn counter(&self, event: Event) -> &Counter {
            self.counters[event as usize].get_or_init(|| {
                let (name, kind) = metric_of(event);
                metrics::counter!(name, labels(&self.function, &self.cache, kind))
            })
        }

        fn compute(&self) -> &Histogram {
            self.compute.get_or_init(|| {
                metrics::histogram!(
                    "redis_cached_compute_seconds",
                    labels(&self.function, &self.cache, None)
                )
            })
        }

        fn only_cache(&self) -> Vec<Label> {
            vec![Label::new("cache", self.cache.clone())]
        }

        fn redis(&self) -> &Histogram {
            self.redis.get_or_init(|| {
                metrics::histogram!("redis_cached_redis_operation_seconds", self.only_cache())
            })
        }

        fn breaker(&self) -> &Gauge {
            self.breaker
                .get_or_init(|| metrics::gauge!("redis_cached_breaker_open", self.only_cache()))
        }
    }

    /// The handles of one cache (`fn=""`) or one cached function: those of
    /// the first cache it counts on, found without a lock, and those of any
    /// other, under a read lock.
    #[derive(Default)]
    pub(crate) struct Meters {
        /// The series registered with the handles (a [`Series`]).
        series: AtomicU64,
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
                series: AtomicU64::new(0),
                first: OnceLock::new(),
                others: RwLock::new(Vec::new()),
            }
        }

        /// Meters that register `series` with their handles.
        pub(crate) fn of(series: Series) -> Meters {
            let meters = Meters::new();
            meters.expect(series);
            meters
        }

        /// Registers `series` with the handles made from now on (a cached
        /// function's, known at its first call, before its first event).
        pub(crate) fn expect(&self, series: Series) {
            self.series.store(series.0, Ordering::Release);
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
            let register = || {
                let series = Series(self.series.load(Ordering::Acquire));
                Handles::register(function(), cache, series)
            };
            let first = self.first.get_or_init(register);
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
                others.push(register());
            }
            if let Some(handles) = others.iter().find(|h| h.cache == cache) {
                use_them(handles);
            }
        }

        pub(crate) fn count<'a>(&self, event: Event, function: impl Fn() -> &'a str, cache: &str) {
            self.with(function, cache, |h| h.counter(event).increment(1));
        }

        pub(crate) fn compute_time<'a>(
            &self,
            took: Duration,
            function: impl Fn() -> &'a str,
            cache: &str,
        ) {
            self.with(function, cache, |h| h.compute().record(took.as_secs_f64()));
        }

        pub(crate) fn redis_time(&self, took: Duration, cache: &str) {
            self.with(
                || NO_FUNCTION,
                cache,
                |h| h.redis().record(took.as_secs_f64()),
            );
        }

        /// How many of the cache's breakers are open (0 or 1 on one
        /// server; on a cluster, one per master may be).
        pub(crate) fn breakers_open(&self, open: usize, cache: &str) {
            self.with(|| NO_FUNCTION, cache, |h| h.breaker().set(open as f64));
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

    pub(crate) fn of(_: Series) -> Meters {
        Meters
    }

    #[inline(always)]
    pub(crate) fn expect(&self, _: Series) {}

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
