//! Redis Cluster benchmark: the hit path of `#[redis_cached]` on one server
//! against the same on a local 3-master cluster (3 replicas), and against a
//! hand-written `GET` + decode through redis-rs's cluster connection,
//! interleaved in rounds in one run, sequential latency and 64-task
//! throughput; then the
//! client commands one hit and one locked miss send to the cluster, counted
//! by `MONITOR` on every master.
//!
//! On one 2-core machine the six nodes share the cores of the one server
//! (and of the benchmark), so the ratio shows what routing costs, not what
//! a cluster gains by spreading load over machines.
//!
//! `cargo bench --bench cluster` (needs `redis-server` and `redis-cli` on
//! the PATH; the benchmark starts its own server and cluster).

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use common::median;
use redis::cluster_async::ClusterConnection;
use redis_cached::{redis_cached, Cache};
use serde::{Deserialize, Serialize};
use support::cluster::{cli, RedisCluster};
use support::RedisServer;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
    email: String,
}

struct Repo {
    cache: Cache,
}

impl Repo {
    #[redis_cached(key = "user:<id>", ttl = 3600, cache = self.cache)]
    async fn get_user(&self, id: u64) -> Result<User, String> {
        Ok(User {
            id,
            name: format!("user {id}"),
            email: format!("user{id}@example.com"),
        })
    }

    #[redis_cached(key = "locked:<id>", ttl = 3600, lock = true, cache = self.cache)]
    async fn locked(&self, id: u64) -> Result<u64, String> {
        Ok(id)
    }
}

const KEYS: u64 = 100;
const SEQ_ROUNDS: usize = 10;
const SEQ_OPS: usize = 2_000;
const TASKS: usize = 64;
const TASK_OPS: usize = 400;
const CONC_ROUNDS: usize = 10;
const SIDES: [&str; 3] = [
    "cache, one server",
    "cache, 3-master cluster",
    "hand-written GET, cluster",
];

/// What one call of a side does: a cached call on one of the caches, or
/// the hand-written read of the same entry through redis-rs's own cluster
/// connection (`GET`, strip the entry's 4-byte header, `from_slice`).
#[derive(Clone)]
struct Sides {
    repos: [Arc<Repo>; 2],
    raw: ClusterConnection,
}

impl Sides {
    async fn call(&self, side: usize, id: u64) {
        if side < 2 {
            black_box(self.repos[side].get_user(id).await.expect("hit"));
            return;
        }
        let mut conn = self.raw.clone();
        let bytes: Vec<u8> = redis::cmd("GET")
            .arg(format!("user:{id}"))
            .query_async(&mut conn)
            .await
            .expect("a stored entry");
        let user: User = serde_json::from_slice(&bytes[4..]).expect("the cached JSON");
        black_box(user);
    }
}

fn main() {
    let server = RedisServer::start();
    let cluster = RedisCluster::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let urls = cluster.urls();
        let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
        let repos = [
            Arc::new(Repo {
                cache: Cache::redis(&server.url()).expect("valid URL"),
            }),
            Arc::new(Repo {
                cache: Cache::redis_cluster(&urls).expect("valid URLs"),
            }),
        ];
        for repo in &repos {
            repo.cache.connect().await.expect("connect");
            for id in 0..KEYS {
                repo.get_user(id).await.expect("filled");
            }
        }
        let raw = redis::cluster::ClusterClient::new(urls.clone())
            .expect("valid URLs")
            .get_async_connection()
            .await
            .expect("connect");
        let sides = Sides { repos, raw };
        hit_path(&sides).await;
        round_trips(&cluster, &sides.repos[1]).await;
        let stats = sides.repos[1].cache.stats();
        println!(
            "cluster cache stats: {} hits, {} misses, {} errors, {} timeouts; CROSSSLOT errors on the nodes: {}",
            stats.hits,
            stats.misses,
            stats.errors,
            stats.timeouts,
            cluster.crossslot_errors()
        );
    });
}

/// Prints each side's figure, then the ratios of side 1 to sides 0 and 2.
fn report(unit: &str, figures: &mut [Vec<f64>; 3], ratios: &mut [Vec<f64>; 2], what: &str) {
    for (side, name) in SIDES.iter().enumerate() {
        println!("  {name:<26} {:>10.1} {unit}", median(&mut figures[side]));
    }
    println!(
        "  cache on the cluster / cache on one server: {what} ratio {:.3}x",
        median(&mut ratios[0])
    );
    println!(
        "  cache on the cluster / hand-written GET on the cluster: {what} ratio {:.3}x",
        median(&mut ratios[1])
    );
}

async fn hit_path(sides: &Sides) {
    let mut p50s: [Vec<f64>; 3] = Default::default();
    let mut ratios: [Vec<f64>; 2] = Default::default();
    for round in 0..SEQ_ROUNDS {
        let mut p50 = [0.0; 3];
        for k in 0..3 {
            let side = (round + k) % 3;
            let mut samples = Vec::with_capacity(SEQ_OPS);
            for i in 0..SEQ_OPS {
                let start = Instant::now();
                sides.call(side, i as u64 % KEYS).await;
                samples.push(start.elapsed().as_secs_f64() * 1e6);
            }
            p50[side] = median(&mut samples);
            p50s[side].push(p50[side]);
        }
        ratios[0].push(p50[1] / p50[0]);
        ratios[1].push(p50[1] / p50[2]);
    }
    println!("Hit, sequential ({SEQ_ROUNDS} rounds x {SEQ_OPS} calls per side; medians of per-round p50s and ratios)");
    report("us (p50)", &mut p50s, &mut ratios, "latency");

    let mut rates: [Vec<f64>; 3] = Default::default();
    let mut ratios: [Vec<f64>; 2] = Default::default();
    for round in 0..CONC_ROUNDS {
        let mut rate = [0.0; 3];
        for k in 0..3 {
            let side = (round + k) % 3;
            let start = Instant::now();
            let tasks: Vec<_> = (0..TASKS)
                .map(|t| {
                    let sides = sides.clone();
                    tokio::spawn(async move {
                        for i in 0..TASK_OPS {
                            sides.call(side, (t * TASK_OPS + i) as u64 % KEYS).await;
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.expect("task");
            }
            rate[side] = (TASKS * TASK_OPS) as f64 / start.elapsed().as_secs_f64();
            rates[side].push(rate[side]);
        }
        ratios[0].push(rate[1] / rate[0]);
        ratios[1].push(rate[1] / rate[2]);
    }
    println!("Hit, {TASKS} concurrent tasks ({CONC_ROUNDS} rounds; medians)");
    report("ops/s", &mut rates, &mut ratios, "throughput");
}

/// Counts the client commands (not those run inside scripts) that one hit
/// and one locked miss send, on every master of the cluster.
async fn round_trips(cluster: &RedisCluster, repo: &Repo) {
    let monitors: Vec<_> = cluster
        .nodes
        .iter()
        .filter(|node| cli(node.port(), &["ROLE"]).starts_with("master"))
        .map(RedisServer::monitor)
        .collect();
    let commands = || async {
        let mut all = Vec::new();
        for monitor in &monitors {
            all.extend(monitor.take_client_commands().await);
        }
        // Only the cache's own commands (not the cluster client's
        // topology checks).
        all.retain(|cmd| !cmd.starts_with("\"CLUSTER\"") && !cmd.starts_with("\"PING\""));
        all
    };
    commands().await;
    repo.locked(1_000).await.expect("a locked miss");
    // The lock subscriber's SSUBSCRIBE to the channel of the key's slot
    // (while the process waits in the slot, on its own connection, whose
    // RESP3 handshake is the only HELLO on a cluster; no caller waits for
    // either) is not one of the caller's round trips.
    let (subscribe, miss): (Vec<String>, Vec<String>) = commands()
        .await
        .into_iter()
        .partition(|cmd| cmd.starts_with("\"SSUBSCRIBE\"") || cmd.starts_with("\"HELLO\""));
    repo.locked(1_000).await.expect("a hit");
    let hit = commands().await;
    println!("Round trips on the cluster (client commands seen by MONITOR on the 3 masters)");
    println!(
        "  locked miss: {} {:?}   target 3 (as on one server); and the subscriber's first SSUBSCRIBE in this slot (with its connection's HELLO): {}",
        miss.len(),
        miss.iter()
            .map(|c| c.split(' ').next().unwrap_or(""))
            .collect::<Vec<_>>(),
        subscribe.len()
    );
    println!("  hit: {} {:?}   target 1", hit.len(), hit);
}
