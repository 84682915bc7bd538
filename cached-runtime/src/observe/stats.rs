//! Counters of everything the cache does, and their snapshot [`Stats`].
//!
//! Each counter is striped over a few cache lines, one picked per thread,
//! so that threads counting hits at once do not trade a cache line back and
//! forth on every lookup; a snapshot adds the stripes up.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

const STRIPES: usize = 4;

/// One stripe, alone on its cache line.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(AtomicU64);

/// A counter that many threads bump cheaply.
#[derive(Debug, Default)]
pub(crate) struct Striped([Stripe; STRIPES]);

impl Striped {
    fn sum(&self) -> u64 {
        self.0.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    STRIPE.with(|s| *s)
}

macro_rules! counters {
    ($( $(#[doc = $doc:literal])* $name:ident ),* $(,)?) => {
        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $( pub(crate) $name: Striped, )*
        }

        /// One of the counters, by name.
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(crate) enum Event {
            $( $name, )*
        }

        #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
        impl Event {
            /// Every event, in declaration order (`event as usize` is its
            /// index).
            pub(crate) const ALL: &'static [Event] = &[$( Event::$name, )*];

            /// Its exported counter's name: `redis_cached_<name>_total`.
            pub(crate) fn metric_name(self) -> &'static str {
                match self {
                    $( Event::$name => concat!("redis_cached_", stringify!($name), "_total"), )*
                }
            }

            /// What it counts: its field's documentation in [`Stats`], on
            /// one line (each line of it begins with a space).
            pub(crate) fn help(self) -> &'static str {
                let help = match self {
                    $( Event::$name => concat!($($doc),*), )*
                };
                help.trim_start()
            }
        }

        impl Counters {
            pub(crate) fn snapshot(&self) -> Stats {
                Stats { $( $name: self.$name.sum(), )* }
            }

            /// Counts one `event`.
            pub(crate) fn add(&self, event: Event) {
                let counter = match event {
                    $( Event::$name => &self.$name, )*
                };
                Counters::bump(counter);
            }
        }

        /// A snapshot of a cache's counters, from [`Cache::stats`](crate::Cache::stats).
        ///
        /// Counters only grow; subtract two snapshots to measure an interval.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct Stats {
            $( $(#[doc = $doc])* pub $name: u64, )*
        }

        /// What happened between two snapshots: `later - earlier`, counter
        /// by counter.
        impl std::ops::Sub for Stats {
            type Output = Stats;
            fn sub(self, earlier: Stats) -> Stats {
                Stats { $( $name: self.$name.saturating_sub(earlier.$name), )* }
            }
        }

        /// One line: the hit rate, then every counter that is not zero.
        impl std::fmt::Display for Stats {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "hit rate {:.1}%", self.hit_rate() * 100.0)?;
                $(
                    if self.$name != 0 {
                        write!(f, ", {} {}", stringify!($name), self.$name)?;
                    }
                )*
                Ok(())
            }
        }
    };
}

counters! {
    /// Lookups answered from the cache.
    hits,
    /// Calls and lookups that found nothing usable (absent, undecodable, or
    /// Redis unavailable): one per call that did not get a cached value,
    /// whether it read the key itself or (with `lock = true`) joined this
    /// process's computation before reading, so `hits + misses` counts the
    /// calls either way.
    misses,
    /// Times a cached function's body (or a `get_or_compute` closure) ran.
    computes,
    /// Callers that waited for another caller's computation in this process instead of computing.
    coalesced,
    /// Values written to the cache.
    writes,
    /// Cross-process locks taken (`lock = true`): this process computed.
    lock_acquired,
    /// Misses that found another process computing and waited for it.
    lock_waits,
    /// Waits for a computation in this process that reached the cache's
    /// `coalesce_wait` and computed by themselves.
    coalesce_timeouts,
    /// Waits that reached `lock_wait` and computed by themselves.
    lock_wait_timeouts,
    /// Lock extensions by the watchdog of a long computation.
    lock_extends,
    /// Hits served after their TTL (`stale`) while a refresh runs.
    stale_serves,
    /// XFetch early refreshes started by hits (`early`).
    early_refreshes,
    /// Background refreshes that ran (`stale`, `early`).
    refreshes,
    /// Background refreshes that failed; the old value stays until it expires.
    refresh_failures,
    /// Results not stored because their key was invalidated or rewritten while they were computed.
    stale_sets_refused,
    /// Keys deleted by `invalidate` or `#[cache_evict]`.
    invalidations,
    /// Redis operations that failed (error reply, I/O error, refused connection or authentication).
    errors,
    /// Commands Redis refused while up (out of memory under `noeviction`, read-only replica).
    refused,
    /// Commands Redis rejected for one key or user (`WRONGTYPE`, `NOPERM`),
    /// or for a cluster slot being moved for longer than the command could
    /// wait (`TRYAGAIN`): misses for that key only.
    rejected,
    /// Redis operations abandoned after `op_timeout`.
    timeouts,
    /// Redis operations skipped because the circuit breaker was open.
    breaker_skips,
    /// Outages: times a closed circuit breaker opened. A probe that fails
    /// while it is open keeps it open for another cool-down, in the same
    /// outage: counted in `breaker_failed_probes`, not here.
    breaker_opens,
    /// Probes of an open circuit breaker (one operation let through after
    /// each cool-down) that failed: Redis was still unreachable.
    breaker_failed_probes,
    /// Stored values that could not be decoded and were treated as misses.
    decode_errors,
    /// Values that could not be serialized and were returned uncached.
    encode_errors,
    /// Values not stored, or stored values ignored, because they exceed `max_value_bytes`.
    oversized,
    /// Calls answered from the near tier (`near = "…"`, `get_near`), without
    /// a round trip; also counted in `hits`.
    near_hits,
    /// Calls of near functions the near tier did not answer (not held,
    /// expired, or the tier not serving): they read Redis.
    near_misses,
    /// Keys Redis said changed, dropped from the near tier (one per key
    /// named, held or not).
    near_invalidations,
    /// Times the near tier was emptied: its tracking connection dropped,
    /// failed a ping or was replaced, or Redis invalidated every key.
    near_flushes,
}

impl Counters {
    pub(crate) fn bump(counter: &Striped) {
        counter.0[stripe()].0.fetch_add(1, Ordering::Relaxed);
    }
}

impl Stats {
    /// `hits / (hits + misses)`, or 0 before the first lookup.
    pub fn hit_rate(&self) -> f64 {
        let lookups = self.hits + self.misses;
        if lookups == 0 {
            0.0
        } else {
            self.hits as f64 / lookups as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_subtract_and_display() {
        let counters = Counters::default();
        Counters::bump(&counters.hits);
        let before = counters.snapshot();
        for _ in 0..3 {
            Counters::bump(&counters.hits);
        }
        Counters::bump(&counters.misses);
        let after = counters.snapshot();
        let delta = after - before;
        assert_eq!((delta.hits, delta.misses, delta.computes), (3, 1, 0));
        assert_eq!(delta.to_string(), "hit rate 75.0%, hits 3, misses 1");
        assert_eq!((before - after).hits, 0, "never negative");
    }

    #[test]
    fn each_event_is_described_by_its_documentation() {
        assert_eq!(Event::hits.help(), "Lookups answered from the cache.");
        assert!(
            Event::misses
                .help()
                .starts_with("Calls and lookups that found nothing usable (absent, undecodable, or Redis unavailable): "),
            "{}",
            Event::misses.help()
        );
        for event in Event::ALL {
            assert!(!event.help().is_empty(), "{event:?}");
        }
    }
}
