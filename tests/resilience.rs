//! Correct under cancellation, failure and reuse: failing bodies do not
//! queue their followers, invalidations are read-your-writes, re-entrant
//! calls finish, write-throughs that cannot store invalidate, background
//! refreshes give their key back however they end; and on Redis, dropped
//! lock holders release at once, key-level errors do not open the breaker,
//! large values are not broadcast, oversized values are compared too.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis_cached::{cache_evict, cache_put, redis_cached, BreakerConfig, Cache};
use support::backends::Env;
use support::RedisServer;

per_backend!(
    failing_bodies_do_not_queue,
    invalidation_is_read_your_writes,
    eviction_is_read_your_writes,
    a_write_through_is_read_your_writes,
    re_entrant_calls_finish,
    a_call_waiting_for_itself_through_a_spawned_task_ends,
    a_write_through_that_cannot_store_invalidates,
    a_panicking_refresh_gives_its_key_back,
    a_hanging_refresh_is_abandoned,
    a_refreshed_row_that_is_gone_is_not_served_on,
);

/// A stand-in for a database: counts calls and how many run at once.
#[derive(Default)]
struct Db {
    value: AtomicU64,
    calls: AtomicU32,
    running: AtomicU32,
    max_running: AtomicU32,
    panic: AtomicBool,
}

impl Db {
    /// Waits until `n` queries have started (each read its value), rather
    /// than for a guessed time, which a loaded machine overruns.
    async fn started(&self, n: u32) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.calls.load(Ordering::SeqCst) < n {
            assert!(std::time::Instant::now() < deadline, "no query started");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn query(&self, took: Duration) -> u64 {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        let value = self.value.load(Ordering::SeqCst);
        tokio::time::sleep(took).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        value
    }
}

/// A `Db::value` that makes `Repo::fresh` hang.
const HANG: u64 = 99;

struct Repo {
    cache: Cache,
    db: Db,
}

impl Repo {
    fn new(cache: Cache) -> Arc<Repo> {
        Arc::new(Repo {
            cache,
            db: Db::default(),
        })
    }

    #[redis_cached(key = "failing:<id>", cache = self.cache)]
    async fn failing(&self, id: u64) -> Result<u64, String> {
        self.db.query(Duration::from_millis(200)).await;
        Err(format!("database down for {id}"))
    }

    #[redis_cached(key = "row:<id>", cache = self.cache)]
    async fn row(&self, id: u64) -> u64 {
        let _ = id;
        self.db.query(Duration::from_millis(300)).await
    }

    #[cache_evict(key = "row:<id>", cache = self.cache)]
    async fn update_row(&self, id: u64, value: u64) -> Result<(), String> {
        let _ = id;
        self.db.value.store(value, Ordering::SeqCst);
        Ok(())
    }

    /// With `lock = true`, callers join this process's computation before
    /// they read the key.
    #[redis_cached(key = "hot:<id>", lock = true, cache = self.cache)]
    async fn hot_row(&self, id: u64) -> u64 {
        let _ = id;
        self.db.query(Duration::from_millis(300)).await
    }

    #[cache_put(key = "hot:<id>", cache = self.cache)]
    async fn save_hot_row(&self, id: u64, value: u64) -> u64 {
        let _ = id;
        self.db.value.store(value, Ordering::SeqCst);
        value
    }

    #[redis_cached(key = "entity:<id>", cache = self.cache)]
    async fn entity(&self, id: u64) -> String {
        format!("entity {id}")
    }

    /// Shares its key template with `entity`, as a DTO built from the
    /// entity might.
    #[redis_cached(key = "entity:<id>", cache = self.cache)]
    async fn entity_dto(&self, id: u64) -> Vec<String> {
        vec![self.entity(id).await]
    }

    /// Asks for its own key from a task it spawns and awaits: no marker
    /// crosses the spawn, so the inner call waits for the outer one.
    #[redis_cached(key = "spawned:<id>", cache = self.cache)]
    async fn via_spawned_task(self: Arc<Self>, id: u64) -> u64 {
        let repo = Arc::clone(&self);
        tokio::spawn(async move { repo.spawned_inner(id).await })
            .await
            .expect("no panic")
            + 1
    }

    #[redis_cached(key = "spawned:<id>", cache = self.cache)]
    async fn spawned_inner(&self, id: u64) -> u64 {
        id
    }

    #[redis_cached(key = "depth:<id>", cache = self.cache)]
    async fn depth(&self, id: u64, n: u32) -> u32 {
        if n == 0 {
            0
        } else {
            Box::pin(self.depth(id, n - 1)).await + 1
        }
    }

    #[redis_cached(key = "text:<id>", cache = self.cache)]
    async fn text(&self, id: u64) -> String {
        let n = self.db.value.load(Ordering::SeqCst);
        format!("{id}:{}", "x".repeat(n as usize))
    }

    #[cache_put(key = "text:<id>", cache = self.cache)]
    async fn save_text(&self, id: u64, len: u64) -> String {
        self.db.value.store(len, Ordering::SeqCst);
        format!("{id}:{}", "x".repeat(len as usize))
    }

    #[redis_cached(key = "hanging:<id>", ttl = "100ms", stale = "500ms", cache = self.cache)]
    async fn hanging(self: Arc<Self>, id: u64) -> u64 {
        let run = self.db.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if self.db.value.load(Ordering::SeqCst) == HANG {
            std::future::pending::<()>().await;
        }
        u64::from(run) + id
    }

    #[redis_cached(key = "row-or-none:<id>", ttl = "100ms", stale = "1h", cache = self.cache)]
    async fn row_or_none(self: Arc<Self>, id: u64) -> Option<u64> {
        self.db.calls.fetch_add(1, Ordering::SeqCst);
        let value = self.db.value.load(Ordering::SeqCst);
        (value != 0).then_some(value + id)
    }

    #[redis_cached(key = "fresh:<id>", ttl = "100ms", stale = "1h", cache = self.cache)]
    async fn fresh(self: Arc<Self>, id: u64) -> u64 {
        let run = self.db.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if self.db.value.load(Ordering::SeqCst) == HANG {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        if self.db.panic.load(Ordering::SeqCst) {
            panic!("refresh of {id} panicked");
        }
        u64::from(run)
    }
}

async fn failing_bodies_do_not_queue(env: &Env) {
    let repo = Repo::new(env.cache());
    let callers: Vec<_> = (0..5)
        .map(|_| {
            let repo = repo.clone();
            tokio::spawn(async move { repo.failing(1).await })
        })
        .collect();
    for caller in callers {
        assert!(caller.await.expect("no panic").is_err());
    }
    assert_eq!(
        repo.db.calls.load(Ordering::SeqCst),
        5,
        "an error is never shared"
    );
    // The first caller's failure sends its four followers to compute side
    // by side, not one after another (which took 5 × the body).
    assert!(
        repo.db.max_running.load(Ordering::SeqCst) >= 2,
        "followers of a failure computed one at a time"
    );
}

/// A call that starts after `invalidate` returned must not get the value
/// of a computation that read the database before it.
async fn invalidation_is_read_your_writes(env: &Env) {
    let repo = Repo::new(env.cache());
    repo.db.value.store(1, Ordering::SeqCst);
    let before = {
        let repo = repo.clone();
        tokio::spawn(async move { repo.row(7).await })
    };
    repo.db.started(1).await;
    repo.db.value.store(2, Ordering::SeqCst);
    repo.cache.invalidate("row:7").await.expect("invalidated");
    assert_eq!(
        repo.row(7).await,
        2,
        "joined a computation older than the invalidation"
    );
    assert_eq!(before.await.expect("no panic"), 1);
    assert_eq!(repo.row(7).await, 2, "the older result was not stored");
}

async fn eviction_is_read_your_writes(env: &Env) {
    let repo = Repo::new(env.cache());
    repo.db.value.store(1, Ordering::SeqCst);
    let before = {
        let repo = repo.clone();
        tokio::spawn(async move { repo.row(7).await })
    };
    repo.db.started(1).await;
    repo.update_row(7, 2).await.expect("updated");
    assert_eq!(
        repo.row(7).await,
        2,
        "joined a computation older than the eviction"
    );
    assert_eq!(before.await.expect("no panic"), 1);
}

async fn a_write_through_is_read_your_writes(env: &Env) {
    let repo = Repo::new(env.cache());
    repo.db.value.store(1, Ordering::SeqCst);
    let before = {
        let repo = repo.clone();
        tokio::spawn(async move { repo.hot_row(7).await })
    };
    repo.db.started(1).await;
    assert_eq!(repo.save_hot_row(7, 2).await, 2);
    assert_eq!(
        repo.hot_row(7).await,
        2,
        "joined a computation older than the write"
    );
    assert_eq!(before.await.expect("no panic"), 1);
    assert_eq!(
        repo.hot_row(7).await,
        2,
        "the older result did not overwrite the write"
    );
}

async fn a_call_waiting_for_itself_through_a_spawned_task_ends(env: &Env) {
    let cache = env
        .builder()
        .coalesce_wait(Duration::from_millis(300))
        .build()
        .unwrap();
    let repo = Repo::new(cache);
    let started = Instant::now();
    let value = tokio::time::timeout(
        Duration::from_secs(10),
        Arc::clone(&repo).via_spawned_task(5),
    )
    .await
    .expect("the wait for itself ended at coalesce_wait");
    // The inner call gave up waiting and computed 5; the outer one added 1.
    assert_eq!(value, 6);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(repo.cache.stats().coalesce_timeouts, 1);
}

async fn re_entrant_calls_finish(env: &Env) {
    let repo = Repo::new(env.cache());
    let bound = Duration::from_secs(10);
    let dto = tokio::time::timeout(bound, repo.entity_dto(3))
        .await
        .expect("a body that asks for its own key waited for itself");
    assert_eq!(dto, vec!["entity 3".to_owned()]);
    let depth = tokio::time::timeout(bound, repo.depth(4, 3))
        .await
        .expect("a recursive body waited for itself");
    assert_eq!(depth, 3);
}

async fn a_write_through_that_cannot_store_invalidates(env: &Env) {
    let cache = env.builder().max_value_bytes(64).build().expect("valid");
    let repo = Repo::new(cache);
    repo.db.value.store(3, Ordering::SeqCst);
    assert_eq!(repo.text(1).await, "1:xxx");
    assert_eq!(repo.text(1).await, "1:xxx", "cached");
    // Too large to store: the old value must not stay.
    let big = repo.save_text(1, 200).await;
    assert_eq!(big.len(), 202);
    assert_eq!(repo.text(1).await, big, "the pre-write value was served");
    assert!(repo.cache.stats().oversized >= 1);
}

async fn a_panicking_refresh_gives_its_key_back(env: &Env) {
    let repo = Repo::new(env.cache());
    assert_eq!(repo.clone().fresh(1).await, 1);
    tokio::time::sleep(Duration::from_millis(150)).await;
    repo.db.panic.store(true, Ordering::SeqCst);
    assert_eq!(repo.clone().fresh(1).await, 1, "served stale");
    wait_until(|| repo.db.calls.load(Ordering::SeqCst) == 2).await;
    repo.db.panic.store(false, Ordering::SeqCst);
    // The panicked refresh gives its claim back once it has unwound (the
    // panic hook may take a while to print): a later stale hit refreshes.
    let deadline = Instant::now() + Duration::from_secs(5);
    while repo.db.calls.load(Ordering::SeqCst) < 3 {
        assert!(
            Instant::now() < deadline,
            "the key was never refreshed again"
        );
        assert_eq!(repo.clone().fresh(1).await, 1, "still stale");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut refreshed = 0;
    for _ in 0..100 {
        refreshed = repo.clone().fresh(1).await;
        if refreshed == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(refreshed, 3);
    assert_eq!(repo.cache.stats().refreshes, 2);
}

/// A refresh that never finishes is abandoned after its stale window, and
/// counted, instead of keeping its key marked as being refreshed forever.
async fn a_hanging_refresh_is_abandoned(env: &Env) {
    let repo = Repo::new(env.cache());
    assert_eq!(repo.clone().hanging(1).await, 2);
    tokio::time::sleep(Duration::from_millis(150)).await;
    repo.db.value.store(HANG, Ordering::SeqCst);
    assert_eq!(repo.clone().hanging(1).await, 2, "served stale");
    wait_until(|| repo.cache.stats().refresh_failures == 1).await;
    assert_eq!(repo.cache.stats().refreshes, 1);
}

/// A row deleted from the database: the refresh gets `None`, which is
/// not cached, and the old row must not be served for the rest of the
/// stale window.
async fn a_refreshed_row_that_is_gone_is_not_served_on(env: &Env) {
    let repo = Repo::new(env.cache());
    repo.db.value.store(5, Ordering::SeqCst);
    assert_eq!(repo.clone().row_or_none(1).await, Some(6));
    tokio::time::sleep(Duration::from_millis(150)).await;
    repo.db.value.store(0, Ordering::SeqCst);
    assert_eq!(
        repo.clone().row_or_none(1).await,
        Some(6),
        "stale, refreshing"
    );
    wait_until(|| repo.db.calls.load(Ordering::SeqCst) == 2).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match repo.clone().row_or_none(1).await {
            None => break,
            Some(_) => assert!(Instant::now() < deadline, "the deleted row is still served"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `done` for up to 5 s (a bound, not a timing assertion).
async fn wait_until(done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "condition not reached in 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn a_refresh_whose_runtime_ended_gives_its_key_back() {
    let repo = Repo::new(Cache::in_memory());
    let first = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    first.block_on(async {
        assert_eq!(repo.clone().fresh(1).await, 1);
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Stale: starts a refresh that the runtime's end interrupts.
        repo.db.value.store(HANG, Ordering::SeqCst);
        assert_eq!(repo.clone().fresh(1).await, 1);
        wait_until(|| repo.db.calls.load(Ordering::SeqCst) == 2).await;
    });
    drop(first);
    let second = tokio::runtime::Runtime::new().expect("runtime");
    second.block_on(async {
        repo.db.value.store(0, Ordering::SeqCst);
        let before = repo.cache.stats().refreshes;
        assert_eq!(repo.clone().fresh(1).await, 1, "stale");
        wait_until(|| repo.cache.stats().refreshes > before).await;
    });
}

// ---- Redis only: locks, error classes, notifications, oversized values.

struct Locked {
    cache: Cache,
    db: Arc<Db>,
}

impl Locked {
    fn new(cache: Cache, db: &Arc<Db>) -> Arc<Locked> {
        Arc::new(Locked {
            cache,
            db: db.clone(),
        })
    }

    #[redis_cached(key = "item:<id>", lock = true, lock_ttl = "10s", lock_wait = "5s", cache = self.cache)]
    async fn item(&self, id: u64, took: Duration, fail: bool) -> Result<u64, String> {
        self.db.query(took).await;
        if fail {
            Err("database error".into())
        } else {
            Ok(id * 10)
        }
    }

    #[redis_cached(key = "maybe:<id>", lock = true, lock_wait = "5s", cache = self.cache)]
    async fn maybe(&self, id: u64) -> Option<u64> {
        self.db.query(Duration::from_millis(300)).await;
        (id > 100).then_some(id)
    }

    #[redis_cached(key = "big:<id>", lock = true, lock_wait = "5s", cache = self.cache)]
    async fn big(&self, id: u64) -> String {
        self.db.query(Duration::from_millis(300)).await;
        format!("{id}{}", "b".repeat(200_000))
    }

    #[redis_cached(key = "plain:<id>", cache = self.cache)]
    async fn plain(&self, id: u64, took: Duration) -> u64 {
        self.db.query(took).await + id
    }
}

fn redis_cache(server: &RedisServer) -> Cache {
    Cache::builder(&server.url())
        .op_timeout(Duration::from_secs(1))
        .build()
        .expect("valid")
}

async fn lock_exists(server: &RedisServer, key: &str) -> bool {
    let n: u32 = server.cmd(::redis::cmd("EXISTS").arg(key)).await;
    n == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_holder_releases_its_lock_at_once() {
    let server = RedisServer::start();
    let db = Arc::new(Db::default());
    let (a, b) = (
        Locked::new(redis_cache(&server), &db),
        Locked::new(redis_cache(&server), &db),
    );
    let holder = {
        let a = a.clone();
        tokio::spawn(async move { a.item(1, Duration::from_secs(30), false).await })
    };
    wait_until(|| db.calls.load(Ordering::SeqCst) == 1).await;
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.item(1, Duration::ZERO, false).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A client disconnect: the holder's future is dropped mid-body.
    holder.abort();
    assert_eq!(waiter.await.expect("no panic"), Ok(10));
    let sb = b.cache.stats();
    // Woken by the release, it took the lock; it did not sit out lock_wait.
    assert_eq!(
        (sb.lock_waits, sb.lock_wait_timeouts, sb.lock_acquired),
        (1, 0, 1),
        "{sb:?}"
    );
    assert!(!lock_exists(&server, "~lock{item:1}").await);
    // This process's next caller is not held up either.
    assert_eq!(a.item(2, Duration::ZERO, false).await, Ok(20));
    assert_eq!(a.cache.stats().lock_wait_timeouts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_that_timed_out_is_released() {
    let server = RedisServer::start();
    let db = Arc::new(Db::default());
    let slow = Cache::builder(&server.url())
        .op_timeout(Duration::from_millis(100))
        .build()
        .expect("valid");
    let (a, b) = (
        Locked::new(slow, &db),
        Locked::new(redis_cache(&server), &db),
    );
    // Connect and load the scripts first.
    assert_eq!(a.item(9, Duration::ZERO, false).await, Ok(90));
    // Scripts wait while reads go on: the acquire runs after the caller gave up.
    let _: () = server
        .cmd(::redis::cmd("CLIENT").arg("PAUSE").arg(500).arg("WRITE"))
        .await;
    assert_eq!(a.item(1, Duration::ZERO, false).await, Ok(10));
    assert!(a.cache.stats().timeouts >= 1);
    tokio::time::sleep(Duration::from_millis(700)).await;
    wait_until_async(|| async { !lock_exists(&server, "~lock{item:1}").await }).await;
    let _ = b.item(1, Duration::ZERO, false).await;
    assert_eq!(b.cache.stats().lock_waits, 0, "{:?}", b.cache.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_dropped_during_its_lock_attempt_leaves_no_lock() {
    let server = RedisServer::start();
    let db = Arc::new(Db::default());
    let (a, b) = (
        Locked::new(redis_cache(&server), &db),
        Locked::new(redis_cache(&server), &db),
    );
    assert_eq!(a.item(9, Duration::ZERO, false).await, Ok(90));
    let _: () = server
        .cmd(::redis::cmd("CLIENT").arg("PAUSE").arg(500).arg("WRITE"))
        .await;
    // The read goes through; the lock attempt waits in Redis, and the
    // caller gives up on it (a client disconnect) before it runs.
    let dropped =
        tokio::time::timeout(Duration::from_millis(100), a.item(1, Duration::ZERO, false)).await;
    assert!(dropped.is_err(), "the call was cut short");
    tokio::time::sleep(Duration::from_millis(700)).await;
    wait_until_async(|| async { !lock_exists(&server, "~lock{item:1}").await }).await;
    assert_eq!(b.item(1, Duration::ZERO, false).await, Ok(10));
    assert_eq!(b.cache.stats().lock_waits, 0, "{:?}", b.cache.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_get_a_result_that_is_not_cached() {
    let server = RedisServer::start();
    let db = Arc::new(Db::default());
    let repos: Vec<_> = (0..3)
        .map(|_| Locked::new(redis_cache(&server), &db))
        .collect();
    // Each cache connects and subscribes first, so that under load a
    // waiter's first connection does not take longer than the holder's body.
    for (i, repo) in repos.iter().enumerate() {
        assert_eq!(repo.maybe(1000 + i as u64).await, Some(1000 + i as u64));
    }
    let before = db.calls.load(Ordering::SeqCst);
    let holder = {
        let a = repos[0].clone();
        tokio::spawn(async move { a.maybe(1).await })
    };
    wait_until(|| db.calls.load(Ordering::SeqCst) == before + 1).await;
    let waiters: Vec<_> = repos[1..]
        .iter()
        .map(|r| {
            let r = r.clone();
            tokio::spawn(async move { r.maybe(1).await })
        })
        .collect();
    assert_eq!(holder.await.expect("no panic"), None);
    for waiter in waiters {
        assert_eq!(waiter.await.expect("no panic"), None);
    }
    // `None` is not cached, but the waiters got it from the holder rather
    // than taking the lock and querying in turn.
    assert_eq!(db.calls.load(Ordering::SeqCst), before + 1);
}

async fn wait_until_async<F, Fut>(done: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done().await {
        assert!(Instant::now() < deadline, "condition not reached in 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_of_a_failed_holder_compute_side_by_side() {
    let server = RedisServer::start();
    let db = Arc::new(Db::default());
    let repos: Vec<_> = (0..3)
        .map(|_| Locked::new(redis_cache(&server), &db))
        .collect();
    // Connected and subscribed first (see above).
    for (i, repo) in repos.iter().enumerate() {
        let id = 1000 + i as u64;
        assert_eq!(repo.item(id, Duration::ZERO, false).await, Ok(id * 10));
    }
    db.max_running.store(0, Ordering::SeqCst);
    let before = db.calls.load(Ordering::SeqCst);
    let holder = {
        let a = repos[0].clone();
        tokio::spawn(async move { a.item(1, Duration::from_millis(300), true).await })
    };
    wait_until(|| db.calls.load(Ordering::SeqCst) == before + 1).await;
    let waiters: Vec<_> = repos[1..]
        .iter()
        .map(|r| {
            let r = r.clone();
            tokio::spawn(async move { r.item(1, Duration::from_millis(300), true).await })
        })
        .collect();
    assert!(holder.await.expect("no panic").is_err());
    for waiter in waiters {
        assert!(waiter.await.expect("no panic").is_err());
    }
    assert_eq!(db.calls.load(Ordering::SeqCst), before + 3);
    assert_eq!(
        db.max_running.load(Ordering::SeqCst),
        2,
        "the two waiters computed one after the other"
    );
    for r in &repos[1..] {
        assert_eq!(
            r.cache.stats().lock_wait_timeouts,
            0,
            "{:?}",
            r.cache.stats()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_type_at_one_key_does_not_open_the_breaker() {
    let server = RedisServer::start();
    let db = Arc::new(Db::default());
    let cache = Cache::builder(&server.url())
        .breaker(BreakerConfig {
            failure_threshold: 2,
            cooldown: Duration::from_secs(30),
        })
        .build()
        .expect("valid");
    let repo = Locked::new(cache, &db);
    let _: () = server
        .cmd(::redis::cmd("HSET").arg("plain:1").arg("f").arg("v"))
        .await;
    for _ in 0..5 {
        assert_eq!(repo.plain(1, Duration::ZERO).await, 1);
    }
    let stats = repo.cache.stats();
    assert!(stats.rejected >= 5, "{stats:?}");
    assert_eq!((stats.errors, stats.breaker_opens), (0, 0), "{stats:?}");
    assert!(!repo.cache.is_degraded());
    repo.plain(2, Duration::ZERO).await;
    repo.plain(2, Duration::ZERO).await;
    assert_eq!(repo.cache.stats().hits, 1, "other keys are still cached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_are_fetched_not_broadcast() {
    let server = RedisServer::start();
    let db = Arc::new(Db::default());
    let (a, b) = (
        Locked::new(redis_cache(&server), &db),
        Locked::new(redis_cache(&server), &db),
    );
    a.cache.connect().await.expect("connected");
    b.cache.connect().await.expect("connected");
    let mut pubsub = server.client().get_async_pubsub().await.expect("pubsub");
    pubsub
        .subscribe("redis-cached:filled")
        .await
        .expect("subscribed");
    let mut messages = pubsub.into_on_message();
    let holder = {
        let a = a.clone();
        tokio::spawn(async move { a.big(1).await })
    };
    wait_until(|| db.calls.load(Ordering::SeqCst) == 1).await;
    let waited = b.big(1).await;
    assert_eq!(waited.len(), 200_001);
    assert_eq!(holder.await.expect("no panic"), waited);
    assert_eq!(
        db.calls.load(Ordering::SeqCst),
        1,
        "the waiter read the value"
    );
    use futures_util::StreamExt;
    let message = tokio::time::timeout(Duration::from_secs(2), messages.next())
        .await
        .expect("a notification")
        .expect("open");
    assert!(
        message.get_payload_bytes().len() < 1024,
        "a notification of {} bytes",
        message.get_payload_bytes().len()
    );
}

#[test]
fn the_lock_subscriber_outlives_its_first_runtime() {
    let server = RedisServer::start();
    let db = Arc::new(Db::default());
    let repo = Locked::new(redis_cache(&server), &db);
    let start_up = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    start_up
        .block_on(repo.cache.connect())
        .expect("connected at start-up");
    drop(start_up);
    let serving = tokio::runtime::Runtime::new().expect("runtime");
    serving.block_on(async {
        assert_eq!(repo.item(1, Duration::ZERO, false).await, Ok(10));
        wait_until_async(|| async {
            let reply: Vec<::redis::Value> = server
                .cmd(
                    ::redis::cmd("PUBSUB")
                        .arg("NUMSUB")
                        .arg("redis-cached:filled"),
                )
                .await;
            matches!(reply.get(1), Some(::redis::Value::Int(1)))
        })
        .await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_value_is_replaced_only_if_unchanged() {
    let server = RedisServer::start();
    let db = Arc::new(Db::default());
    let cache = Cache::builder(&server.url())
        .max_value_bytes(100)
        .build()
        .expect("valid");
    let repo = Locked::new(cache, &db);
    let _: () = server
        .cmd(::redis::cmd("SET").arg("plain:1").arg("o".repeat(1000)))
        .await;
    let fill = {
        let repo = repo.clone();
        tokio::spawn(async move { repo.plain(1, Duration::from_millis(300)).await })
    };
    wait_until(|| db.calls.load(Ordering::SeqCst) == 1).await;
    repo.cache.invalidate("plain:1").await.expect("invalidated");
    assert_eq!(fill.await.expect("no panic"), 1);
    let stats = repo.cache.stats();
    assert_eq!(
        (stats.writes, stats.stale_sets_refused),
        (0, 1),
        "{stats:?}"
    );
    assert_eq!(
        repo.cache.get::<u64>("plain:1").await,
        None,
        "the fill overwrote the invalidation"
    );
}

#[tokio::test]
async fn the_in_memory_backend_is_bounded_by_bytes() {
    let max_bytes = 2 << 20;
    let cache = Cache::builder("memory://")
        .memory(redis_cached::MemoryConfig {
            max_bytes,
            ..redis_cached::MemoryConfig::default()
        })
        .build()
        .expect("valid");
    let value = "v".repeat(64 * 1024);
    for i in 0..200 {
        cache
            .set(&format!("big:{i}"), &value, Duration::from_secs(60))
            .await
            .expect("stored");
    }
    let held = cache.memory_entry_count().expect("in memory") as u64;
    assert!(held * 64 * 1024 <= max_bytes, "{held} entries of 64 KiB");
    assert!(held >= 8, "it still caches: {held}");
}

/// In memory: a computation reads row 7 (value 1), the row is updated and
/// its key invalidated, `overwrite` optionally writes the new value over
/// the tombstone, then a flood of values that are read again evicts what
/// nobody reads (the tombstone, or the value over it). The computation's
/// older value must not be stored.
async fn older_value_after_eviction(overwrite: bool) -> Arc<Repo> {
    let cache = Cache::builder("memory://")
        .memory(redis_cached::MemoryConfig {
            max_entries: 64,
            ..Default::default()
        })
        .build()
        .unwrap();
    let repo = Repo::new(cache);
    repo.db.value.store(1, Ordering::SeqCst);
    let before = {
        let repo = repo.clone();
        tokio::spawn(async move { repo.row(7).await })
    };
    repo.db.started(1).await;
    repo.update_row(7, 2).await.expect("updated");
    if overwrite {
        repo.cache
            .set("row:7", &2u64, Duration::from_secs(60))
            .await
            .unwrap();
    }
    for n in 0..2_000u32 {
        let key = format!("filler:{}", n % 128);
        repo.cache
            .set(&key, &n, Duration::from_secs(60))
            .await
            .unwrap();
        let _ = repo.cache.get::<u32>(&key).await;
    }
    assert_eq!(before.await.expect("no panic"), 1);
    assert_ne!(
        repo.cache.get::<u64>("row:7").await,
        Some(1),
        "the value read before the invalidation was stored"
    );
    assert_eq!(repo.row(7).await, 2);
    repo
}

/// The tombstone outlives any amount of eviction while its window lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_an_evicted_tombstone_does_not_let_an_older_value_in() {
    let repo = older_value_after_eviction(false).await;
    assert_eq!(repo.cache.stats().stale_sets_refused, 1);
}

/// A value written over the tombstone shadows it: when that value is
/// evicted, the key reads as the tombstone again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_a_tombstone_outlives_the_value_written_over_it() {
    older_value_after_eviction(true).await;
}
