//! The listener's counters, and how far behind the database it is.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// A snapshot of a [`Listener`](crate::Listener)'s counters
/// ([`Listener::stats`](crate::Listener::stats)).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenerStats {
    /// Whether the listener is streaming changes now.
    pub streaming: bool,
    /// How long the stream has been down, while it is (`None` while it
    /// streams). Entries made from rows changed meanwhile are served as
    /// before until it is back and has caught up.
    pub cut_off: Option<Duration>,
    /// How long ago (by the database's commit time) the oldest transaction
    /// received but not yet invalidated committed; zero when caught up.
    pub lag: Duration,
    /// From the commit of the last transaction invalidated (the database's
    /// clock) to the end of its invalidation (this machine's clock).
    pub last_latency: Option<Duration>,
    /// Transactions whose invalidations are done.
    pub transactions: u64,
    /// Rows changed in mapped tables (inserted, updated or deleted).
    pub rows: u64,
    /// Keys invalidated.
    pub keys: u64,
    /// Tags invalidated.
    pub tags: u64,
    /// Changes whose entries could not all be named from the columns
    /// Postgres sent (see [`Table::tag`](crate::Table::tag)): the table tag
    /// was invalidated instead.
    pub fallbacks: u64,
    /// `TRUNCATE`s of mapped tables.
    pub truncates: u64,
    /// Times everything the mapping covers was invalidated because
    /// changes may have been missed: a replication slot created (the
    /// first start included), lost or dropped, a table added to the
    /// publication.
    pub resets: u64,
    /// Times the stream was (re)connected after a failure.
    pub reconnects: u64,
    /// Invalidations (a pipeline of keys, or a tag) that failed (Redis
    /// down, slow, or the breaker open) and were tried again.
    pub failed_invalidations: u64,
    /// Batches of invalidations sent.
    pub batches: u64,
    /// The most keys and tags one batch held.
    pub largest_batch: u64,
    /// The last WAL position confirmed to Postgres: every transaction
    /// committed before it has been invalidated.
    pub confirmed_lsn: u64,
}

/// The live counters behind [`ListenerStats`].
#[derive(Debug, Default)]
pub(crate) struct Meter {
    pub(crate) streaming: AtomicBool,
    cut_off_since: Mutex<Option<Instant>>,
    /// The commit time of the oldest transaction not yet invalidated.
    oldest_pending: Mutex<Option<SystemTime>>,
    last_latency_us: AtomicU64,
    pub(crate) transactions: AtomicU64,
    pub(crate) rows: AtomicU64,
    pub(crate) keys: AtomicU64,
    pub(crate) tags: AtomicU64,
    pub(crate) fallbacks: AtomicU64,
    pub(crate) truncates: AtomicU64,
    pub(crate) resets: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) failed_invalidations: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) largest_batch: AtomicU64,
    pub(crate) confirmed_lsn: AtomicU64,
    /// The end of the WAL received from the slot.
    pub(crate) received_lsn: AtomicU64,
}

/// Adds `n` to a counter.
pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Meter {
    pub(crate) fn new() -> Meter {
        let meter = Meter::default();
        // Not streaming until the first connection.
        *lock(&meter.cut_off_since) = Some(Instant::now());
        meter
    }

    pub(crate) fn snapshot(&self) -> ListenerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let lag = lock(&self.oldest_pending)
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default();
        let latency = get(&self.last_latency_us);
        ListenerStats {
            streaming: self.streaming.load(Ordering::Relaxed),
            cut_off: lock(&self.cut_off_since).map(|since| since.elapsed()),
            lag,
            last_latency: (latency > 0).then(|| Duration::from_micros(latency - 1)),
            transactions: get(&self.transactions),
            rows: get(&self.rows),
            keys: get(&self.keys),
            tags: get(&self.tags),
            fallbacks: get(&self.fallbacks),
            truncates: get(&self.truncates),
            resets: get(&self.resets),
            reconnects: get(&self.reconnects),
            failed_invalidations: get(&self.failed_invalidations),
            batches: get(&self.batches),
            largest_batch: get(&self.largest_batch),
            confirmed_lsn: get(&self.confirmed_lsn),
        }
    }

    /// The stream is up.
    pub(crate) fn connected(&self) {
        self.streaming.store(true, Ordering::Relaxed);
        if let Some(since) = lock(&self.cut_off_since).take() {
            tracing::info!(
                target: "redis_cached_pg",
                cut_off_ms = since.elapsed().as_millis() as u64,
                "streaming changes; catching up from the replication slot"
            );
        }
    }

    /// The stream is down; how long it has been (zero if it just went).
    pub(crate) fn disconnected(&self) -> Duration {
        self.streaming.store(false, Ordering::Relaxed);
        lock(&self.cut_off_since)
            .get_or_insert_with(Instant::now)
            .elapsed()
    }

    /// A transaction committed at `at` is waiting for its invalidations.
    pub(crate) fn pending_since(&self, at: SystemTime) {
        lock(&self.oldest_pending).get_or_insert(at);
    }

    /// Every transaction received is invalidated but the one still open,
    /// committed at `open` if there is one; the last one invalidated
    /// committed at `last_commit`.
    pub(crate) fn caught_up(&self, last_commit: Option<SystemTime>, open: Option<SystemTime>) {
        *lock(&self.oldest_pending) = open;
        if let Some(at) = last_commit {
            let latency = SystemTime::now().duration_since(at).unwrap_or_default();
            let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX - 1);
            self.last_latency_us.store(us + 1, Ordering::Relaxed);
        }
    }

    /// Bytes of WAL received but not yet confirmed to Postgres.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn unconfirmed_bytes(&self) -> u64 {
        let received = self.received_lsn.load(Ordering::Relaxed);
        received.saturating_sub(self.confirmed_lsn.load(Ordering::Relaxed))
    }

    /// One batch of `size` keys and tags was sent.
    pub(crate) fn batch(&self, size: usize) {
        add(&self.batches, 1);
        self.largest_batch.fetch_max(size as u64, Ordering::Relaxed);
    }
}

/// The value behind `mutex`, even if a panic poisoned it (counters only).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
