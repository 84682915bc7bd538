//! Near-tier benchmark, in one run against one server: a near hit of a
//! `#[redis_cached(near = "…")]` function, the same function's Redis hit
//! (no `near`), the in-memory backend's hit, the hand-written `GET` +
//! `serde_json::from_slice`, and redis-rs's own experimental client-side
//! cache (`cache-aio`, RESP3) answering that `GET` from memory, + decode.
//! Sequential p50 and 64-task throughput, in interleaved rounds; then how
//! the process's memory grows with near entries.
//!
//! Targets: near hit p50 below redis-rs's cache's, and at least 1.5x its
//! 64-task throughput; at least 100x faster than the Redis hit
//! sequentially.
//!
//! `cargo bench --bench near` (needs `redis-server` on the PATH; the
//! benchmark starts its own on a free port).

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{median, user, verdict, User};
use redis::aio::MultiplexedConnection;
use redis_cached::{redis_cached, Cache};

#[derive(Clone)]
struct Repo {
    cache: Cache,
}

impl Repo {
    #[redis_cached(key = "user:<id>", ttl = 3600, near = "10m", cache = self.cache)]
    async fn near_user(&self, id: u64) -> Result<User, String> {
        Ok(user(id))
    }

    #[redis_cached(key = "user:<id>", ttl = 3600, cache = self.cache)]
    async fn redis_user(&self, id: u64) -> Result<User, String> {
        Ok(user(id))
    }
}

const KEYS: u64 = 100;
const SEQ_ROUNDS: usize = 9;
const SEQ_OPS: usize = 2_000;
const TASKS: usize = 64;
const TASK_OPS: usize = 2_000;
const CONC_ROUNDS: usize = 9;

const SIDES: [&str; 5] = [
    "near hit (near = \"10m\")",
    "redis-rs cache-aio GET + from_slice",
    "in-memory backend hit",
    "hand-written GET + from_slice",
    "Redis hit (no near)",
];
const NEAR: usize = 0;
const ANCHOR: usize = 1;
const REDIS: usize = 4;

struct Sides {
    near: Repo,
    memory: Repo,
    raw: MultiplexedConnection,
    client_cached: MultiplexedConnection,
}

async fn get_raw(conn: &MultiplexedConnection, id: u64) -> User {
    let mut conn = conn.clone();
    let bytes: Vec<u8> = redis::cmd("GET")
        .arg(format!("raw:user:{id}"))
        .query_async(&mut conn)
        .await
        .expect("GET");
    serde_json::from_slice(&bytes).expect("JSON")
}

async fn call(side: usize, sides: &Sides, id: u64) {
    match side {
        0 => black_box(sides.near.near_user(id).await.expect("hit")),
        1 => black_box(get_raw(&sides.client_cached, id).await),
        2 => black_box(sides.memory.redis_user(id).await.expect("hit")),
        3 => black_box(get_raw(&sides.raw, id).await),
        _ => black_box(sides.near.redis_user(id).await.expect("hit")),
    };
}

fn main() {
    let server = support::RedisServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(compare(&server));
    runtime.block_on(memory_per_entry(&server));
}

async fn compare(server: &support::RedisServer) {
    let near = Repo {
        cache: Cache::redis(&server.url()).expect("valid URL"),
    };
    let memory = Repo {
        cache: Cache::in_memory(),
    };
    let raw = server
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let resp3 = redis::Client::open(format!("{}?protocol=resp3", server.url())).expect("URL");
    let config =
        redis::AsyncConnectionConfig::new().set_cache_config(redis::caching::CacheConfig::new());
    let client_cached = resp3
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("connect with client-side caching");
    let sides = Arc::new(Sides {
        near,
        memory,
        raw,
        client_cached,
    });
    for id in 0..KEYS {
        sides.near.redis_user(id).await.expect("filled");
        sides.memory.redis_user(id).await.expect("filled");
        let json = serde_json::to_vec(&user(id)).expect("JSON");
        let _: () = server
            .cmd(redis::cmd("SET").arg(format!("raw:user:{id}")).arg(json))
            .await;
    }
    // Warm both client-side caches: every key read until it is held.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sides.near.cache.near_entry_count().unwrap_or(0) < KEYS as usize {
        for id in 0..KEYS {
            sides.near.near_user(id).await.expect("hit");
            get_raw(&sides.client_cached, id).await;
        }
        assert!(Instant::now() < deadline, "the near tier never filled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let n = SIDES.len();
    let rounds = common::sequential_p50s(n, SEQ_ROUNDS, SEQ_OPS, |side, i| {
        call(side, &sides, i as u64 % KEYS)
    })
    .await;
    let mut p50s: Vec<Vec<f64>> = rounds
        .iter()
        .map(|side| side.iter().map(Duration::as_secs_f64).collect())
        .collect();
    let mut near_vs: Vec<Vec<f64>> = rounds
        .iter()
        .map(|side| {
            side.iter()
                .zip(&rounds[NEAR])
                .map(|(p50, near)| p50.as_secs_f64() / near.as_secs_f64())
                .collect()
        })
        .collect();
    println!("Sequential p50 ({SEQ_ROUNDS} rounds x {SEQ_OPS} calls per side; median of rounds)");
    for (side, name) in SIDES.iter().enumerate() {
        println!("  {name:<38} {:>9.3} µs", median(&mut p50s[side]) * 1e6);
    }
    for side in 1..n {
        println!(
            "  near hit is {:>8.1}x faster than {}",
            median(&mut near_vs[side]),
            SIDES[side]
        );
    }

    let mut rates = vec![Vec::new(); n];
    let mut near_over = vec![Vec::new(); n];
    for round in 0..CONC_ROUNDS {
        let mut round_rate = vec![0.0; n];
        for k in 0..n {
            let side = (round + k) % n;
            let ops = if side >= 3 { TASK_OPS / 10 } else { TASK_OPS };
            let start = Instant::now();
            let tasks: Vec<_> = (0..TASKS)
                .map(|t| {
                    let sides = Arc::clone(&sides);
                    tokio::spawn(async move {
                        for i in 0..ops {
                            call(side, &sides, (t * ops + i) as u64 % KEYS).await;
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.expect("task");
            }
            round_rate[side] = (TASKS * ops) as f64 / start.elapsed().as_secs_f64();
            rates[side].push(round_rate[side]);
        }
        for side in 1..n {
            near_over[side].push(round_rate[NEAR] / round_rate[side]);
        }
    }
    println!("{TASKS} concurrent tasks ({CONC_ROUNDS} rounds; median of rounds)");
    for (side, name) in SIDES.iter().enumerate() {
        println!("  {name:<38} {:>12.0} ops/s", median(&mut rates[side]));
    }
    for side in 1..n {
        println!(
            "  near hit throughput {:>8.2}x {}",
            median(&mut near_over[side]),
            SIDES[side]
        );
    }

    let p50_near = median(&mut p50s[NEAR]);
    let p50_anchor = median(&mut p50s[ANCHOR]);
    let throughput = median(&mut near_over[ANCHOR]);
    let faster = median(&mut near_vs[REDIS]);
    println!("Targets");
    println!(
        "  near p50 {:.3} µs < redis-rs cache-aio p50 {:.3} µs   {}",
        p50_near * 1e6,
        p50_anchor * 1e6,
        verdict(p50_near < p50_anchor)
    );
    println!(
        "  64-task throughput {throughput:.2}x redis-rs cache-aio, target >= 1.50x   {}",
        verdict(throughput >= 1.5)
    );
    println!(
        "  {faster:.0}x faster than the Redis hit sequentially, target >= 100x   {}",
        verdict(faster >= 100.0)
    );
    let stats = sides.near.cache.stats();
    println!(
        "  near cache stats: {} near hits, {} near misses, {} invalidations, {} flushes",
        stats.near_hits, stats.near_misses, stats.near_invalidations, stats.near_flushes
    );
}

/// The process's resident memory, from `/proc/self/statm` (Linux).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// How resident memory grows with near entries of the benchmark's row.
async fn memory_per_entry(server: &support::RedisServer) {
    const ENTRIES: u64 = 50_000;
    let repo = Repo {
        cache: Cache::builder(&server.url())
            .namespace("mem")
            .near_capacity(ENTRIES as usize * 2)
            .build()
            .expect("valid URL"),
    };
    repo.redis_user(0).await.expect("filled");
    let deadline = Instant::now() + Duration::from_secs(10);
    while repo.cache.stats().near_hits == 0 {
        repo.near_user(0).await.expect("hit");
        assert!(Instant::now() < deadline, "the near tier never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for id in 0..ENTRIES {
        repo.redis_user(id).await.expect("filled");
    }
    let before = resident_bytes();
    for pass in 0..2 {
        for id in 0..ENTRIES {
            repo.near_user(id).await.expect("hit");
        }
        let _ = pass; // the second pass decodes what the first kept
    }
    let after = resident_bytes();
    let held = repo.cache.near_entry_count().unwrap_or(0);
    match (before, after) {
        (Some(before), Some(after)) if held > 0 => println!(
            "Memory: {held} near entries (decoded rows of {} B as JSON) grew the process by {:.1} MB, {:.0} B per entry",
            serde_json::to_vec(&user(1)).expect("JSON").len(),
            after.saturating_sub(before) as f64 / 1e6,
            after.saturating_sub(before) as f64 / held as f64
        ),
        _ => println!("Memory: not measured (no /proc/self/statm, or nothing held)"),
    }
}
