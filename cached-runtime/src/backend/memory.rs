//! The embedded backend: a bounded `quick_cache` (S3-FIFO eviction, which
//! keeps frequently read entries over one-hit wonders) with a TTL per entry.
//!
//! It is bounded by entries and by bytes at once: each entry weighs its
//! key, its value and a fixed overhead, but at least `max_bytes /
//! max_entries`, and the total weight is at most `max_bytes`. So neither
//! more than `max_entries` entries nor more than `max_bytes` bytes are held.
//!
//! Reads take no lock. Writes take one of a fixed set of striped mutexes, so
//! that a compare-and-set (`set_if`) is atomic against every other write to
//! the same key.
//!
//! Tombstones (left by invalidations) are kept apart from values, out of
//! eviction's reach, until they expire (the cache's `invalidation_window`):
//! an evicted tombstone would let a computation that read the key before
//! the invalidation store its older value over "nothing". A value written
//! over a tombstone shadows it without removing it, so that if that value
//! is evicted or expires, the key reads as the tombstone again, not as
//! nothing. They are bounded by the invalidations of one window, not by
//! `max_entries`.
//!
//! An entry read by a hit of a type that can be cloned keeps its decoded
//! value beside its bytes (as the near tier does): later hits clone it
//! rather than decode the bytes. The value is weighed when it is kept (an
//! estimate of what it holds, see `weigh.rs`), so the byte bound counts it;
//! one too large to keep within it is not kept, and hits of its entry
//! decode the bytes.
//!
//! An expired entry is never returned: a read that finds one removes it.
//! Expired entries nobody reads are reclaimed by a sweep that runs after
//! every `max_entries / 4` writes, so they cost at most the bound's memory
//! for a short while, never more.

use std::any::Any;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use quick_cache::sync::Cache as Store;
use quick_cache::{DefaultHashBuilder, Weighter};
use serde::de::DeserializeOwned;

use super::{Backend, Bytes, Seen, StoreIf};
use crate::encoding::codec::{self, Codec};
use crate::encoding::weigh;
use crate::error::Result;
use crate::token::now_unix_ms;

/// Limits of the in-memory backend, see [`CacheBuilder::memory`](crate::CacheBuilder::memory).
///
/// ```
/// # extern crate cached_runtime as redis_cached;
/// use redis_cached::MemoryConfig;
///
/// let small = MemoryConfig { max_bytes: 16 << 20, ..MemoryConfig::default() };
/// assert_eq!(small.max_entries, 100_000);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryConfig {
    /// How many entries it holds at most; past that, the least valuable are
    /// evicted. Default 100 000.
    pub max_entries: usize,
    /// How many bytes of keys and values (plus about 64 bytes of bookkeeping
    /// per entry) it holds at most. Default 128 MiB. A value larger than
    /// about 1/8 of this (quick_cache's shard size) is not held at all:
    /// its lookups miss and it is computed again.
    pub max_bytes: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            max_entries: 100_000,
            max_bytes: 128 * 1024 * 1024,
        }
    }
}

/// The bookkeeping of one entry beyond its key and value bytes, roughly.
const ENTRY_OVERHEAD: u64 = 64;

/// Weighs an entry by its bytes, but at least `floor`: see the module docs.
#[derive(Debug, Clone, Copy)]
struct ByBytes {
    floor: u64,
}

impl Weighter<String, Entry> for ByBytes {
    fn weight(&self, key: &String, entry: &Entry) -> u64 {
        let bytes = (key.len() + entry.bytes.len()) as u64 + ENTRY_OVERHEAD + entry.decoded_bytes;
        bytes.max(self.floor)
    }
}

#[derive(Clone)]
struct Entry {
    bytes: Arc<[u8]>,
    expires_at: Instant,
    /// The value the bytes decode to, as an `Option<T>` (`None`: a stored
    /// absence), once a hit of a type that can be cloned decoded them.
    decoded: Option<Arc<dyn Any + Send + Sync>>,
    /// An estimate of the memory `decoded` holds; 0 without it.
    decoded_bytes: u64,
}

const STRIPES: usize = 64;

/// One key's record in a tag set.
#[derive(Debug, Clone, Copy)]
struct Record {
    /// Unix ms.
    expiry: u64,
    made: Instant,
}

pub(crate) struct MemoryBackend {
    entries: Store<String, Entry, ByBytes, DefaultHashBuilder>,
    /// How `entries` weighs an entry.
    weigher: ByBytes,
    /// Tag set → the keys cached under it, with when each record expires
    /// (Unix ms, as on Redis) and when it was made. The sweep drops expired
    /// records, records of keys that hold nothing (evicted or expired)
    /// once they are older than `record_grace` (a fill records its key
    /// before it stores it), and empty sets: the records stay proportional
    /// to the entries held, whatever their TTLs.
    tags: Mutex<HashMap<String, HashMap<String, Record>>>,
    /// How long a record of a key that holds nothing is kept: the cache's
    /// invalidation window, the time a slow fill has to store.
    record_grace: Duration,
    /// The keys' tombstones, which eviction must not drop.
    tombstones: Mutex<HashMap<String, Entry>>,
    /// How many tombstones there are, so that a lookup that finds no value
    /// looks for one only when there may be one.
    tombstone_count: std::sync::atomic::AtomicUsize,
    stripes: [Mutex<()>; STRIPES],
    hasher: RandomState,
    writes: AtomicU64,
    sweep_every: u64,
}

impl std::fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("entries", &self.entries.len())
            .field("capacity", &self.entries.capacity())
            .finish()
    }
}

impl MemoryBackend {
    pub(crate) fn new(config: MemoryConfig, record_grace: Duration) -> Self {
        let capacity = config.max_entries.max(1);
        let max_bytes = config.max_bytes.max(1);
        let floor = (max_bytes / capacity as u64).max(1);
        let weigher = ByBytes { floor };
        MemoryBackend {
            entries: Store::with_weighter(capacity, max_bytes, weigher),
            weigher,
            tags: Mutex::new(HashMap::new()),
            record_grace,
            tombstones: Mutex::new(HashMap::new()),
            tombstone_count: std::sync::atomic::AtomicUsize::new(0),
            stripes: std::array::from_fn(|_| Mutex::new(())),
            hasher: RandomState::new(),
            writes: AtomicU64::new(0),
            sweep_every: (capacity as u64 / 4).max(64),
        }
    }

    fn write_lock(&self, key: &str) -> MutexGuard<'_, ()> {
        let stripe = self.hasher.hash_one(key) as usize % STRIPES;
        self.stripes[stripe]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The unexpired entry at `key`: its value, else its tombstone.
    fn live(&self, key: &str) -> Option<Entry> {
        let now = Instant::now();
        match self.entries.get(key) {
            Some(entry) if entry.expires_at > now => return Some(entry),
            Some(expired) => {
                // Remove only the entry we saw: a fresh write may have
                // replaced it.
                self.entries
                    .remove_if(key, |current| Arc::ptr_eq(&current.bytes, &expired.bytes));
            }
            None => {}
        }
        if self.tombstone_count.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.tombstones()
            .get(key)
            .filter(|entry| entry.expires_at > now)
            .cloned()
    }

    fn tombstones(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.tombstones
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn insert(&self, key: &str, value: Arc<[u8]>, ttl: Duration) {
        let now = Instant::now();
        // A TTL too long for the clock is as good as forever.
        let expires_at = now
            .checked_add(ttl)
            .unwrap_or(now + Duration::from_secs(100 * 365 * 86_400));
        let entry = Entry {
            bytes: value,
            expires_at,
            decoded: None,
            decoded_bytes: 0,
        };
        // A tombstone goes in before the value it replaces goes out, so
        // that a lock-free reader never finds neither.
        if Codec::is_tombstone(&entry.bytes) {
            let mut tombstones = self.tombstones();
            tombstones.insert(key.to_owned(), entry);
            self.tombstone_count
                .store(tombstones.len(), Ordering::Release);
            drop(tombstones);
            self.entries.remove(key);
        } else {
            self.entries.insert(key.to_owned(), entry);
        }
        self.count_writes(1);
    }

    /// Counts `n` writes (entries or tag records), and sweeps every
    /// `sweep_every` of them: tag records are written on every tagged miss,
    /// stored or not, so they too must bring the sweep that bounds them.
    fn count_writes(&self, n: u64) {
        let before = self.writes.fetch_add(n, Ordering::Relaxed);
        if before / self.sweep_every != (before + n) / self.sweep_every {
            self.sweep();
        }
    }

    /// Removes every expired entry, and from the tag sets the keys that
    /// are no longer held.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        self.entries.retain(|_, entry| entry.expires_at > now);
        {
            let mut tombstones = self.tombstones();
            tombstones.retain(|_, entry| entry.expires_at > now);
            self.tombstone_count
                .store(tombstones.len(), Ordering::Release);
        }
        let now_ms = now_unix_ms();
        let mut tags = self.tags.lock().unwrap_or_else(PoisonError::into_inner);
        tags.retain(|_, keys| {
            keys.retain(|key, record| {
                record.expiry > now_ms
                    && (now.saturating_duration_since(record.made) < self.record_grace
                        || self.holds(key, now))
            });
            !keys.is_empty()
        });
    }

    /// Whether `key` holds a value or a tombstone, without counting as a
    /// read for eviction.
    fn holds(&self, key: &str, now: Instant) -> bool {
        if self
            .entries
            .peek(key)
            .is_some_and(|entry| entry.expires_at > now)
        {
            return true;
        }
        self.tombstone_count.load(Ordering::Acquire) != 0
            && self
                .tombstones()
                .get(key)
                .is_some_and(|entry| entry.expires_at > now)
    }

    pub(crate) fn entry_count(&self) -> usize {
        self.entries.len()
    }

    /// The value at `key` (`Some(None)`: a stored absence), if it holds
    /// one that is unexpired, at most `max_value_bytes` as stored, and
    /// decodes as a `T`: cloned from the entry's decoded value, which the
    /// first such read keeps. `None` for anything else (a miss, a
    /// tombstone, an entry of another type or that does not decode),
    /// which a read of the bytes then handles.
    pub(crate) fn get_decoded<T>(
        &self,
        key: &str,
        codec: Codec,
        max_value_bytes: usize,
    ) -> Option<Option<T>>
    where
        T: DeserializeOwned + Clone + Send + Sync + 'static,
    {
        let entry = self.entries.get(key)?;
        if entry.expires_at <= Instant::now() {
            return None;
        }
        if let Some(decoded) = &entry.decoded {
            // Another type's entry: its bytes are decoded by the caller.
            return decoded.downcast_ref::<Option<T>>().cloned();
        }
        if entry.bytes.len() > max_value_bytes {
            return None;
        }
        let (value, heap) = match codec.decode_weighed::<T>(&entry.bytes) {
            Ok((codec::Entry::Value(value, _), heap)) => (value, heap),
            _ => return None,
        };
        // The `Arc`'s counts and the `Option<T>` it holds, and what that holds.
        let bytes = weigh::allocation(16 + size_of::<Option<T>>()) + heap;
        self.keep_decoded(key, &entry, Arc::new(value.clone()), bytes as u64);
        Some(value)
    }

    /// Replaces `key`'s entry `read`, if it still holds it, by one that
    /// also holds `decoded`, weighed `bytes` more; not if that entry would
    /// weigh over an eighth of a shard of the store (it would not be held
    /// at all, and its value would be lost).
    fn keep_decoded(
        &self,
        key: &str,
        read: &Entry,
        decoded: Arc<dyn Any + Send + Sync>,
        bytes: u64,
    ) {
        // Under the key's write lock: a write that came since the read
        // replaced its bytes, one that comes later replaces this entry.
        let _write = self.write_lock(key);
        let Some(current) = self.entries.peek(key) else {
            return;
        };
        if !Arc::ptr_eq(&current.bytes, &read.bytes) || current.decoded.is_some() {
            return;
        }
        let kept = Entry {
            decoded: Some(decoded),
            decoded_bytes: bytes,
            ..current
        };
        let key = key.to_owned();
        if self.weigher.weight(&key, &kept) > self.entries.shard_capacity() / 8 {
            return;
        }
        self.entries.insert(key, kept);
    }
}

impl Backend for MemoryBackend {
    async fn get(&self, key: &str, _limit: Option<usize>) -> Result<Option<Bytes>> {
        // Entries come only from this process's writes, which are bounded.
        Ok(self.live(key).map(|entry| Bytes::Shared(entry.bytes)))
    }

    async fn set(&self, key: &str, value: Arc<[u8]>, ttl: Duration) -> Result<()> {
        let _write = self.write_lock(key);
        self.insert(key, value, ttl);
        Ok(())
    }

    async fn set_if(
        &self,
        key: &str,
        seen: &Seen,
        value: Arc<[u8]>,
        ttl: Duration,
    ) -> Result<bool> {
        let expected = match seen {
            Seen::Nothing => None,
            Seen::Bytes(bytes) => Some(&**bytes),
            // Entries here come only from this process's bounded writes.
            Seen::Oversized | Seen::Unknown => return Ok(false),
        };
        let _write = self.write_lock(key);
        let current = self.live(key);
        if current.as_ref().map(|e| &*e.bytes) != expected {
            return Ok(false);
        }
        self.insert(key, value, ttl);
        Ok(true)
    }

    async fn tag(&self, keys: &[String], tag_keys: &[String], ttl: Duration) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let expiry =
            now_unix_ms().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        let mut tags = self.tags.lock().unwrap_or_else(PoisonError::into_inner);
        for tag_key in tag_keys {
            let members = tags.entry(tag_key.clone()).or_default();
            for key in keys {
                // Every record raises the expiry (as on Redis), so that
                // `untag` sees any record made since a batch was read.
                let made = Instant::now();
                let recorded = members
                    .entry(key.clone())
                    .or_insert(Record { expiry: 0, made });
                recorded.expiry = expiry.max(recorded.expiry + 1);
                recorded.made = made;
            }
        }
        drop(tags);
        self.count_writes((keys.len() * tag_keys.len()) as u64);
        Ok(())
    }

    /// All members at once: nothing here blocks another process, and a
    /// sorted batch of a large set would cost a sort per batch.
    async fn tagged(&self, tag_key: &str, _limit: usize) -> Result<Vec<(String, u64)>> {
        let tags = self.tags.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(tags
            .get(tag_key)
            .map(|keys| keys.iter().map(|(k, r)| (k.clone(), r.expiry)).collect())
            .unwrap_or_default())
    }

    async fn get_many(&self, keys: &[String], limit: Option<usize>) -> Result<Vec<Option<Bytes>>> {
        let mut found = Vec::with_capacity(keys.len());
        for key in keys {
            found.push(self.get(key, limit).await?);
        }
        Ok(found)
    }

    async fn set_many_if(&self, stores: &[StoreIf]) -> Result<Vec<bool>> {
        let mut stored = Vec::with_capacity(stores.len());
        for store in stores {
            let value = store.value.clone();
            stored.push(
                self.set_if(&store.key, &store.seen, value, store.ttl)
                    .await?,
            );
        }
        Ok(stored)
    }

    async fn set_many(&self, entries: &[(String, Arc<[u8]>)], ttl: Duration) -> Result<()> {
        for (key, value) in entries {
            let _write = self.write_lock(key);
            self.insert(key, value.clone(), ttl);
        }
        Ok(())
    }

    async fn drain_tag(&self, tag_key: &str, drain_key: &str) -> Result<bool> {
        let mut tags = self.tags.lock().unwrap_or_else(PoisonError::into_inner);
        // An empty set is no set, as on Redis.
        if tags.get(drain_key).is_some_and(HashMap::is_empty) {
            tags.remove(drain_key);
        }
        if tags.contains_key(drain_key) {
            return Ok(!tags.contains_key(tag_key));
        }
        if let Some(members) = tags.remove(tag_key) {
            tags.insert(drain_key.to_owned(), members);
        }
        Ok(true)
    }

    async fn untag(&self, tag_key: &str, members: &[(String, u64)]) -> Result<()> {
        let mut tags = self.tags.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(keys) = tags.get_mut(tag_key) {
            for (key, expiry) in members {
                if keys.get(key).map(|r| r.expiry) == Some(*expiry) {
                    keys.remove(key);
                }
            }
            if keys.is_empty() {
                tags.remove(tag_key);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(60);

    /// A backend that keeps at most 64 entries.
    fn of_64_entries() -> MemoryBackend {
        MemoryBackend::new(
            MemoryConfig {
                max_entries: 64,
                ..MemoryConfig::default()
            },
            Duration::ZERO,
        )
    }

    /// Tag records of keys that no longer hold anything (evicted, here) go
    /// at the next sweep once past the grace: the records stay
    /// proportional to the entries, not to every key ever tagged.
    #[tokio::test]
    async fn tag_records_stay_proportional_to_the_entries() {
        let m = of_64_entries();
        let ttl = Duration::from_secs(3600);
        for n in 0..5_000 {
            let key = format!("k{n}");
            m.tag(std::slice::from_ref(&key), &["t".to_owned()], ttl)
                .await
                .unwrap();
            m.set(&key, bytes("v"), ttl).await.unwrap();
        }
        m.sweep();
        let records = m.tagged("t", usize::MAX).await.unwrap();
        assert!(
            records.len() <= 64,
            "{} records for 64 entries",
            records.len()
        );
        assert!(records.iter().all(|(key, _)| m.holds(key, Instant::now())));
    }

    /// Records of misses that store nothing (`None` without `cache_none`,
    /// an `Err`) are swept too, without any store to bring the sweep.
    #[tokio::test]
    async fn tag_records_without_stores_are_swept() {
        let m = of_64_entries();
        for n in 0..5_000 {
            m.tag(
                &[format!("k{n}")],
                &["t".to_owned()],
                Duration::from_secs(3600),
            )
            .await
            .unwrap();
        }
        let records = m.tagged("t", usize::MAX).await.unwrap();
        assert!(records.len() <= 64, "{} records kept", records.len());
    }

    /// As on Redis: recording no key makes no set, and an emptied drain is
    /// no drain, so the next invalidation moves its tag's set at once.
    #[tokio::test]
    async fn empty_sets_do_not_exist() {
        let m = MemoryBackend::new(MemoryConfig::default(), GRACE);
        let ttl = Duration::from_secs(60);
        m.tag(&[], &["t".to_owned()], ttl).await.unwrap();
        assert!(m.drain_tag("t", "d").await.unwrap());
        assert!(m.tagged("d", usize::MAX).await.unwrap().is_empty());
        m.tag(&["k".to_owned()], &["t".to_owned()], ttl)
            .await
            .unwrap();
        assert!(m.drain_tag("t", "d").await.unwrap(), "moved");
        let drained = m.tagged("d", usize::MAX).await.unwrap();
        assert_eq!(drained.len(), 1);
        m.untag("d", &drained).await.unwrap();
        m.tag(&["k".to_owned()], &["t".to_owned()], ttl)
            .await
            .unwrap();
        assert!(
            m.drain_tag("t", "d").await.unwrap(),
            "the emptied drain is gone"
        );
        assert_eq!(m.tagged("d", usize::MAX).await.unwrap().len(), 1);
    }

    fn bytes(s: &str) -> Arc<[u8]> {
        Arc::from(s.as_bytes())
    }

    #[tokio::test]
    async fn entries_expire_and_are_swept() {
        let m = MemoryBackend::new(
            MemoryConfig {
                max_entries: 100,
                ..MemoryConfig::default()
            },
            GRACE,
        );
        m.set("short", bytes("a"), Duration::from_millis(20))
            .await
            .unwrap();
        m.set("long", bytes("b"), Duration::from_secs(60))
            .await
            .unwrap();
        assert!(m.get("short", None).await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(m.get("short", None).await.unwrap().is_none(), "expired");
        m.set("unread", bytes("c"), Duration::from_millis(1))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        m.sweep();
        assert_eq!(m.entry_count(), 1, "only the unexpired entry is left");
    }

    #[tokio::test]
    async fn a_rewrite_takes_the_new_ttl() {
        let m = MemoryBackend::new(MemoryConfig::default(), GRACE);
        m.set("k", bytes("a"), Duration::from_millis(10))
            .await
            .unwrap();
        m.set("k", bytes("b"), Duration::from_secs(60))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(m.get("k", None).await.unwrap().as_deref(), Some(&b"b"[..]));
    }

    #[tokio::test]
    async fn set_if_compares_with_the_live_entry() {
        let m = MemoryBackend::new(MemoryConfig::default(), GRACE);
        assert!(m
            .set_if("k", &Seen::Nothing, bytes("a"), Duration::from_secs(60))
            .await
            .unwrap());
        assert!(!m
            .set_if("k", &Seen::Nothing, bytes("b"), Duration::from_secs(60))
            .await
            .unwrap());
        assert!(m
            .set_if(
                "k",
                &Seen::Bytes(Bytes::Owned(b"a".to_vec())),
                bytes("c"),
                Duration::from_millis(10)
            )
            .await
            .unwrap());
        assert!(!m
            .set_if(
                "k",
                &Seen::Bytes(Bytes::Owned(b"a".to_vec())),
                bytes("d"),
                Duration::from_secs(60)
            )
            .await
            .unwrap());
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(
            m.set_if("k", &Seen::Nothing, bytes("e"), Duration::from_secs(60))
                .await
                .unwrap(),
            "expired counts as absent"
        );
        assert_eq!(m.get("k", None).await.unwrap().as_deref(), Some(&b"e"[..]));
    }

    #[tokio::test]
    async fn size_stays_bounded() {
        let m = MemoryBackend::new(
            MemoryConfig {
                max_entries: 1000,
                ..MemoryConfig::default()
            },
            GRACE,
        );
        for i in 0..20_000 {
            m.set(&format!("k{i}"), bytes("v"), Duration::from_secs(60))
                .await
                .unwrap();
        }
        assert!(m.entry_count() <= 1000, "{}", m.entry_count());
    }

    #[tokio::test]
    async fn bytes_stay_bounded() {
        let max_bytes = 8 << 20;
        let m = MemoryBackend::new(
            MemoryConfig {
                max_entries: 100_000,
                max_bytes,
            },
            GRACE,
        );
        let value: Arc<[u8]> = vec![7u8; 64 * 1024].into();
        for i in 0..1_000 {
            m.set(&format!("k{i}"), value.clone(), Duration::from_secs(60))
                .await
                .unwrap();
        }
        let held = m.entry_count() as u64 * value.len() as u64;
        assert!(
            held <= max_bytes,
            "{} entries, {held} bytes",
            m.entry_count()
        );
        assert!(m.entry_count() >= 64, "still caches: {}", m.entry_count());
    }

    fn entry_of<T: serde::Serialize>(value: &T) -> Arc<[u8]> {
        Codec::Json.encode(value, None).unwrap().into()
    }

    /// A decoded copy counts in the byte bound: with every entry's value
    /// kept decoded (as large again as its bytes), the store holds at most
    /// `max_bytes` of both.
    #[tokio::test]
    async fn decoded_values_count_in_the_byte_bound() {
        let max_bytes = 8 << 20;
        let m = MemoryBackend::new(
            MemoryConfig {
                max_entries: 100_000,
                max_bytes,
            },
            GRACE,
        );
        let value = entry_of(&"x".repeat(16 * 1024));
        let ttl = Duration::from_secs(60);
        for i in 0..1_000 {
            let key = format!("k{i}");
            m.set(&key, value.clone(), ttl).await.unwrap();
            let read = m.get_decoded::<String>(&key, Codec::Json, usize::MAX);
            assert_eq!(read.flatten().map(|s| s.len()), Some(16 * 1024));
        }
        let kept = m
            .entries
            .iter()
            .filter(|(_, entry)| entry.decoded.is_some())
            .count() as u64;
        assert!(kept >= 64, "decoded copies kept: {kept}");
        let held = m.entry_count() as u64 * value.len() as u64 + kept * 16 * 1024;
        assert!(
            held <= max_bytes,
            "{} entries, {kept} decoded, {held} bytes",
            m.entry_count()
        );
    }

    /// A decoded copy is of the entry it was read from: one written since
    /// is decoded afresh, never shadowed by the older copy.
    #[tokio::test]
    async fn a_decoded_copy_goes_with_its_entry() {
        let m = MemoryBackend::new(MemoryConfig::default(), GRACE);
        let ttl = Duration::from_secs(60);
        m.set("k", entry_of(&1u32), ttl).await.unwrap();
        assert_eq!(
            m.get_decoded::<u32>("k", Codec::Json, usize::MAX),
            Some(Some(1))
        );
        assert_eq!(
            m.get_decoded::<u32>("k", Codec::Json, usize::MAX),
            Some(Some(1))
        );
        m.set("k", entry_of(&2u32), ttl).await.unwrap();
        assert_eq!(
            m.get_decoded::<u32>("k", Codec::Json, usize::MAX),
            Some(Some(2))
        );
        // Read as another type: not served from the copy, nor decodable.
        assert_eq!(m.get_decoded::<String>("k", Codec::Json, usize::MAX), None);
        // A tombstone is no value.
        m.set("k", Codec::Json.encode_tombstone().into(), ttl)
            .await
            .unwrap();
        assert_eq!(m.get_decoded::<u32>("k", Codec::Json, usize::MAX), None);
    }
}
