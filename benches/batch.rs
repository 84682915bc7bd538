//! Batch benchmark: a page of 100 ids, all cached, read three ways in one
//! run: a batch function (`<ids[]>`, one `MGET`), 100 sequential calls of
//! the single-key function, and the hand-written `MGET` +
//! `serde_json::from_slice` of each value into a map. Within a round the
//! sides take turns page by page (in a rotating order), so that a slow
//! moment of the machine falls on all of them alike; every call must be a
//! hit.
//!
//! `cargo bench --bench batch` (needs `redis-server` on the PATH; the
//! benchmark starts its own on a free port).

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use common::{assert_all_hits, median, not_hits, user, verdict, User};
use redis::aio::ConnectionManager;
use redis_cached::{redis_cached, Cache};

struct Repo {
    cache: Cache,
}

impl Repo {
    #[redis_cached(key = "user:<ids[]>", ttl = 3600, cache = self.cache)]
    async fn users(&self, ids: Vec<u64>) -> Result<HashMap<u64, User>, String> {
        Ok(ids.iter().map(|id| (*id, user(*id))).collect())
    }

    #[redis_cached(key = "user:<id>", ttl = 3600, cache = self.cache)]
    async fn user(&self, id: u64) -> Result<User, String> {
        Ok(user(id))
    }
}

async fn raw_page(conn: &mut ConnectionManager, ids: &[u64]) -> HashMap<u64, User> {
    let mut mget = redis::cmd("MGET");
    for id in ids {
        mget.arg(format!("raw:user:{id}"));
    }
    let values: Vec<Option<Vec<u8>>> = mget.query_async(conn).await.expect("MGET");
    ids.iter()
        .zip(values)
        .filter_map(|(id, bytes)| Some((*id, serde_json::from_slice(&bytes?).ok()?)))
        .collect()
}

const PAGE: u64 = 100;
const ROUNDS: usize = 15;
const PAGES: usize = 200;

const SIDES: [&str; 3] = [
    "hand-written MGET + from_slice",
    "batch fn users(ids)",
    "100 sequential user(id) hits",
];

fn main() {
    let server = support::RedisServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(&server));
}

async fn run(server: &support::RedisServer) {
    let repo = Repo {
        cache: Cache::redis(&server.url()).expect("valid URL"),
    };
    let mut conn = ConnectionManager::new(server.client())
        .await
        .expect("connect");
    let ids: Vec<u64> = (0..PAGE).collect();
    repo.users(ids.clone()).await.expect("filled");
    for id in &ids {
        let json = serde_json::to_vec(&user(*id)).expect("json");
        let _: () = server
            .cmd(redis::cmd("SET").arg(format!("raw:user:{id}")).arg(json))
            .await;
    }
    let before = not_hits(&repo.cache);
    let mut per_page: [Vec<Duration>; 3] = Default::default();
    let mut ratios: [Vec<f64>; 2] = Default::default();
    for _ in 0..ROUNDS {
        let mut took = [Duration::ZERO; 3];
        let mut pages = [0u32; 3];
        for page in 0..PAGES {
            for k in 0..3 {
                let side = (page + k) % 3;
                // The sequential side is 100 round trips a page: one page
                // in ten keeps the run short.
                if side == 2 && page % 10 != 0 {
                    continue;
                }
                let start = Instant::now();
                match side {
                    0 => assert_eq!(black_box(raw_page(&mut conn, &ids).await).len(), 100),
                    1 => assert_eq!(
                        black_box(repo.users(ids.clone()).await.expect("hits")).len(),
                        100
                    ),
                    _ => {
                        for id in &ids {
                            black_box(repo.user(*id).await.expect("hit"));
                        }
                    }
                }
                took[side] += start.elapsed();
                pages[side] += 1;
            }
        }
        for side in 0..3 {
            took[side] /= pages[side];
            per_page[side].push(took[side]);
        }
        ratios[0].push(took[1].as_secs_f64() / took[0].as_secs_f64());
        ratios[1].push(took[2].as_secs_f64() / took[1].as_secs_f64());
    }
    assert_all_hits("batch and single-key functions", &repo.cache, before);
    let stats = repo.cache.stats();
    println!("A page of {PAGE} cached ids ({ROUNDS} rounds; median time per page)");
    for (side, name) in SIDES.iter().enumerate() {
        per_page[side].sort();
        println!("  {name:<32} {:>9.1?}", per_page[side][ROUNDS / 2]);
    }
    let batch_vs_raw = median(&mut ratios[0]);
    let sequential_vs_batch = median(&mut ratios[1]);
    println!(
        "  batch / hand-written MGET         {batch_vs_raw:.3}x (median of per-round ratios)   target <= 1.10x   {}",
        verdict(batch_vs_raw <= 1.10)
    );
    println!(
        "  sequential hits / batch           {sequential_vs_batch:.1}x faster   target >= 20x   {}",
        verdict(sequential_vs_batch >= 20.0)
    );
    println!(
        "  cache stats: {} hits, {} misses, {} errors",
        stats.hits, stats.misses, stats.errors
    );
}
