//! Write-behind: writes visible in the cache at once, journaled in Redis
//! before they are acknowledged, flushed in batches in key order, and
//! nothing lost when the flushing process is SIGKILLed mid-flush, the sink
//! fails for a while, or Redis restarts with persistence on.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis_cached::{Cache, Change, Error, Sink, Write, WriteBehind};
use support::backends::Env;
use support::write_behind::{builder, drained, Recorder, Sqlite, Users};
use support::RedisServer;

per_shared_backend!(
    a_write_is_visible_at_once_and_flushed_coalesced,
    racing_writers_leave_the_cache_at_the_later_write,
    two_flushers_under_load_flush_one_at_a_time_in_key_order,
);

async fn a_write_is_visible_at_once_and_flushed_coalesced(env: &Env) {
    let cache = env.cache();
    let sink = Recorder::default();
    let wb = builder("users", &cache, sink.clone())
        .max_delay(Duration::from_secs(1))
        .start()
        .expect("valid settings");
    let users = Users::new(&cache);
    for n in 0..20 {
        wb.write(1, &format!("ada {n}")).await.expect("journaled");
    }
    wb.write(2, &"grace".to_owned()).await.expect("journaled");
    wb.delete(2).await.expect("journaled");
    wb.delete(3).await.expect("journaled");
    // In the cache before any flush: the getter never reads the database.
    assert_eq!(users.user(1).await.as_deref(), Some("ada 19"));
    assert_eq!(users.user(2).await, None);
    assert_eq!(users.reads.load(Ordering::SeqCst), 0);
    assert_eq!(
        cache.get::<String>("user:1").await.as_deref(),
        Some("ada 19")
    );
    drained(&wb).await;
    let writes = sink.writes();
    let mut last: BTreeMap<u32, Change<String>> = BTreeMap::new();
    for w in &writes {
        last.insert(w.key, w.change.clone());
    }
    assert_eq!(last[&1], Change::Upsert("ada 19".into()));
    assert_eq!(last[&2], Change::Delete);
    assert_eq!(last[&3], Change::Delete);
    // 23 writes within max_delay (1 s): one batch, one write per key.
    let stats = wb.stats();
    assert_eq!(writes.len(), 3, "{writes:?}");
    assert_eq!(
        (stats.accepted, stats.flushed, stats.coalesced),
        (23, 3, 20),
        "{stats:?}"
    );
    assert_eq!(stats.dead_letters, 0);
    assert_eq!(wb.shutdown(Duration::from_secs(5)).await, Ok(0));
}

async fn racing_writers_leave_the_cache_at_the_later_write(env: &Env) {
    // Two processes write one key at once; whatever order their cache
    // updates land in, the cache ends at the write journaled last.
    let sink = Recorder::default();
    let (a, b) = (env.cache(), env.cache());
    let wa = builder("race", &a, sink.clone())
        .flusher(false)
        .start()
        .expect("valid");
    let wb = builder("race", &b, sink.clone())
        .flusher(false)
        .start()
        .expect("valid");
    for round in 0..50 {
        let (va, vb) = (format!("a{round}"), format!("b{round}"));
        let (x, y) = tokio::join!(wa.write(9, &va), wb.write(9, &vb));
        let (x, y) = (x.expect("journaled"), y.expect("journaled"));
        let later = if x > y { va } else { vb };
        assert_eq!(
            a.get::<String>("user:9").await,
            Some(later),
            "round {round}"
        );
    }
    assert_eq!(wa.pending().await, Ok(100));
    // A cache entry already at a later write is left alone.
    let full = env.key("user:9");
    let version = match full.strip_suffix(":user:9") {
        Some(namespace) => format!("{namespace}:~wbv{{{full}}}"),
        None => format!("~wbv{{{full}}}"),
    };
    let _: () = env
        .raw(redis::cmd("SET").arg(&version).arg("99999999999999-0"))
        .await;
    wa.write(9, &"older".to_owned()).await.expect("journaled");
    assert_ne!(a.get::<String>("user:9").await.as_deref(), Some("older"));
}

/// A sink that checks what one at a time and key order mean: how many
/// calls ran at once, and any write older than one applied to its key.
#[derive(Clone, Default)]
struct Ordered {
    state: Arc<Mutex<OrderedState>>,
    running: Arc<AtomicU32>,
    max_running: Arc<AtomicU32>,
}

#[derive(Default)]
struct OrderedState {
    applied: BTreeMap<u32, (redis_cached::JournalId, String)>,
    reordered: u32,
}

impl Sink<u32, String> for Ordered {
    type Error = String;

    async fn write_batch(&self, batch: Vec<Write<u32, String>>) -> Result<(), String> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(30)).await;
        {
            let mut state = self.state.lock().expect("not poisoned");
            for write in batch {
                if state
                    .applied
                    .get(&write.key)
                    .is_some_and(|(id, _)| *id > write.id)
                {
                    state.reordered += 1;
                }
                if let Change::Upsert(value) = write.change {
                    state.applied.insert(write.key, (write.id, value));
                }
            }
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

async fn two_flushers_under_load_flush_one_at_a_time_in_key_order(env: &Env) {
    // Two processes write and flush under steady load for many times the
    // lease; one hands over half-way. The sink never runs twice at once,
    // and never gets a key's write after a later one.
    let sink = Ordered::default();
    let start = |cache: &Cache| {
        WriteBehind::builder("steady", cache, sink.clone())
            .key_template("user:<id>")
            .ttl(Duration::from_secs(60))
            .takeover_after(Duration::from_millis(300))
            .max_delay(Duration::from_millis(20))
            .start()
            .expect("valid")
    };
    let (a, b) = (env.cache(), env.cache());
    let (wa, wb) = (start(&a), start(&b));
    let last: Arc<Mutex<BTreeMap<u32, (redis_cached::JournalId, String)>>> = Arc::default();
    let writer = |wb: WriteBehind<u32, String>, lane: u32| {
        let last = Arc::clone(&last);
        tokio::spawn(async move {
            let until = Instant::now() + Duration::from_millis(2_500);
            let mut n = 0;
            while Instant::now() < until {
                let key = n % 10;
                let value = format!("{lane}-{n}");
                let id = match wb.write(key, &value).await {
                    Ok(id) => id,
                    // This process's write-behind was shut down.
                    Err(Error::Closed) => break,
                    Err(err) => panic!("not journaled: {err}"),
                };
                let mut last = last.lock().expect("not poisoned");
                if last.get(&key).is_none_or(|(at, _)| *at < id) {
                    last.insert(key, (id, value));
                }
                n += 1;
            }
        })
    };
    let (ta, tb) = (writer(wa.clone(), 0), writer(wb.clone(), 1));
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(wa.shutdown(Duration::ZERO).await.map(|_| ()), Ok(()));
    ta.await.expect("no panic");
    tb.await.expect("no panic");
    drained(&wb).await;
    let state = sink.state.lock().expect("not poisoned");
    assert_eq!(
        sink.max_running.load(Ordering::SeqCst),
        1,
        "two flushers ran at once"
    );
    assert_eq!(state.reordered, 0, "a write landed after a later one");
    let last = last.lock().expect("not poisoned");
    assert_eq!(state.applied, *last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_sink_keeps_refusing_goes_to_the_dead_letters() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).expect("valid URL");
    let sink = Recorder {
        poison: Some(13),
        ..Recorder::default()
    };
    let wb = builder("dead", &cache, sink.clone())
        .max_attempts(2)
        .max_delay(Duration::from_millis(200))
        .start()
        .expect("valid");
    for id in 10..20 {
        wb.write(id, &format!("row {id}")).await.expect("journaled");
    }
    drained(&wb).await;
    let flushed: Vec<u32> = sink.writes().iter().map(|w| w.key).collect();
    assert_eq!(flushed.len(), 9, "{flushed:?}");
    assert!(!flushed.contains(&13));
    let stats = wb.stats();
    assert_eq!(stats.dead_letters, 1, "{stats:?}");
    assert!(stats.retries >= 2, "{stats:?}");
    let dead: Vec<redis::Value> = server
        .cmd(
            redis::cmd("XRANGE")
                .arg("~wb-dead:{dead}")
                .arg("-")
                .arg("+"),
        )
        .await;
    assert_eq!(dead.len(), 1);
    let text = format!("{dead:?}");
    assert!(text.contains("violates a constraint"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_sink_is_retried_not_fatal() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).expect("valid URL");
    let sink = Recorder {
        panics: Arc::new(AtomicU32::new(2)),
        ..Recorder::default()
    };
    let wb = builder("panics", &cache, sink.clone())
        .start()
        .expect("valid");
    wb.write(1, &"one".to_owned()).await.expect("journaled");
    drained(&wb).await;
    assert_eq!(sink.writes().len(), 1);
    assert_eq!(wb.stats().retries, 2);
    assert_eq!(wb.stats().dead_letters, 0);
}

/// A sink whose first call never returns.
struct Hangs {
    calls: AtomicU32,
    inner: Recorder,
}

impl Sink<u32, String> for Hangs {
    type Error = String;

    async fn write_batch(&self, batch: Vec<Write<u32, String>>) -> Result<(), String> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            std::future::pending::<()>().await;
        }
        self.inner.write_batch(batch).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_sink_call_is_abandoned_and_retried() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).expect("valid URL");
    let recorder = Recorder::default();
    let sink = Hangs {
        calls: AtomicU32::new(0),
        inner: recorder.clone(),
    };
    let wb = WriteBehind::builder("hangs", &cache, sink)
        .key_template("user:<id>")
        .retry(Duration::from_millis(10), Duration::from_millis(50))
        .sink_timeout(Duration::from_millis(300))
        .start()
        .expect("valid");
    wb.write(1, &"one".to_owned()).await.expect("journaled");
    drained(&wb).await;
    assert_eq!(recorder.writes().len(), 1, "flushed by the second call");
    assert_eq!(wb.stats().retries, 1, "the hung call counted as a failure");
    assert_eq!(wb.stats().dead_letters, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_journal_refuses_writes() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).expect("valid URL");
    let wb = builder("full", &cache, Recorder::default())
        .max_len(3)
        .flusher(false)
        .start()
        .expect("valid");
    for id in 0..3 {
        wb.write(id, &"x".to_owned()).await.expect("journaled");
    }
    assert_eq!(wb.write(3, &"x".to_owned()).await, Err(Error::Backlog(3)));
    assert_eq!(
        cache.get::<String>("user:3").await,
        None,
        "a refused write is not in the cache"
    );
    assert_eq!((wb.stats().accepted, wb.stats().refused), (3, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_write_time_is_an_error() {
    let mut server = RedisServer::start();
    let cache = Cache::builder(&server.url())
        .op_timeout(Duration::from_millis(300))
        .build()
        .expect("valid");
    let wb = builder("down", &cache, Recorder::default())
        .start()
        .expect("valid");
    server.kill();
    assert!(wb.write(1, &"x".to_owned()).await.is_err());
    assert_eq!(wb.stats().failed, 1);
    assert_eq!(wb.stats().accepted, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_caller_gives_up_ends_in_the_cache_once_flushed() {
    let server = RedisServer::start();
    let cache = Cache::builder(&server.url())
        .op_timeout(Duration::from_secs(2))
        .build()
        .expect("valid");
    let wb = builder("dropped", &cache, Recorder::default())
        .flusher(false)
        .start()
        .expect("valid");
    wb.write(0, &"warm".to_owned()).await.expect("journaled");
    let _: () = server
        .cmd(redis::cmd("CLIENT").arg("PAUSE").arg(300).arg("WRITE"))
        .await;
    let gave_up =
        tokio::time::timeout(Duration::from_millis(50), wb.write(1, &"late".to_owned())).await;
    assert!(gave_up.is_err(), "the caller gave up");
    tokio::time::sleep(Duration::from_millis(600)).await;
    // It was sent, so it is journaled; the flush puts it in the cache.
    assert_eq!(wb.pending().await, Ok(2));
    let flusher = builder("dropped", &cache, Recorder::default())
        .start()
        .expect("valid");
    drained(&flusher).await;
    assert_eq!(cache.get::<String>("user:1").await.as_deref(), Some("late"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_redis_answers_too_late_leaves_no_older_value_cached() {
    let server = RedisServer::start();
    let cache = Cache::builder(&server.url())
        .op_timeout(Duration::from_millis(100))
        .build()
        .expect("valid");
    let wb = builder("late", &cache, Recorder::default())
        .flusher(false)
        .start()
        .expect("valid");
    wb.write(1, &"old".to_owned()).await.expect("journaled");
    let _: () = server
        .cmd(redis::cmd("CLIENT").arg("PAUSE").arg(300).arg("WRITE"))
        .await;
    let late = wb.write(1, &"new".to_owned()).await;
    assert!(matches!(late, Err(Error::Timeout(_))), "{late:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Redis journaled it after all; the cache no longer serves "old".
    assert_eq!(wb.pending().await, Ok(2));
    let users = Users::new(&cache);
    users
        .rows
        .lock()
        .expect("not poisoned")
        .insert(1, "older row".into());
    // A reader meanwhile fills the key from the database's older row…
    assert_eq!(users.user(1).await.as_deref(), Some("older row"));
    // …which the flush replaces with the write the database now holds.
    let flusher = builder("late", &cache, Recorder::default())
        .start()
        .expect("valid");
    drained(&flusher).await;
    assert_eq!(users.user(1).await.as_deref(), Some("new"));
    assert_eq!(users.reads.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_hands_the_journal_over_at_once() {
    let server = RedisServer::start();
    let (a, b) = (
        Cache::redis(&server.url()).expect("valid URL"),
        Cache::redis(&server.url()).expect("valid URL"),
    );
    let first = Recorder::default();
    let wa = builder("handover", &a, first.clone())
        .takeover_after(Duration::from_secs(30))
        .start()
        .expect("valid");
    wa.write(1, &"one".to_owned()).await.expect("journaled");
    drained(&wa).await;
    assert_eq!(wa.shutdown(Duration::from_secs(5)).await, Ok(0));
    // The lease was given up: a second process flushes without waiting 30 s.
    let second = Recorder::default();
    let wb = builder("handover", &b, second.clone())
        .takeover_after(Duration::from_secs(30))
        .start()
        .expect("valid");
    wb.write(2, &"two".to_owned()).await.expect("journaled");
    drained(&wb).await;
    assert_eq!(second.writes().len(), 1);
    assert_eq!(first.writes().len(), 1);
}

#[tokio::test]
async fn write_behind_needs_redis() {
    let cache = Cache::in_memory();
    let err = builder("memory", &cache, Recorder::default())
        .start()
        .expect_err("no journal in process memory");
    assert!(matches!(err, Error::Config(_)), "{err}");
    let err = WriteBehind::builder(
        "no key",
        &Cache::redis("redis://127.0.0.1:1/").expect("valid"),
        Recorder::default(),
    )
    .start()
    .expect_err("a key rule is required");
    assert!(matches!(err, Error::Config(_)), "{err}");
}

// ---------------------------------------------------------------------
// Persistence: Redis restarted between accept and flush.

async fn accept_then_restart(persistence: &[&str]) -> (usize, u64) {
    let mut server = RedisServer::start_with(persistence);
    let writer_cache = Cache::redis(&server.url()).expect("valid URL");
    let writer = builder("restart", &writer_cache, Recorder::default())
        .flusher(false)
        .start()
        .expect("valid");
    for id in 0..100 {
        writer
            .write(id, &format!("row {id}"))
            .await
            .expect("journaled");
    }
    server.restart();
    let sink = Recorder::default();
    let flusher_cache = Cache::redis(&server.url()).expect("valid URL");
    let flusher = builder("restart", &flusher_cache, sink.clone())
        .start()
        .expect("valid");
    tokio::time::sleep(Duration::from_millis(300)).await;
    drained(&flusher).await;
    (
        sink.writes().len(),
        flusher.pending().await.expect("answers"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_with_appendonly_loses_nothing() {
    let (flushed, left) =
        accept_then_restart(&["--appendonly", "yes", "--appendfsync", "always"]).await;
    assert_eq!((flushed, left), (100, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_without_persistence_loses_the_journal() {
    // What the README warns of: the journal is only as durable as Redis.
    let (flushed, left) = accept_then_restart(&[]).await;
    assert_eq!((flushed, left), (0, 0));
}

// ---------------------------------------------------------------------
// Crash: a child process journals 10,000 writes over 1,000 keys into a
// SQLite sink and is SIGKILLed mid-flush; this process takes over.

const WRITES: u32 = 10_000;
const KEYS: u32 = 1_000;

/// The `i`-th write of the crash scenario: a key, and a value or a delete.
fn scenario_write(i: u32) -> (u32, Option<String>) {
    let key = (i * 7_919 + i / KEYS) % KEYS;
    let delete = (i.wrapping_mul(2_654_435_761) >> 7).is_multiple_of(5);
    (key, (!delete).then(|| format!("v{i}")))
}

fn expected_rows() -> BTreeMap<u32, String> {
    let mut rows = BTreeMap::new();
    for i in 0..WRITES {
        match scenario_write(i) {
            (key, Some(value)) => rows.insert(key, value),
            (key, None) => rows.remove(&key),
        };
    }
    rows
}

fn crash_builder(
    cache: &Cache,
    sink: Sqlite,
) -> redis_cached::WriteBehindBuilder<u32, String, Sqlite> {
    WriteBehind::builder("crash", cache, sink)
        .key_template("user:<id>")
        .ttl(Duration::from_secs(600))
        .takeover_after(Duration::from_secs(1))
        .retry(Duration::from_millis(50), Duration::from_millis(400))
}

/// The child's part (run by the crash tests in a process of their own):
/// journals every write, says so, and flushes slowly until killed.
#[test]
fn crash_child() {
    let (Ok(url), Ok(db)) = (
        std::env::var("WB_CHILD_REDIS"),
        std::env::var("WB_CHILD_DB"),
    ) else {
        return; // run directly: nothing to do
    };
    let fail = std::env::var("WB_CHILD_FAIL").is_ok();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let cache = Cache::redis(&url).expect("valid URL");
        let mut sink = Sqlite::new(Path::new(&db));
        sink.announce = true;
        sink.after_commit = Duration::from_millis(300);
        if fail {
            sink.fail_at = 1;
            sink.fail_for = Duration::from_secs(2);
        }
        let wb = crash_builder(&cache, sink)
            .batch_size(50)
            .start()
            .expect("valid");
        let wb = Arc::new(wb);
        let mut tasks = Vec::new();
        for lane in 0..8 {
            let wb = Arc::clone(&wb);
            tasks.push(tokio::spawn(async move {
                // Each lane keeps its writes in order; lanes own
                // disjoint writes, so every key's writes are in order.
                for i in (0..WRITES).filter(|i| scenario_write(*i).0 % 8 == lane) {
                    match scenario_write(i) {
                        (key, Some(value)) => wb.write(key, &value).await,
                        (key, None) => wb.delete(key).await,
                    }
                    .expect("journaled");
                }
            }));
        }
        for task in tasks {
            task.await.expect("no panic");
        }
        println!("accepted {WRITES}");
        std::future::pending::<()>().await;
    });
}

fn crash_and_recover(sink_fails: bool) {
    let server = RedisServer::start_with(&["--appendonly", "yes"]);
    let dir = std::env::temp_dir().join(format!("redis-cached-wb-{}", server.port()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a directory");
    let db = dir.join("users.db");
    let mut child = Command::new(std::env::current_exe().expect("this test binary"))
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env("WB_CHILD_REDIS", server.url())
        .env("WB_CHILD_DB", &db)
        .envs(sink_fails.then_some(("WB_CHILD_FAIL", "1")))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the child starts");
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut accepted = false;
    let mut commits_after = 0;
    // Killed right after a batch commits, before it is acknowledged: the
    // hardest case, a batch applied that the journal still holds.
    while commits_after < 3 {
        let line = lines
            .next()
            .expect("the child ended early")
            .expect("readable output");
        if line.starts_with("accepted") {
            accepted = true;
        } else if line.starts_with("committed") && accepted {
            commits_after += 1;
        }
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let cache = Cache::redis(&server.url()).expect("valid URL");
        let mut sink = Sqlite::new(&db);
        if sink_fails {
            sink.fail_at = 1;
            sink.fail_for = Duration::from_secs(2);
        }
        let left = cache_pending(&server).await;
        assert!(left > 0, "the child was killed mid-flush");
        let wb = crash_builder(&cache, sink.clone())
            .batch_size(500)
            .start()
            .expect("valid");
        let deadline = Instant::now() + Duration::from_secs(120);
        while wb.pending().await.expect("answers") > 0 {
            assert!(Instant::now() < deadline, "not flushed in 120 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stats = wb.stats();
        assert!(
            stats.claimed > 0,
            "the dead flusher's batch was taken over: {stats:?}"
        );
        assert_eq!(stats.dead_letters, 0, "{stats:?}");
        if sink_fails {
            assert!(stats.retries > 0, "{stats:?}");
        }
        assert_eq!(sink.reordered(), 0, "a write landed after a later one");
        let rows = sink.rows();
        let expected = expected_rows();
        assert_eq!(rows.len(), expected.len());
        assert!(
            rows == expected,
            "the table differs from the last write of each key"
        );
    });
    let _ = std::fs::remove_dir_all(&dir);
}

async fn cache_pending(server: &RedisServer) -> u64 {
    server.cmd(redis::cmd("XLEN").arg("~wb:{crash}")).await
}

#[test]
fn a_flusher_killed_mid_flush_loses_and_reorders_nothing() {
    crash_and_recover(false);
}

#[test]
fn a_flusher_killed_mid_flush_with_a_failing_sink_loses_nothing() {
    crash_and_recover(true);
}
