//! In-process hits, side by side in one run: moka 0.12's
//! `future::Cache::get` (which clones the value), the `cached` crate's
//! in-memory `#[cached]` (async), this crate's in-memory backend
//! (`Cache::in_memory()`, the default) and its near tier (`near = "…"`),
//! each answering a hit of a 4-field `User` among 100 keys. Sequential p50
//! and 64-task throughput in interleaved rounds, each against moka's in
//! the same round; then the memory one in-memory entry of that `User`
//! holds, for 100 000 entries.
//!
//! Targets: the in-memory hit and the near hit each at most 1.2x moka's
//! sequential p50, and at least moka's 64-task throughput.
//!
//! `cargo bench --bench in_process` (needs `redis-server` on the PATH for
//! the near tier; the benchmark starts its own on a free port).

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{median, user, verdict, User};
use redis_cached::{redis_cached, Cache, MemoryConfig};

#[derive(Clone)]
struct Repo {
    cache: Cache,
}

impl Repo {
    #[redis_cached(key = "user:<id>", ttl = 3600, cache = self.cache)]
    async fn user(&self, id: u64) -> User {
        user(id)
    }

    #[redis_cached(key = "user:<id>", ttl = 3600, near = "10m", cache = self.cache)]
    async fn near_user(&self, id: u64) -> User {
        user(id)
    }
}

#[cached::proc_macro::cached(max_size = 1000)]
async fn cached_crate_user(id: u64) -> User {
    user(id)
}

const KEYS: u64 = 100;
const SEQ_ROUNDS: usize = 9;
const SEQ_OPS: usize = 20_000;
const TASKS: usize = 64;
const TASK_OPS: usize = 5_000;
const CONC_ROUNDS: usize = 9;

const SIDES: [&str; 4] = [
    "moka 0.12 future::Cache::get",
    "cached crate #[cached] (in memory)",
    "in-memory backend hit",
    "near hit (near = \"10m\")",
];
const MOKA: usize = 0;
const MEMORY: usize = 2;
const NEAR: usize = 3;

struct Sides {
    moka: moka::future::Cache<u64, User>,
    memory: Repo,
    near: Repo,
}

async fn call(side: usize, sides: &Sides, id: u64) {
    match side {
        MOKA => black_box(sides.moka.get(&id).await.expect("hit")),
        1 => black_box(cached_crate_user(id).await),
        MEMORY => black_box(sides.memory.user(id).await),
        _ => black_box(sides.near.near_user(id).await),
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
    runtime.block_on(memory_per_entry());
}

async fn compare(server: &support::RedisServer) {
    let moka = moka::future::Cache::new(1_000);
    let memory = Repo {
        cache: Cache::in_memory(),
    };
    let near = Repo {
        cache: Cache::redis(&server.url()).expect("valid URL"),
    };
    for id in 0..KEYS {
        moka.insert(id, user(id)).await;
        cached_crate_user(id).await;
        memory.user(id).await;
        near.near_user(id).await;
    }
    // The near tier fills from reads on its tracking connection: read
    // every key until it holds them all.
    let deadline = Instant::now() + Duration::from_secs(10);
    while near.cache.near_entry_count().unwrap_or(0) < KEYS as usize {
        for id in 0..KEYS {
            near.near_user(id).await;
        }
        assert!(Instant::now() < deadline, "the near tier never filled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sides = Arc::new(Sides { moka, memory, near });
    let memory_before = common::not_hits(&sides.memory.cache);
    let near_before = sides.near.cache.stats().near_hits;

    let n = SIDES.len();
    let rounds = common::sequential_p50s(n, SEQ_ROUNDS, SEQ_OPS, |side, i| {
        call(side, &sides, i as u64 % KEYS)
    })
    .await;
    let mut p50s: Vec<Vec<f64>> = rounds
        .iter()
        .map(|side| side.iter().map(Duration::as_secs_f64).collect())
        .collect();
    let mut over_moka: Vec<Vec<f64>> = rounds
        .iter()
        .map(|side| {
            side.iter()
                .zip(&rounds[MOKA])
                .map(|(p50, moka)| p50.as_secs_f64() / moka.as_secs_f64())
                .collect()
        })
        .collect();
    println!("Sequential p50 ({SEQ_ROUNDS} rounds x {SEQ_OPS} calls per side; median of rounds)");
    for (side, name) in SIDES.iter().enumerate() {
        println!(
            "  {name:<36} {:>7.3} µs   {:>5.2}x moka's",
            median(&mut p50s[side]) * 1e6,
            median(&mut over_moka[side])
        );
    }

    let mut rates = vec![Vec::new(); n];
    let mut vs_moka = vec![Vec::new(); n];
    for round in 0..CONC_ROUNDS {
        let mut round_rate = vec![0.0; n];
        for k in 0..n {
            let side = (round + k) % n;
            let start = Instant::now();
            let tasks: Vec<_> = (0..TASKS)
                .map(|t| {
                    let sides = Arc::clone(&sides);
                    tokio::spawn(async move {
                        for i in 0..TASK_OPS {
                            call(side, &sides, (t * TASK_OPS + i) as u64 % KEYS).await;
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.expect("task");
            }
            round_rate[side] = (TASKS * TASK_OPS) as f64 / start.elapsed().as_secs_f64();
            rates[side].push(round_rate[side]);
        }
        for side in 0..n {
            vs_moka[side].push(round_rate[side] / round_rate[MOKA]);
        }
    }
    println!("{TASKS} concurrent tasks ({CONC_ROUNDS} rounds; median of rounds)");
    for (side, name) in SIDES.iter().enumerate() {
        println!(
            "  {name:<36} {:>11.0} ops/s   {:>5.2}x moka's",
            median(&mut rates[side]),
            median(&mut vs_moka[side])
        );
    }

    common::assert_all_hits("in-memory backend", &sides.memory.cache, memory_before);
    let near_hits = sides.near.cache.stats().near_hits - near_before;
    assert_eq!(
        near_hits,
        (SEQ_ROUNDS * SEQ_OPS + CONC_ROUNDS * TASKS * TASK_OPS) as u64,
        "every measured near call must be a near hit"
    );

    println!("Targets (at most 1.2x moka's sequential p50; at least its 64-task throughput)");
    for side in [MEMORY, NEAR] {
        let p50 = median(&mut over_moka[side]);
        let rate = median(&mut vs_moka[side]);
        println!(
            "  {:<36} p50 {p50:.2}x   {}   throughput {rate:.2}x   {}",
            SIDES[side],
            verdict(p50 <= 1.2),
            verdict(rate >= 1.0)
        );
    }
}

/// The process's resident memory, from `/proc/self/statm` (Linux).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// How resident memory grows with in-memory entries of the benchmark's
/// row, each stored by a miss and then read by a hit.
async fn memory_per_entry() {
    const ENTRIES: u64 = 100_000;
    let repo = Repo {
        cache: Cache::builder(redis_cached::MEMORY_URL)
            .memory(MemoryConfig {
                max_entries: ENTRIES as usize * 2,
                max_bytes: 1 << 30,
            })
            .build()
            .expect("valid settings"),
    };
    let before = resident_bytes();
    for id in 0..ENTRIES {
        black_box(repo.user(id).await);
    }
    for id in 0..ENTRIES {
        black_box(repo.user(id).await);
    }
    let after = resident_bytes();
    let held = repo.cache.memory_entry_count().unwrap_or(0);
    match (before, after) {
        (Some(before), Some(after)) if held > 0 => println!(
            "Memory: {held} in-memory entries (rows of {} B as JSON), each read once after its store, \
             grew the process by {:.1} MB, {:.0} B per entry",
            serde_json::to_vec(&user(1)).expect("JSON").len(),
            after.saturating_sub(before) as f64 / 1e6,
            after.saturating_sub(before) as f64 / held as f64
        ),
        _ => println!("Memory: not measured (no /proc/self/statm, or nothing held)"),
    }
}
