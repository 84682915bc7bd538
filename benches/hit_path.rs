//! Hit-path benchmark: a `#[redis_cached]` function's hit against the
//! hand-written equivalent (`GET` + `serde_json::from_slice`) on the same
//! kind of connection to the same server, measured in one run, interleaved
//! in rounds so that machine noise hits both sides alike. Also: the
//! in-memory backend's hit, and the bytes each value costs in Redis.
//!
//! `cargo bench --bench hit_path` (needs `redis-server` on the PATH; the
//! benchmark starts its own on a free port).

#[path = "../tests/support/mod.rs"]
mod support;

use std::hint::black_box;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis_cached::{redis_cached, Cache};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
    email: String,
    active: bool,
}

fn user(id: u64) -> User {
    User {
        id,
        name: format!("user {id}"),
        email: format!("user{id}@example.com"),
        active: true,
    }
}

struct Repo {
    cache: Cache,
}

impl Repo {
    #[redis_cached(key = "user:<id>", ttl = 3600, cache = self.cache)]
    async fn get_user(&self, id: u64) -> Result<User, String> {
        Ok(user(id))
    }
}

async fn raw_get(conn: &mut ConnectionManager, id: u64) -> Option<User> {
    let key = format!("raw:user:{id}");
    let bytes: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query_async(conn).await.ok()?;
    serde_json::from_slice(&bytes?).ok()
}

const KEYS: u64 = 100;
const ROUNDS: usize = 6;
const SEQ_OPS: usize = 3_000;
const TASKS: usize = 64;
const TASK_OPS: usize = 100;
const CONC_ROUNDS: usize = 15;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let server = support::RedisServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(redis_hit_path(&server));
    in_memory_hit();
}

async fn redis_hit_path(server: &support::RedisServer) {
    let repo = std::sync::Arc::new(Repo {
        cache: Cache::redis(&server.url()).expect("valid URL"),
    });
    let conn = ConnectionManager::new(server.client())
        .await
        .expect("connect");
    // Fill both sides: the cached fn stores `user:<id>`, the raw side `raw:user:<id>`.
    for id in 0..KEYS {
        repo.get_user(id).await.expect("filled");
        let json = serde_json::to_vec(&user(id)).expect("json");
        let _: () = server
            .cmd(redis::cmd("SET").arg(format!("raw:user:{id}")).arg(json))
            .await;
    }

    // Sequential latency, per call.
    let (mut cached, mut raw) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        for side in [round % 2, 1 - round % 2] {
            for i in 0..SEQ_OPS {
                let id = i as u64 % KEYS;
                let start = Instant::now();
                if side == 0 {
                    black_box(repo.get_user(id).await.expect("hit"));
                    cached.push(start.elapsed());
                } else {
                    let mut c = conn.clone();
                    black_box(raw_get(&mut c, id).await.expect("hit"));
                    raw.push(start.elapsed());
                }
            }
        }
    }
    cached.sort();
    raw.sort();
    let (c50, r50) = (percentile(&cached, 0.5), percentile(&raw, 0.5));
    let (c99, r99) = (percentile(&cached, 0.99), percentile(&raw, 0.99));
    let seq_ratio = c50.as_secs_f64() / r50.as_secs_f64();
    println!("Redis hit, sequential ({} calls per side)", cached.len());
    println!("  hand-written GET + from_slice   p50 {r50:>10.1?}   p99 {r99:>10.1?}");
    println!("  #[redis_cached] hit             p50 {c50:>10.1?}   p99 {c99:>10.1?}");
    println!(
        "  latency ratio (cached / hand-written, p50): {seq_ratio:.3}x   target <= 1.10x   {}",
        verdict(seq_ratio <= 1.10)
    );

    // Concurrent throughput, 64 tasks.
    let (mut cached_rate, mut raw_rate) = (Vec::new(), Vec::new());
    for round in 0..CONC_ROUNDS {
        for side in [round % 2, 1 - round % 2] {
            let start = Instant::now();
            let tasks: Vec<_> = (0..TASKS)
                .map(|t| {
                    let repo = repo.clone();
                    let mut c = conn.clone();
                    tokio::spawn(async move {
                        for i in 0..TASK_OPS {
                            let id = (t * TASK_OPS + i) as u64 % KEYS;
                            if side == 0 {
                                black_box(repo.get_user(id).await.expect("hit"));
                            } else {
                                black_box(raw_get(&mut c, id).await.expect("hit"));
                            }
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.expect("task");
            }
            let rate = (TASKS * TASK_OPS) as f64 / start.elapsed().as_secs_f64();
            if side == 0 {
                cached_rate.push(rate)
            } else {
                raw_rate.push(rate)
            }
        }
    }
    // Each round measures both sides back to back; the median of the
    // per-round ratios is robust to the machine's load changing between rounds.
    let mut ratios: Vec<f64> = cached_rate
        .iter()
        .zip(&raw_rate)
        .map(|(c, r)| c / r)
        .collect();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (c, r) = (median(&mut cached_rate), median(&mut raw_rate));
    let conc_ratio = median(&mut ratios);
    println!("Redis hit, {TASKS} concurrent tasks (medians of {CONC_ROUNDS} rounds)");
    println!("  hand-written GET + from_slice   {r:>10.0} ops/s");
    println!("  #[redis_cached] hit             {c:>10.0} ops/s");
    println!(
        "  throughput ratio (cached / hand-written, median per round): {conc_ratio:.3}x   target >= 0.90x   {}",
        verdict(conc_ratio >= 0.90)
    );
    let stats = repo.cache.stats();
    println!(
        "  cache stats: {} hits, {} misses, {} errors, {} timeouts",
        stats.hits, stats.misses, stats.errors, stats.timeouts
    );

    // What one value costs in Redis.
    let json_len = serde_json::to_vec(&user(1)).expect("json").len();
    let entry_len: usize = server.cmd(redis::cmd("STRLEN").arg("user:1")).await;
    // A key of the same length as `user:1`, holding the bare JSON.
    let json = serde_json::to_vec(&user(1)).expect("json");
    let _: () = server.cmd(redis::cmd("SET").arg("json:1").arg(json)).await;
    let raw_usage: usize = server
        .cmd(redis::cmd("MEMORY").arg("USAGE").arg("json:1"))
        .await;
    let entry_usage: usize = server
        .cmd(redis::cmd("MEMORY").arg("USAGE").arg("user:1"))
        .await;
    println!("Bytes per value in Redis");
    println!(
        "  bare JSON {json_len} B, stored entry {entry_len} B (header {} B)",
        entry_len - json_len
    );
    println!(
        "  MEMORY USAGE (same key length): bare JSON {raw_usage} B, cached entry {entry_usage} B"
    );
}

fn in_memory_hit() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let repo = Repo {
        cache: Cache::in_memory(),
    };
    runtime.block_on(async {
        for id in 0..KEYS {
            repo.get_user(id).await.expect("filled");
        }
        let calls = 1_000_000u64;
        let mut best = f64::MAX;
        for _ in 0..3 {
            let start = Instant::now();
            for i in 0..calls {
                black_box(repo.get_user(i % KEYS).await.expect("hit"));
            }
            best = best.min(start.elapsed().as_secs_f64() * 1e9 / calls as f64);
        }
        // Baseline in the same run: decoding the value alone.
        let json = serde_json::to_vec(&user(1)).expect("json");
        let start = Instant::now();
        for _ in 0..calls {
            black_box(serde_json::from_slice::<User>(black_box(&json)).expect("json"));
        }
        let decode = start.elapsed().as_secs_f64() * 1e9 / calls as f64;
        println!("In-memory hit (best of 3 x {calls} calls)");
        println!("  serde_json::from_slice alone   {decode:>8.0} ns");
        println!(
            "  #[redis_cached] hit            {best:>8.0} ns   ({:.2}x the decode)   target < 1000 ns   {}",
            best / decode,
            verdict(best < 1000.0)
        );
    });
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT MET"
    }
}
