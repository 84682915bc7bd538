//! The global cache: without one, cached functions run uncached (and warn
//! once); after `set_global`, they cache. One test, since the global is
//! process-wide.

use std::sync::atomic::{AtomicU32, Ordering};

use redis_cached::{redis_cached, Cache};

static CALLS: AtomicU32 = AtomicU32::new(0);

#[redis_cached(key = "global:<id>")]
async fn double(id: u32) -> u32 {
    CALLS.fetch_add(1, Ordering::SeqCst);
    id * 2
}

#[tokio::test]
async fn uncached_without_a_global_then_cached() {
    assert!(redis_cached::global().is_none());
    assert_eq!(double(2).await, 4);
    assert_eq!(double(2).await, 4);
    assert_eq!(
        CALLS.load(Ordering::SeqCst),
        2,
        "no cache: every call computes"
    );

    let cache = Cache::in_memory();
    redis_cached::set_global(cache.clone());
    assert_eq!(double(2).await, 4);
    assert_eq!(double(2).await, 4);
    assert_eq!(
        CALLS.load(Ordering::SeqCst),
        3,
        "global cache: second call hits"
    );
    assert_eq!(cache.get::<u32>("global:2").await, Some(4));
    assert_eq!(cache.stats().hits, 2);
}
