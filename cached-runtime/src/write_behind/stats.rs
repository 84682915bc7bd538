//! The write-behind's counters: this process's, in [`WriteBehindStats`],
//! and (feature `metrics`) their exported twins.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A snapshot of a [`WriteBehind`](crate::WriteBehind)'s counters (this process's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriteBehindStats {
    /// Writes journaled through this handle.
    pub accepted: u64,
    /// Writes refused because the journal was full ([`Error::Backlog`](crate::Error::Backlog)).
    pub refused: u64,
    /// Writes that failed because Redis did (an error to the caller).
    pub failed: u64,
    /// Journaled writes whose cache update failed; the key was invalidated
    /// instead when Redis allowed.
    pub cache_update_failures: u64,
    /// Writes the sink took (after coalescing).
    pub flushed: u64,
    /// Journaled writes folded into a later write of the same key.
    pub coalesced: u64,
    /// Batches the sink took.
    pub batches: u64,
    /// Sink calls that failed and were retried.
    pub retries: u64,
    /// Entries added to the dead-letter stream (each the last write of a
    /// key, with the ids of the writes of that key it stands for).
    pub dead_letters: u64,
    /// Pending writes taken over from another process's flusher (one that
    /// died, was cut off, or handed over).
    pub claimed: u64,
    /// Journaled writes this flusher could not decode (a newer format
    /// written by a newer version of the application, or data that is not
    /// ours), each counted once: parked, retried with back-off for a
    /// flusher that can, and dead-lettered after `park_undecodable_for`.
    pub parked: u64,
    /// Times a write given up on stayed in the journal because the dead
    /// letters held `max_dead_letters` entries (nothing is ever dropped
    /// from them: drain them to make room).
    pub dead_letters_full: u64,
    /// Times the flusher task panicked (in code of the application's: a
    /// `Deserialize`, `Display` or `CacheKey` impl) and was started again.
    pub flusher_restarts: u64,
    /// Writes in the journal when the flusher last looked.
    pub queue_depth: u64,
    /// Age of the oldest write of the last batch (coalesced writes
    /// included) when the sink took it.
    pub last_flush_lag: Duration,
    /// The largest such age seen.
    pub max_flush_lag: Duration,
}

/// This process's counters, and (feature `metrics`) their exported twins,
/// `redis_cached_write_behind_<name>_total{journal, cache}`, described by
/// `help`.
macro_rules! write_behind_counters {
    ($($name:ident => $help:literal),* $(,)?) => {
        #[derive(Default)]
        pub(super) struct Counters {
            $( $name: AtomicU64, )*
            queue_depth: AtomicU64,
            last_lag_ms: AtomicU64,
            max_lag_ms: AtomicU64,
            #[cfg(feature = "metrics")]
            exported: Option<Exported>,
        }

        /// One of the counters, by name.
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy)]
        pub(super) enum Tally {
            $( $name, )*
        }

        impl Counters {
            pub(super) fn add(&self, tally: Tally, by: u64) {
                let counter = match tally {
                    $( Tally::$name => &self.$name, )*
                };
                counter.fetch_add(by, Ordering::Relaxed);
                #[cfg(feature = "metrics")]
                if let Some(exported) = &self.exported {
                    match tally {
                        $( Tally::$name => exported.$name.increment(by), )*
                    }
                }
            }
        }

        #[cfg(feature = "metrics")]
        struct Exported {
            $( $name: metrics::Counter, )*
            queue_depth: metrics::Gauge,
            flush_lag: metrics::Histogram,
        }

        #[cfg(feature = "metrics")]
        impl Exported {
            fn register(journal: &str, cache: &str) -> Exported {
                Exported::describe();
                let labels = || {
                    vec![
                        metrics::Label::new("journal", journal.to_owned()),
                        metrics::Label::new("cache", cache.to_owned()),
                    ]
                };
                Exported {
                    $( $name: metrics::counter!(
                        concat!("redis_cached_write_behind_", stringify!($name), "_total"),
                        labels()
                    ), )*
                    queue_depth: metrics::gauge!("redis_cached_write_behind_queue_depth", labels()),
                    flush_lag: metrics::histogram!("redis_cached_write_behind_flush_lag_seconds", labels()),
                }
            }

            /// Tells the recorder what each metric measures, and in which
            /// unit (a recorder keeps the first description of a name).
            fn describe() {
                use metrics::Unit;
                $( metrics::describe_counter!(
                    concat!("redis_cached_write_behind_", stringify!($name), "_total"),
                    Unit::Count,
                    $help
                ); )*
                metrics::describe_gauge!(
                    "redis_cached_write_behind_queue_depth",
                    Unit::Count,
                    "Writes in the journal when the flusher last looked."
                );
                metrics::describe_histogram!(
                    "redis_cached_write_behind_flush_lag_seconds",
                    Unit::Seconds,
                    "Age of each flushed batch's oldest write (coalesced writes included) when the sink took it."
                );
            }
        }
    };
}

write_behind_counters!(
    accepted => "Writes journaled through this handle.",
    refused => "Writes refused because the journal was full (Error::Backlog).",
    failed => "Writes that failed because Redis did (an error to the caller).",
    cache_update_failures => "Journaled writes whose cache update failed; the key was invalidated instead when Redis allowed.",
    flushed => "Writes the sink took (after coalescing).",
    coalesced => "Journaled writes folded into a later write of the same key.",
    batches => "Batches the sink took.",
    retries => "Sink calls that failed and were retried.",
    dead_letters => "Entries added to the dead-letter stream (each the last write of a key).",
    claimed => "Pending writes taken over from another process's flusher (one that died, was cut off, or handed over).",
    parked => "Journaled writes this flusher could not decode, each counted once: parked, retried for a flusher that can, dead-lettered after park_undecodable_for.",
    dead_letters_full => "Times a write given up on stayed in the journal because the dead letters held max_dead_letters entries.",
    flusher_restarts => "Times the flusher task panicked (in application code) and was started again.",
);

impl Counters {
    /// Counters exported under `journal` and `cache` (with the `metrics`
    /// feature; registered now, with the recorder installed by then).
    pub(super) fn for_journal(journal: &str, cache: &str) -> Counters {
        let _ = (journal, cache);
        Counters {
            #[cfg(feature = "metrics")]
            exported: Some(Exported::register(journal, cache)),
            ..Counters::default()
        }
    }

    pub(super) fn depth(&self, depth: u64) {
        self.queue_depth.store(depth, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(exported) = &self.exported {
            exported.queue_depth.set(depth as f64);
        }
    }

    pub(super) fn lag(&self, lag_ms: u64) {
        self.last_lag_ms.store(lag_ms, Ordering::Relaxed);
        self.max_lag_ms.fetch_max(lag_ms, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(exported) = &self.exported {
            exported.flush_lag.record(lag_ms as f64 / 1e3);
        }
    }

    /// A snapshot of the counters.
    pub(super) fn snapshot(&self) -> WriteBehindStats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        WriteBehindStats {
            accepted: get(&self.accepted),
            refused: get(&self.refused),
            failed: get(&self.failed),
            cache_update_failures: get(&self.cache_update_failures),
            flushed: get(&self.flushed),
            coalesced: get(&self.coalesced),
            batches: get(&self.batches),
            retries: get(&self.retries),
            dead_letters: get(&self.dead_letters),
            claimed: get(&self.claimed),
            parked: get(&self.parked),
            dead_letters_full: get(&self.dead_letters_full),
            flusher_restarts: get(&self.flusher_restarts),
            queue_depth: get(&self.queue_depth),
            last_flush_lag: Duration::from_millis(get(&self.last_lag_ms)),
            max_flush_lag: Duration::from_millis(get(&self.max_lag_ms)),
        }
    }
}
