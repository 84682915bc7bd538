//! Write-behind under failures: a row the database always refuses, a
//! journaled write nobody here can decode, a lease that runs out while the
//! sink works, a full dead-letter stream, a Redis too old for the journal,
//! a panic in the application's code, writes after a shutdown, and keys
//! that must be the getter's.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis_cached::{redis_cached, Cache, Change, Error, Sink, Write, WriteBehind};
use serde::{Deserialize, Serialize};
use support::proxy::Proxy;
use support::write_behind::{builder, drained, Recorder, Users};
use support::RedisServer;

/// Waits until `done` holds, at most `within`.
async fn until(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_row_is_buried_with_the_default_ratios_and_the_rest_keeps_flowing() {
    // The defaults scaled down 10x (lease 1 s, retry 10 ms to 1 s,
    // max_delay 10 ms, sink_timeout 3 s), max_attempts at its default.
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).expect("valid URL");
    let sink = Recorder {
        poison: Some(13),
        ..Recorder::default()
    };
    let wb = WriteBehind::builder("refused", &cache, sink.clone())
        .key_template("user:<id>")
        .ttl(Duration::from_secs(60))
        .takeover_after(Duration::from_secs(1))
        .retry(Duration::from_millis(10), Duration::from_secs(1))
        .max_delay(Duration::from_millis(10))
        .sink_timeout(Duration::from_secs(3))
        .start()
        .expect("valid");
    let users = Users::new(&cache);
    for id in 10..20 {
        wb.write(id, &format!("row {id}")).await.expect("journaled");
    }
    // A trickle of other writes all along.
    let stop = Arc::new(AtomicBool::new(false));
    let last: Arc<Mutex<BTreeMap<u32, String>>> = Arc::default();
    let trickle = {
        let (wb, stop, last) = (wb.clone(), Arc::clone(&stop), Arc::clone(&last));
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let (key, value) = (100 + n % 50, format!("t{n}"));
                wb.write(key, &value).await.expect("journaled");
                last.lock().expect("not poisoned").insert(key, value);
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    until(Duration::from_secs(40), "the refused row buried", || {
        wb.stats().dead_letters == 1
    })
    .await;
    // The database never got row 13: the cache no longer serves it.
    assert_eq!(users.user(13).await, None);
    assert_eq!(
        users.reads.load(Ordering::SeqCst),
        1,
        "read from the database"
    );
    // The rest flows again at its usual pace.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    trickle.await.expect("no panic");
    drained(&wb).await;
    let stats = wb.stats();
    assert_eq!(stats.dead_letters, 1, "{stats:?}");
    assert_eq!(
        stats.claimed, 0,
        "nothing re-claimed from itself: {stats:?}"
    );
    assert!(
        stats.last_flush_lag < Duration::from_millis(500),
        "the lag came back down: {stats:?}"
    );
    let mut flushed: BTreeMap<u32, String> = BTreeMap::new();
    for write in sink.writes() {
        if let Change::Upsert(value) = write.change {
            flushed.insert(write.key, value);
        }
    }
    assert!(!flushed.contains_key(&13));
    for id in (10..20).filter(|id| *id != 13) {
        assert_eq!(flushed.get(&id), Some(&format!("row {id}")));
    }
    for (key, value) in last.lock().expect("not poisoned").iter() {
        assert_eq!(flushed.get(key), Some(value), "key {key}");
    }
}

/// A sink for a newer version of the application, whose values are any
/// JSON.
#[derive(Clone, Default)]
struct Documents(Arc<Mutex<Vec<Write<u32, serde_json::Value>>>>);

impl Sink<u32, serde_json::Value> for Documents {
    type Error = String;

    async fn write_batch(&self, batch: Vec<Write<u32, serde_json::Value>>) -> Result<(), String> {
        self.0.lock().expect("not poisoned").extend(batch);
        Ok(())
    }
}

fn documents(cache: &Cache, sink: Documents) -> WriteBehind<u32, serde_json::Value> {
    WriteBehind::builder("rolling", cache, sink)
        .key_template("user:<id>")
        .retry(Duration::from_millis(10), Duration::from_millis(50))
        .start()
        .expect("valid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_write_waits_for_a_flusher_that_can_decode_it() {
    // A rolling deploy: a newer process journals a format that the older
    // one, flushing, cannot decode.
    let server = RedisServer::start();
    let old_cache = Cache::redis(&server.url()).expect("valid URL");
    let old_sink = Recorder::default();
    let old = builder("rolling", &old_cache, old_sink.clone())
        .start()
        .expect("valid");
    let new_cache = Cache::redis(&server.url()).expect("valid URL");
    let newer = WriteBehind::builder("rolling", &new_cache, Documents::default())
        .key_template("user:<id>")
        .flusher(false)
        .start()
        .expect("valid");
    newer
        .write(7, &serde_json::json!({"name": "Ada", "plan": 3}))
        .await
        .expect("journaled");
    old.write(8, &"fine".to_owned()).await.expect("journaled");
    until(Duration::from_secs(10), "the other write flushed", || {
        old_sink.writes().len() == 1
    })
    .await;
    // Parked and retried, not buried.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = old.stats();
    assert_eq!((stats.parked, stats.dead_letters), (1, 0), "{stats:?}");
    assert_eq!(old.pending().await, Ok(1));
    // The old process stops; a new one flushes what it could not.
    old.shutdown(Duration::ZERO).await.expect("answers");
    let sink = Documents::default();
    let new_flusher = documents(&new_cache, sink.clone());
    drained(&new_flusher).await;
    let flushed = sink.0.lock().expect("not poisoned").clone();
    assert_eq!(flushed.len(), 1, "{flushed:?}");
    assert_eq!(flushed[0].key, 7);
    assert_eq!(
        flushed[0].change,
        Change::Upsert(serde_json::json!({"name": "Ada", "plan": 3}))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_write_is_replaced_by_a_later_one_or_buried_after_its_bound() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).expect("valid URL");
    let sink = Recorder::default();
    let old = builder("rolling", &cache, sink.clone())
        .park_undecodable_for(Duration::from_millis(800))
        .start()
        .expect("valid");
    let newer = WriteBehind::builder("rolling", &cache, Documents::default())
        .key_template("user:<id>")
        .flusher(false)
        .start()
        .expect("valid");
    newer
        .write(9, &serde_json::json!([1, 2]))
        .await
        .expect("journaled");
    newer
        .write(10, &serde_json::json!({"x": 1}))
        .await
        .expect("journaled");
    until(Duration::from_secs(10), "both parked", || {
        old.stats().parked == 2
    })
    .await;
    // A later write of key 9 replaces its parked one.
    old.write(9, &"later".to_owned()).await.expect("journaled");
    until(Duration::from_secs(10), "key 9 flushed", || {
        sink.writes().iter().any(|w| w.key == 9)
    })
    .await;
    assert_eq!(
        sink.writes()[0].change,
        Change::Upsert("later".to_owned()),
        "only the later write reaches the sink"
    );
    // Key 10 is buried once parked for 800 ms, and its cache entry, which
    // the database never got, invalidated.
    until(Duration::from_secs(10), "key 10 buried", || {
        old.stats().dead_letters == 1
    })
    .await;
    drained(&old).await;
    assert_eq!(cache.get::<serde_json::Value>("user:10").await, None);
    assert_eq!(
        cache.get::<String>("user:9").await.as_deref(),
        Some("later")
    );
    let dead: Vec<redis::Value> = server
        .cmd(
            redis::cmd("XRANGE")
                .arg("~wb-dead:{rolling}")
                .arg("-")
                .arg("+"),
        )
        .await;
    assert_eq!(dead.len(), 1);
    let text = format!("{dead:?}");
    assert!(text.contains("cannot be decoded"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_parked_writes_do_not_hold_up_the_others() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).expect("valid URL");
    let newer = WriteBehind::builder("stall", &cache, Documents::default())
        .key_template("user:<id>")
        .flusher(false)
        .start()
        .expect("valid");
    for id in 0..40 {
        newer
            .write(id, &serde_json::json!({"id": id}))
            .await
            .expect("journaled");
    }
    let sink = Recorder::default();
    let old = WriteBehind::builder("stall", &cache, sink.clone())
        .key_template("user:<id>")
        .batch_size(2)
        .max_delay(Duration::from_millis(10))
        .retry(Duration::from_millis(200), Duration::from_secs(5))
        .start()
        .expect("valid");
    old.write(100, &"fine".to_owned()).await.expect("journaled");
    until(
        Duration::from_secs(10),
        "the decodable write flushed",
        || !sink.writes().is_empty(),
    )
    .await;
    assert_eq!(old.stats().dead_letters, 0);
}

/// A sink whose call never ends, and which says when its call started and
/// when its future was dropped.
#[derive(Clone, Default)]
struct Stuck {
    started: Arc<tokio::sync::Notify>,
    dropped: Arc<Mutex<Option<Instant>>>,
}

struct DropClock(Arc<Mutex<Option<Instant>>>);

impl Drop for DropClock {
    fn drop(&mut self) {
        *self.0.lock().expect("not poisoned") = Some(Instant::now());
    }
}

impl Sink<u32, String> for Stuck {
    type Error = String;

    async fn write_batch(&self, _: Vec<Write<u32, String>>) -> Result<(), String> {
        let _clock = DropClock(Arc::clone(&self.dropped));
        self.started.notify_one();
        std::future::pending::<()>().await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_call_is_dropped_when_the_lease_runs_out_by_the_flushers_own_clock() {
    let server = RedisServer::start();
    let cache = Cache::builder(&server.url())
        .op_timeout(Duration::from_millis(150))
        .build()
        .expect("valid");
    let sink = Stuck::default();
    let wb = WriteBehind::builder("fenced", &cache, sink.clone())
        .key_template("user:<id>")
        .takeover_after(Duration::from_millis(600))
        .max_delay(Duration::from_millis(10))
        .sink_timeout(Duration::from_secs(60))
        .start()
        .expect("valid");
    let started = sink.started.notified();
    wb.write(1, &"one".to_owned()).await.expect("journaled");
    tokio::time::timeout(Duration::from_secs(5), started)
        .await
        .expect("the sink was called");
    // Redis freezes: no renewal gets through, and no other process could
    // be told the lease is still held.
    server.pause();
    let frozen = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let dropped = *sink.dropped.lock().expect("not poisoned");
    server.resume();
    let dropped = dropped.expect("the sink call was abandoned while Redis was frozen");
    assert!(
        dropped.duration_since(frozen) < Duration::from_millis(1500),
        "abandoned {:?} after the freeze, the lease being 600 ms",
        dropped.duration_since(frozen)
    );
}

/// A sink whose first call takes 200 ms, and says whether it finished.
#[derive(Clone, Default)]
struct Slow {
    started: Arc<tokio::sync::Notify>,
    calls: Arc<AtomicU32>,
    first_finished: Arc<AtomicBool>,
    inner: Recorder,
}

impl Sink<u32, String> for Slow {
    type Error = String;

    async fn write_batch(&self, batch: Vec<Write<u32, String>>) -> Result<(), String> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            self.started.notify_one();
            tokio::time::sleep(Duration::from_millis(200)).await;
            self.first_finished.store(true, Ordering::SeqCst);
        }
        self.inner.write_batch(batch).await
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_paused_flusher_never_finishes_a_sink_call_past_its_lease() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).expect("valid URL");
    let sink = Slow::default();
    let wb = WriteBehind::builder("paused", &cache, sink.clone())
        .key_template("user:<id>")
        .takeover_after(Duration::from_millis(300))
        .max_delay(Duration::from_millis(10))
        .retry(Duration::from_millis(10), Duration::from_millis(50))
        .start()
        .expect("valid");
    let started = sink.started.notified();
    wb.write(1, &"one".to_owned()).await.expect("journaled");
    tokio::time::timeout(Duration::from_secs(5), started)
        .await
        .expect("the sink was called");
    // The process stops for three leases (a pause, a stop-the-world): on
    // waking, its lease is over by its own clock.
    std::thread::sleep(Duration::from_millis(900));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !sink.first_finished.load(Ordering::SeqCst),
        "the call went on after the lease ran out"
    );
    drained(&wb).await;
    assert_eq!(sink.inner.writes().len(), 1, "flushed by a later call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_dead_letters_keep_writes_in_the_journal_until_drained() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).expect("valid URL");
    let sink = Recorder {
        refuse_below: 5,
        ..Recorder::default()
    };
    let wb = builder("capped", &cache, sink.clone())
        .max_attempts(1)
        .max_dead_letters(3)
        .max_delay(Duration::from_millis(20))
        .start()
        .expect("valid");
    for id in 0..5 {
        wb.write(id, &format!("row {id}")).await.expect("journaled");
    }
    // Other writes pass meanwhile: the five are refused rows, not an outage.
    for id in 100..110 {
        wb.write(id, &format!("row {id}")).await.expect("journaled");
    }
    until(Duration::from_secs(20), "three buried, two held", || {
        let stats = wb.stats();
        stats.dead_letters == 3 && stats.dead_letters_full >= 2
    })
    .await;
    // Nothing dropped: two wait in the journal (once the others are out).
    let deadline = Instant::now() + Duration::from_secs(20);
    while wb.pending().await != Ok(2) {
        assert!(Instant::now() < deadline, "{:?}", wb.pending().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held: u64 = server
        .cmd(redis::cmd("XLEN").arg("~wb-dead:{capped}"))
        .await;
    assert_eq!(held, 3);
    // Draining the dead letters makes room: the two follow.
    let _: () = server.cmd(redis::cmd("DEL").arg("~wb-dead:{capped}")).await;
    wb.write(200, &"more".to_owned()).await.expect("journaled");
    drained(&wb).await;
    until(Duration::from_secs(10), "five dead letters counted", || {
        wb.stats().dead_letters >= 5
    })
    .await;
    assert_eq!(wb.stats().dead_letters, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_buries_nothing_and_costs_the_database_one_call_per_back_off() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).expect("valid URL");
    let sink = Recorder::default();
    sink.refuse_all.store(true, Ordering::SeqCst);
    let wb = builder("outage", &cache, sink.clone())
        .max_attempts(2)
        .retry(Duration::from_millis(10), Duration::from_millis(200))
        .max_delay(Duration::from_millis(20))
        .start()
        .expect("valid");
    for id in 0..20 {
        wb.write(id, &format!("row {id}")).await.expect("journaled");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls = sink.calls.load(Ordering::SeqCst);
    let stats = wb.stats();
    assert_eq!(
        stats.dead_letters, 0,
        "an outage is not a refused write: {stats:?}"
    );
    // Back-off from 10 ms doubling to 200 ms: about 20 calls in 3 s.
    assert!(calls <= 40, "{calls} calls in 3 s of outage");
    // The database comes back: every write lands.
    sink.refuse_all.store(false, Ordering::SeqCst);
    drained(&wb).await;
    assert_eq!(sink.writes().len(), 20);
    assert_eq!(wb.stats().dead_letters, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_too_old_for_the_journal_is_refused_at_the_first_write() {
    let server = RedisServer::start();
    let info: String = server.cmd(redis::cmd("INFO").arg("server")).await;
    let version = info
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .expect("a version")
        .trim()
        .to_owned();
    // The same server, saying it is a 6.0.
    let mut old = String::from("6.0.");
    while old.len() < version.len() {
        old.push('9');
    }
    assert_eq!(
        old.len(),
        version.len(),
        "the version {version} is long enough"
    );
    let proxy = Proxy::start(server.port());
    proxy.rewrite_replies(version.as_bytes(), old.as_bytes());
    let cache = Cache::redis(&proxy.url()).expect("valid URL");
    let sink = Recorder::default();
    let wb = builder("old", &cache, sink.clone()).start().expect("valid");
    let refused = wb.write(1, &"x".to_owned()).await;
    match refused {
        Err(Error::Config(why)) => assert!(why.contains("6.2"), "{why}"),
        other => panic!("not refused: {other:?}"),
    }
    // Nothing journaled, and the flusher takes no lease.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held: u64 = server.cmd(redis::cmd("XLEN").arg("~wb:{old}")).await;
    let leased: u64 = server
        .cmd(redis::cmd("EXISTS").arg("~wb-lease:{old}"))
        .await;
    assert_eq!((held, leased), (0, 0));
    // Upgraded in place: the handle finds out within seconds, without a
    // restart of the application.
    proxy.heal();
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(err) = wb.write(1, &"x".to_owned()).await {
        assert!(Instant::now() < deadline, "still refused: {err:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drained(&wb).await;
    assert_eq!(sink.writes().len(), 1);
}

/// A value whose `Clone` panics while `BOMBS` is above zero, and always
/// for `Bomb("boom")`.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Bomb(String);

static BOMBS: AtomicU32 = AtomicU32::new(0);

impl Clone for Bomb {
    fn clone(&self) -> Self {
        if self.0 == "boom"
            || BOMBS
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            panic!("Bomb::clone");
        }
        Bomb(self.0.clone())
    }
}

/// An error whose `Display` panics.
struct Grumpy;

impl std::fmt::Display for Grumpy {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        panic!("Grumpy::fmt")
    }
}

#[derive(Clone, Default)]
struct Bombs {
    fail_first: Arc<AtomicBool>,
    writes: Arc<Mutex<Vec<Write<u32, Bomb>>>>,
}

impl Sink<u32, Bomb> for Bombs {
    type Error = Grumpy;

    async fn write_batch(&self, batch: Vec<Write<u32, Bomb>>) -> Result<(), Grumpy> {
        if self.fail_first.swap(false, Ordering::SeqCst) {
            return Err(Grumpy);
        }
        self.writes.lock().expect("not poisoned").extend(batch);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_applications_code_does_not_stop_the_flusher() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).expect("valid URL");
    let sink = Bombs::default();
    sink.fail_first.store(true, Ordering::SeqCst);
    let wb = WriteBehind::builder("bombs", &cache, sink.clone())
        .key_template("user:<id>")
        .max_attempts(2)
        .retry(Duration::from_millis(10), Duration::from_millis(50))
        .start()
        .expect("valid");
    BOMBS.store(1, Ordering::SeqCst);
    wb.write(1, &Bomb("one".into())).await.expect("journaled");
    // No other write: the flusher itself must carry on.
    drained(&wb).await;
    let stats = wb.stats();
    // Both panics are failures of the sink call, retried.
    assert_eq!((stats.retries, stats.flusher_restarts), (2, 0), "{stats:?}");
    let writes = sink.writes.lock().expect("not poisoned").clone();
    assert_eq!(writes.len(), 1);
    assert_eq!(writes[0].change, Change::Upsert(Bomb("one".into())));
    // A value whose Clone always panics is one refused write: buried, and
    // the others flow.
    wb.write(2, &Bomb("boom".into())).await.expect("journaled");
    for id in 3..6 {
        wb.write(id, &Bomb(format!("v{id}")))
            .await
            .expect("journaled");
    }
    drained(&wb).await;
    until(Duration::from_secs(10), "the dead letter counted", || {
        wb.stats().dead_letters >= 1
    })
    .await;
    assert_eq!(wb.stats().dead_letters, 1);
    assert_eq!(sink.writes.lock().expect("not poisoned").len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_after_shutdown_are_refused() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).expect("valid URL");
    let wb = builder("closed", &cache, Recorder::default())
        .start()
        .expect("valid");
    let clone = wb.clone();
    wb.write(1, &"before".to_owned()).await.expect("journaled");
    assert_eq!(wb.shutdown(Duration::from_secs(5)).await, Ok(0));
    assert_eq!(wb.write(2, &"after".to_owned()).await, Err(Error::Closed));
    assert_eq!(clone.delete(1).await, Err(Error::Closed));
    let held: u64 = server.cmd(redis::cmd("XLEN").arg("~wb:{closed}")).await;
    assert_eq!(held, 0, "nothing journaled after the shutdown");
    assert_eq!(cache.get::<String>("user:2").await, None);
}

struct Pages {
    cache: Cache,
    reads: AtomicU32,
}

impl Pages {
    #[redis_cached(key = "pv:<page>", ttl = 60, cache = self.cache)]
    async fn views(&self, page: String) -> Option<u64> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        None
    }

    #[redis_cached(key = "{order:<tenant>}:<id>", ttl = 60, version = 2, cache = self.cache)]
    async fn order(&self, tenant: &str, id: u32) -> Option<String> {
        let _ = (tenant, id);
        self.reads.fetch_add(1, Ordering::SeqCst);
        None
    }
}

#[derive(Clone, Default)]
struct Nowhere;

impl<K: Send + 'static, V: Send + 'static> Sink<K, V> for Nowhere {
    type Error = String;

    async fn write_batch(&self, _: Vec<Write<K, V>>) -> Result<(), String> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_template_renders_as_the_getters() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).expect("valid URL");
    let pages = Pages {
        cache: cache.clone(),
        reads: AtomicU32::new(0),
    };
    // A value the template escapes: `/` is not a key byte.
    let views = WriteBehind::builder("views", &cache, Nowhere)
        .key_template("pv:<page>")
        .start()
        .expect("valid");
    views
        .write("/p/0".to_owned(), &5u64)
        .await
        .expect("journaled");
    assert_eq!(pages.views("/p/0".to_owned()).await, Some(5));
    // A tuple fills several placeholders; a version as the getter's.
    let orders = WriteBehind::builder("orders", &cache, Nowhere)
        .key_template("{order:<tenant>}:<id>")
        .version(2)
        .start()
        .expect("valid");
    orders
        .write(("acme corp".to_owned(), 7u32), &"shipped".to_owned())
        .await
        .expect("journaled");
    assert_eq!(
        pages.order("acme corp", 7).await.as_deref(),
        Some("shipped")
    );
    assert_eq!(
        pages.reads.load(Ordering::SeqCst),
        0,
        "both read from the cache"
    );
    // A template the key cannot fill, or the attribute would refuse.
    for bad in ["pv:<a>:<b>", "pv", "pv:<page", "pv:<a><b>", "pv:~<a>"] {
        let started = WriteBehind::builder("bad", &cache, Nowhere)
            .key_template(bad)
            .start()
            .map(|_: WriteBehind<String, u64>| ());
        assert!(
            matches!(started, Err(Error::Config(_))),
            "{bad}: {started:?}"
        );
    }
    let untemplated = WriteBehind::builder("bad", &cache, Nowhere)
        .start()
        .map(|_: WriteBehind<u32, u64>| ());
    assert!(matches!(untemplated, Err(Error::Config(_))));
}

/// The fields of the journal entries of `stream`, oldest first.
async fn entries(server: &RedisServer, stream: &str) -> Vec<(String, Vec<(String, Vec<u8>)>)> {
    server
        .cmd(redis::cmd("XRANGE").arg(stream).arg("-").arg("+"))
        .await
}

/// Adds an entry with these fields to `stream`, as another program could.
async fn forge(server: &RedisServer, stream: &str, id: &str, fields: &[(String, Vec<u8>)]) {
    let mut add = redis::cmd("XADD");
    add.arg(stream).arg(id);
    for (name, value) in fields {
        add.arg(name).arg(value);
    }
    let _: String = server.cmd(&add).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_integrity_key_entries_another_program_added_never_reach_the_sink() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).expect("valid URL");
    // Parked for a flusher with the right key, then buried.
    let signed = |flusher: bool, sink: Recorder| {
        builder("signed", &cache, sink)
            .integrity_key(b"a key the application holds")
            .park_undecodable_for(Duration::from_millis(300))
            .flusher(flusher)
            .start()
            .expect("valid")
    };
    let writer = signed(false, Recorder::default());
    writer.write(7, &"ada".to_owned()).await.expect("journaled");
    let legit = entries(&server, "~wb:{signed}").await;
    let fields = legit[0].1.clone();
    // A neighbour adds: the same write unsigned (as a forged upsert would
    // be), a signed one with its value changed, and the signed one again,
    // ten minutes in the future (a replay).
    let unsigned: Vec<_> = fields
        .iter()
        .filter(|(name, _)| name == "k" || name == "v")
        .cloned()
        .collect();
    forge(&server, "~wb:{signed}", "*", &unsigned).await;
    let mut tampered = fields.clone();
    for (name, value) in &mut tampered {
        if name == "v" {
            let at = value.len() - 2;
            value[at] = b'x';
        }
    }
    forge(&server, "~wb:{signed}", "*", &tampered).await;
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis()
        + 600_000;
    forge(&server, "~wb:{signed}", &format!("{later}-0"), &fields).await;
    let sink = Recorder::default();
    let flusher = signed(true, sink.clone());
    drained(&flusher).await;
    let writes = sink.writes();
    assert_eq!(writes.len(), 1, "only the signed write: {writes:?}");
    assert_eq!(writes[0].change, Change::Upsert("ada".to_owned()));
    // The journal empties as each dead letter lands; the count follows.
    until(
        Duration::from_secs(10),
        "three dead letters counted",
        || flusher.stats().dead_letters >= 3,
    )
    .await;
    assert_eq!(flusher.stats().dead_letters, 3);
    let dead: String = entries(&server, "~wb-dead:{signed}")
        .await
        .iter()
        .flat_map(|(_, fields)| fields.iter())
        .filter(|(name, _)| name == "error")
        .map(|(_, why)| String::from_utf8_lossy(why).into_owned() + "\n")
        .collect();
    for why in ["not signed", "integrity check", "another time"] {
        assert!(dead.contains(why), "{why}: {dead}");
    }
}

#[tokio::test]
async fn an_integrity_key_anyone_could_guess_is_refused() {
    // Refused before anything connects: no server needed.
    let cache = Cache::redis("redis://127.0.0.1:1/").expect("valid URL");
    for short in [&b""[..], b"secret", b"fifteen bytes.."] {
        let refused = builder("signed", &cache, Recorder::default())
            .integrity_key(short)
            .start();
        assert!(
            matches!(&refused, Err(Error::Config(why)) if why.contains("16 bytes")),
            "{short:?}: {refused:?}"
        );
    }
    builder("signed", &cache, Recorder::default())
        .integrity_key(b"sixteen bytes..!")
        .flusher(false)
        .start()
        .expect("16 bytes are enough");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_larger_than_max_value_bytes_never_reaches_the_sink() {
    let server = RedisServer::start();
    let cache = Cache::builder(&server.url())
        .max_value_bytes(1024)
        .build()
        .expect("valid");
    let writer = builder("bounded", &cache, Recorder::default())
        .flusher(false)
        .start()
        .expect("valid");
    writer
        .write(1, &"small".to_owned())
        .await
        .expect("journaled");
    let mut fields = entries(&server, "~wb:{bounded}").await[0].1.clone();
    for (name, value) in &mut fields {
        if name == "v" {
            value.resize(64 * 1024, b' ');
        }
    }
    forge(&server, "~wb:{bounded}", "*", &fields).await;
    let sink = Recorder::default();
    let flusher = builder("bounded", &cache, sink.clone())
        .park_undecodable_for(Duration::from_millis(300))
        .start()
        .expect("valid");
    drained(&flusher).await;
    assert_eq!(sink.writes().len(), 1);
    until(Duration::from_secs(10), "the dead letter counted", || {
        flusher.stats().dead_letters >= 1
    })
    .await;
    assert_eq!(flusher.stats().dead_letters, 1);
    // Never handed to the sink, never lost: the dead letter keeps it.
    let dead = entries(&server, "~wb-dead:{bounded}").await;
    let kept = dead[0]
        .1
        .iter()
        .find(|(name, _)| name == "v")
        .map(|(_, v)| v.len());
    assert_eq!(kept, Some(64 * 1024));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_blocked_by_the_largest_id_is_a_clear_error_not_an_outage() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).expect("valid URL");
    let wb = builder("blocked", &cache, Recorder::default())
        .start()
        .expect("valid");
    wb.write(1, &"before".to_owned()).await.expect("journaled");
    let _: String = server
        .cmd(
            redis::cmd("XADD")
                .arg("~wb:{blocked}")
                .arg("18446744073709551615-18446744073709551615")
                .arg("k")
                .arg("x"),
        )
        .await;
    for _ in 0..10 {
        let refused = wb.write(2, &"after".to_owned()).await;
        assert_eq!(refused, Err(Error::Rejected("JOURNALBLOCKED".into())));
    }
    // Redis answered each time: not held against the breaker.
    assert_eq!(cache.stats().errors, 0);
    assert_eq!(
        cache.get::<String>("user:1").await.as_deref(),
        Some("before")
    );
}

/// A sink that refuses keys below `refuse_below`, and says when it took
/// each other write.
#[derive(Clone, Default)]
struct Timed {
    refuse_below: u32,
    took: Arc<Mutex<Vec<(u32, Instant)>>>,
}

impl Sink<u32, String> for Timed {
    type Error = String;

    async fn write_batch(&self, batch: Vec<Write<u32, String>>) -> Result<(), String> {
        if let Some(w) = batch.iter().find(|w| w.key < self.refuse_below) {
            return Err(format!("row {} refused", w.key));
        }
        let now = Instant::now();
        self.took
            .lock()
            .expect("not poisoned")
            .extend(batch.iter().map(|w| (w.key, now)));
        Ok(())
    }
}

/// The defaults scaled down 10x.
fn scaled(
    name: &str,
    cache: &Cache,
    sink: Timed,
) -> redis_cached::WriteBehindBuilder<u32, String, Timed> {
    WriteBehind::builder(name, cache, sink)
        .key_template("user:<id>")
        .takeover_after(Duration::from_secs(1))
        .retry(Duration::from_millis(10), Duration::from_secs(1))
        .max_delay(Duration::from_millis(10))
        .sink_timeout(Duration::from_secs(3))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_refused_rows_hold_up_no_other_write() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).expect("valid URL");
    let sink = Timed {
        refuse_below: 10,
        ..Timed::default()
    };
    let wb = scaled("rows", &cache, sink.clone())
        .max_attempts(3)
        .start()
        .expect("valid");
    for id in 0..10 {
        wb.write(id, &format!("bad {id}")).await.expect("journaled");
    }
    let mut written = Vec::new();
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < Duration::from_secs(6) {
        let key = 1000 + n;
        wb.write(key, &format!("t{n}")).await.expect("journaled");
        written.push((key, Instant::now()));
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drained(&wb).await;
    let took: BTreeMap<u32, Instant> = sink
        .took
        .lock()
        .expect("not poisoned")
        .iter()
        .copied()
        .collect();
    let mut lags: Vec<Duration> = written
        .iter()
        .map(|(key, at)| {
            took.get(key)
                .map_or(Duration::MAX, |t| t.saturating_duration_since(*at))
        })
        .collect();
    lags.sort_unstable();
    let p90 = lags[lags.len() * 9 / 10];
    assert!(
        p90 < Duration::from_secs(1),
        "p90 lag {p90:?} of {} writes",
        lags.len()
    );
    // The ten are buried once refused alone three times while others pass.
    until(Duration::from_secs(10), "ten dead letters counted", || {
        wb.stats().dead_letters >= 10
    })
    .await;
    assert_eq!(wb.stats().dead_letters, 10, "{:?}", wb.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_the_database_always_refuses_is_buried_all_the_same() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).expect("valid URL");
    let sink = Timed {
        refuse_below: 1,
        ..Timed::default()
    };
    let wb = scaled("hot", &cache, sink.clone())
        .max_attempts(5)
        .start()
        .expect("valid");
    for n in 0..25u32 {
        wb.write(0, &format!("v{n}")).await.expect("journaled");
        wb.write(1000 + n, &format!("o{n}"))
            .await
            .expect("journaled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every new write of the key joins its held ones and their count: it
    // is buried while the others pass, however often it is written.
    until(
        Duration::from_secs(20),
        "the others flushed, the key buried",
        || sink.took.lock().expect("not poisoned").len() == 25 && wb.stats().dead_letters >= 1,
    )
    .await;
    // What is left of the key (its last writes, once nothing else passes)
    // waits in the journal: a few entries, not all 25.
    let left = wb.pending().await.expect("answers");
    assert!(left < 25, "{left} writes of the key left");
}

/// Delivers every write of `stream` to a consumer that then dies: its
/// writes are pending, for the next flusher to take over.
async fn deliver_to_a_dead_flusher(server: &RedisServer, stream: &str) {
    let _: redis::Value = server
        .cmd(
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg("flushers")
                .arg("0")
                .arg("MKSTREAM"),
        )
        .await;
    let _: redis::Value = server
        .cmd(
            redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("flushers")
                .arg("dead")
                .arg("COUNT")
                .arg(1000)
                .arg("STREAMS")
                .arg(stream)
                .arg(">"),
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_that_failed_is_done_again_before_any_write_is_read() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).expect("valid URL");
    let writer = builder("retake", &cache, Recorder::default())
        .flusher(false)
        .start()
        .expect("valid");
    writer.write(1, &"v1".to_owned()).await.expect("journaled");
    writer.write(2, &"a".to_owned()).await.expect("journaled");
    deliver_to_a_dead_flusher(&server, "~wb:{retake}").await;
    writer.write(1, &"v2".to_owned()).await.expect("journaled");
    // The takeover fails for a moment (its XINFO refused).
    let _: () = server
        .cmd(
            redis::cmd("ACL")
                .arg("SETUSER")
                .arg("default")
                .arg("-xinfo"),
        )
        .await;
    let sink = Recorder::default();
    let wb = builder("retake", &cache, sink.clone())
        .max_delay(Duration::from_millis(10))
        .start()
        .expect("valid");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _: () = server
        .cmd(
            redis::cmd("ACL")
                .arg("SETUSER")
                .arg("default")
                .arg("+xinfo"),
        )
        .await;
    drained(&wb).await;
    let key1: Vec<Change<String>> = sink
        .writes()
        .into_iter()
        .filter(|w| w.key == 1)
        .map(|w| w.change)
        .collect();
    assert_eq!(
        key1.last(),
        Some(&Change::Upsert("v2".to_owned())),
        "{key1:?}"
    );
    assert!(
        sink.writes().iter().any(|w| w.key == 2),
        "the dead flusher's write"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_writes_behind_many_held_ones_keep_their_order() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).expect("valid URL");
    let newer = WriteBehind::builder("window", &cache, Documents::default())
        .key_template("user:<id>")
        .flusher(false)
        .start()
        .expect("valid");
    let writer = builder("window", &cache, Recorder::default())
        .flusher(false)
        .start()
        .expect("valid");
    for id in 100..120 {
        newer
            .write(id, &serde_json::json!({"id": id}))
            .await
            .expect("journaled");
    }
    writer.write(1, &"v1".to_owned()).await.expect("journaled");
    deliver_to_a_dead_flusher(&server, "~wb:{window}").await;
    writer.write(1, &"v2".to_owned()).await.expect("journaled");
    let sink = Recorder::default();
    let wb = builder("window", &cache, sink.clone())
        .batch_size(2)
        .max_delay(Duration::from_millis(10))
        .retry(Duration::from_secs(2), Duration::from_secs(4))
        .park_undecodable_for(Duration::from_secs(1))
        .start()
        .expect("valid");
    drained(&wb).await;
    let key1: Vec<Change<String>> = sink
        .writes()
        .into_iter()
        .filter(|w| w.key == 1)
        .map(|w| w.change)
        .collect();
    assert_eq!(
        key1.last(),
        Some(&Change::Upsert("v2".to_owned())),
        "{key1:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_write_far_from_the_journals_clock_fails_at_once() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).expect("valid URL");
    let sink = Recorder::default();
    let wb = builder("skewed", &cache, sink.clone())
        .integrity_key(b"a key the application holds")
        .start()
        .expect("valid");
    wb.write(1, &"before".to_owned()).await.expect("journaled");
    drained(&wb).await;
    // The stream's last id ten minutes ahead (as a clock that jumped, or a
    // neighbour's entry): every `*` id from now on is far from the time
    // the writer signs. Acknowledged, such a write would be refused by the
    // flusher later and never reach the database; it must fail now.
    let ahead = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis()
        + 600_000;
    let _: String = server
        .cmd(
            redis::cmd("XADD")
                .arg("~wb:{skewed}")
                .arg(format!("{ahead}-0"))
                .arg("k")
                .arg("x"),
        )
        .await;
    let _: u64 = server
        .cmd(redis::cmd("XTRIM").arg("~wb:{skewed}").arg("MAXLEN").arg(0))
        .await;
    let refused = wb.write(2, &"after".to_owned()).await;
    assert_eq!(refused.err(), Some(Error::Rejected("JOURNALSKEW".into())));
    assert_eq!(wb.pending().await, Ok(0), "nothing was journaled");
    assert_eq!(cache.get::<String>("user:2").await, None);
    assert_eq!(sink.writes().len(), 1);
    assert_eq!(wb.stats().dead_letters, 0);
}
