//! The near tier: entries kept in this process as well as in Redis, with
//! their decoded values, for the functions with `near = "…"`.
//!
//! May import `encoding`, `observe` and the leaves; never `backend`: the
//! Redis backend drives this tier, not the other way round.
//!
//! An entry is only ever filled from a read made on the tracking
//! connection (see the Redis backend's `track` module), on which Redis
//! remembers the key and later pushes an invalidation when anyone changes
//! it. So an entry is correct for as long as the invalidations of that
//! connection are heard, and the store serves none otherwise:
//!
//! - **Lease.** Hits are served only until a deadline that each proof of
//!   delivery on the tracking connection pushes forward (the proof's start
//!   plus [`LEASE`]): the tracker reads a canary key there, changes it from
//!   the main connection, and hears its invalidation; the invalidations
//!   Redis sent before that one have been handled by then, since a
//!   connection delivers in order. A connection that stalls, or answers
//!   but delivers no invalidation, stops the hits within [`LEASE`].
//! - **Epoch.** A connection that drops (its invalidations since are lost),
//!   or Redis saying "all keys" (`FLUSHALL`, a full tracking table),
//!   empties the store and starts a new epoch: a fill whose read was sent
//!   in an earlier epoch stores nothing.
//! - **Fill counts.** A fill registers its key before its read is sent,
//!   and notes how many invalidations of the key were heard since the
//!   first fill in flight registered it; a fill that finds another count
//!   when its read returns stores nothing (an invalidation may have been
//!   about a newer value than the one read). Only an invalidation (or an
//!   emptying) voids a fill: concurrent fills of a hot key do not void
//!   one another, so it stays in the tier however often it is read.

use std::any::Any;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::encoding::codec::{Codec, Entry};
use crate::encoding::weigh;
use crate::observe::meters::Counting;
use crate::observe::stats::Event;
use crate::sync::{AtomicU64, Mutex, MutexGuard};

/// How long a proof of delivery lets the tier serve hits, counted from its
/// start.
pub(crate) const LEASE: Duration = Duration::from_millis(500);

/// How often delivery is proven (well within [`LEASE`]).
pub(crate) const PROVE_EVERY: Duration = Duration::from_millis(100);

const SHARDS: usize = 16;

/// One entry: the bytes as stored in Redis, and their decoded value once
/// a hit decoded them (an entry is replaced by one that holds it).
struct Slot {
    raw: Arc<[u8]>,
    decoded: OnceLock<Box<dyn Any + Send + Sync>>,
    /// An estimate of the memory the decoded value holds (see `weigh.rs`);
    /// 0 until it is decoded.
    decoded_bytes: u64,
    /// Served until then (ns since the store's `base`).
    deadline: u64,
    epoch: u64,
}

/// What an entry holds besides its bytes and its decoded value: the slot,
/// its `Arc`, and the store's own record of it.
const ENTRY_OVERHEAD: u64 = 160;

/// An entry's weight: about the memory it holds (the entry as read, its
/// decoded value, its key; before a hit decodes it, the value is taken to
/// be as large as the entry), and never less than the tier's bytes over
/// its entries, so that it holds at most that many.
#[derive(Clone)]
struct ByBytes {
    least: u64,
}

impl quick_cache::Weighter<String, Arc<Slot>> for ByBytes {
    fn weight(&self, key: &String, slot: &Arc<Slot>) -> u64 {
        let raw = weigh::allocation(slot.raw.len()) as u64;
        let decoded = match slot.decoded_bytes {
            0 => raw,
            bytes => bytes,
        };
        let key = weigh::allocation(key.len()) as u64;
        (raw + decoded + key + ENTRY_OVERHEAD).max(self.least)
    }
}

/// Why the tier was emptied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flush {
    /// The tracking connection dropped or was replaced.
    Disconnected,
    /// Redis invalidated every key (`FLUSHALL`, `FLUSHDB`, or a full
    /// tracking table).
    Everything,
}

/// The near tier of one cache.
pub(crate) struct NearStore {
    entries: quick_cache::sync::Cache<String, Arc<Slot>, ByBytes>,
    /// The keys with fills in flight.
    pending: [Mutex<HashMap<String, Pending>>; SHARDS],
    hasher: std::collections::hash_map::RandomState,
    epoch: AtomicU64,
    /// Which tracking connection is the live one: its proofs of delivery
    /// renew the lease, its disconnection flushes.
    generation: AtomicU64,
    /// Hits are served until then (ns since `base`); 0: not at all.
    lease: AtomicU64,
    base: Instant,
    /// Where invalidations and flushes are counted: the cache's counters,
    /// once it is built.
    tally: OnceLock<Counting>,
    /// The largest entry kept: its bytes as stored, and the estimate of
    /// its decoded value.
    max_entry: usize,
}

impl std::fmt::Debug for NearStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NearStore")
            .field("entries", &self.entries.len())
            .finish_non_exhaustive()
    }
}

/// The fills in flight of one key, and how many invalidations of the key
/// were heard since the first of them registered.
#[derive(Debug, Default)]
struct Pending {
    fills: u32,
    invalidations: u64,
}

/// A fill of one key, from [`NearStore::begin_fill`]: unregistered when it
/// ends, finished or dropped.
pub(crate) struct Fill<'a> {
    store: &'a NearStore,
    key: &'a str,
    /// The key's invalidation count when the fill registered.
    seen: u64,
    epoch: u64,
    /// Whether it still counts among the key's fills in flight.
    registered: bool,
}

impl NearStore {
    /// A store of at most `capacity` entries and about `max_bytes` bytes.
    pub(crate) fn new(capacity: usize, max_bytes: usize) -> NearStore {
        let (capacity, max_bytes) = (capacity.max(1) as u64, max_bytes.max(1) as u64);
        // A little under the bytes per entry: a whole-budget entry would
        // be refused by the store (which checks each of its shards).
        let weigher = ByBytes {
            least: (max_bytes / capacity * 9 / 10).max(1),
        };
        NearStore {
            entries: quick_cache::sync::Cache::with_weighter(capacity as usize, max_bytes, weigher),
            pending: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            hasher: std::collections::hash_map::RandomState::new(),
            epoch: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            lease: AtomicU64::new(0),
            base: Instant::now(),
            tally: OnceLock::new(),
            max_entry: (max_bytes / 64) as usize,
        }
    }

    /// Counts the tier's events in `tally` from now on.
    pub(crate) fn count_in(&self, tally: Counting) {
        let _ = self.tally.set(tally);
    }

    fn count(&self, event: Event) {
        if let Some(tally) = self.tally.get() {
            tally.count(event);
        }
    }

    fn now(&self) -> u64 {
        self.at(Instant::now())
    }

    fn at(&self, instant: Instant) -> u64 {
        u64::try_from(instant.saturating_duration_since(self.base).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, HashMap<String, Pending>> {
        self.pending[self.hasher.hash_one(key) as usize % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the tier serves hits now.
    pub(crate) fn serving(&self) -> bool {
        self.now() < self.lease.load(Ordering::Acquire)
    }

    /// How many entries it holds (expired ones included until evicted).
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The value at `key`, if the tier holds it and may serve it now:
    /// `Some(None)` for a cached absence. Decoded once per entry, and
    /// weighed then (an entry read as another type is decoded each time,
    /// and never shared).
    pub(crate) fn get<T>(&self, key: &str, codec: Codec) -> Option<Option<T>>
    where
        T: DeserializeOwned + Clone + Send + Sync + 'static,
    {
        let now = self.now();
        if now >= self.lease.load(Ordering::Acquire) {
            return None;
        }
        let slot = self.entries.get(key)?;
        if slot.deadline <= now || slot.epoch != self.epoch.load(Ordering::Acquire) {
            return None;
        }
        if let Some(decoded) = slot.decoded.get() {
            return decoded.downcast_ref::<Option<T>>().cloned().or_else(|| {
                // Read as another type: decoded each time, never kept.
                match codec.decode::<T>(&slot.raw) {
                    Ok(Entry::Value(value, _)) => Some(value),
                    _ => None,
                }
            });
        }
        let (value, heap) = match codec.decode_weighed::<T>(&slot.raw) {
            Ok((Entry::Value(value, _), heap)) => (value, heap),
            _ => return None,
        };
        let bytes = heap + weigh::allocation(size_of::<Option<T>>());
        self.keep_decoded(key, &slot, Box::new(value.clone()), bytes);
        Some(value)
    }

    /// Replaces `key`'s entry `slot`, if it is still there, by one that
    /// holds its decoded value, weighed `bytes` more: the store's byte
    /// bound then counts what the value holds. A value over the largest
    /// entry is not kept, nor its entry.
    fn keep_decoded(
        &self,
        key: &str,
        slot: &Arc<Slot>,
        decoded: Box<dyn Any + Send + Sync>,
        bytes: usize,
    ) {
        // Under the shard's lock, as an invalidation: one that came since
        // the hit already removed `slot`, one that comes later removes
        // what is inserted here.
        let _pending = self.shard(key);
        let current = self.entries.peek(key);
        if !current.is_some_and(|current| Arc::ptr_eq(&current, slot)) {
            return;
        }
        if bytes > self.max_entry {
            self.entries.remove(key);
            return;
        }
        let kept = Slot {
            raw: Arc::clone(&slot.raw),
            decoded: OnceLock::from(decoded),
            decoded_bytes: bytes.max(1) as u64,
            deadline: slot.deadline,
            epoch: slot.epoch,
        };
        self.entries.insert(key.to_owned(), Arc::new(kept));
    }

    /// Registers a fill of `key` before its read is sent; `None` while the
    /// tier is not serving (the read is then not worth keeping).
    pub(crate) fn begin_fill<'a>(&'a self, key: &'a str) -> Option<Fill<'a>> {
        if !self.serving() {
            return None;
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        let mut pending = self.shard(key);
        let seen = match pending.get_mut(key) {
            Some(pending) => {
                pending.fills += 1;
                pending.invalidations
            }
            None => {
                let first = Pending {
                    fills: 1,
                    invalidations: 0,
                };
                pending.insert(key.to_owned(), first);
                0
            }
        };
        Some(Fill {
            store: self,
            key,
            seen,
            epoch,
            registered: true,
        })
    }

    /// Drops `key`'s entry and voids its fills in flight: Redis said it
    /// changed, or this process is about to change it (or just did).
    pub(crate) fn invalidate(&self, key: &str) {
        let mut pending = self.shard(key);
        if let Some(pending) = pending.get_mut(key) {
            pending.invalidations += 1;
        }
        self.entries.remove(key);
    }

    /// Redis named `key` as changed.
    pub(crate) fn invalidated(&self, key: &str) {
        self.count(Event::near_invalidations);
        self.invalidate(key);
    }

    /// Redis invalidated every key (`FLUSHALL`, `FLUSHDB`): the tier is
    /// emptied, and fills in flight voided; tracking goes on.
    pub(crate) fn flush(&self, why: Flush) {
        self.empty(Some(why));
    }

    /// Empties the tier and voids every fill in flight (a new epoch),
    /// counting it as a flush if `why` says one happened.
    fn empty(&self, why: Option<Flush>) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.clear();
        if let Some(why) = why {
            self.count(Event::near_flushes);
            tracing::debug!(target: "redis_cached", why = ?why, "near tier emptied");
        }
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// A new tracking connection takes over: the tier starts empty, and
    /// serves once the connection of the returned generation proves its
    /// delivery.
    pub(crate) fn connected(&self) -> u64 {
        // Generation first: an answer being recorded now sees it.
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let was_serving = self.lease.swap(0, Ordering::AcqRel) != 0;
        let held = was_serving || !self.entries.is_empty();
        self.empty(held.then_some(Flush::Disconnected));
        generation
    }

    /// The tracking connection of `generation` dropped or was given up:
    /// what Redis pushed since is lost. (A later connection's generation
    /// is left alone.)
    pub(crate) fn disconnected(&self, generation: u64) {
        let ended = self.generation.compare_exchange(
            generation,
            generation + 1,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        if ended.is_ok() {
            let was_serving = self.lease.swap(0, Ordering::AcqRel) != 0;
            let held = was_serving || !self.entries.is_empty();
            self.empty(held.then_some(Flush::Disconnected));
        }
    }

    /// The connection of `generation` proved its delivery in a round
    /// started at `sent`: every invalidation Redis pushed there before then
    /// has been handled, so hits may be served until `sent + LEASE`.
    /// Whether that connection is still the live one.
    pub(crate) fn delivered(&self, sent: Instant, generation: u64) -> bool {
        let until = self.at(sent).saturating_add(nanos(LEASE));
        let live = || self.generation.load(Ordering::Acquire) == generation;
        if !live() {
            return false;
        }
        self.lease.fetch_max(until, Ordering::AcqRel);
        if !live() {
            // Disconnected meanwhile: its "not serving" stands.
            self.lease.store(0, Ordering::Release);
            return false;
        }
        true
    }
}

impl Fill<'_> {
    /// Keeps `raw`, read by a command sent at `sent`, for at most `bound`
    /// and Redis's remaining TTL then (`pttl_ms`: -1 none, -2 the key is
    /// gone), and never past `soft_expiry` (Unix ms, for a `stale`/`early`
    /// entry); unless the key was invalidated or the tier flushed since
    /// the fill began.
    pub(crate) fn finish(
        mut self,
        raw: Arc<[u8]>,
        sent: Instant,
        bound: Duration,
        pttl_ms: i64,
        soft_expiry: Option<u64>,
    ) {
        let mut life = bound;
        match pttl_ms {
            -1 => {}
            ms if ms >= 0 => life = life.min(Duration::from_millis(ms as u64)),
            _ => return,
        }
        if let Some(soft) = soft_expiry {
            let now_ms = crate::token::now_unix_ms();
            life = life.min(Duration::from_millis(soft.saturating_sub(now_ms)));
        }
        let store = self.store;
        if raw.len() > store.max_entry || life.is_zero() {
            return;
        }
        let deadline = store.at(sent).saturating_add(nanos(life));
        let mut pending = store.shard(self.key);
        let voided = pending
            .get(self.key)
            .is_none_or(|pending| pending.invalidations != self.seen);
        if !voided && store.epoch() == self.epoch {
            // Under the shard's lock: an invalidation heard from now on
            // removes what is inserted here.
            store.entries.insert(
                self.key.to_owned(),
                Arc::new(Slot {
                    raw,
                    decoded: OnceLock::new(),
                    decoded_bytes: 0,
                    deadline,
                    epoch: self.epoch,
                }),
            );
        }
        self.release(&mut pending);
    }

    /// No longer among the key's fills in flight; the last one forgets the
    /// key's count.
    fn release(&mut self, pending: &mut HashMap<String, Pending>) {
        if !std::mem::replace(&mut self.registered, false) {
            return;
        }
        if let Some(entry) = pending.get_mut(self.key) {
            entry.fills -= 1;
            if entry.fills == 0 {
                pending.remove(self.key);
            }
        }
    }
}

/// `duration` in ns, saturating.
fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

impl Drop for Fill<'_> {
    fn drop(&mut self) {
        if self.registered {
            let store = self.store;
            self.release(&mut store.shard(self.key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(value: &str) -> Arc<[u8]> {
        Codec::Json.encode(value, None).unwrap().into()
    }

    impl Fill<'_> {
        fn finish_now(self, raw: Arc<[u8]>, bound: Duration, pttl_ms: i64, soft: Option<u64>) {
            self.finish(raw, Instant::now(), bound, pttl_ms, soft);
        }
    }

    /// How many fills are registered, over every shard.
    fn pending_fills(store: &NearStore) -> usize {
        let fills = |shard: &Mutex<HashMap<String, Pending>>| {
            let shard = shard.lock().unwrap();
            shard.values().map(|p| p.fills as usize).sum::<usize>()
        };
        store.pending.iter().map(fills).sum()
    }

    fn serving(store: &NearStore) {
        store.delivered(Instant::now(), store.generation.load(Ordering::Acquire));
    }

    #[test]
    fn nothing_is_served_without_a_lease() {
        let store = NearStore::new(100, 1 << 20);
        assert!(store.begin_fill("k").is_none(), "no lease: no fill");
        serving(&store);
        let fill = store.begin_fill("k").unwrap();
        fill.finish_now(entry("v"), Duration::from_secs(30), -1, None);
        assert_eq!(
            store.get::<String>("k", Codec::Json),
            Some(Some("v".into()))
        );
        assert_eq!(
            store.get::<String>("k", Codec::Json),
            Some(Some("v".into())),
            "decoded once, kept"
        );
        store.lease.store(1, Ordering::Release); // lapsed
        assert_eq!(store.get::<String>("k", Codec::Json), None);
    }

    #[test]
    fn an_invalidation_during_a_fill_voids_it() {
        let store = NearStore::new(100, 1 << 20);
        serving(&store);
        let fill = store.begin_fill("k").unwrap();
        store.invalidated("k");
        fill.finish_now(entry("old"), Duration::from_secs(30), -1, None);
        assert_eq!(store.get::<String>("k", Codec::Json), None);
        // A flush voids fills of every key, and an older epoch's too.
        let fill = store.begin_fill("k").unwrap();
        store.flush(Flush::Everything);
        fill.finish_now(entry("old"), Duration::from_secs(30), -1, None);
        assert_eq!(store.get::<String>("k", Codec::Json), None);
        assert_eq!(pending_fills(&store), 0);
    }

    /// Fills of one key overlap all the time when it is hot: none voids
    /// another, only an invalidation voids those that began before it.
    #[test]
    fn concurrent_fills_of_one_key_do_not_void_each_other() {
        let store = NearStore::new(100, 1 << 20);
        serving(&store);
        let bound = Duration::from_secs(30);
        let a = store.begin_fill("k").unwrap();
        let b = store.begin_fill("k").unwrap();
        a.finish_now(entry("v"), bound, -1, None);
        assert_eq!(
            store.get::<String>("k", Codec::Json),
            Some(Some("v".into())),
            "a later fill in flight does not void an earlier one"
        );
        let c = store.begin_fill("k").unwrap();
        b.finish_now(entry("v"), bound, -1, None);
        store.invalidated("k");
        let d = store.begin_fill("k").unwrap();
        c.finish_now(entry("old"), bound, -1, None);
        assert_eq!(store.get::<String>("k", Codec::Json), None, "voided");
        d.finish_now(entry("new"), bound, -1, None);
        assert_eq!(
            store.get::<String>("k", Codec::Json),
            Some(Some("new".into())),
            "a fill that began after the invalidation keeps its value"
        );
        assert_eq!(pending_fills(&store), 0);
    }

    #[test]
    fn a_disconnection_stops_serving_until_the_next_answer() {
        let store = NearStore::new(100, 1 << 20);
        let old = store.connected();
        store.delivered(Instant::now(), old);
        let fill = store.begin_fill("k").unwrap();
        fill.finish_now(entry("v"), Duration::from_secs(30), -1, None);
        let sent = Instant::now();
        store.disconnected(old + 1); // not the live connection's
        assert!(store.serving());
        store.disconnected(old);
        assert!(!store.serving());
        store.delivered(sent, old); // a late answer on the old connection
        assert!(
            !store.serving(),
            "a proof on an older connection proves nothing"
        );
        let new = store.connected();
        store.delivered(Instant::now(), new);
        assert_eq!(store.get::<String>("k", Codec::Json), None, "emptied");
        // Everything invalidated: emptied, but still serving.
        store
            .begin_fill("k")
            .unwrap()
            .finish_now(entry("v"), Duration::from_secs(30), -1, None);
        store.flush(Flush::Everything);
        assert!(store.serving());
        assert_eq!(store.get::<String>("k", Codec::Json), None);
    }

    #[test]
    fn an_entry_lives_no_longer_than_its_redis_ttl_nor_the_bound() {
        let store = NearStore::new(100, 1 << 20);
        serving(&store);
        store
            .begin_fill("a")
            .unwrap()
            .finish_now(entry("v"), Duration::from_secs(30), 0, None);
        assert_eq!(
            store.get::<String>("a", Codec::Json),
            None,
            "expiring in Redis"
        );
        store
            .begin_fill("b")
            .unwrap()
            .finish_now(entry("v"), Duration::ZERO, -1, None);
        assert_eq!(store.get::<String>("b", Codec::Json), None);
        let past = crate::token::now_unix_ms() - 1;
        store.begin_fill("c").unwrap().finish_now(
            entry("v"),
            Duration::from_secs(30),
            -1,
            Some(past),
        );
        assert_eq!(
            store.get::<String>("c", Codec::Json),
            None,
            "past its freshness"
        );
        store.begin_fill("d").unwrap().finish_now(
            entry("v"),
            Duration::from_secs(30),
            60_000,
            None,
        );
        assert!(store.get::<String>("d", Codec::Json).is_some());
        // Read as another type: decoded each time, never a wrong value.
        assert_eq!(store.get::<u64>("d", Codec::Json), None);
        assert!(store.get::<String>("d", Codec::Json).is_some());
    }

    #[test]
    fn a_dropped_fill_leaves_no_registration() {
        let store = NearStore::new(100, 1 << 20);
        serving(&store);
        drop(store.begin_fill("k").unwrap());
        assert_eq!(pending_fills(&store), 0);
    }
}

/// Models of the store's protocols, which loom runs over every
/// interleaving of a few threads (up to 3 preemptions each run), with the
/// store's own locks and atomics (see `sync.rs`): fills of one key racing
/// one another, a write and its invalidation, an emptying; a proof of
/// delivery racing its connection's end. Run by `scripts/test.sh`.
#[cfg(all(test, redis_cached_loom))]
mod model {
    use super::*;
    use crate::sync::model;
    use loom::sync::atomic::AtomicU64 as Redis;
    use loom::thread;

    const BOUND: Duration = Duration::from_secs(30);

    fn serving() -> Arc<NearStore> {
        let store = NearStore::new(100, 1 << 20);
        let generation = store.connected();
        store.delivered(Instant::now(), generation);
        Arc::new(store)
    }

    fn entry(version: u64) -> Arc<[u8]> {
        Codec::Json.encode(&version, None).unwrap().into()
    }

    fn held(store: &NearStore) -> Option<u64> {
        store.get::<u64>("k", Codec::Json).flatten()
    }

    /// A fill that reads the key's version in "Redis" and keeps it.
    fn fill(store: &NearStore, redis: &Redis) {
        let fill = store.begin_fill("k").expect("serving");
        let version = redis.load(Ordering::SeqCst);
        fill.finish(entry(version), Instant::now(), BOUND, -1, None);
    }

    fn pending_fills(store: &NearStore) -> usize {
        let shard = |s: &Mutex<HashMap<String, Pending>>| s.lock().unwrap().len();
        store.pending.iter().map(shard).sum()
    }

    /// Overlapping fills of one key, and no invalidation: each fill, once
    /// finished, has left the key in the tier (none voids another).
    #[test]
    fn overlapping_fills_keep_the_key() {
        model("overlapping_fills_keep_the_key", || {
            let store = serving();
            let redis = Arc::new(Redis::new(1));
            let fills: Vec<_> = (0..2)
                .map(|_| {
                    let (store, redis) = (Arc::clone(&store), Arc::clone(&redis));
                    thread::spawn(move || {
                        fill(&store, &redis);
                        assert_eq!(held(&store), Some(1), "a finished fill is kept");
                    })
                })
                .collect();
            for fill in fills {
                fill.join().unwrap();
            }
            assert_eq!(pending_fills(&store), 0, "no fill left registered");
        });
    }

    /// A write in Redis, then its invalidation heard, against two fills
    /// that read Redis: once both are done, the tier holds the new value
    /// or nothing, never the old one.
    #[test]
    fn no_fill_keeps_a_value_older_than_an_invalidation() {
        model("no_fill_keeps_a_value_older_than_an_invalidation", || {
            let store = serving();
            let redis = Arc::new(Redis::new(1));
            let writer = {
                let (store, redis) = (Arc::clone(&store), Arc::clone(&redis));
                thread::spawn(move || {
                    redis.store(2, Ordering::SeqCst);
                    store.invalidated("k");
                })
            };
            let fills: Vec<_> = (0..2)
                .map(|_| {
                    let (store, redis) = (Arc::clone(&store), Arc::clone(&redis));
                    thread::spawn(move || fill(&store, &redis))
                })
                .collect();
            writer.join().unwrap();
            for fill in fills {
                fill.join().unwrap();
            }
            let held = held(&store);
            assert!(held.is_none() || held == Some(2), "kept {held:?}");
            assert_eq!(pending_fills(&store), 0);
        });
    }

    /// The same with Redis invalidating everything (`FLUSHALL`), and a hit
    /// that decodes the entry (and replaces it) meanwhile.
    #[test]
    fn no_fill_keeps_a_value_older_than_an_emptying() {
        model("no_fill_keeps_a_value_older_than_an_emptying", || {
            let store = serving();
            let redis = Arc::new(Redis::new(1));
            let writer = {
                let (store, redis) = (Arc::clone(&store), Arc::clone(&redis));
                thread::spawn(move || {
                    redis.store(2, Ordering::SeqCst);
                    store.flush(Flush::Everything);
                })
            };
            let filler = {
                let (store, redis) = (Arc::clone(&store), Arc::clone(&redis));
                thread::spawn(move || {
                    fill(&store, &redis);
                    held(&store);
                })
            };
            writer.join().unwrap();
            filler.join().unwrap();
            let held = held(&store);
            assert!(held.is_none() || held == Some(2), "kept {held:?}");
        });
    }

    /// A proof of delivery that lands as its connection ends: once the end
    /// is handled, the tier does not serve, whichever came first.
    #[test]
    fn a_late_proof_does_not_outlive_its_connection() {
        model("a_late_proof_does_not_outlive_its_connection", || {
            let store = Arc::new(NearStore::new(100, 1 << 20));
            let generation = store.connected();
            let sent = Instant::now();
            let proof = {
                let store = Arc::clone(&store);
                thread::spawn(move || {
                    store.delivered(sent, generation);
                })
            };
            let end = {
                let store = Arc::clone(&store);
                thread::spawn(move || store.disconnected(generation))
            };
            proof.join().unwrap();
            end.join().unwrap();
            assert!(!store.serving(), "serving after its connection ended");
        });
    }
}
