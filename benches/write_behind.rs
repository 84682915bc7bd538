//! Write-behind benchmark: accepted writes per second through a
//! `WriteBehind` (64 tasks writing at once, a SQLite table as the sink)
//! against the same writes made synchronously to that table one by one
//! (one transaction each), interleaved in rounds in one run; and the flush
//! lag (journaled → committed to the table) under that load, p50 and p99.
//!
//! Redis runs with `appendonly yes`, `appendfsync everysec`; SQLite with
//! its defaults (rollback journal, `synchronous = FULL`).
//!
//! `cargo bench --bench write_behind` (needs `redis-server` on the PATH;
//! the benchmark starts its own on a free port).

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::{median, verdict};
use redis_cached::{Cache, Change, Sink, Write, WriteBehind};

const ROUNDS: usize = 3;
const SYNC_WRITES: u64 = 300;
const BEHIND_WRITES: u64 = 20_000;
const TASKS: u64 = 64;
const KEYS: u64 = 10_000;

fn open(path: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).expect("open the database");
    conn.busy_timeout(Duration::from_secs(30))
        .expect("busy timeout");
    conn
}

fn upsert(conn: &rusqlite::Connection, id: u64, name: &str) {
    conn.execute(
        "INSERT INTO users (id, name) VALUES (?1, ?2)
         ON CONFLICT(id) DO UPDATE SET name = excluded.name",
        (id as i64, name),
    )
    .expect("upsert");
}

/// The table as a write-behind sink: one transaction per batch; records
/// each write's lag from journal to commit.
#[derive(Clone)]
struct Table {
    path: PathBuf,
    lags: Arc<Mutex<Vec<Duration>>>,
}

impl Sink<u64, String> for Table {
    type Error = String;

    async fn write_batch(&self, batch: Vec<Write<u64, String>>) -> Result<(), String> {
        let path = self.path.clone();
        let accepted: Vec<SystemTime> = batch.iter().map(|w| w.id.accepted_at()).collect();
        tokio::task::spawn_blocking(move || {
            let mut conn = open(&path);
            let tx = conn.transaction().map_err(|e| e.to_string())?;
            for write in &batch {
                match &write.change {
                    Change::Upsert(name) => upsert(&tx, write.key, name),
                    Change::Delete => {
                        tx.execute("DELETE FROM users WHERE id = ?1", [write.key as i64])
                            .map_err(|e| e.to_string())?;
                    }
                }
            }
            tx.commit().map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())??;
        let now = SystemTime::now();
        let mut lags = self.lags.lock().expect("not poisoned");
        lags.extend(
            accepted
                .iter()
                .map(|at| now.duration_since(*at).unwrap_or_default()),
        );
        Ok(())
    }
}

fn main() {
    let server =
        support::RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "everysec"]);
    let dir = std::env::temp_dir().join(format!("redis-cached-bench-wb-{}", server.port()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a directory");
    let path = dir.join("users.db");
    open(&path)
        .execute_batch("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
        .expect("create the table");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(&server, &path));
    let _ = std::fs::remove_dir_all(&dir);
}

async fn run(server: &support::RedisServer, path: &Path) {
    let cache = Cache::redis(&server.url()).expect("valid URL");
    let table = Table {
        path: path.to_owned(),
        lags: Arc::default(),
    };
    let wb = WriteBehind::builder("bench", &cache, table.clone())
        .key_template("user:<id>")
        .ttl(Duration::from_secs(3600))
        .batch_size(1000)
        .max_delay(Duration::from_millis(50))
        .start()
        .expect("valid settings");
    let wb = Arc::new(wb);
    let (mut sync_rates, mut behind_rates) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let sync_path = path.to_owned();
        let sync = tokio::task::spawn_blocking(move || {
            let conn = open(&sync_path);
            let started = Instant::now();
            for i in 0..SYNC_WRITES {
                upsert(&conn, (i * 7_919) % KEYS, &format!("sync {round} {i}"));
            }
            SYNC_WRITES as f64 / started.elapsed().as_secs_f64()
        })
        .await
        .expect("no panic");
        sync_rates.push(sync);

        let started = Instant::now();
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| {
                let wb = Arc::clone(&wb);
                tokio::spawn(async move {
                    for i in (task..BEHIND_WRITES).step_by(TASKS as usize) {
                        let name = format!("behind {round} {i}");
                        wb.write((i * 7_919) % KEYS, &name)
                            .await
                            .expect("journaled");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("no panic");
        }
        let behind = BEHIND_WRITES as f64 / started.elapsed().as_secs_f64();
        behind_rates.push(behind);
        // Flushed before the next round, so rounds do not overlap.
        while wb.pending().await.expect("Redis answers") > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!(
            "round {round}: synchronous {sync:.0} writes/s, write-behind {behind:.0} writes/s ({:.1}x)",
            behind / sync
        );
    }
    let (sync, behind) = (median(&mut sync_rates), median(&mut behind_rates));
    let ratio = behind / sync;
    let mut lags = table.lags.lock().expect("not poisoned").clone();
    lags.sort();
    let at = |q: f64| lags[((lags.len() as f64 * q) as usize).min(lags.len() - 1)];
    let stats = wb.stats();
    println!("median: synchronous {sync:.0} writes/s, write-behind {behind:.0} writes/s");
    println!(
        "write-behind / synchronous: {ratio:.1}x (target >= 10x: {})",
        verdict(ratio >= 10.0)
    );
    println!(
        "flush lag (journaled -> committed), {} writes: p50 {:?}, p99 {:?}, max {:?}",
        lags.len(),
        at(0.50),
        at(0.99),
        at(1.0)
    );
    println!(
        "batches {}, writes flushed {}, coalesced {}, retries {}",
        stats.batches, stats.flushed, stats.coalesced, stats.retries
    );
}
