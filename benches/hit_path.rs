//! Hit-path benchmark: a `#[redis_cached]` function's hit against the
//! hand-written equivalent (`GET` + `serde_json::from_slice`) on the same
//! kind of connection to the same server, measured in one run, interleaved
//! in rounds so that machine noise hits both sides alike. Also: the
//! in-memory backend's hit, and the bytes each value costs in Redis.
//!
//! The 64-task throughput is measured twice. First with the client's
//! runtime on every core, unpinned, sharing them with the local Redis.
//! Then with Redis pinned to the last core and the client (a runtime with
//! one worker per remaining core) pinned to the others, as when Redis has a
//! host of its own: the targets are judged there, and the sequential
//! latency is measured there too. Pinning uses `taskset`; where it fails the
//! benchmark says so. Every measured call must be a hit: a cache that fell
//! back to its (instant) body would look fast, so the benchmark checks its
//! counters.
//!
//! `cargo bench --bench hit_path` (needs `redis-server` on the PATH; the
//! benchmark starts its own on a free port).

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{median, not_hits, percentile, user, verdict, User};
use redis::aio::ConnectionManager;
use redis_cached::{redis_cached, Cache};

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
const SEQ_ROUNDS: usize = 12;
const SEQ_OPS: usize = 2_000;
const TASKS: usize = 64;
const TASK_OPS: usize = 400;
const CONC_ROUNDS: usize = 15;

fn main() {
    let server = support::RedisServer::start();
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let client_cores = cores.saturating_sub(1).max(1);
    let redis_pid = runtime(cores).block_on(async {
        let (repos, conn) = connect(&server).await;
        fill(&server, &repos).await;
        let before = counts(&repos);
        let title = format!("client on all {cores} cores, shared with Redis, unpinned; no target");
        concurrent(&repos, &conn, &title, false).await;
        assert_all_hits(&repos, before);
        let info: String = server.cmd(redis::cmd("INFO").arg("server")).await;
        info.lines()
            .find_map(|line| line.strip_prefix("process_id:"))
            .map(|pid| pid.trim().to_owned())
    });
    let pinned = match (cores, redis_pid) {
        (1, _) => "client and Redis on the one core".to_owned(),
        (_, Some(pid)) if pin(&pid, cores) => {
            format!("client pinned to {client_cores} of {cores} cores, Redis to the last")
        }
        _ => format!("client on {client_cores} of {cores} cores (pinning failed)"),
    };
    // A new runtime, and connections of its own: a connection's driver
    // runs on the runtime it was made on. Its threads inherit the pinning.
    runtime(client_cores).block_on(async {
        let (repos, conn) = connect(&server).await;
        let before = counts(&repos);
        sequential(&repos, &conn).await;
        concurrent(&repos, &conn, &pinned, true).await;
        assert_all_hits(&repos, before);
        value_bytes(&server).await;
    });
    in_memory_hit();
}

/// Pins Redis (`pid`) to the last of `cores` cores and this process's
/// threads to the others; whether `taskset` did both.
fn pin(pid: &str, cores: usize) -> bool {
    let taskset = |list: String, pid: &str| {
        std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", &list, pid])
            .output()
            .is_ok_and(|out| out.status.success())
    };
    taskset(format!("{}", cores - 1), pid)
        && taskset(format!("0-{}", cores - 2), &std::process::id().to_string())
}

/// Each measured cache's misses and body runs so far.
fn counts(repos: &[Arc<Repo>; N - 1]) -> [(u64, u64); N - 1] {
    repos.each_ref().map(|repo| not_hits(&repo.cache))
}

/// Fails the benchmark if a measured call was not a hit.
fn assert_all_hits(repos: &[Arc<Repo>; N - 1], before: [(u64, u64); N - 1]) {
    for (side, (repo, before)) in repos.iter().zip(before).enumerate() {
        common::assert_all_hits(SIDES[side + 1].0, &repo.cache, before);
    }
}

fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The configurations of the cache measured against the hand-written
/// read, with their targets (sequential latency ratio at most, 64-task
/// throughput ratio at least): the default (concurrent lookups merged into
/// one `MGET`), merging off (each lookup a `GET`), and bounded reads
/// (`bounded_reads(true)`, `GETRANGE key 0 max`, never merged).
const SIDES: [(&str, f64, f64); 4] = [
    ("hand-written GET + from_slice", 1.0, 1.0),
    ("#[redis_cached] hit (default)", 1.05, 1.50),
    ("#[redis_cached] hit, merging off", 1.05, 0.95),
    ("#[redis_cached] hit, bounded", 1.10, 0.90),
];
const N: usize = SIDES.len();

async fn call(side: usize, repos: &[Arc<Repo>; N - 1], conn: &ConnectionManager, id: u64) {
    if side == 0 {
        let mut c = conn.clone();
        black_box(raw_get(&mut c, id).await.expect("hit"));
    } else {
        black_box(repos[side - 1].get_user(id).await.expect("hit"));
    }
}

/// The caches measured (default, merging off, bounded) and the
/// hand-written side's connection.
async fn connect(server: &support::RedisServer) -> ([Arc<Repo>; N - 1], ConnectionManager) {
    let repo = |builder: redis_cached::CacheBuilder| {
        Arc::new(Repo {
            cache: builder.build().expect("valid URL"),
        })
    };
    let repos = [
        repo(Cache::builder(&server.url())),
        repo(Cache::builder(&server.url()).merge_lookups(false)),
        repo(Cache::builder(&server.url()).bounded_reads(true)),
    ];
    let conn = ConnectionManager::new(server.client())
        .await
        .expect("connect");
    (repos, conn)
}

async fn fill(server: &support::RedisServer, repos: &[Arc<Repo>; N - 1]) {
    // Fill both: the cached fn stores `user:<id>`, the raw side `raw:user:<id>`.
    for id in 0..KEYS {
        repos[0].get_user(id).await.expect("filled");
        let json = serde_json::to_vec(&user(id)).expect("json");
        let _: () = server
            .cmd(redis::cmd("SET").arg(format!("raw:user:{id}")).arg(json))
            .await;
    }
}

async fn sequential(repos: &[Arc<Repo>; N - 1], conn: &ConnectionManager) {
    // Sequential latency: within a round the sides take turns call by call
    // (in a rotating order), so that a slow moment of the machine falls on
    // all of them alike; the figure is the median of the per-round p50
    // ratios.
    let mut p50s: [Vec<Duration>; N] = Default::default();
    let mut ratios: [Vec<f64>; N] = Default::default();
    for _ in 0..SEQ_ROUNDS {
        let mut samples: [Vec<Duration>; N] = Default::default();
        for i in 0..SEQ_OPS {
            for k in 0..N {
                let side = (i + k) % N;
                let start = Instant::now();
                call(side, repos, conn, i as u64 % KEYS).await;
                samples[side].push(start.elapsed());
            }
        }
        let mut round_p50 = [Duration::ZERO; N];
        for side in 0..N {
            samples[side].sort();
            round_p50[side] = percentile(&samples[side], 0.5);
            p50s[side].push(round_p50[side]);
        }
        for s in 1..N {
            ratios[s].push(round_p50[s].as_secs_f64() / round_p50[0].as_secs_f64());
        }
    }
    println!("Redis hit, sequential ({SEQ_ROUNDS} rounds x {SEQ_OPS} calls per side)");
    for (side, (name, _, _)) in SIDES.iter().enumerate() {
        p50s[side].sort();
        println!("  {name:<34} p50 {:>9.1?}", p50s[side][SEQ_ROUNDS / 2]);
    }
    for s in 1..N {
        let ratio = median(&mut ratios[s]);
        let (name, target, _) = SIDES[s];
        println!(
            "  {name:<34} latency ratio {ratio:.3}x (median of per-round p50 ratios)   target <= {target:.2}x   {}",
            verdict(ratio <= target)
        );
    }
}

/// Throughput of 64 tasks, every side in each round in a rotating order;
/// judged against the targets when `judged`.
async fn concurrent(
    repos: &[Arc<Repo>; N - 1],
    conn: &ConnectionManager,
    title: &str,
    judged: bool,
) {
    // Concurrent throughput, 64 tasks, same rotation.
    let mut rates: [Vec<f64>; N] = Default::default();
    let mut ratios: [Vec<f64>; N] = Default::default();
    for round in 0..CONC_ROUNDS {
        let mut round_rate = [0.0; N];
        for k in 0..N {
            let side = (round + k) % N;
            let start = Instant::now();
            let tasks: Vec<_> = (0..TASKS)
                .map(|t| {
                    let repos = repos.clone();
                    let conn = conn.clone();
                    tokio::spawn(async move {
                        for i in 0..TASK_OPS {
                            call(side, &repos, &conn, (t * TASK_OPS + i) as u64 % KEYS).await;
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
        for s in 1..N {
            ratios[s].push(round_rate[s] / round_rate[0]);
        }
    }
    println!("Redis hit, {TASKS} concurrent tasks ({CONC_ROUNDS} rounds), {title}");
    for (side, (name, _, _)) in SIDES.iter().enumerate() {
        println!(
            "  {name:<34} {:>9.0} ops/s (median)",
            median(&mut rates[side])
        );
    }
    for s in 1..N {
        let ratio = median(&mut ratios[s]);
        let (name, _, target) = SIDES[s];
        let judgement = if judged {
            format!("target >= {target:.2}x   {}", verdict(ratio >= target))
        } else {
            String::new()
        };
        println!(
            "  {name:<34} throughput ratio {ratio:.3}x (median of per-round ratios)   {judgement}"
        );
    }
}

/// What one value costs in Redis.
async fn value_bytes(server: &support::RedisServer) {
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
