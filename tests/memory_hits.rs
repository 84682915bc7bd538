//! Hits of the in-memory backend: a value type that is `Clone` is decoded
//! once per entry and cloned on later hits; any other is decoded on each
//! hit, as before; every write is seen by the next hit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis_cached::{cache_put, invalidate_call, redis_cached, Cache};
use serde::{Deserialize, Deserializer, Serialize};

/// A value whose decodes are counted (per test: each uses its own id range).
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Counted {
    id: u64,
    name: String,
}

static DECODES: AtomicUsize = AtomicUsize::new(0);

impl<'de> Deserialize<'de> for Counted {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            id: u64,
            name: String,
        }
        let raw = Raw::deserialize(de)?;
        DECODES.fetch_add(1, Ordering::SeqCst);
        Ok(Counted {
            id: raw.id,
            name: raw.name,
        })
    }
}

/// The same, not `Clone`.
#[derive(Debug, PartialEq, Serialize)]
struct Unclonable {
    id: u64,
}

static UNCLONABLE_DECODES: AtomicUsize = AtomicUsize::new(0);

impl<'de> Deserialize<'de> for Unclonable {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            id: u64,
        }
        let raw = Raw::deserialize(de)?;
        UNCLONABLE_DECODES.fetch_add(1, Ordering::SeqCst);
        Ok(Unclonable { id: raw.id })
    }
}

struct Repo {
    cache: Cache,
    version: AtomicUsize,
}

impl Repo {
    fn new(cache: Cache) -> Repo {
        Repo {
            cache,
            version: AtomicUsize::new(0),
        }
    }

    fn row(&self, id: u64) -> Counted {
        Counted {
            id,
            name: format!("v{}", self.version.load(Ordering::SeqCst)),
        }
    }

    #[redis_cached(key = "counted:<id>", ttl = 60, cache = self.cache)]
    async fn counted(&self, id: u64) -> Counted {
        self.row(id)
    }

    #[redis_cached(key = "counted:<id>", ttl = 60, cache = self.cache)]
    async fn counted_opt(&self, id: u64) -> Option<Counted> {
        Some(self.row(id))
    }

    #[cache_put(key = "counted:<id>", ttl = 60, cache = self.cache)]
    async fn put_counted(&self, id: u64) -> Counted {
        self.version.fetch_add(1, Ordering::SeqCst);
        self.row(id)
    }

    #[redis_cached(key = "unclonable:<id>", ttl = 60, cache = self.cache)]
    async fn unclonable(&self, id: u64) -> Unclonable {
        Unclonable { id }
    }

    #[redis_cached(key = "generic:<id>", ttl = 60, cache = self.cache)]
    async fn generic<T>(&self, id: u64, value: T) -> T
    where
        T: Serialize + serde::de::DeserializeOwned + Send + 'static,
    {
        let _ = id;
        value
    }
}

/// A `Clone` value is decoded once, by its first hit: later hits clone
/// the kept copy (before, each hit decoded the entry).
#[tokio::test]
async fn a_clone_value_is_decoded_once_per_entry() {
    let repo = Repo::new(Cache::in_memory());
    assert_eq!(repo.counted(1).await, repo.row(1));
    let before = DECODES.load(Ordering::SeqCst);
    for _ in 0..10 {
        assert_eq!(repo.counted(1).await, repo.row(1));
    }
    let decodes = DECODES.load(Ordering::SeqCst) - before;
    assert!(decodes <= 1, "{decodes} decodes for 10 hits");
    let stats = repo.cache.stats();
    assert_eq!((stats.hits, stats.misses), (10, 1));
}

/// A value that is not `Clone` is still cached, and decoded on each hit.
#[tokio::test]
async fn a_value_that_is_not_clone_decodes_on_each_hit() {
    let repo = Repo::new(Cache::in_memory());
    assert_eq!(repo.unclonable(7).await, Unclonable { id: 7 });
    let before = UNCLONABLE_DECODES.load(Ordering::SeqCst);
    for _ in 0..5 {
        assert_eq!(repo.unclonable(7).await, Unclonable { id: 7 });
    }
    assert_eq!(UNCLONABLE_DECODES.load(Ordering::SeqCst) - before, 5);
    assert_eq!(repo.cache.stats().hits, 5);
}

/// A generic function whose value type has no `Clone` bound compiles and
/// hits as any other.
#[tokio::test]
async fn a_generic_value_hits() {
    let repo = Repo::new(Cache::in_memory());
    assert_eq!(repo.generic(1, "a".to_owned()).await, "a");
    assert_eq!(repo.generic(1, "b".to_owned()).await, "a", "a hit");
    assert_eq!(repo.cache.stats().hits, 1);
}

/// The kept copy never outlives its entry: a write-through, an
/// invalidation or an expiry is seen by the next hit.
#[tokio::test]
async fn every_write_is_seen_by_the_next_hit() {
    let repo = Repo::new(Cache::in_memory());
    repo.counted(2).await;
    assert_eq!(repo.counted(2).await.name, "v0");
    assert_eq!(repo.counted(2).await.name, "v0", "from the kept copy");
    repo.put_counted(2).await;
    assert_eq!(repo.counted(2).await.name, "v1", "the write-through");
    assert_eq!(repo.counted(2).await.name, "v1");
    repo.version.fetch_add(1, Ordering::SeqCst);
    invalidate_call(repo.counted(2)).await.expect("invalidated");
    assert_eq!(repo.counted(2).await.name, "v2", "recomputed");
    assert_eq!(repo.counted(2).await.name, "v2");
    let stats = repo.cache.stats();
    assert_eq!(stats.misses, 2, "{stats}");
}

/// An entry expires with its kept copy.
#[tokio::test]
async fn the_kept_copy_expires_with_its_entry() {
    let repo = Repo::new(Cache::in_memory());
    repo.cache
        .set("counted:3", &repo.row(3), Duration::from_millis(50))
        .await
        .expect("set");
    assert_eq!(repo.counted(3).await.name, "v0");
    assert_eq!(repo.counted(3).await.name, "v0");
    repo.version.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert_eq!(repo.counted(3).await.name, "v1", "expired: recomputed");
}

/// Two functions that share a key with different result types each get
/// their own: the kept copy is of the stored value, not of a result.
#[tokio::test]
async fn functions_sharing_a_key_read_the_same_value() {
    let repo = Repo::new(Cache::builder("memory://").namespace("ns").build().unwrap());
    assert_eq!(repo.counted(4).await, repo.row(4));
    assert_eq!(repo.counted_opt(4).await, Some(repo.row(4)));
    assert_eq!(repo.counted(4).await, repo.row(4));
    assert_eq!(repo.counted_opt(4).await, Some(repo.row(4)));
    assert_eq!(repo.cache.stats().hits, 3);
}
