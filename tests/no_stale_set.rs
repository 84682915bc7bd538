//! No stale set: a computation that began before an invalidation or a
//! write-through of its key must not overwrite the newer state. Each
//! interleaving is forced step by step, on both backends.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use redis_cached::{cache_put, redis_cached, Cache};
use support::backends::Env;
use tokio::sync::{oneshot, Notify};

per_backend!(
    fill_then_invalidate,
    fill_then_invalidate_many,
    invalidate_many_reaches_every_key,
    fill_then_write_through,
    fill_with_no_interference_stores,
);

/// A database row and a way to hold a query between reading it and
/// returning it.
struct Db {
    cache: Cache,
    row: AtomicU32,
    gate: Notify,
    reads: AtomicU32,
}

impl Db {
    fn new(cache: Cache) -> Arc<Self> {
        Arc::new(Db {
            cache,
            row: AtomicU32::new(1),
            gate: Notify::new(),
            reads: AtomicU32::new(0),
        })
    }

    /// Reads the row, signals `read`, then waits for the gate (if held).
    #[redis_cached(key = "row:<id>", cache = self.cache)]
    async fn load(&self, id: u32, read: Option<oneshot::Sender<()>>) -> u32 {
        let _ = id;
        let value = self.row.load(Ordering::SeqCst);
        self.reads.fetch_add(1, Ordering::SeqCst);
        if let Some(read) = read {
            let _ = read.send(());
            self.gate.notified().await;
        }
        value
    }

    #[cache_put(key = "row:<id>", cache = self.cache)]
    async fn update(&self, id: u32, value: u32) -> u32 {
        let _ = id;
        self.row.store(value, Ordering::SeqCst);
        value
    }
}

/// Starts a load that reads the row and then blocks; returns it once the
/// read happened.
async fn start_slow_load(db: &Arc<Db>) -> tokio::task::JoinHandle<u32> {
    let (read_tx, read_rx) = oneshot::channel();
    let db2 = db.clone();
    let task = tokio::spawn(async move { db2.load(1, Some(read_tx)).await });
    read_rx.await.expect("the load read the row");
    task
}

async fn fill_then_invalidate(env: &Env) {
    let db = Db::new(env.cache());
    let slow = start_slow_load(&db).await;
    // The row changes and the key is invalidated while the load is in flight.
    db.row.store(2, Ordering::SeqCst);
    db.cache.invalidate("row:1").await.expect("invalidate");
    db.gate.notify_one();
    assert_eq!(slow.await.unwrap(), 1, "the slow caller gets what it read");
    assert_eq!(
        db.cache.get::<u32>("row:1").await,
        None,
        "its old value was not stored"
    );
    assert_eq!(db.cache.stats().stale_sets_refused, 1);
    assert_eq!(db.load(1, None).await, 2, "the next call reads the new row");
    assert_eq!(db.cache.get::<u32>("row:1").await, Some(2), "and caches it");
}

async fn fill_then_invalidate_many(env: &Env) {
    let db = Db::new(env.cache());
    let slow = start_slow_load(&db).await;
    db.row.store(2, Ordering::SeqCst);
    // Its key among many, in more than one pipeline.
    let mut keys: Vec<String> = (2..1_100).map(|n| format!("row:{n}")).collect();
    keys.insert(700, "row:1".to_owned());
    db.cache
        .invalidate_many(&keys)
        .await
        .expect("invalidate_many");
    db.gate.notify_one();
    assert_eq!(slow.await.unwrap(), 1);
    assert_eq!(
        db.cache.get::<u32>("row:1").await,
        None,
        "its old value was not stored"
    );
    assert_eq!(db.cache.stats().stale_sets_refused, 1);
    assert_eq!(db.load(1, None).await, 2);
}

async fn invalidate_many_reaches_every_key(env: &Env) {
    let cache = env.cache();
    let keys: Vec<String> = (0..1_300).map(|n| format!("many:{n}")).collect();
    let ttl = std::time::Duration::from_secs(60);
    for key in &keys {
        cache.set(key, &1u32, ttl).await.expect("set");
    }
    cache.set("kept", &1u32, ttl).await.expect("set");
    cache.invalidate_many(&keys).await.expect("invalidate_many");
    for key in &keys {
        assert_eq!(cache.get::<u32>(key).await, None, "{key}");
    }
    assert_eq!(cache.get::<u32>("kept").await, Some(1), "no other key");
    assert_eq!(cache.stats().invalidations, keys.len() as u64);

    // A key the runtime API refuses: nothing is invalidated.
    cache.set("many:0", &2u32, ttl).await.expect("set");
    let refused = cache.invalidate_many(&["many:0", "bad~key"]).await;
    assert!(matches!(refused, Err(redis_cached::Error::InvalidKey(_))));
    assert_eq!(cache.get::<u32>("many:0").await, Some(2));
}

async fn fill_then_write_through(env: &Env) {
    let db = Db::new(env.cache());
    let slow = start_slow_load(&db).await;
    assert_eq!(db.update(1, 3).await, 3);
    db.gate.notify_one();
    assert_eq!(slow.await.unwrap(), 1);
    assert_eq!(
        db.cache.get::<u32>("row:1").await,
        Some(3),
        "the write-through survives"
    );
    assert_eq!(db.cache.stats().stale_sets_refused, 1);
    let reads = db.reads.load(Ordering::SeqCst);
    assert_eq!(db.load(1, None).await, 3);
    assert_eq!(
        db.reads.load(Ordering::SeqCst),
        reads,
        "served from the cache"
    );
}

async fn fill_with_no_interference_stores(env: &Env) {
    let db = Db::new(env.cache());
    let slow = start_slow_load(&db).await;
    db.gate.notify_one();
    assert_eq!(slow.await.unwrap(), 1);
    assert_eq!(db.cache.get::<u32>("row:1").await, Some(1));
    assert_eq!(db.cache.stats().stale_sets_refused, 0);
}
