//! `lock = true` on every Redis deployment, with two `Cache` handles
//! standing in for two processes (each has its own in-process coalescing):
//! the watchdog, waiting, wait time-outs, and errors that release the lock;
//! on one server, round trips and lost notifications.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis_cached::{redis_cached, Cache};
use support::backends::Env;
use support::RedisServer;

per_shared_backend!(
    the_other_process_waits_and_the_watchdog_keeps_the_lock,
    an_error_releases_the_lock_and_the_waiter_computes_at_once,
    a_waiter_computes_itself_after_lock_wait,
);

struct Db {
    cache: Cache,
    computes: Arc<AtomicU32>,
}

impl Db {
    fn new(cache: Cache, computes: &Arc<AtomicU32>) -> Arc<Db> {
        Arc::new(Db {
            cache,
            computes: computes.clone(),
        })
    }

    fn on(server: &RedisServer, computes: &Arc<AtomicU32>) -> Arc<Db> {
        Db::new(Cache::redis(&server.url()).expect("valid URL"), computes)
    }

    #[redis_cached(key = "item:<id>", lock = true, lock_ttl = "300ms", lock_wait = "3s", cache = self.cache)]
    async fn item(&self, id: u64, body: Duration, fail: bool) -> Result<u64, String> {
        self.computes.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(body).await;
        if fail {
            Err("database error".to_owned())
        } else {
            Ok(id * 10)
        }
    }

    #[redis_cached(key = "short:<id>", lock = true, lock_wait = "300ms", cache = self.cache)]
    async fn short_wait(&self, id: u64) -> u64 {
        self.computes.fetch_add(1, Ordering::SeqCst);
        id
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_miss_is_three_round_trips_and_a_hit_one() {
    let server = RedisServer::start();
    let computes = Arc::new(AtomicU32::new(0));
    let db = Db::on(&server, &computes);
    // Load the scripts and connect first.
    db.item(1, Duration::ZERO, false).await.unwrap();
    let monitor = server.monitor();
    monitor.take_client_commands().await;

    assert_eq!(db.item(2, Duration::ZERO, false).await, Ok(20));
    let miss = monitor.take_client_commands().await;
    assert_eq!(miss.len(), 3, "read, acquire, release-and-store: {miss:?}");
    assert_eq!(miss[0], "\"GET\" \"item:2\"", "{miss:?}");
    assert!(
        miss[1].starts_with("\"EVALSHA\"") && miss[2].starts_with("\"EVALSHA\""),
        "{miss:?}"
    );

    assert_eq!(db.item(2, Duration::ZERO, false).await, Ok(20));
    let hit = monitor.take_client_commands().await;
    assert_eq!(hit, vec!["\"GET\" \"item:2\"".to_owned()]);
    let lock_left: u32 = server
        .cmd(::redis::cmd("EXISTS").arg("~lock{item:2}"))
        .await;
    assert_eq!(lock_left, 0, "the lock is released");
}

async fn the_other_process_waits_and_the_watchdog_keeps_the_lock(env: &Env) {
    let computes = Arc::new(AtomicU32::new(0));
    let (a, b) = (
        Db::new(env.cache(), &computes),
        Db::new(env.cache(), &computes),
    );
    let holder = {
        let a = a.clone();
        tokio::spawn(async move { a.item(5, Duration::from_millis(1000), false).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.item(5, Duration::from_millis(1000), false).await })
    };
    // Past lock_ttl (300 ms) the holder still computes: its lock must live on.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let pttl: i64 = env
        .raw(::redis::cmd("PTTL").arg(env.lock_key("item:5")))
        .await;
    assert!(pttl > 0, "the watchdog extended the lock: PTTL {pttl}");
    assert_eq!(holder.await.unwrap(), Ok(50));
    assert_eq!(waiter.await.unwrap(), Ok(50));
    assert_eq!(
        computes.load(Ordering::SeqCst),
        1,
        "one computation for both"
    );
    let (sa, sb) = (a.cache.stats(), b.cache.stats());
    assert_eq!(sa.lock_acquired, 1);
    assert!(sa.lock_extends >= 2, "{sa:?}");
    assert_eq!(
        (sb.lock_waits, sb.lock_wait_timeouts, sb.computes),
        (1, 0, 0),
        "{sb:?}"
    );
}

async fn an_error_releases_the_lock_and_the_waiter_computes_at_once(env: &Env) {
    let computes = Arc::new(AtomicU32::new(0));
    let (a, b) = (
        Db::new(env.cache(), &computes),
        Db::new(env.cache(), &computes),
    );
    let failing = {
        let a = a.clone();
        tokio::spawn(async move { a.item(6, Duration::from_millis(300), true).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let next = b.item(6, Duration::ZERO, false).await;
    assert!(
        failing.await.unwrap().is_err(),
        "the error goes to its own caller only"
    );
    assert_eq!(next, Ok(60), "the waiter computed its own value");
    let sb = b.cache.stats();
    // Woken by the release (told the holder failed, it computes without
    // the lock; or its retry timer found the lock free first), it did not
    // sit out lock_wait.
    assert_eq!(
        (sb.lock_waits, sb.lock_wait_timeouts, sb.computes),
        (1, 0, 1),
        "{sb:?}"
    );
}

async fn a_waiter_computes_itself_after_lock_wait(env: &Env) {
    let computes = Arc::new(AtomicU32::new(0));
    let db = Db::new(env.cache(), &computes);
    // Someone else holds the lock and never finishes.
    let _: () = env
        .raw(
            ::redis::cmd("SET")
                .arg(env.lock_key("short:7"))
                .arg("someone-else")
                .arg("PX")
                .arg(60_000),
        )
        .await;
    assert_eq!(db.short_wait(7).await, 7);
    let stats = db.cache.stats();
    assert_eq!(
        (stats.lock_waits, stats.lock_wait_timeouts, stats.computes),
        (1, 1, 1),
        "{stats:?}"
    );
    let owner: String = env
        .raw(::redis::cmd("GET").arg(env.lock_key("short:7")))
        .await;
    assert_eq!(
        owner, "someone-else",
        "another's lock is never released by us"
    );
    assert_eq!(
        db.cache.get::<u64>("short:7").await,
        Some(7),
        "the value was stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_on_the_in_memory_backend_is_in_process_coalescing() {
    let computes = Arc::new(AtomicU32::new(0));
    let db = Arc::new(Db {
        cache: Cache::in_memory(),
        computes: computes.clone(),
    });
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let db = db.clone();
            tokio::spawn(async move { db.item(8, Duration::from_millis(50), false).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), Ok(80));
    }
    assert_eq!(computes.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_notifications_are_covered_by_the_retry_timer() {
    let server = RedisServer::start();
    // This user may not subscribe to anything: every notification to it is lost.
    let _: () = server
        .cmd(
            ::redis::cmd("ACL")
                .arg("SETUSER")
                .arg("deaf")
                .arg("on")
                .arg(">pw")
                .arg("~*")
                .arg("resetchannels")
                .arg("+@all"),
        )
        .await;
    let computes = Arc::new(AtomicU32::new(0));
    let holder = Db::on(&server, &computes);
    let deaf = Arc::new(Db {
        cache: Cache::redis(&format!("redis://deaf:pw@127.0.0.1:{}/", server.port())).unwrap(),
        computes: computes.clone(),
    });
    let computing = {
        let holder = holder.clone();
        tokio::spawn(async move { holder.item(9, Duration::from_millis(500), false).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        deaf.item(9, Duration::from_millis(500), false).await,
        Ok(90)
    );
    assert_eq!(computing.await.unwrap(), Ok(90));
    let stats = deaf.cache.stats();
    assert_eq!(
        computes.load(Ordering::SeqCst),
        1,
        "the waiter did not compute"
    );
    assert_eq!(
        (stats.lock_waits, stats.lock_wait_timeouts),
        (1, 0),
        "it found the value by retrying: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_in_one_process_sends_one_read_and_one_lock_attempt() {
    let server = RedisServer::start();
    let computes = Arc::new(AtomicU32::new(0));
    let db = Db::on(&server, &computes);
    db.item(1, Duration::ZERO, false).await.unwrap(); // connect, load scripts
    let monitor = server.monitor();
    monitor.take_client_commands().await;
    let crowd: Vec<_> = (0..100)
        .map(|_| {
            let db = db.clone();
            tokio::spawn(async move { db.item(3, Duration::from_millis(100), false).await })
        })
        .collect();
    for call in crowd {
        assert_eq!(call.await.unwrap(), Ok(30));
    }
    let commands = monitor.take_client_commands().await;
    let reads = commands
        .iter()
        .filter(|c| c.starts_with("\"GET\" \"item:3\""))
        .count();
    // Acquire and release (on the value and its lock); the watchdog's
    // extensions (on the lock alone) may come on top.
    let scripts = commands
        .iter()
        .filter(|c| c.starts_with("\"EVALSHA\"") && c.contains("\"2\" \"item:3\""))
        .count();
    assert_eq!(
        (reads, scripts),
        (1, 2),
        "one read, one acquire, one release: {commands:?}"
    );
    assert_eq!(computes.load(Ordering::SeqCst), 2);
}

struct Report {
    cache: Cache,
}

impl Report {
    #[redis_cached(key = "report:<day>", lock = true, lock_wait = "3s", cache = self.cache)]
    async fn report(&self, day: u32) -> String {
        format!("fresh report {day}")
    }
}

/// Another process holds `key`'s lock, as `holder`, for 1.5 s.
async fn held_elsewhere(server: &RedisServer, key: &str, holder: &str) {
    let _: () = server
        .cmd(
            ::redis::cmd("SET")
                .arg(format!("~lock{{{key}}}"))
                .arg(holder)
                .arg("PX")
                .arg(1_500),
        )
        .await;
}

/// `report(day)` called in a task, once it waits for the lock.
async fn waiting_report(repo: &Arc<Report>, day: u32) -> tokio::task::JoinHandle<String> {
    let waits = repo.cache.stats().lock_waits;
    let call = {
        let repo = Arc::clone(repo);
        tokio::spawn(async move { repo.report(day).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        repo.cache.stats().lock_waits,
        waits + 1,
        "the call waits for the holder"
    );
    call
}

/// Publishes a lock notification saying `entry` landed at `key`, from
/// `holder` (`None`: in the format that names none).
async fn announce(server: &RedisServer, key: &str, holder: Option<&str>, entry: &[u8]) {
    let mut message = format!("{}:{key}", key.len()).into_bytes();
    match holder {
        None => message.push(b'v'),
        Some(token) => message.extend_from_slice(format!("V{}:{token}", token.len()).as_bytes()),
    }
    message.extend_from_slice(entry);
    let _: () = server
        .cmd(
            ::redis::cmd("PUBLISH")
                .arg("redis-cached:filled")
                .arg(message),
        )
        .await;
}

/// A repository whose reports are cached, with the entry of an "old
/// report" as an earlier holder would have stored it.
async fn report_repo(server: &RedisServer) -> (Arc<Report>, Vec<u8>) {
    let repo = Arc::new(Report {
        cache: Cache::redis(&server.url()).unwrap(),
    });
    repo.cache.connect().await.unwrap();
    repo.cache
        .set("old", &"old report".to_owned(), Duration::from_secs(60))
        .await
        .unwrap();
    let old_entry: Vec<u8> = server.cmd(::redis::cmd("GET").arg("old")).await;
    (repo, old_entry)
}

/// A lock notification that carries a value computed before this process
/// invalidated the key, and reaches a waiter after the invalidation (a
/// late message): the waiter reads the key instead of taking that value,
/// so no call that starts after `invalidate` returned gets the older value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_notification_older_than_an_invalidation_is_not_taken() {
    let server = RedisServer::start();
    let (repo, old_entry) = report_repo(&server).await;
    repo.cache.invalidate("report:1").await.unwrap();
    // Another process holds the lock now (taken after the invalidation).
    held_elsewhere(&server, "report:1", "another holder").await;
    let call = waiting_report(&repo, 1).await;
    // The earlier holder's message arrives only now.
    announce(&server, "report:1", None, &old_entry).await;
    // The holder goes away without a value: the waiter takes the lock.
    assert_eq!(
        call.await.unwrap(),
        "fresh report 1",
        "a value older than the invalidation was taken"
    );
}

/// The same late message when another process made the invalidation (so
/// this one has no trace of it), in both formats: one that names no holder,
/// and one that names an earlier holder than the one the call waits for.
/// Neither is taken; the holder's own message is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_awaited_holders_value_is_taken_from_a_message() {
    let server = RedisServer::start();
    let (repo, old_entry) = report_repo(&server).await;
    let elsewhere = Cache::redis(&server.url()).unwrap();
    let holder = "0123456789abcdef0123456789abcdef";
    for (day, message_from) in [(1u32, None), (2, Some("fedcba9876543210fedcba9876543210"))] {
        let key = format!("report:{day}");
        elsewhere.invalidate(&key).await.unwrap();
        held_elsewhere(&server, &key, holder).await;
        let call = waiting_report(&repo, day).await;
        announce(&server, &key, message_from, &old_entry).await;
        assert_eq!(
            call.await.unwrap(),
            format!("fresh report {day}"),
            "a late message from {message_from:?} was taken"
        );
    }

    // From the holder waited for: taken, without reading the key (which
    // holds nothing here).
    held_elsewhere(&server, "report:3", holder).await;
    let call = waiting_report(&repo, 3).await;
    announce(&server, "report:3", Some(holder), &old_entry).await;
    assert_eq!(call.await.unwrap(), "old report", "the holder's own value");
}

/// A repository whose row can appear, seen through one process's cache.
struct Finder {
    cache: Cache,
    row: Arc<std::sync::atomic::AtomicBool>,
    /// Set: the body signals `started`, then waits for `go`.
    hold: Option<(Arc<tokio::sync::Notify>, Arc<tokio::sync::Notify>)>,
}

impl Finder {
    #[redis_cached(key = "find:<id>", lock = true, lock_wait = "3s", cache = self.cache)]
    async fn find(&self, id: u32) -> Option<String> {
        let found = self.row.load(Ordering::SeqCst).then(|| format!("row {id}"));
        if let Some((started, go)) = &self.hold {
            started.notify_one();
            go.notified().await;
        }
        found
    }
}

/// A holder whose result is an absence that is not cached hands it to the
/// waiters of other processes only if the key is unchanged since its read:
/// here the row appeared and another process invalidated the key while the
/// holder computed, and a call that started after that invalidation gets
/// the row, not the older absence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_result_older_than_an_invalidation_is_not_handed_on() {
    let server = RedisServer::start();
    let row = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (started, go) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let holder = Arc::new(Finder {
        cache: Cache::redis(&server.url()).unwrap(),
        row: row.clone(),
        hold: Some((started.clone(), go.clone())),
    });
    let waiter = Arc::new(Finder {
        cache: Cache::redis(&server.url()).unwrap(),
        row: row.clone(),
        hold: None,
    });
    let elsewhere = Cache::redis(&server.url()).unwrap();
    holder.cache.connect().await.unwrap();
    waiter.cache.connect().await.unwrap();
    let computing = started.notified();
    let held = {
        let holder = Arc::clone(&holder);
        tokio::spawn(async move { holder.find(1).await })
    };
    computing.await;
    // The row appears, and its writer invalidates the key.
    row.store(true, Ordering::SeqCst);
    elsewhere.invalidate("find:1").await.unwrap();
    let later = {
        let waiter = Arc::clone(&waiter);
        tokio::spawn(async move { waiter.find(1).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(waiter.cache.stats().lock_waits, 1, "the later call waits");
    go.notify_one();
    assert_eq!(held.await.unwrap(), None, "the holder read before the row");
    assert_eq!(
        later.await.unwrap(),
        Some("row 1".to_owned()),
        "the later call got an absence read before the invalidation"
    );
}

/// Background lock work that fails is counted: a dropped holder's release
/// that Redis does not answer in time, and a watchdog's extension.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_background_lock_work_is_counted() {
    static STARTED: tokio::sync::Notify = tokio::sync::Notify::const_new();
    #[redis_cached(key = "slow:<id>", lock = true, lock_ttl = "300ms", cache = cache)]
    async fn slow(cache: &Cache, id: u64) -> u64 {
        STARTED.notify_one();
        tokio::time::sleep(Duration::from_secs(5)).await;
        id
    }
    let server = RedisServer::start();
    let cache = Cache::builder(&server.url())
        .op_timeout(Duration::from_millis(100))
        .build()
        .expect("valid URL");
    let started = STARTED.notified();
    let call = {
        let cache = cache.clone();
        tokio::spawn(async move { slow(&cache, 1).await })
    };
    started.await;
    server.pause();
    let before = cache.stats();
    // The watchdog extends every 100 ms: its extensions time out.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let extending = cache.stats();
    assert!(
        extending.timeouts > before.timeouts,
        "a watchdog's failed extension is counted: {extending:?}"
    );
    // The holder is dropped: its release runs in the background, and
    // times out too.
    call.abort();
    let _ = call.await;
    let dropped = cache.stats();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.resume();
    let after = cache.stats();
    assert!(
        after.timeouts > dropped.timeouts,
        "a dropped holder's release that timed out is counted: {after:?}"
    );
}
