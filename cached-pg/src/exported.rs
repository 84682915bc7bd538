//! The listener's state through the `metrics` facade (feature `metrics`),
//! to whatever recorder the program installs, as the runtime exports the
//! cache's: a task that copies the [`ListenerStats`] into gauges and
//! counters labelled by `slot`, once a second and when the listener stops.
//!
//! | Name | Type | What |
//! |---|---|---|
//! | `redis_cached_pg_streaming` | gauge | 1 while the change stream is up, else 0 |
//! | `redis_cached_pg_cut_off_seconds` | gauge | how long the stream has been down (0 while up) |
//! | `redis_cached_pg_lag_seconds` | gauge | age of the oldest transaction received but not yet invalidated |
//! | `redis_cached_pg_lag_bytes` | gauge | WAL received but not yet confirmed to Postgres |
//! | `redis_cached_pg_<name>_total` | counter | `transactions`, `rows`, `keys`, `tags`, `fallbacks`, `truncates`, `resets`, `reconnects`, `failed_invalidations`, `batches` (as [`ListenerStats`]) |
//!
//! Exported from a copy taken once a second rather than counted in the
//! applier, so that a listener stuck on a failing Redis still shows its
//! lag growing.

use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Label, Unit};

use crate::stats::{ListenerStats, Meter};
use crate::Shutdown;

/// How often the gauges and counters are brought up to date.
const EVERY: Duration = Duration::from_secs(1);

/// A counter: its name, its help, and its field of [`ListenerStats`].
type Exported = (&'static str, &'static str, fn(&ListenerStats) -> u64);

const COUNTERS: &[Exported] = &[
    (
        "redis_cached_pg_transactions_total",
        "Transactions whose invalidations are done.",
        |s| s.transactions,
    ),
    (
        "redis_cached_pg_rows_total",
        "Rows changed in mapped tables (inserted, updated or deleted).",
        |s| s.rows,
    ),
    (
        "redis_cached_pg_keys_total",
        "Keys invalidated.",
        |s| s.keys,
    ),
    (
        "redis_cached_pg_tags_total",
        "Tags invalidated.",
        |s| s.tags,
    ),
    (
        "redis_cached_pg_fallbacks_total",
        "Changes whose entries could not all be named from the columns Postgres sent: the table tag was invalidated instead.",
        |s| s.fallbacks,
    ),
    (
        "redis_cached_pg_truncates_total",
        "TRUNCATEs of mapped tables.",
        |s| s.truncates,
    ),
    (
        "redis_cached_pg_resets_total",
        "Times everything the mapping covers was invalidated because changes may have been missed (a slot created, lost or dropped, a table added to the publication).",
        |s| s.resets,
    ),
    (
        "redis_cached_pg_reconnects_total",
        "Times the change stream was connected again after a failure.",
        |s| s.reconnects,
    ),
    (
        "redis_cached_pg_failed_invalidations_total",
        "Invalidations (a pipeline of keys, or a tag) that failed and were tried again; the position is not confirmed meanwhile.",
        |s| s.failed_invalidations,
    ),
    (
        "redis_cached_pg_batches_total",
        "Batches of invalidations sent.",
        |s| s.batches,
    ),
];

/// One listener's handles.
struct Handles {
    streaming: Gauge,
    cut_off: Gauge,
    lag: Gauge,
    lag_bytes: Gauge,
    counters: Vec<Counter>,
}

impl Handles {
    fn register(slot: &str) -> Handles {
        describe();
        let labels = || vec![Label::new("slot", slot.to_owned())];
        Handles {
            streaming: metrics::gauge!("redis_cached_pg_streaming", labels()),
            cut_off: metrics::gauge!("redis_cached_pg_cut_off_seconds", labels()),
            lag: metrics::gauge!("redis_cached_pg_lag_seconds", labels()),
            lag_bytes: metrics::gauge!("redis_cached_pg_lag_bytes", labels()),
            counters: COUNTERS
                .iter()
                .map(|(name, _, _)| metrics::counter!(*name, labels()))
                .collect(),
        }
    }

    fn update(&self, stats: &ListenerStats, lag_bytes: u64) {
        self.streaming.set(if stats.streaming { 1.0 } else { 0.0 });
        self.cut_off
            .set(stats.cut_off.unwrap_or_default().as_secs_f64());
        self.lag.set(stats.lag.as_secs_f64());
        self.lag_bytes.set(lag_bytes as f64);
        for ((_, _, field), counter) in COUNTERS.iter().zip(&self.counters) {
            counter.absolute(field(stats));
        }
    }
}

/// Tells the recorder what each metric measures, and in which unit.
fn describe() {
    for (name, help, _) in COUNTERS {
        metrics::describe_counter!(*name, Unit::Count, *help);
    }
    metrics::describe_gauge!(
        "redis_cached_pg_streaming",
        Unit::Count,
        "1 while the listener's change stream is up, else 0."
    );
    metrics::describe_gauge!(
        "redis_cached_pg_cut_off_seconds",
        Unit::Seconds,
        "How long the change stream has been down (0 while it streams): entries of rows changed meanwhile are served as they are."
    );
    metrics::describe_gauge!(
        "redis_cached_pg_lag_seconds",
        Unit::Seconds,
        "How long ago (by the database's commit time) the oldest transaction received but not yet invalidated committed; 0 when caught up."
    );
    metrics::describe_gauge!(
        "redis_cached_pg_lag_bytes",
        Unit::Bytes,
        "WAL received from the slot but not yet confirmed to Postgres (its invalidations not all done)."
    );
}

/// Exports `meter` under `slot` until `shutdown`, and once more then.
pub(crate) async fn run(meter: Arc<Meter>, slot: String, shutdown: Shutdown) {
    let handles = Handles::register(&slot);
    loop {
        handles.update(&meter.snapshot(), meter.unconfirmed_bytes());
        tokio::select! {
            () = tokio::time::sleep(EVERY) => {}
            () = shutdown.cancelled() => break,
        }
    }
    handles.update(&meter.snapshot(), meter.unconfirmed_bytes());
}
