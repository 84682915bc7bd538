//! The flusher: one task per process, flushing only while it holds the
//! journal's lease.
//!
//! It takes the lease (and with it what other flushers left pending),
//! reads the journal in id order (its own pending writes first, then new
//! ones, never new ones while older pending ones are unread), coalesces
//! each batch into one write per key, hands them to the sink, puts what
//! the sink took in the cache again (unless a later write of its key is
//! there) and only then removes it from the journal.
//!
//! Failures. A failing batch is split in halves. A write that fails alone
//! is *held*: its key's writes stay pending in the journal, tried again
//! alone with a back-off of the key's own while the flusher goes on with
//! other keys; a later write of the key joins them (the sink needs only a
//! key's last write), so a key's writes never reach the sink out of order.
//! A key's failures count towards `max_attempts` only when the sink took
//! some other write since the key's previous try; at `max_attempts` its
//! writes are buried in the dead letters and its cache entry invalidated.
//! When nothing passes (an outage, or a batch of bad rows), writes are held
//! uncounted, retried together, and every call waits a back-off that grows
//! with the failures in a row: an outage costs the database one call per
//! back-off and buries nothing. A write this process cannot decode (or
//! whose integrity check fails) is held the same way, parked, for a
//! flusher that can.
//!
//! The lease is kept on two clocks. Redis's: every read and renewal
//! extends it, and only the holder can read, claim, forget consumers,
//! acknowledge or bury (each checked in the same script). This process's
//! own: the lease ends one lease period after the last renewal was *sent*;
//! the sink's future is never polled past that, so a sink call cut off
//! from Redis, or a process paused, stops before Redis can hand the lease
//! to another process (to within one poll: a sink that must be exact
//! fences rows by journal id).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::integrity::MAX_SKEW_MS;
use super::shared::{Limits, Shared};
use super::stats::Tally;
use super::{Change, JournalId, Sink, Write};
use crate::backend::{Buried, DeadLetter, JournalPut, Journaled};
use crate::encoding::codec::Entry;
use crate::encoding::key::KeyParts;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::observe::stats::Event;
use crate::token::now_unix_ms;

/// Failures of a part before it is split in halves.
const SPLIT_AFTER: u32 = 3;
/// Pages of pending writes one batch reads at most.
const MAX_PENDING_PAGES: usize = 64;
/// Writes one acknowledgement (or burial) removes.
const ACK_CHUNK: usize = 1000;
/// The largest encoded key the flusher decodes: far above any key this
/// journal writes, far below what would hurt.
const MAX_JOURNALED_KEY: usize = 64 * 1024;

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
/// `Clone`, `Display` and `CacheKey` impls, and the sink), and a flusher
/// that died would leave the journal unflushed until the next local write.
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

/// The back-off after `failures` failures in a row.
fn backoff_after(failures: u32, limits: &Limits) -> Duration {
    let mut wait = limits.retry_base;
    for _ in 1..failures.min(32) {
        wait = backoff(wait, limits);
    }
    wait
}

/// What makes two journaled writes writes of one key: the cache key they
/// render to, or, for a key that cannot be decoded here, its bytes. A
/// write that fails the screen (not signed, not checkable, too large) is a
/// key of its own: it may be forged, so it never replaces another write.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum SlotKey {
    Cache(String),
    Raw(Vec<u8>),
    Unverified(String),
}

/// One key's writes in a batch: the last one, and the ids of all.
struct Slot<K, V> {
    /// The key's last write, or why it cannot be decoded (never the data).
    write: std::result::Result<Write<K, V>, &'static str>,
    key: Arc<SlotKey>,
    /// Its full cache key, when its key could be decoded.
    cache_key: Option<String>,
    raw_key: Vec<u8>,
    entry: Vec<u8>,
    /// The ids of the key's writes it stands for, oldest first.
    ids: Vec<String>,
    /// The last of them.
    last: JournalId,
}

impl<K, V> Slot<K, V> {
    fn last_id(&self) -> &str {
        self.ids.last().map_or("", String::as_str)
    }
}

/// A batch, coalesced.
struct Coalesced<K, V> {
    slots: Vec<Slot<K, V>>,
    /// Writes removed from the stream while pending.
    gone: Vec<String>,
}

/// What a part is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Writes tried for the first time (or their halves): tried again at
    /// once, split, and held when nothing passes.
    Fresh,
    /// A group of writes held while nothing passed: tried once per batch,
    /// then held again (in halves while nothing passes).
    Retried,
    /// A key suspected of a bad row: tried once per batch, alone.
    Suspect,
}

/// Part of a batch that the sink has not taken yet.
struct Part<K, V> {
    slots: Vec<Slot<K, V>>,
    kind: Kind,
    failures: u32,
    /// When the batch it comes from first failed.
    failing_since: Option<Instant>,
}

/// Why a key's writes are held back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// The sink refused them.
    Refused,
    /// They cannot be decoded (or checked) here.
    Parked,
}

/// A key whose writes are held back in the journal.
#[derive(Debug, Clone)]
struct HeldKey {
    hold: Hold,
    /// The keys held while nothing passed are retried together, by group
    /// (the halves of a group that failed again are groups of their own).
    group: u64,
    /// The ids of its held writes.
    ids: Vec<String>,
    /// The failed tries, for the back-off.
    tries: u32,
    /// The failures that count towards `max_attempts`: those after which
    /// the sink had taken another write since this key's previous try.
    counted: u32,
    /// Its first failure.
    since: Instant,
    last_try: Instant,
    /// Not tried again before then.
    next: Instant,
}

/// What is held back, by key, and by id for the reads.
#[derive(Default)]
struct Held {
    keys: HashMap<Arc<SlotKey>, HeldKey>,
    ids: HashMap<String, Arc<SlotKey>>,
}

impl Held {
    fn insert(&mut self, key: &Arc<SlotKey>, record: HeldKey) {
        for id in &record.ids {
            self.ids.insert(id.clone(), Arc::clone(key));
        }
        self.keys.insert(Arc::clone(key), record);
    }

    fn remove(&mut self, key: &SlotKey) -> Option<HeldKey> {
        let record = self.keys.remove(key)?;
        for id in &record.ids {
            self.ids.remove(id);
        }
        Some(record)
    }

    /// Whether the write `id` is held and not due for another try.
    fn waits(&self, id: &str, now: Instant) -> bool {
        self.ids
            .get(id)
            .and_then(|key| self.keys.get(key))
            .is_some_and(|record| record.next > now)
    }
}

/// Sink calls failing in a row, none passing.
#[derive(Debug, Clone, Copy)]
struct Streak {
    failures: u32,
    /// No call before then.
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
    /// Writes held back. Kept when the lease is lost and taken back: the
    /// journal keeps them pending, and their counts must go on; a full
    /// read of the pending writes forgets those no longer there.
    held: Mutex<Held>,
    /// Every pending write up to this id is held and waiting: reads of
    /// the pending writes start after it.
    floor: Mutex<Option<String>>,
    streak: Mutex<Option<Streak>>,
    /// When a sink call last passed.
    last_success: Mutex<Option<Instant>>,
    /// The last group number handed out.
    groups: AtomicU64,
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
            held: Mutex::default(),
            floor: Mutex::default(),
            streak: Mutex::default(),
            last_success: Mutex::default(),
            groups: AtomicU64::new(0),
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
            if failpoint::hit("write-behind/flusher", &shared.journal.stream)
                == Some(failpoint::Action::Fail)
            {
                panic!("write-behind flusher failpoint");
            }
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
            if batch.is_empty() {
                pause = limits.retry_base;
                shared.draining.store(false, Ordering::Release);
                shared.idle(poll).await;
                continue;
            }
            match self.apply(batch).await {
                Ok(true) => pause = limits.retry_base,
                Ok(false) => self.lost(),
                // The writes stay pending and are read again, after a
                // back-off that grows while this goes on.
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
    /// journal over with it; whether this process is the flusher now. The
    /// lease counts as held only once the takeover is done: one that fails
    /// is tried again before any write is read.
    async fn lead(&self) -> Result<bool> {
        let shared = self.shared;
        shared.check_server().await?;
        let sent = Instant::now();
        if !shared.lease(true).await? {
            return Ok(false);
        }
        // A process stopped here holds a lease that may lapse meanwhile.
        failpoint::pause("write-behind/before-take-over", &shared.journal.stream).await;
        let redis = shared.redis()?;
        let take_over = redis.journal_take_over(
            &shared.journal,
            &shared.consumer,
            &shared.consumer,
            shared.limits.lease,
        );
        let claimed = shared
            .cache
            .inner
            .guarded_within(shared.limits.lease, take_over)
            .await?;
        let Some(claimed) = claimed else {
            return Ok(false);
        };
        if claimed > 0 {
            tracing::info!(target: "redis_cached", claimed, stream = %shared.journal.stream, "took over pending writes");
            shared.counters.add(Tally::claimed, claimed);
        }
        // Read the pending writes whole again: some are new to this process.
        *locked(&self.floor) = None;
        self.renewed(sent);
        Ok(true)
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

    /// Waits until `until`, extending the lease meanwhile; whether it
    /// still holds. A stop ends the wait early.
    async fn hold_until(&self, until: Instant) -> bool {
        let step = self.shared.limits.lease / 3;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            self.shared.pause(left.min(step)).await;
            if self.shared.stopping() || Instant::now() >= until {
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

    /// The next writes to flush, in id order: this flusher's pending ones
    /// first (a takeover's, a failed acknowledgement's, held ones now due),
    /// past the held ones that wait, then new ones, which are read only
    /// once every older pending write has been; a batch that is not full
    /// waits until its oldest write is `max_delay` old. `None` when the
    /// lease is lost.
    async fn next_batch(&self) -> Result<Option<Vec<Journaled>>> {
        let limits = &self.shared.limits;
        let size = limits.batch_size;
        let now = Instant::now();
        let due = locked(&self.held).keys.values().any(|r| r.next <= now);
        // Past the held writes that wait, unless one of them is due.
        let start = if due {
            None
        } else {
            locked(&self.floor).clone()
        };
        let whole = start.is_none();
        let mut after = start.unwrap_or_else(|| "0".to_owned());
        let mut batch = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        let mut waiting_so_far = true;
        let mut exhausted = false;
        for _ in 0..MAX_PENDING_PAGES {
            let want = size - batch.len();
            let Some(read) = self.read(want, Some(&after)).await? else {
                return Ok(None);
            };
            // Fewer than asked: the pending writes ran out (the script
            // then gave new ones).
            exhausted = read.len() < want;
            let Some(last) = read.last().map(|w| w.id.clone()) else {
                break;
            };
            {
                let held = locked(&self.held);
                for journaled in read {
                    if whole {
                        seen.insert(journaled.id.clone());
                    }
                    if held.waits(&journaled.id, now) {
                        continue;
                    }
                    waiting_so_far = false;
                    batch.push(journaled);
                }
            }
            if waiting_so_far {
                *locked(&self.floor) = Some(last.clone());
            }
            after = last;
            if exhausted || batch.len() >= size {
                break;
            }
        }
        if whole && exhausted {
            self.forget_unseen(&seen);
        }
        let Some(first) = batch.first().and_then(|w| JournalId::parse(&w.id)) else {
            return Ok(Some(batch));
        };
        let age = Duration::from_millis(now_unix_ms().saturating_sub(first.ms));
        if exhausted && batch.len() < size && age < limits.max_delay && !self.shared.hurry() {
            // Not woken by each write meanwhile: one read at the end.
            self.shared.pause(limits.max_delay - age).await;
            match self.read(size - batch.len(), None).await? {
                Some(more) => batch.extend(more),
                None => return Ok(None),
            }
        }
        Ok(Some(batch))
    }

    /// Forgets the held writes that a whole read of the pending writes did
    /// not see: another process flushed or buried them meanwhile.
    fn forget_unseen(&self, seen: &HashSet<String>) {
        let mut held = locked(&self.held);
        let gone: Vec<Arc<SlotKey>> = held
            .keys
            .iter()
            .filter(|(_, record)| record.ids.iter().all(|id| !seen.contains(id)))
            .map(|(key, _)| Arc::clone(key))
            .collect();
        for key in gone {
            held.remove(&key);
        }
    }

    /// Decodes a journaled write: the write, or why not (never the data,
    /// which may be personal), and its key. The application's
    /// `Deserialize` and `CacheKey` impls run here: a panic in one is an
    /// undecodable write, not a dead flusher.
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
        let write = match (key, change, &cache_key) {
            (Ok(key), Ok(change), Some(_)) => Ok(Write { key, change, id }),
            (Err(why), _, _) | (_, Err(why), _) => Err(why),
            (_, _, None) => Err("rendering the journaled key's cache key panicked"),
        };
        (write, cache_key)
    }

    /// Why a journaled write may not be decoded here, if so: larger than
    /// this journal writes them, or not signed by this application when
    /// the journal is (not ours, or signed with another key: parked, never
    /// handed to the sink).
    fn screen(
        &self,
        raw_key: &[u8],
        entry: &[u8],
        journaled: &Journaled,
        id: JournalId,
    ) -> Option<&'static str> {
        let shared = self.shared;
        if raw_key.len() > MAX_JOURNALED_KEY {
            return Some("the journaled key is larger than any this journal writes");
        }
        if entry.len() > shared.cache.inner.settings.max_value_bytes {
            return Some("the journaled entry is larger than max_value_bytes");
        }
        let secret = shared.integrity.as_ref()?;
        let (Some(stamp), Some(mac)) = (journaled.stamp, journaled.mac.as_deref()) else {
            return Some("the journaled write is not signed");
        };
        if !secret.verify(&shared.journal.stream, stamp, raw_key, entry, mac) {
            return Some("the journaled write fails its integrity check");
        }
        if stamp.abs_diff(id.ms) > MAX_SKEW_MS {
            return Some(
                "the journaled write was signed at another time (an old write added again)",
            );
        }
        None
    }

    /// Coalesces `batch` into one slot per key (its last write), in
    /// journal order, and the ids of writes removed from the stream while
    /// pending.
    fn coalesce(&self, batch: Vec<Journaled>) -> Coalesced<K, V> {
        let mut slots: Vec<Slot<K, V>> = Vec::new();
        let mut index: HashMap<Arc<SlotKey>, usize> = HashMap::new();
        let mut gone = Vec::new();
        for mut journaled in batch {
            let (Some(raw_key), Some(entry), Some(id)) = (
                journaled.key.take(),
                journaled.entry.take(),
                JournalId::parse(&journaled.id),
            ) else {
                gone.push(journaled.id);
                continue;
            };
            let refused = self.screen(&raw_key, &entry, &journaled, id);
            let (mut write, cache_key) = self.decode(&raw_key, &entry, id);
            let key = Arc::new(match (&cache_key, refused) {
                (_, Some(why)) => {
                    write = Err(why);
                    SlotKey::Unverified(journaled.id.clone())
                }
                (Some(key), None) => SlotKey::Cache(key.clone()),
                (None, None) => SlotKey::Raw(raw_key.clone()),
            });
            match index.get(&key) {
                Some(&at) => {
                    let slot = &mut slots[at];
                    slot.write = write;
                    slot.cache_key = cache_key;
                    slot.raw_key = raw_key;
                    slot.entry = entry;
                    slot.ids.push(journaled.id);
                    slot.last = id;
                }
                None => {
                    index.insert(Arc::clone(&key), slots.len());
                    slots.push(Slot {
                        write,
                        key,
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
        Coalesced { slots, gone }
    }

    /// Makes each slot stand for every held write of its key too: a later
    /// write replaces them (the sink needs only a key's last write), so
    /// they are removed with it and never applied after it. The key's
    /// record stays, with its counts, until the slot is flushed or buried.
    /// A slot older than a held write of its key is folded into that
    /// write instead (and not returned).
    fn absorb(&self, slots: Vec<Slot<K, V>>) -> Vec<Slot<K, V>> {
        let mut held = locked(&self.held);
        if held.keys.is_empty() {
            return slots;
        }
        let mut kept = Vec::with_capacity(slots.len());
        for mut slot in slots {
            let Some(record) = held.keys.get(&slot.key) else {
                kept.push(slot);
                continue;
            };
            let newest_held = record
                .ids
                .iter()
                .filter_map(|id| JournalId::parse(id))
                .max();
            if newest_held.is_some_and(|newest| newest > slot.last) {
                let mut record = record.clone();
                for id in slot.ids {
                    if !record.ids.contains(&id) {
                        record.ids.push(id);
                    }
                }
                held.insert(&slot.key, record);
                continue;
            }
            let mut ids: Vec<String> = record
                .ids
                .iter()
                .filter(|id| !slot.ids.contains(id))
                .cloned()
                .collect();
            if !ids.is_empty() {
                ids.append(&mut slot.ids);
                ids.sort_by_key(|id| JournalId::parse(id));
                slot.ids = ids;
            }
            kept.push(slot);
        }
        kept
    }

    // ---------------------------------------------------------------
    // Flushing.

    /// Applies one batch; whether the lease held throughout.
    async fn apply(&self, batch: Vec<Journaled>) -> Result<bool> {
        let Coalesced { slots, gone } = self.coalesce(batch);
        let gone: Vec<&str> = gone.iter().map(String::as_str).collect();
        if !self.ack(&gone).await? {
            return Ok(false);
        }
        let slots = self.absorb(slots);
        let mut ready = Vec::with_capacity(slots.len());
        for slot in slots {
            match slot.write {
                Ok(_) => ready.push(slot),
                Err(why) => {
                    if !self.park(&slot, why).await? {
                        return Ok(false);
                    }
                }
            }
        }
        if ready.is_empty() {
            return Ok(true);
        }
        self.flush(ready).await
    }

    /// Holds a write that cannot be decoded or checked here for a flusher
    /// that can (a newer version of the application, one with the right
    /// key), tried again with back-off, until `park_undecodable_for`
    /// passed; then buries it. Whether the lease held.
    async fn park(&self, slot: &Slot<K, V>, why: &'static str) -> Result<bool> {
        let now = Instant::now();
        let (record, new) = self.hold(slot, Hold::Parked, None, now, 0);
        if new {
            self.shared.counters.add(Tally::parked, 1);
            tracing::warn!(target: "redis_cached", stream = %self.shared.journal.stream, problem = why,
                "a journaled write cannot be decoded or checked by this process; it waits for a flusher that can");
        }
        if now.saturating_duration_since(record.since) < self.shared.limits.park_for {
            return Ok(true);
        }
        self.bury(slot, why, record.tries).await
    }

    /// Records one more failed try of `slot`'s key, held back from now on:
    /// its record, and whether it is new. The failure counts towards
    /// `max_attempts` if the sink took another write since the key's
    /// previous try (since `since`, the batch's first failure, for a first
    /// one).
    fn hold(
        &self,
        slot: &Slot<K, V>,
        hold: Hold,
        since: Option<Instant>,
        now: Instant,
        group: u64,
    ) -> (HeldKey, bool) {
        let limits = &self.shared.limits;
        let mut held = locked(&self.held);
        let existing = held.remove(&slot.key);
        let new = existing.is_none();
        let previous = existing
            .as_ref()
            .map(|r| r.last_try)
            .or(since)
            .unwrap_or(now);
        let counts = self.others_pass(previous);
        let mut record = existing.unwrap_or(HeldKey {
            hold,
            group,
            ids: Vec::new(),
            tries: 0,
            counted: 0,
            since: since.unwrap_or(now),
            last_try: now,
            next: now,
        });
        record.hold = hold;
        record.group = group;
        record.tries += 1;
        record.counted += u32::from(counts);
        record.last_try = now;
        record.next = now + backoff_after(record.tries, limits);
        for id in &slot.ids {
            if !record.ids.contains(id) {
                record.ids.push(id.clone());
            }
        }
        held.insert(&slot.key, record.clone());
        (record, new)
    }

    /// Forgets what was held of `slot`'s key: its writes are flushed or
    /// buried.
    fn release(&self, slot: &Slot<K, V>) {
        locked(&self.held).remove(&slot.key);
    }

    /// The parts a flush starts with, in this order: the fresh writes
    /// together; each key suspected of a bad row (a counted failure)
    /// alone; each group of writes held while nothing passed (an outage's,
    /// or bad rows not told apart yet) together. Held writes never slow
    /// fresh ones down.
    fn parts(&self, slots: Vec<Slot<K, V>>) -> Vec<Part<K, V>> {
        let held = locked(&self.held);
        let mut fresh = Vec::with_capacity(slots.len());
        let mut suspects = Vec::new();
        let mut groups: Vec<(u64, Part<K, V>)> = Vec::new();
        for slot in slots {
            match held.keys.get(&slot.key).filter(|r| r.hold == Hold::Refused) {
                None => fresh.push(slot),
                Some(record) if record.counted == 0 => {
                    match groups.iter_mut().find(|(group, _)| *group == record.group) {
                        Some((_, part)) => {
                            part.failing_since = part.failing_since.map(|s| s.min(record.since));
                            part.slots.push(slot);
                        }
                        None => groups.push((
                            record.group,
                            Part {
                                slots: vec![slot],
                                kind: Kind::Retried,
                                failures: 0,
                                failing_since: Some(record.since),
                            },
                        )),
                    }
                }
                Some(record) => suspects.push(Part {
                    slots: vec![slot],
                    kind: Kind::Suspect,
                    failures: 0,
                    failing_since: Some(record.since),
                }),
            }
        }
        let mut parts = Vec::with_capacity(1 + suspects.len() + groups.len());
        if !fresh.is_empty() {
            parts.push(Part {
                slots: fresh,
                kind: Kind::Fresh,
                failures: 0,
                failing_since: None,
            });
        }
        parts.extend(suspects);
        parts.extend(groups.into_iter().map(|(_, part)| part));
        parts
    }

    /// Waits, keeping the lease, while sink calls have been failing in a
    /// row (an outage costs the database one call per back-off); whether
    /// the lease held.
    async fn pace(&self) -> bool {
        // A part's first tries and splits go at once; a longer streak is
        // an outage, or rows not told apart yet.
        let next = locked(&self.streak)
            .filter(|streak| streak.failures > SPLIT_AFTER)
            .map(|streak| streak.next);
        match next {
            Some(next) if next > Instant::now() => self.hold_until(next).await,
            _ => true,
        }
    }

    fn passed(&self) {
        *locked(&self.streak) = None;
        *locked(&self.last_success) = Some(Instant::now());
    }

    fn failed(&self) {
        let mut streak = locked(&self.streak);
        let failures = streak.map_or(0, |s| s.failures) + 1;
        let paced = failures.saturating_sub(SPLIT_AFTER);
        *streak = Some(Streak {
            failures,
            next: Instant::now() + backoff_after(paced, &self.shared.limits),
        });
    }

    /// Whether the sink took some write since `since`.
    fn others_pass(&self, since: Instant) -> bool {
        locked(&self.last_success).is_some_and(|at| at > since)
    }

    /// Flushes `slots`: until the sink took each write, or it is held back
    /// or buried; whether the lease held throughout. A stop or a lost lease
    /// leaves the rest pending in the journal, for whoever flushes next.
    async fn flush(&self, slots: Vec<Slot<K, V>>) -> Result<bool> {
        let mut parts = self.parts(slots);
        while !parts.is_empty() && !self.shared.stopping() {
            let mut failing = Vec::new();
            for mut part in parts {
                if !self.pace().await {
                    return Ok(false);
                }
                let (outcome, held) = self.call_sink(&part.slots).await;
                match outcome {
                    Some(Ok(())) => {
                        self.passed();
                        if !self.flushed(&part.slots).await? {
                            return Ok(false);
                        }
                    }
                    Some(Err(error)) => {
                        // A suspected bad row failing again says nothing
                        // of the database: it does not pace the others.
                        if part.kind != Kind::Suspect {
                            self.failed();
                        }
                        self.shared.counters.add(Tally::retries, 1);
                        let writes = part.slots.len();
                        let attempts = part.failures + 1;
                        if self.shared.limits.log_sink_errors {
                            tracing::warn!(target: "redis_cached", %error, writes, attempts, "the write-behind sink failed; retrying");
                        } else {
                            tracing::warn!(target: "redis_cached", writes, attempts,
                                "the write-behind sink failed; retrying (its error text is kept with any write given up on; log_sink_errors shows it here)");
                        }
                        part.failures += 1;
                        part.failing_since.get_or_insert_with(Instant::now);
                        failing.extend(self.after_failure(part, &error).await?);
                    }
                    None => {}
                }
                if !held {
                    return Ok(false);
                }
            }
            parts = failing;
        }
        Ok(true)
    }

    /// What becomes of a part that just failed: kept or split (returned,
    /// fresh writes only, tried again at once); or held back, its writes
    /// tried again in a later batch while the flusher goes on with fresh
    /// ones (a suspect or a retried part, at its first failure; fresh
    /// writes that kept failing while nothing passed, which tells a bad
    /// row from an outage only once fresh writes pass); or, a key that
    /// failed `max_attempts` counted times, buried.
    async fn after_failure(&self, mut part: Part<K, V>, error: &str) -> Result<Vec<Part<K, V>>> {
        let since = part.failing_since;
        let others_passed = since.is_some_and(|since| self.others_pass(since));
        match part.kind {
            Kind::Suspect => {}
            // Other writes passed since these first failed: the group holds
            // bad rows, and its keys' failures count (each alone next
            // time). Else, with nothing to tell an outage from a bad row,
            // it is held again in halves, each a group of its own: a group
            // of bad rows splits down to the rows across batches, while
            // fresh writes flow between them.
            Kind::Retried if !others_passed && part.slots.len() > 1 => {
                let second = part.slots.split_off(part.slots.len() / 2);
                self.hold_all(&part.slots, since, error).await?;
                self.hold_all(&second, since, error).await?;
                return Ok(Vec::new());
            }
            Kind::Retried => {}
            Kind::Fresh if part.slots.len() == 1 => {}
            Kind::Fresh if part.failures < SPLIT_AFTER => return Ok(vec![part]),
            // Fresh writes that kept failing while nothing passed: held,
            // one group, until fresh ones pass (an outage costs one call
            // per back-off meanwhile).
            Kind::Fresh if !others_passed => {}
            Kind::Fresh => {
                let second = part.slots.split_off(part.slots.len() / 2);
                let half = |slots| Part {
                    slots,
                    kind: Kind::Fresh,
                    failures: 0,
                    failing_since: since,
                };
                return Ok(vec![half(std::mem::take(&mut part.slots)), half(second)]);
            }
        }
        self.hold_all(&part.slots, since, error).await?;
        Ok(Vec::new())
    }

    /// Holds `slots`' keys as one group (buried, those that failed
    /// `max_attempts` counted times).
    async fn hold_all(
        &self,
        slots: &[Slot<K, V>],
        since: Option<Instant>,
        error: &str,
    ) -> Result<()> {
        let now = Instant::now();
        let group = self.groups.fetch_add(1, Ordering::Relaxed) + 1;
        for slot in slots {
            let (record, _) = self.hold(slot, Hold::Refused, since, now, group);
            if record.counted >= self.shared.limits.max_attempts {
                self.bury(slot, error, record.tries).await?;
            }
        }
        Ok(())
    }

    /// Runs the sink on `slots` if the lease still holds, extending it
    /// while the sink works and abandoning the call (dropping its future,
    /// which is never polled past the lease's end by this process's clock)
    /// once the lease is lost or ran out, or `sink_timeout` passed. The
    /// sink's outcome (`None`: not called, or abandoned for the lease), and
    /// whether the lease held.
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
        // The application's `Clone` and the sink's code before its first
        // await run here.
        let sink = &self.shared.sink;
        let call = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let batch: Vec<Write<K, V>> = slots
                .iter()
                .filter_map(|slot| slot.write.as_ref().ok().cloned())
                .collect();
            sink.write_batch(batch)
        }));
        let Ok(call) = call else {
            return (
                Some(Err("the sink (or a write's Clone) panicked".to_owned())),
                true,
            );
        };
        let fenced = Fenced {
            call: Box::pin(call),
            flusher: self,
        };
        let call =
            tokio::time::timeout(limits.sink_timeout, AssertUnwindSafe(fenced).catch_unwind());
        tokio::select! {
            biased;
            () = self.keep_lease() => {
                tracing::warn!(target: "redis_cached", stream = %self.shared.journal.stream, "write-behind lease lost during a sink call; call abandoned");
                (None, false)
            }
            outcome = call => {
                let outcome = match outcome {
                    Ok(Ok(Some(Ok(())))) => Ok(()),
                    Ok(Ok(Some(Err(err)))) => Err(describe(&err)),
                    // The lease ran out by this process's clock.
                    Ok(Ok(None)) => {
                        tracing::warn!(target: "redis_cached", stream = %self.shared.journal.stream, "write-behind lease ran out during a sink call; call abandoned");
                        return (None, false);
                    }
                    Ok(Err(_)) => Err("the sink panicked".to_owned()),
                    Err(_) => Err(format!("the sink took longer than {:?}", limits.sink_timeout)),
                };
                (Some(outcome), self.holds())
            }
        }
    }

    /// Puts what the sink took in the cache again, unless a later write of
    /// its key is there: a process that crashed before its cache update, a
    /// failed update, or a reader that filled the key from the database's
    /// older row meanwhile leave the cache at the database's value. When
    /// Redis refuses to store (out of memory), the keys are deleted
    /// instead: readers then go to the database, which holds the writes.
    async fn settle(&self, slots: &[Slot<K, V>]) -> Result<()> {
        let shared = self.shared;
        let inner = &shared.cache.inner;
        let redis = shared.redis()?;
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
        let mut settled = inner.guarded(redis.journal_put_many(&puts)).await;
        if let Err(Error::Refused(_)) = &settled {
            let keys: Vec<&str> = keys.iter().map(|(key, ..)| *key).collect();
            settled = inner.guarded(redis.journal_uncache(&keys)).await;
        }
        for (key, ..) in &keys {
            inner.wrote(key);
        }
        settled
    }

    /// Records that the sink took `slots`: puts them in the cache again,
    /// then removes them from the journal. Whether the lease held.
    async fn flushed(&self, slots: &[Slot<K, V>]) -> Result<bool> {
        self.settle(slots).await?;
        let ids: Vec<&str> = slots
            .iter()
            .flat_map(|slot| slot.ids.iter().map(String::as_str))
            .collect();
        if !self.ack(&ids).await? {
            return Ok(false);
        }
        for slot in slots {
            self.release(slot);
        }
        let c = &self.shared.counters;
        c.add(Tally::batches, 1);
        c.add(Tally::flushed, slots.len() as u64);
        // The writes folded into a later one of their key.
        let folded: usize = slots.iter().map(|slot| slot.ids.len() - 1).sum();
        c.add(Tally::coalesced, folded as u64);
        // From the oldest write the batch stands for, coalesced ones too.
        let oldest = slots
            .iter()
            .filter_map(|slot| slot.ids.first().and_then(|id| JournalId::parse(id)))
            .min();
        if let Some(oldest) = oldest {
            c.lag(now_unix_ms().saturating_sub(oldest.ms));
        }
        Ok(true)
    }

    /// Gives a key's writes up: invalidates its cache entry (unless a later
    /// write of it is there), since the database never got them, then
    /// moves them to the dead letters. When they are full, the writes stay
    /// held in the journal (nothing is ever dropped). Whether the lease
    /// held.
    async fn bury(&self, slot: &Slot<K, V>, error: &str, attempts: u32) -> Result<bool> {
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
        // One dead letter, with every id; removed from the journal in
        // chunks (a key written many times holds many).
        let all: Vec<&str> = slot.ids.iter().map(String::as_str).collect();
        let (first, rest) = all.split_at(all.len().min(ACK_CHUNK));
        let dead = DeadLetter {
            key: &slot.raw_key,
            entry: &slot.entry,
            error,
            attempts,
            ids: first,
            all_ids: &all,
        };
        let bury = redis.journal_bury(
            &shared.journal,
            &shared.consumer,
            &dead,
            shared.limits.max_dead_letters,
        );
        let c = &shared.counters;
        match inner.guarded(bury).await? {
            Buried::Yes => {
                // Counted as soon as the dead letter is written, before the
                // rest of its ids leave the journal.
                c.add(Tally::dead_letters, 1);
                if !self.ack(rest).await? {
                    return Ok(false);
                }
                self.release(slot);
                if shared.limits.log_sink_errors {
                    tracing::error!(target: "redis_cached", error, attempts, stream = %shared.journal.dead, "a write was given up on and moved to the dead letters");
                } else {
                    tracing::error!(target: "redis_cached", attempts, stream = %shared.journal.dead, "a write was given up on and moved to the dead letters, with its reason");
                }
                Ok(true)
            }
            Buried::Full => {
                c.add(Tally::dead_letters_full, 1);
                if shared.limits.log_sink_errors {
                    tracing::error!(target: "redis_cached", error, attempts, most = shared.limits.max_dead_letters, stream = %shared.journal.dead,
                        "a write given up on stays in the journal: the dead letters are full; drain them (XRANGE, then XDEL)");
                } else {
                    tracing::error!(target: "redis_cached", attempts, most = shared.limits.max_dead_letters, stream = %shared.journal.dead,
                        "a write given up on stays in the journal: the dead letters are full; drain them (XRANGE, then XDEL); \
                         its reason is kept once it is buried (log_sink_errors shows it here)");
                }
                Ok(true)
            }
            Buried::NoLease => {
                self.lost();
                Ok(false)
            }
        }
    }

    /// Removes `ids` from the journal; whether the lease held.
    async fn ack(&self, ids: &[&str]) -> Result<bool> {
        let shared = self.shared;
        let redis = shared.redis()?;
        for chunk in ids.chunks(ACK_CHUNK) {
            let ack = redis.journal_ack(&shared.journal, &shared.consumer, chunk);
            if !shared.cache.inner.guarded(ack).await? {
                self.lost();
                return Ok(false);
            }
        }
        Ok(true)
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

/// A sink call that is never polled once the flusher's lease has run out
/// by its own clock: `None` then.
struct Fenced<'f, 'a, F, K, V, S> {
    call: Pin<Box<F>>,
    flusher: &'f Flusher<'a, K, V, S>,
}

impl<F, K, V, S> Future for Fenced<'_, '_, F, K, V, S>
where
    F: Future,
    K: Serialize + DeserializeOwned + KeyParts + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    S: Sink<K, V>,
{
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if !self.flusher.holds() {
            return Poll::Ready(None);
        }
        self.call.as_mut().poll(cx).map(Some)
    }
}

/// The sink's error as text; a `Display` impl that panics does not take
/// the flusher down.
fn describe<E: std::fmt::Display>(err: &E) -> String {
    std::panic::catch_unwind(AssertUnwindSafe(|| err.to_string()))
        .unwrap_or_else(|_| "the sink failed (and its error could not be displayed)".to_owned())
}
