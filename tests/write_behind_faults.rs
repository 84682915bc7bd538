//! Write-behind faults made on purpose with failpoints (feature
//! `failpoints`): a writer process killed at 20 random points (among them
//! the point between the journal append and the cache update) while a
//! second process runs; a cache update that fails; a process whose lease
//! lapses just before its takeover.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis_cached::__private::failpoint::{self, Action};
use redis_cached::{Cache, Sink, Write, WriteBehind};
use support::write_behind::{drained, Recorder, Sqlite, Table, Users};
use support::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_cache_update_does_not_outlive_the_flush() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).expect("valid URL");
    let users = Users::new(&cache);
    users
        .rows
        .lock()
        .expect("not poisoned")
        .insert(1, "old".into());
    failpoint::arm("write-behind/cache-update:~wb:{update}", Action::Fail, 0);
    let writer = WriteBehind::builder("update", &cache, Table(Arc::clone(&users.rows)))
        .key_template("user:<id>")
        .flusher(false)
        .start()
        .expect("valid");
    writer.write(1, &"new".to_owned()).await.expect("journaled");
    assert_eq!(writer.stats().cache_update_failures, 1);
    // Before the flush a reader gets the database's row, and caches it.
    assert_eq!(users.user(1).await.as_deref(), Some("old"));
    failpoint::disarm("write-behind/cache-update:~wb:{update}");
    // The flush puts the write in the cache, over the older row.
    let flusher = WriteBehind::builder("update", &cache, Table(Arc::clone(&users.rows)))
        .key_template("user:<id>")
        .start()
        .expect("valid");
    drained(&flusher).await;
    let reads = users.reads.load(Ordering::SeqCst);
    assert_eq!(users.user(1).await.as_deref(), Some("new"));
    assert_eq!(users.reads.load(Ordering::SeqCst), reads, "from the cache");
}

/// A sink that holds its calls until opened, saying when one started.
#[derive(Clone, Default)]
struct Gated {
    started: Arc<tokio::sync::Notify>,
    open: Arc<AtomicBool>,
    inner: Recorder,
}

impl Sink<u32, String> for Gated {
    type Error = String;

    async fn write_batch(&self, batch: Vec<Write<u32, String>>) -> Result<(), String> {
        self.started.notify_one();
        while !self.open.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.inner.write_batch(batch).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_whose_lease_lapsed_claims_and_forgets_nothing() {
    let server = RedisServer::start();
    // The first process to lead stops for 3 s just before its takeover:
    // its 500 ms lease lapses meanwhile.
    failpoint::arm(
        "write-behind/before-take-over:~wb:{fence}",
        Action::Pause(3_000),
        1,
    );
    let start = |sink: Gated| {
        let cache = Cache::redis(&server.url()).expect("valid URL");
        WriteBehind::builder("fence", &cache, sink)
            .key_template("user:<id>")
            .takeover_after(Duration::from_millis(500))
            .max_delay(Duration::from_millis(10))
            .retry(Duration::from_millis(10), Duration::from_millis(50))
            .start()
            .expect("valid")
    };
    let stalled = start(Gated::default());
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The other process takes the lapsed lease and reads writes; its sink
    // holds them, pending under its own consumer.
    let live_sink = Gated::default();
    let live = start(live_sink.clone());
    tokio::time::sleep(Duration::from_millis(900)).await;
    let started = live_sink.started.notified();
    for id in 0..5 {
        live.write(id, &format!("row {id}"))
            .await
            .expect("journaled");
    }
    tokio::time::timeout(Duration::from_secs(2), started)
        .await
        .expect("the live flusher called its sink");
    // The stalled process wakes up and runs its takeover without the lease.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(stalled.stats().claimed, 0, "claimed without the lease");
    let consumers: Vec<redis::Value> = server
        .cmd(
            redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg("~wb:{fence}")
                .arg("flushers"),
        )
        .await;
    let pending: Vec<i64> = consumers
        .iter()
        .filter_map(|consumer| match consumer {
            redis::Value::Array(fields) => {
                fields
                    .chunks_exact(2)
                    .find_map(|pair| match (&pair[0], &pair[1]) {
                        (redis::Value::BulkString(name), redis::Value::Int(n))
                            if name == b"pending" =>
                        {
                            Some(*n)
                        }
                        _ => None,
                    })
            }
            _ => None,
        })
        .filter(|n| *n > 0)
        .collect();
    // However many of the five it had read when its sink took them (a
    // loaded machine may hand it fewer than five at once), they are all
    // still pending under its own consumer: none claimed, none forgotten.
    assert_eq!(
        pending.len(),
        1,
        "the live flusher's writes are still its own"
    );
    assert!(pending[0] >= 1, "{pending:?}");
    live_sink.open.store(true, Ordering::SeqCst);
    drained(&live).await;
    assert_eq!(live_sink.inner.writes().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flusher_that_panics_is_started_again() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).expect("valid URL");
    // The first pass of its loop panics: the write can only be flushed by
    // the flusher started again.
    failpoint::arm("write-behind/flusher:~wb:{restart}", Action::Fail, 1);
    let sink = Recorder::default();
    let wb = WriteBehind::builder("restart", &cache, sink.clone())
        .key_template("user:<id>")
        .retry(Duration::from_millis(10), Duration::from_millis(50))
        .start()
        .expect("valid");
    wb.write(1, &"one".to_owned()).await.expect("journaled");
    // No other write: the flusher must carry on by itself.
    drained(&wb).await;
    assert_eq!(wb.stats().flusher_restarts, 1);
    assert_eq!(sink.writes().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_under_noeviction_still_drains_the_journal() {
    let server =
        RedisServer::start_with(&["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"]);
    let cache = Cache::redis(&server.url()).expect("valid URL");
    let sink = Gated::default();
    let wb = WriteBehind::builder("full", &cache, sink.clone())
        .key_template("user:<id>")
        .max_delay(Duration::from_millis(10))
        .retry(Duration::from_millis(10), Duration::from_millis(100))
        .start()
        .expect("valid");
    let started = sink.started.notified();
    for id in 0..10 {
        wb.write(id, &format!("row {id}")).await.expect("journaled");
    }
    tokio::time::timeout(Duration::from_secs(5), started)
        .await
        .expect("the sink was called");
    // Another program fills the memory: Redis refuses every write now
    // (what is used is over `maxmemory`).
    let mut client = server
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let chunk = vec![b'x'; 256 * 1024];
    for n in 0..8 {
        let _: () = redis::cmd("SET")
            .arg(format!("filler:{n}"))
            .arg(&chunk)
            .query_async(&mut client)
            .await
            .expect("room for the filler");
    }
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1mb")
        .query_async(&mut client)
        .await
        .expect("config set");
    let refused: redis::RedisResult<()> = redis::cmd("SET")
        .arg("probe")
        .arg("x")
        .query_async(&mut client)
        .await;
    assert!(refused.is_err(), "Redis is full");
    sink.open.store(true, Ordering::SeqCst);
    // The writes reach the database and leave the journal; the cache can
    // no longer hold them, so readers go to the database.
    drained(&wb).await;
    assert_eq!(sink.inner.writes().len(), 10);
    assert_eq!(cache.get::<String>("user:3").await, None);
}

// ---------------------------------------------------------------------
// A writer process killed at random points while a second process runs.

/// Keys the writer writes, round after round.
const KEYS: u32 = 100;
/// The writer's tasks; each owns the keys equal to its number modulo this.
const TASKS: u32 = 4;
/// Runs of the crash test, and how many of them crash at the failpoint
/// between the journal append and the cache update.
const RUNS: u32 = 20;
const AT_FAILPOINT: u32 = 7;

fn crash_builder(
    cache: &Cache,
    sink: Sqlite,
) -> redis_cached::WriteBehindBuilder<u32, String, Sqlite> {
    WriteBehind::builder("crash", cache, sink)
        .key_template("user:<id>")
        .ttl(Duration::from_secs(3600))
        .takeover_after(Duration::from_millis(500))
        .max_delay(Duration::from_millis(20))
        .retry(Duration::from_millis(20), Duration::from_millis(200))
}

fn crash_cache(url: &str, namespace: &str) -> Cache {
    Cache::builder(url)
        .namespace(namespace)
        .build()
        .expect("valid URL")
}

/// The writer's part, run by the crash test in a process of its own:
/// writes rounds 1, 2, 3… to every key (each key's writes in order, by one
/// task), saying `ack <key> <round>` after each acknowledged write, until
/// killed.
#[test]
fn crash_writer() {
    let (Ok(url), Ok(db), Ok(namespace)) = (
        std::env::var("WB_CRASH_REDIS"),
        std::env::var("WB_CRASH_DB"),
        std::env::var("WB_CRASH_NAMESPACE"),
    ) else {
        return; // run directly: nothing to do
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let cache = crash_cache(&url, &namespace);
        let wb = crash_builder(&cache, Sqlite::new(Path::new(&db)))
            .batch_size(64)
            .start()
            .expect("valid");
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let wb = wb.clone();
            tasks.push(tokio::spawn(async move {
                for round in 1u64.. {
                    for key in (task..KEYS).step_by(TASKS as usize) {
                        let value = round.to_string();
                        while wb.write(key, &value).await.is_err() {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        println!("ack {key} {round}");
                    }
                }
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
    });
}

/// A small deterministic generator, so that a failing run can be
/// repeated from the seed it prints.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

#[test]
fn a_writer_killed_anywhere_leaves_the_cache_and_the_database_together() {
    let server = RedisServer::start();
    let seed = std::env::var("WB_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    let mut random = Lcg(seed);
    let dir = std::env::temp_dir().join(format!("redis-cached-wb-crash-{}", server.port()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a directory");
    for run in 0..RUNS {
        let at_failpoint = run < AT_FAILPOINT;
        let kill_after = 20 + random.below(3_000);
        crash_run(&server, &dir, run, at_failpoint, kill_after, seed);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn crash_run(
    server: &RedisServer,
    dir: &Path,
    run: u32,
    at_failpoint: bool,
    kill_after: u64,
    seed: u64,
) {
    let what = format!(
        "run {run} (seed {seed}): killed {} after {kill_after} writes",
        if at_failpoint {
            "between the journal append and the cache update"
        } else {
            "by SIGKILL"
        }
    );
    let namespace = format!("r{run}");
    let db = dir.join(format!("run{run}.db"));
    let sink = Sqlite::new(&db);
    let mut child = Command::new(std::env::current_exe().expect("this test binary"));
    child
        .args(["crash_writer", "--exact", "--nocapture", "--test-threads=1"])
        .env("WB_CRASH_REDIS", server.url())
        .env("WB_CRASH_DB", &db)
        .env("WB_CRASH_NAMESPACE", &namespace)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if at_failpoint {
        // The n-th append is the last thing the process does.
        child.env(
            "REDIS_CACHED_FAILPOINTS",
            format!("write-behind/after-append:{namespace}:~wb:{{crash}}=abort@{kill_after}"),
        );
    }
    let mut child = child.spawn().expect("the writer starts");
    let lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let acked: Arc<Mutex<BTreeMap<u32, u64>>> = Arc::default();
    let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reader = {
        let (acked, count) = (Arc::clone(&acked), Arc::clone(&count));
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let mut words = line.split(' ');
                if words.next() != Some("ack") {
                    continue;
                }
                let (Some(key), Some(round)) = (
                    words.next().and_then(|w| w.parse::<u32>().ok()),
                    words.next().and_then(|w| w.parse::<u64>().ok()),
                ) else {
                    continue;
                };
                let mut acked = acked.lock().expect("not poisoned");
                let last = acked.entry(key).or_default();
                *last = (*last).max(round);
                count.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        // The second process starts once the writer is under way (and
        // most likely holds the lease), and stays to the end.
        let deadline = Instant::now() + Duration::from_secs(30);
        while count.load(Ordering::SeqCst) < 10.min(kill_after) {
            if matches!(child.try_wait(), Ok(Some(_))) {
                break;
            }
            assert!(Instant::now() < deadline, "{what}: the writer never wrote");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let cache = crash_cache(&server.url(), &namespace);
        let second = crash_builder(&cache, sink.clone()).start().expect("valid");
        if at_failpoint {
            let ended = tokio::task::spawn_blocking(move || child.wait());
            tokio::time::timeout(Duration::from_secs(60), ended)
                .await
                .unwrap_or_else(|_| panic!("{what}: the writer never reached its failpoint"))
                .expect("joined")
                .expect("reaped");
        } else {
            while count.load(Ordering::SeqCst) < kill_after {
                assert!(Instant::now() < deadline, "{what}: the writer stalled");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            child.kill().expect("SIGKILL");
            child.wait().expect("reaped");
        }
        // After the takeover, the journal drains.
        let deadline = Instant::now() + Duration::from_secs(60);
        while second.pending().await.expect("Redis answers") > 0 {
            assert!(
                Instant::now() < deadline,
                "{what}: the journal never drained"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        reader.join().expect("the reader thread");
        let acked = acked.lock().expect("not poisoned").clone();
        assert_eq!(
            sink.reordered(),
            0,
            "{what}: a write landed after a later one"
        );
        let rows = sink.rows();
        for (key, last) in &acked {
            let row: Option<u64> = rows.get(key).and_then(|v| v.parse().ok());
            // Nothing acknowledged lost; at most the write in flight more.
            assert!(
                row == Some(*last) || row == Some(last + 1),
                "{what}: key {key} acknowledged at round {last}, the database has {row:?}"
            );
        }
        for key in 0..KEYS {
            let cached = cache.get::<String>(&format!("user:{key}")).await;
            assert_eq!(
                cached.as_ref(),
                rows.get(&key),
                "{what}: key {key}: the cache and the database differ"
            );
        }
        drop(second);
    });
}
