//! The flusher: one task per process, flushing only while it holds the
//! journal's lease.
//!
//! It takes the lease (and with it what other flushers left pending),
//! reads the journal in batches, coalesces each into one write per key,
//! hands them to the sink, puts what the sink took in the cache again
//! (unless a later write of its key is there) and only then removes it
//! from the journal. A failing batch is retried with back-off and split
//! down to single writes, and a write that keeps failing alone is buried
//! in the dead letters, its cache entry invalidated. A write it cannot
//! decode is parked for a flusher that can.
//!
//! The lease is kept on two clocks. Redis's: every read and renewal
//! extends it, and only the holder can read, claim or forget consumers
//! (each checked in the same script). This process's own: the lease ends
//! one lease period after the last renewal was *sent*, so a sink call
//! still running then is dropped before Redis can hand the lease to
//! another process, whatever happened to the renewals meanwhile.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::shared::{Limits, Shared};
use super::stats::Tally;
use super::{Change, JournalId, Sink, Write};
use crate::backend::{DeadLetter, JournalPut, Journaled};
use crate::codec::Entry;
use crate::error::Result;
use crate::failpoint;
use crate::key::KeyParts;
use crate::stats::Event;
use crate::token::now_unix_ms;

/// Failures of a part before it is split in halves.
const SPLIT_AFTER: u32 = 3;
/// Reads one batch may take to get past parked writes.
const MAX_READS_PER_BATCH: usize = 16;
/// Writes one acknowledgement removes.
const ACK_CHUNK: usize = 1000;

/// Starts the flusher task on `runtime`, unless one is running.
pub(super) fn spawn<K, V, S>(shared: &Arc<Shared<K, V, S>>, runtime: &tokio::runtime::Handle)
where
    K: Serialize + DeserializeOwned + KeyParts + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    S: Sink<K, V>,
{
    if shared.running.swap(true, Ordering::AcqRel) {
        return;
    }
    // Made before the task, so that a task dropped unstarted (its runtime
    // shutting down) clears `running` too.
    let running = Running(Arc::clone(shared));
    runtime.spawn(async move {
        let running = running;
        supervise(&running.0).await;
    });
}

/// Clears `running` and wakes `shutdown` however the flusher ends.
struct Running<K, V, S>(Arc<Shared<K, V, S>>);

impl<K, V, S> Drop for Running<K, V, S> {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Release);
        self.0.ended.notify_waiters();
    }
}

/// Runs the flusher until the write-behind stops, starting it again if it
/// panics: the application's code runs inside it (its `Deserialize`,
/// `Display` and `CacheKey` impls), and a flusher that died would leave
/// the journal unflushed until the next local write.
async fn supervise<K, V, S>(shared: &Shared<K, V, S>)
where
    K: Serialize + DeserializeOwned + KeyParts + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    S: Sink<K, V>,
{
    let mut pause = shared.limits.retry_base;
    loop {
        let flusher = Flusher::new(shared);
        if AssertUnwindSafe(flusher.run()).catch_unwind().await.is_ok() || shared.stopping() {
            return;
        }
        shared.counters.add(Tally::flusher_restarts, 1);
        tracing::error!(target: "redis_cached", stream = %shared.journal.stream, "the write-behind flusher panicked; starting it again");
        shared.pause(pause).await;
        pause = backoff(pause, &shared.limits);
    }
}

/// The next back-off after `pause`: doubled, at most the retry maximum.
fn backoff(pause: Duration, limits: &Limits) -> Duration {
    pause.saturating_mul(2).min(limits.retry_max)
}

/// One key's writes in a batch: the last one, and the ids of all.
struct Slot<K, V> {
    /// The key's last write, or why it cannot be decoded (never the data).
    write: std::result::Result<Write<K, V>, &'static str>,
    /// Its full cache key, when its key could be decoded.
    cache_key: Option<String>,
    raw_key: Vec<u8>,
    entry: Vec<u8>,
    /// The ids of the key's writes in the batch, oldest first.
    ids: Vec<String>,
    /// The last of them.
    last: JournalId,
}

impl<K, V> Slot<K, V> {
    fn last_id(&self) -> &str {
        self.ids.last().map_or("", String::as_str)
    }
}

/// Part of a batch that the sink has not taken yet.
struct Part<K, V> {
    slots: Vec<Slot<K, V>>,
    failures: u32,
    failing_since: Option<Instant>,
    error: String,
}

/// A write's failures alone, kept while it is read again.
#[derive(Debug, Clone, Copy)]
struct Strikes {
    failures: u32,
    since: Instant,
}

/// A write that could not be decoded, waiting.
#[derive(Debug, Clone)]
struct Parked {
    raw_key: Vec<u8>,
    /// Its last write's id: the writes it stands for are parked with it.
    last: JournalId,
    since: Instant,
    tries: u32,
    /// Not tried again before then.
    next: Instant,
}

/// One run of the flusher, with what it remembers across batches.
struct Flusher<'a, K, V, S> {
    shared: &'a Shared<K, V, S>,
    /// The origin of `lease_end`.
    epoch: Instant,
    /// When this flusher's lease ends by its own clock, in ms after
    /// `epoch`; 0 when it holds none.
    lease_end: AtomicU64,
    /// Writes that failed alone, by id: read again (the lease lost and
    /// taken back), they stay alone, with their count.
    alone: Mutex<HashMap<String, Strikes>>,
    /// Writes that could not be decoded, by id.
    parked: Mutex<HashMap<String, Parked>>,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<'a, K, V, S> Flusher<'a, K, V, S>
where
    K: Serialize + DeserializeOwned + KeyParts + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    S: Sink<K, V>,
{
    fn new(shared: &'a Shared<K, V, S>) -> Self {
        Flusher {
            shared,
            epoch: Instant::now(),
            lease_end: AtomicU64::new(0),
            alone: Mutex::default(),
            parked: Mutex::default(),
        }
    }

    /// While the write-behind lives: takes the lease when it is free and
    /// flushes the journal batch by batch.
    async fn run(&self) {
        let shared = self.shared;
        let limits = &shared.limits;
        // Each read extends the lease, so an idle holder reads at least
        // three times per lease.
        let poll = limits
            .max_delay
            .min(limits.lease / 4)
            .max(Duration::from_millis(5));
        let mut pause = limits.retry_base;
        while !shared.stopping() {
            if !self.holds() {
                match self.lead().await {
                    Ok(true) => {}
                    Ok(false) => {
                        shared.pause(limits.lease / 4).await;
                        continue;
                    }
                    Err(err) => {
                        tracing::debug!(target: "redis_cached", error = %err, "write-behind takeover failed");
                        shared.pause(pause).await;
                        pause = backoff(pause, limits);
                        continue;
                    }
                }
            }
            let batch = match self.next_batch().await {
                Ok(Some(batch)) => batch,
                Ok(None) => {
                    self.lost();
                    continue;
                }
                Err(err) => {
                    tracing::debug!(target: "redis_cached", error = %err, "write-behind read failed");
                    shared.pause(pause).await;
                    pause = backoff(pause, limits);
                    continue;
                }
            };
            pause = limits.retry_base;
            if batch.is_empty() {
                shared.draining.store(false, Ordering::Release);
                shared.idle(poll).await;
                continue;
            }
            match self.apply(batch).await {
                Ok(true) => {}
                Ok(false) => self.lost(),
                // The writes stay pending and are read again.
                Err(err) => {
                    tracing::debug!(target: "redis_cached", error = %err, "write-behind batch left pending");
                    shared.pause(pause).await;
                    pause = backoff(pause, limits);
                }
            }
            self.record_depth().await;
        }
        if self.lease_end().is_some() {
            if let Ok(redis) = shared.redis() {
                let unlease = redis.unlease(&shared.journal.lease, &shared.consumer);
                let _ = shared.cache.inner.guarded(unlease).await;
            }
        }
    }

    // ---------------------------------------------------------------
    // The lease.

    fn renewed(&self, sent: Instant) {
        let end = sent + self.shared.limits.lease;
        let ms = end.saturating_duration_since(self.epoch).as_millis();
        self.lease_end.store(
            u64::try_from(ms).unwrap_or(u64::MAX).max(1),
            Ordering::Release,
        );
    }

    fn lost(&self) {
        self.lease_end.store(0, Ordering::Release);
    }

    /// When the lease ends by this process's clock, if it holds one.
    fn lease_end(&self) -> Option<Instant> {
        match self.lease_end.load(Ordering::Acquire) {
            0 => None,
            ms => Some(self.epoch + Duration::from_millis(ms)),
        }
    }

    fn holds(&self) -> bool {
        self.lease_end().is_some_and(|end| Instant::now() < end)
    }

    /// Takes the lease if it is free (or still this process's) and the
    /// journal over with it; whether this process is the flusher now.
    async fn lead(&self) -> Result<bool> {
        let shared = self.shared;
        shared.check_server().await?;
        let sent = Instant::now();
        if !shared.lease(true).await? {
            return Ok(false);
        }
        self.renewed(sent);
        // A process stopped here holds a lease that may lapse meanwhile.
        failpoint::pause("write-behind/before-take-over", &shared.journal.stream).await;
        let redis = shared.redis()?;
        let take_over = redis.journal_take_over(
            &shared.journal,
            &shared.consumer,
            &shared.consumer,
            shared.limits.lease,
        );
        match shared
            .cache
            .inner
            .guarded_within(shared.limits.lease, take_over)
            .await?
        {
            None => {
                self.lost();
                Ok(false)
            }
            Some(claimed) => {
                if claimed > 0 {
                    tracing::info!(target: "redis_cached", claimed, stream = %shared.journal.stream, "took over pending writes");
                    shared.counters.add(Tally::claimed, claimed);
                }
                Ok(true)
            }
        }
    }

    /// Extends the lease; whether this process still holds it (by its own
    /// clock, when Redis did not answer).
    async fn renew(&self) -> bool {
        let sent = Instant::now();
        match self.shared.lease(false).await {
            Ok(true) => {
                self.renewed(sent);
                true
            }
            Ok(false) => {
                self.lost();
                false
            }
            Err(_) => self.holds(),
        }
    }

    /// Extends the lease every third of it while a sink call runs;
    /// returns once the lease is lost, or has run out by this process's
    /// clock (renewals failing meanwhile).
    async fn keep_lease(&self) {
        let period = self.shared.limits.lease / 3;
        loop {
            let Some(end) = self.lease_end() else { return };
            let next = (Instant::now() + period).min(end);
            tokio::time::sleep_until(next.into()).await;
            let Some(end) = self.lease_end() else { return };
            if Instant::now() >= end {
                self.lost();
                return;
            }
            let sent = Instant::now();
            match tokio::time::timeout_at(end.into(), self.shared.lease(false)).await {
                Ok(Ok(true)) => self.renewed(sent),
                Ok(Ok(false)) | Err(_) => {
                    self.lost();
                    return;
                }
                // Not renewed: the lease holds until `end`, no longer.
                Ok(Err(_)) => {}
            }
        }
    }

    /// Waits `period`, extending the lease meanwhile; whether it still
    /// holds. A drain or a stop ends the wait early.
    async fn hold_for(&self, period: Duration) -> bool {
        let end = Instant::now() + period;
        let step = self.shared.limits.lease / 3;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            self.shared.pause(left.min(step)).await;
            if self.shared.stopping() || Instant::now() >= end {
                return true;
            }
            if !self.renew().await {
                return false;
            }
        }
    }

    // ---------------------------------------------------------------
    // Reading.

    /// Up to `count` writes if this process still holds the lease (which
    /// the read extends): with `pending_after`, its pending ones after
    /// that id first, then new ones. `None` when the lease is lost.
    async fn read(
        &self,
        count: usize,
        pending_after: Option<&str>,
    ) -> Result<Option<Vec<Journaled>>> {
        let shared = self.shared;
        let redis = shared.redis()?;
        let sent = Instant::now();
        let read = redis.journal_read(
            &shared.journal,
            &shared.consumer,
            &shared.consumer,
            shared.limits.lease,
            count,
            pending_after,
        );
        let read = shared.cache.inner.guarded(read).await?;
        match &read {
            Some(_) => self.renewed(sent),
            None => self.lost(),
        }
        Ok(read)
    }

    /// Whether the write `id` is parked and not due for another try.
    fn waits(&self, id: &str) -> bool {
        locked(&self.parked)
            .get(id)
            .is_some_and(|parked| parked.next > Instant::now())
    }

    /// The next writes to flush: this flusher's pending ones first (a
    /// takeover's, a failed acknowledgement's), past the parked ones that
    /// wait, then new ones; a batch that is not full waits until its
    /// oldest write is `max_delay` old. `None` when the lease is lost.
    async fn next_batch(&self) -> Result<Option<Vec<Journaled>>> {
        let limits = &self.shared.limits;
        let size = limits.batch_size;
        let mut batch = Vec::new();
        let mut after = "0".to_owned();
        for _ in 0..MAX_READS_PER_BATCH {
            let want = size - batch.len();
            let Some(read) = self.read(want, Some(&after)).await? else {
                return Ok(None);
            };
            let full = read.len() == want;
            if let Some(last) = read.last() {
                after.clone_from(&last.id);
            }
            let before = batch.len() + read.len();
            batch.extend(read.into_iter().filter(|w| !self.waits(&w.id)));
            // Read on past what waits, if that filled the read.
            if !full || batch.len() == before || batch.len() >= size {
                break;
            }
        }
        let Some(first) = batch.first().and_then(|w| JournalId::parse(&w.id)) else {
            return Ok(Some(batch));
        };
        let age = Duration::from_millis(now_unix_ms().saturating_sub(first.ms));
        if batch.len() < size && age < limits.max_delay && !self.shared.hurry() {
            // Not woken by each write meanwhile: one read at the end.
            self.shared.pause(limits.max_delay - age).await;
            match self.read(size - batch.len(), None).await? {
                Some(more) => batch.extend(more),
                None => return Ok(None),
            }
        }
        Ok(Some(batch))
    }

    /// Decodes a journaled write: the write, or why not (never the data,
    /// which may be personal), and its full cache key when its key
    /// decodes. The application's `Deserialize` and `CacheKey` impls run
    /// here: a panic in one is an undecodable write, not a dead flusher.
    fn decode(
        &self,
        raw_key: &[u8],
        entry: &[u8],
        id: JournalId,
    ) -> (
        std::result::Result<Write<K, V>, &'static str>,
        Option<String>,
    ) {
        let codec = self.shared.cache.inner.settings.codec;
        let key = std::panic::catch_unwind(AssertUnwindSafe(|| match codec.decode::<K>(raw_key) {
            Ok(Entry::Value(Some(key), _)) => Ok(key),
            Ok(_) => Err("the journaled key is not a value"),
            Err(_) => Err("the journaled key cannot be decoded"),
        }))
        .unwrap_or(Err("decoding the journaled key panicked"));
        let cache_key = key.as_ref().ok().and_then(|key| {
            std::panic::catch_unwind(AssertUnwindSafe(|| self.shared.cache_key(key))).ok()
        });
        let change =
            std::panic::catch_unwind(AssertUnwindSafe(|| match codec.decode::<V>(entry) {
                Ok(Entry::Value(Some(value), _)) => Ok(Change::Upsert(value)),
                Ok(Entry::Value(None, _)) => Ok(Change::Delete),
                Ok(Entry::Tombstone) => Err("the journaled entry is a tombstone"),
                Err(_) => Err("the journaled value cannot be decoded"),
            }))
            .unwrap_or(Err("decoding the journaled value panicked"));
        let write = match (key, change) {
            (Ok(key), Ok(change)) => Ok(Write { key, change, id }),
            (Err(why), _) | (_, Err(why)) => Err(why),
        };
        (write, cache_key)
    }

    /// Coalesces `batch` into one slot per key (its last write), in
    /// journal order, and the ids of writes removed from the stream while
    /// pending.
    fn coalesce(&self, batch: Vec<Journaled>) -> (Vec<Slot<K, V>>, Vec<String>) {
        let mut slots: Vec<Slot<K, V>> = Vec::new();
        let mut index: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut gone = Vec::new();
        for journaled in batch {
            let (Some(raw_key), Some(entry), Some(id)) = (
                journaled.key,
                journaled.entry,
                JournalId::parse(&journaled.id),
            ) else {
                gone.push(journaled.id);
                continue;
            };
            let (write, cache_key) = self.decode(&raw_key, &entry, id);
            match index.get(&raw_key) {
                Some(&at) => {
                    self.shared.counters.add(Tally::coalesced, 1);
                    let slot = &mut slots[at];
                    slot.write = write;
                    slot.cache_key = cache_key;
                    slot.entry = entry;
                    slot.ids.push(journaled.id);
                    slot.last = id;
                }
                None => {
                    index.insert(raw_key.clone(), slots.len());
                    slots.push(Slot {
                        write,
                        cache_key,
                        raw_key,
                        entry,
                        ids: vec![journaled.id],
                        last: id,
                    });
                }
            }
        }
        slots.sort_by_key(|slot| slot.last);
        (slots, gone)
    }

    // ---------------------------------------------------------------
    // Flushing.

    /// Applies one batch; whether the lease held throughout.
    async fn apply(&self, batch: Vec<Journaled>) -> Result<bool> {
        {
            // What failed alone and is no longer read has been flushed or
            // buried by another process.
            let read: HashSet<&str> = batch.iter().map(|w| w.id.as_str()).collect();
            locked(&self.alone).retain(|id, _| read.contains(id.as_str()));
        }
        let (slots, gone) = self.coalesce(batch);
        let gone: Vec<&str> = gone.iter().map(String::as_str).collect();
        self.ack(&gone).await?;
        let mut ready = Vec::with_capacity(slots.len());
        for slot in slots {
            match slot.write {
                Ok(_) => ready.push(slot),
                Err(why) => self.park(&slot, why).await?,
            }
        }
        if ready.is_empty() {
            return Ok(true);
        }
        self.flush(ready).await
    }

    /// Parks a write that cannot be decoded: it stays in the journal for
    /// a flusher that can (a newer version of the application), tried
    /// again with back-off, until `park_undecodable_for` passed; then it
    /// is buried.
    async fn park(&self, slot: &Slot<K, V>, why: &'static str) -> Result<()> {
        let limits = &self.shared.limits;
        let now = Instant::now();
        let (since, tries) = {
            let mut parked = locked(&self.parked);
            let record = parked
                .get(slot.last_id())
                .cloned()
                .unwrap_or_else(|| {
                    self.shared.counters.add(Tally::parked, 1);
                    tracing::warn!(target: "redis_cached", stream = %self.shared.journal.stream, problem = why,
                        "a journaled write cannot be decoded by this process; it waits for a flusher that can");
                    Parked {
                        raw_key: slot.raw_key.clone(),
                        last: slot.last,
                        since: now,
                        tries: 0,
                        next: now,
                    }
                });
            let mut wait = limits.retry_base;
            for _ in 0..record.tries.min(32) {
                wait = backoff(wait, limits);
            }
            let record = Parked {
                tries: record.tries + 1,
                next: now + wait,
                ..record
            };
            for id in &slot.ids {
                parked.insert(id.clone(), record.clone());
            }
            // Forgotten by whoever flushed or buried them meanwhile.
            let stale = limits.park_for.saturating_mul(2);
            parked.retain(|_, p| now.saturating_duration_since(p.since) < stale);
            (record.since, record.tries)
        };
        if now.saturating_duration_since(since) >= limits.park_for {
            self.bury(slot, why, tries).await?;
        }
        Ok(())
    }

    /// The parts a flush starts with: the writes that failed alone before
    /// stay alone, with their count; the others go together.
    fn parts(&self, slots: Vec<Slot<K, V>>) -> Vec<Part<K, V>> {
        let alone = locked(&self.alone);
        let mut together = Vec::with_capacity(slots.len());
        let mut parts = Vec::new();
        for slot in slots {
            match alone.get(slot.last_id()) {
                Some(strikes) => parts.push(Part {
                    slots: vec![slot],
                    failures: strikes.failures,
                    failing_since: Some(strikes.since),
                    error: String::new(),
                }),
                None => together.push(slot),
            }
        }
        if !together.is_empty() {
            parts.insert(
                0,
                Part {
                    slots: together,
                    failures: 0,
                    failing_since: None,
                    error: String::new(),
                },
            );
        }
        parts
    }

    /// Flushes `slots` until the sink took each or it was buried; whether
    /// the lease held throughout. A stop or a lost lease leaves the rest
    /// pending in the journal, for whoever flushes next.
    async fn flush(&self, slots: Vec<Slot<K, V>>) -> Result<bool> {
        let limits = &self.shared.limits;
        let mut parts = self.parts(slots);
        let mut backoff_now = limits.retry_base;
        let mut last_success: Option<Instant> = None;
        while !parts.is_empty() {
            let mut failing = Vec::new();
            let mut progressed = false;
            for mut part in parts {
                let (outcome, held) = self.call_sink(&part.slots).await;
                match outcome {
                    Some(Ok(())) => {
                        progressed = true;
                        last_success = Some(Instant::now());
                        self.flushed(&part.slots).await?;
                    }
                    Some(Err(error)) => {
                        self.shared.counters.add(Tally::retries, 1);
                        tracing::warn!(target: "redis_cached", %error, writes = part.slots.len(), "the write-behind sink failed; retrying");
                        part.failures += 1;
                        let since = *part.failing_since.get_or_insert_with(Instant::now);
                        part.error = error;
                        failing.extend(self.after_failure(part, since, last_success).await?);
                    }
                    None => {}
                }
                if !held {
                    return Ok(false);
                }
            }
            parts = failing;
            if parts.is_empty() || self.shared.stopping() {
                break;
            }
            backoff_now = if progressed {
                limits.retry_base
            } else {
                backoff(backoff_now, limits)
            };
            if !self.hold_for(backoff_now).await {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// What becomes of a part that just failed: kept, split, or (a single
    /// write) buried.
    async fn after_failure(
        &self,
        mut part: Part<K, V>,
        since: Instant,
        last_success: Option<Instant>,
    ) -> Result<Vec<Part<K, V>>> {
        let attempts = self.shared.limits.max_attempts;
        if part.slots.len() == 1 {
            let others_pass = last_success.is_some_and(|at| at > since);
            let limit = if others_pass {
                attempts
            } else {
                attempts.saturating_mul(3)
            };
            if part.failures < limit {
                let strikes = Strikes {
                    failures: part.failures,
                    since,
                };
                locked(&self.alone).insert(part.slots[0].last_id().to_owned(), strikes);
                return Ok(vec![part]);
            }
            self.bury(&part.slots[0], &part.error, part.failures)
                .await?;
            return Ok(Vec::new());
        }
        if part.failures < SPLIT_AFTER {
            return Ok(vec![part]);
        }
        let second = part.slots.split_off(part.slots.len() / 2);
        let half = |slots| Part {
            slots,
            failures: 0,
            failing_since: part.failing_since,
            error: part.error.clone(),
        };
        Ok(vec![half(std::mem::take(&mut part.slots)), half(second)])
    }

    /// Runs the sink on `slots` if the lease still holds, extending it
    /// while the sink works and abandoning the call (dropping its future)
    /// once the lease is lost, has run out by this process's clock, or
    /// `sink_timeout` passed. The sink's outcome (`None`: not called, or
    /// abandoned for the lease), and whether the lease held.
    async fn call_sink(
        &self,
        slots: &[Slot<K, V>],
    ) -> (Option<std::result::Result<(), String>>, bool) {
        // A Redis error counts as a lost lease: the sink is never called
        // while another process may hold it.
        let sent = Instant::now();
        match self.shared.lease(false).await {
            Ok(true) => self.renewed(sent),
            _ => {
                self.lost();
                return (None, false);
            }
        }
        let limits = &self.shared.limits;
        let batch: Vec<Write<K, V>> = slots
            .iter()
            .filter_map(|slot| slot.write.as_ref().ok().cloned())
            .collect();
        // The sink's code before its first await runs here.
        let sink = &self.shared.sink;
        let Ok(call) = std::panic::catch_unwind(AssertUnwindSafe(|| sink.write_batch(batch)))
        else {
            return (Some(Err("the sink panicked".to_owned())), true);
        };
        let call = tokio::time::timeout(limits.sink_timeout, AssertUnwindSafe(call).catch_unwind());
        tokio::select! {
            outcome = call => {
                let outcome = match outcome {
                    Ok(Ok(Ok(()))) => Ok(()),
                    Ok(Ok(Err(err))) => Err(describe(&err)),
                    Ok(Err(_)) => Err("the sink panicked".to_owned()),
                    Err(_) => Err(format!("the sink took longer than {:?}", limits.sink_timeout)),
                };
                (Some(outcome), true)
            }
            () = self.keep_lease() => {
                tracing::warn!(target: "redis_cached", stream = %self.shared.journal.stream, "write-behind lease lost during a sink call; call abandoned");
                (None, false)
            }
        }
    }

    /// Puts what the sink took in the cache again, unless a later write of
    /// its key is there: a process that crashed before its cache update, a
    /// failed update, or a reader that filled the key from the database's
    /// older row meanwhile leave the cache at the database's value.
    async fn settle(&self, slots: &[Slot<K, V>]) -> Result<()> {
        let shared = self.shared;
        let inner = &shared.cache.inner;
        let keys: Vec<(&str, String, &Slot<K, V>)> = slots
            .iter()
            .filter_map(|slot| {
                let key = slot.cache_key.as_deref()?;
                Some((key, shared.version_key(key), slot))
            })
            .collect();
        let puts: Vec<JournalPut<'_>> = keys
            .iter()
            .map(|(key, version, slot)| JournalPut {
                key,
                version_key: version,
                id: slot.last_id(),
                entry: &slot.entry,
                ttl: shared.limits.ttl,
            })
            .collect();
        for (key, ..) in &keys {
            inner.forget_near(key);
        }
        let settled = inner.guarded(shared.redis()?.journal_put_many(&puts)).await;
        for (key, ..) in &keys {
            inner.wrote(key);
        }
        settled
    }

    /// Records that the sink took `slots`: puts them in the cache again,
    /// then removes them from the journal with the parked writes of their
    /// keys that they replace.
    async fn flushed(&self, slots: &[Slot<K, V>]) -> Result<()> {
        self.settle(slots).await?;
        let replaced: Vec<String> = {
            let parked = locked(&self.parked);
            parked
                .iter()
                .filter(|(_, p)| {
                    slots
                        .iter()
                        .any(|slot| slot.raw_key == p.raw_key && p.last < slot.last)
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        let ids: Vec<&str> = slots
            .iter()
            .flat_map(|slot| slot.ids.iter().map(String::as_str))
            .chain(replaced.iter().map(String::as_str))
            .collect();
        self.ack(&ids).await?;
        {
            let mut parked = locked(&self.parked);
            for id in &replaced {
                parked.remove(id);
            }
            let mut alone = locked(&self.alone);
            for slot in slots {
                alone.remove(slot.last_id());
            }
        }
        let c = &self.shared.counters;
        c.add(Tally::batches, 1);
        c.add(Tally::flushed, slots.len() as u64);
        c.add(Tally::coalesced, replaced.len() as u64);
        // From the oldest write the batch stands for, coalesced ones too.
        let oldest = slots
            .iter()
            .filter_map(|slot| slot.ids.first().and_then(|id| JournalId::parse(id)))
            .min();
        if let Some(oldest) = oldest {
            c.lag(now_unix_ms().saturating_sub(oldest.ms));
        }
        Ok(())
    }

    /// Gives a write up: invalidates its cache entry (unless a later write
    /// of its key is there), since the database never got it, then moves
    /// it to the dead letters.
    async fn bury(&self, slot: &Slot<K, V>, error: &str, attempts: u32) -> Result<()> {
        let shared = self.shared;
        let inner = &shared.cache.inner;
        let redis = shared.redis()?;
        if let Some(key) = slot.cache_key.as_deref() {
            let tombstone = inner.settings.codec.encode_tombstone();
            let version = shared.version_key(key);
            let put = JournalPut {
                key,
                version_key: &version,
                id: slot.last_id(),
                entry: &tombstone,
                ttl: inner.settings.invalidation_window,
            };
            inner.forget_near(key);
            let invalidated = inner.guarded(redis.journal_put(&put)).await;
            inner.wrote(key);
            if invalidated? {
                inner.count(None, Event::invalidations);
            }
        }
        let ids: Vec<&str> = slot.ids.iter().map(String::as_str).collect();
        let dead = DeadLetter {
            key: &slot.raw_key,
            entry: &slot.entry,
            error,
            attempts,
            ids: &ids,
        };
        let bury = redis.journal_bury(&shared.journal, &dead, shared.limits.max_dead_letters);
        let dropped = inner.guarded(bury).await?;
        {
            let (mut alone, mut parked) = (locked(&self.alone), locked(&self.parked));
            for id in &slot.ids {
                alone.remove(id);
                parked.remove(id);
            }
        }
        let c = &shared.counters;
        c.add(Tally::dead_letters, 1);
        tracing::error!(target: "redis_cached", error, attempts, stream = %shared.journal.dead, "a write was given up on and moved to the dead letters");
        if dropped > 0 {
            c.add(Tally::dead_letters_dropped, dropped);
            tracing::warn!(target: "redis_cached", dropped, most = shared.limits.max_dead_letters, stream = %shared.journal.dead, "the dead letters are full: the oldest were dropped");
        }
        Ok(())
    }

    async fn ack(&self, ids: &[&str]) -> Result<()> {
        let shared = self.shared;
        let redis = shared.redis()?;
        for chunk in ids.chunks(ACK_CHUNK) {
            let ack = redis.journal_ack(&shared.journal, chunk);
            shared.cache.inner.guarded(ack).await?;
        }
        Ok(())
    }

    async fn record_depth(&self) {
        let shared = self.shared;
        if let Ok(redis) = shared.redis() {
            let depth = redis.stream_len(&shared.journal.stream);
            if let Ok(depth) = shared.cache.inner.guarded(depth).await {
                shared.counters.depth(depth);
            }
        }
    }
}

/// The sink's error as text; a `Display` impl that panics does not take
/// the flusher down.
fn describe<E: std::fmt::Display>(err: &E) -> String {
    std::panic::catch_unwind(AssertUnwindSafe(|| err.to_string()))
        .unwrap_or_else(|_| "the sink failed (and its error could not be displayed)".to_owned())
}
