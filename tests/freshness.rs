//! `stale` and `early` on a real Redis: a hot key under steady load is
//! recomputed about once per TTL period, in the background, so after the
//! first call every call is a hit; a failing refresh keeps the old value
//! until its hard expiry.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use redis_cached::{redis_cached, Cache};
use support::RedisServer;

static STALE_RUNS: AtomicU32 = AtomicU32::new(0);
static EARLY_RUNS: AtomicU32 = AtomicU32::new(0);
static FLAKY_RUNS: AtomicU32 = AtomicU32::new(0);
static FLAKY_FAILS: AtomicBool = AtomicBool::new(false);

#[redis_cached(key = "hot-stale:<id>", ttl = 1, stale = "10s", cache = cache)]
async fn hot_stale(cache: Cache, id: u32) -> u32 {
    STALE_RUNS.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    id
}

#[redis_cached(key = "hot-early:<id>", ttl = 1, early = 1.0, cache = cache)]
async fn hot_early(cache: Cache, id: u32) -> u32 {
    EARLY_RUNS.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    id
}

#[redis_cached(key = "flaky:<id>", ttl = "300ms", stale = "1s", cache = cache)]
async fn flaky(cache: Cache, id: u32) -> Result<u32, String> {
    let run = FLAKY_RUNS.fetch_add(1, Ordering::SeqCst);
    if FLAKY_FAILS.load(Ordering::SeqCst) {
        Err("database down".into())
    } else {
        Ok(id * 100 + run)
    }
}

/// Calls `f` from 4 tasks, 125 calls/s each, for `duration`; returns the
/// number of calls and the slowest one.
async fn steady_load<F, Fut>(f: F, duration: Duration) -> (u32, Duration)
where
    F: Fn() -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = u32> + Send,
{
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let f = f.clone();
            tokio::spawn(async move {
                let (mut calls, mut worst) = (0, Duration::ZERO);
                let end = Instant::now() + duration;
                let mut tick = tokio::time::interval(Duration::from_millis(8));
                while Instant::now() < end {
                    tick.tick().await;
                    let start = Instant::now();
                    assert_eq!(f().await, 1);
                    worst = worst.max(start.elapsed());
                    calls += 1;
                }
                (calls, worst)
            })
        })
        .collect();
    let mut total = (0, Duration::ZERO);
    for task in tasks {
        let (calls, worst) = task.await.expect("load task");
        total = (total.0 + calls, total.1.max(worst));
    }
    total
}

const LOAD: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_refreshes_a_hot_key_in_the_background() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).unwrap();
    assert_eq!(
        hot_stale(cache.clone(), 1).await,
        1,
        "cold: computed inline"
    );
    let c = cache.clone();
    let (calls, worst) = steady_load(move || hot_stale(c.clone(), 1), LOAD).await;
    let runs = STALE_RUNS.load(Ordering::SeqCst);
    let stats = cache.stats();
    println!("stale: {calls} calls in {LOAD:?}, body ran {runs} times (ttl 1 s, body 100 ms), slowest call {worst:?}; {stats:?}");
    assert_eq!(
        stats.misses, 1,
        "after the cold call, every call is a hit: nobody waits for a recompute"
    );
    assert!(stats.stale_serves >= 3 && stats.refreshes >= 3, "{stats:?}");
    assert!((4..=8).contains(&runs), "about once per TTL period: {runs}");
    assert_eq!(stats.refresh_failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_refreshes_a_hot_key_before_it_expires() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).unwrap();
    assert_eq!(hot_early(cache.clone(), 1).await, 1);
    let c = cache.clone();
    let (calls, worst) = steady_load(move || hot_early(c.clone(), 1), LOAD).await;
    let runs = EARLY_RUNS.load(Ordering::SeqCst);
    let stats = cache.stats();
    println!("early: {calls} calls in {LOAD:?}, body ran {runs} times (ttl 1 s, body 100 ms), slowest call {worst:?}; {stats:?}");
    assert!(
        stats.misses <= 2,
        "refreshed before expiry, so (nearly) every call hits: {stats:?}"
    );
    assert!(
        stats.early_refreshes >= 3 && stats.refreshes >= 3,
        "{stats:?}"
    );
    assert!((4..=9).contains(&runs), "about once per TTL period: {runs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_refresh_keeps_serving_the_old_value_until_it_expires() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).unwrap();
    let first = flaky(cache.clone(), 3)
        .await
        .expect("first computation succeeds");
    FLAKY_FAILS.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Past the TTL: served stale, while the refresh fails in the background.
    assert_eq!(flaky(cache.clone(), 3).await, Ok(first));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(flaky(cache.clone(), 3).await, Ok(first), "stale-if-error");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stats = cache.stats();
    assert!(stats.refresh_failures >= 1, "{stats:?}");
    // Past the hard expiry (300 ms + 1 s) the old value is gone.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(flaky(cache.clone(), 3).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_with_lock_refreshes_once_across_caches() {
    static RUNS: AtomicU32 = AtomicU32::new(0);

    #[redis_cached(key = "shared:<id>", ttl = "300ms", stale = "10s", lock = true, cache = cache)]
    async fn shared(cache: Cache, id: u32) -> u32 {
        RUNS.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        id
    }

    let server = RedisServer::start();
    // Three handles stand in for three processes.
    let caches: Vec<Cache> = (0..3)
        .map(|_| Cache::redis(&server.url()).unwrap())
        .collect();
    assert_eq!(shared(caches[0].clone(), 1).await, 1);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let calls: Vec<_> = caches
        .iter()
        .map(|c| tokio::spawn(shared(c.clone(), 1)))
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), 1);
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        RUNS.load(Ordering::SeqCst),
        2,
        "one initial run, one refresh for all three"
    );
    let stale_serves: u64 = caches.iter().map(|c| c.stats().stale_serves).sum();
    assert_eq!(stale_serves, 3);
}
