//! Hot-key benchmark: 4 tasks call one key 500 times a second in all for
//! 10 s, with `ttl = 1s` and a 100 ms body, under `stale` and under `early`,
//! and, as the baseline in the same run, with neither. Prints how often the
//! body ran and the callers' latencies: with `stale` or `early` no caller
//! should wait for a recomputation, so the worst call stays near a hit's.
//!
//! `cargo bench --bench hot_key` (needs `redis-server` on the PATH).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use redis_cached::{redis_cached, Cache};

static RUNS: AtomicU32 = AtomicU32::new(0);
const BODY: Duration = Duration::from_millis(100);
const LOAD: Duration = Duration::from_secs(10);

async fn body(id: u32) -> u32 {
    RUNS.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(BODY).await;
    id
}

#[redis_cached(key = "plain:<id>", ttl = 1, cache = cache)]
async fn plain(cache: Cache, id: u32) -> u32 {
    body(id).await
}

#[redis_cached(key = "stale:<id>", ttl = 1, stale = "10s", cache = cache)]
async fn stale(cache: Cache, id: u32) -> u32 {
    body(id).await
}

#[redis_cached(key = "early:<id>", ttl = 1, early = 1.0, cache = cache)]
async fn early(cache: Cache, id: u32) -> u32 {
    body(id).await
}

async fn load(cache: Cache, which: &'static str) -> Vec<Duration> {
    let call = move |cache: Cache| async move {
        match which {
            "stale" => stale(cache, 1).await,
            "early" => early(cache, 1).await,
            _ => plain(cache, 1).await,
        }
    };
    call(cache.clone()).await; // cold
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let end = Instant::now() + LOAD;
                let mut tick = tokio::time::interval(Duration::from_millis(8));
                while Instant::now() < end {
                    tick.tick().await;
                    let start = Instant::now();
                    call(cache.clone()).await;
                    latencies.push(start.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("load task"));
    }
    all.sort();
    all
}

fn main() {
    let server = support::RedisServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    println!("one key, 4 tasks x 125 calls/s for {LOAD:?}, ttl 1 s, body {BODY:?}");
    for which in ["none", "stale", "early"] {
        let cache = Cache::redis(&server.url()).expect("valid URL");
        RUNS.store(0, Ordering::SeqCst);
        let latencies = runtime.block_on(load(cache.clone(), which));
        let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
        let stats = cache.stats();
        let slow = latencies.iter().filter(|l| **l >= BODY).count();
        println!(
            "{which:<6} body ran {:>2} times; {} calls: p50 {:.2?}, p99 {:.2?}, max {:.2?}; calls that waited >= body: {slow}; misses {}, stale serves {}, early refreshes {}",
            RUNS.load(Ordering::SeqCst),
            latencies.len(),
            pct(0.5),
            pct(0.99),
            latencies.last().copied().unwrap_or_default(),
            stats.misses,
            stats.stale_serves,
            stats.early_refreshes,
        );
    }
}
