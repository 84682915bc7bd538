//! The near tier: values kept in process memory, dropped when Redis says
//! their key changed, and not served at all while that cannot be heard.
//! Two `Cache` instances on one server stand for two processes: each has
//! its own connections.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis_cached::{cache_put, redis_cached, Cache};
use support::proxy::Proxy;
use support::RedisServer;

const NEAR: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(600);
/// How long the near tier may serve without a proof that invalidations
/// arrive.
const LEASE: Duration = Duration::from_millis(500);

/// A cache on `server` whose near tier is serving, checked on `key`
/// (which must hold a value): its calls answer from memory.
async fn serving(server: &RedisServer, key: &str) -> Cache {
    let cache = Cache::builder(&server.url())
        .op_timeout(Duration::from_millis(500))
        .build()
        .expect("valid URL");
    near_hit_on(&cache, key).await;
    cache
}

/// Reads `key` until the near tier answers it (within 5 s).
async fn near_hit_on(cache: &Cache, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let before = cache.stats().near_hits;
        let value = cache.get_near::<String>(key, NEAR).await;
        assert!(value.is_some(), "{key} holds a value");
        if cache.stats().near_hits > before {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the near tier never served {key}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long until `cache` reads `want` at `key` (within 5 s), reading
/// through the near tier.
async fn seen_after(cache: &Cache, key: &str, want: &str) -> Duration {
    let started = Instant::now();
    loop {
        if cache.get_near::<String>(key, NEAR).await.as_deref() == Some(want) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{key} still not {want}"
        );
        tokio::task::yield_now().await;
    }
}

/// How long until `cache` finds nothing at `key` (within 5 s), reading
/// through the near tier.
async fn gone_after(cache: &Cache, key: &str) -> Duration {
    let started = Instant::now();
    while cache.get_near::<String>(key, NEAR).await.is_some() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{key} still cached"
        );
        tokio::task::yield_now().await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_by_anyone_is_seen_by_the_next_read_after_one_message() {
    let server = RedisServer::start();
    let writer = Cache::redis(&server.url()).expect("valid URL");
    writer.set("k", &"v0", TTL).await.expect("stored");
    let reader = serving(&server, "k").await;
    let hits = reader.stats().near_hits;
    for _ in 0..100 {
        assert_eq!(
            reader.get_near::<String>("k", NEAR).await.as_deref(),
            Some("v0")
        );
    }
    assert_eq!(reader.stats().near_hits, hits + 100, "answered from memory");

    // Another cache's writes, each seen after about one message.
    let mut delays = Vec::new();
    for n in 1..=50 {
        let value = format!("v{n}");
        writer.set("k", &value, TTL).await.expect("stored");
        delays.push(seen_after(&reader, "k", &value).await);
        near_hit_on(&reader, "k").await;
    }
    delays.sort();
    eprintln!(
        "near tier: another cache's write seen after p50 {:?}, p99 {:?}, max {:?} (50 writes)",
        delays[24], delays[48], delays[49]
    );
    assert!(reader.stats().near_invalidations >= 50);

    // An invalidation, another program's plain SET, a DEL, an expiry and
    // a FLUSHALL each drop the near copy.
    writer.invalidate("k").await.expect("invalidated");
    gone_after(&reader, "k").await;
    writer.set("k", &"v-again", TTL).await.expect("stored");
    near_hit_on(&reader, "k").await;
    let mut raw = server
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let entry: Vec<u8> = redis::cmd("GET")
        .arg("k")
        .query_async(&mut raw)
        .await
        .expect("GET");
    let mut other = entry.clone();
    // The same header, another JSON string: "v-other".
    let header = entry.len() - br#""v-again""#.len();
    other.truncate(header);
    other.extend_from_slice(br#""v-other""#);
    let () = redis::cmd("SET")
        .arg("k")
        .arg(&other)
        .query_async(&mut raw)
        .await
        .expect("SET");
    seen_after(&reader, "k", "v-other").await;
    near_hit_on(&reader, "k").await;
    let () = redis::cmd("PEXPIRE")
        .arg("k")
        .arg(200)
        .query_async(&mut raw)
        .await
        .expect("PEXPIRE");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        reader.get_near::<String>("k", NEAR).await,
        None,
        "expired in Redis"
    );
    writer.set("k", &"v-last", TTL).await.expect("stored");
    near_hit_on(&reader, "k").await;
    let flushes = reader.stats().near_flushes;
    let () = redis::cmd("FLUSHALL")
        .query_async(&mut raw)
        .await
        .expect("FLUSHALL");
    gone_after(&reader, "k").await;
    assert!(
        reader.stats().near_flushes > flushes,
        "{:?}",
        reader.stats()
    );
}

/// `near` on the attribute; `#[cache_put]` from another cache, and this
/// cache's own writes, which it reads back at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_functions_answer_from_memory_until_the_key_changes() {
    static COMPUTED: AtomicU64 = AtomicU64::new(0);
    #[redis_cached(key = "user:<id>", ttl = 600, near = "30s", cache = cache)]
    async fn user(cache: &Cache, id: u64) -> Option<String> {
        COMPUTED.fetch_add(1, Ordering::SeqCst);
        Some(format!("user {id}"))
    }
    #[redis_cached(key = "nobody:<id>", ttl = 600, cache_none = "10m", near = "30s", cache = cache)]
    async fn nobody(cache: &Cache, id: u64) -> Option<String> {
        let _ = id;
        COMPUTED.fetch_add(1, Ordering::SeqCst);
        None
    }
    #[cache_put(key = "user:<id>", ttl = 600, cache = cache)]
    async fn rename(cache: &Cache, id: u64, name: &str) -> Option<String> {
        let _ = id;
        Some(name.to_owned())
    }
    let server = RedisServer::start();
    let a = Cache::redis(&server.url()).expect("valid URL");
    let b = Cache::redis(&server.url()).expect("valid URL");
    assert_eq!(user(&a, 1).await.as_deref(), Some("user 1"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.stats().near_hits == 0 {
        assert_eq!(user(&a, 1).await.as_deref(), Some("user 1"));
        assert!(Instant::now() < deadline, "never served from memory");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(COMPUTED.load(Ordering::SeqCst), 1, "computed once");
    let near_hits = redis_cached::stats_of(user(&a, 1))
        .expect("a cached function")
        .near_hits;
    assert!(near_hits >= 1, "counted for the function");

    rename(&b, 1, "Ada").await;
    let started = Instant::now();
    while user(&a, 1).await.as_deref() != Some("Ada") {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the rename never reached a"
        );
        tokio::task::yield_now().await;
    }
    // Its own write: read back at once, whatever the messages do.
    for n in 0..20 {
        let name = format!("name {n}");
        rename(&a, 1, &name).await;
        assert_eq!(user(&a, 1).await.as_deref(), Some(name.as_str()));
    }
    assert_eq!(COMPUTED.load(Ordering::SeqCst), 1);

    // A cached absence is served from memory as one.
    assert_eq!(nobody(&a, 1).await, None);
    let hits = a.stats().near_hits;
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.stats().near_hits == hits {
        assert_eq!(nobody(&a, 1).await, None);
        assert!(
            Instant::now() < deadline,
            "an absence is never served from memory"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        COMPUTED.load(Ordering::SeqCst),
        2,
        "the absence computed once"
    );
}

/// A hot key: ten reads start every millisecond, on a link of 2 ms, so
/// that the fills of its misses overlap all the time. After another
/// cache's write, the key is back in the tier as soon as a fill that began
/// after the invalidation returns: the fills in flight do not void one
/// another, only the invalidation voids those that began before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_is_back_in_the_tier_soon_after_a_write() {
    let server = RedisServer::start();
    let proxy = Proxy::start(server.port());
    proxy.set_delay_line(Duration::from_millis(2));
    let writer = Cache::redis(&server.url()).expect("valid URL");
    writer.set("hot", &"v1", TTL).await.expect("stored");
    let reader = Cache::builder(&proxy.url())
        .op_timeout(Duration::from_millis(500))
        .build()
        .expect("valid URL");
    near_hit_on(&reader, "hot").await;

    let started = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_millis(1));
    let mut calls = Vec::new();
    let mut wrote = None;
    let mut from = None;
    while started.elapsed() < Duration::from_secs(2) {
        ticks.tick().await;
        for _ in 0..10 {
            let reader = reader.clone();
            calls.push(tokio::spawn(async move {
                reader.get_near::<String>("hot", NEAR).await
            }));
        }
        if wrote.is_none() && started.elapsed() >= Duration::from_millis(200) {
            writer.set("hot", &"v2", TTL).await.expect("stored");
            wrote = Some(Instant::now());
        }
        if from.is_none() && wrote.is_some_and(|at| at.elapsed() >= Duration::from_millis(400)) {
            from = Some(reader.stats());
        }
    }
    for call in calls {
        assert!(
            call.await.expect("no panic").is_some(),
            "the key holds a value"
        );
    }
    let (from, to) = (from.expect("the loop ran past the write"), reader.stats());
    let hits = to.near_hits - from.near_hits;
    let misses = to.near_misses - from.near_misses;
    eprintln!("hot key, from 400 ms after a write on: {hits} near hits, {misses} misses");
    assert!(
        hits * 10 >= (hits + misses) * 9,
        "{hits} near hits of {} reads",
        hits + misses
    );
    assert_eq!(
        reader.get_near::<String>("hot", NEAR).await.as_deref(),
        Some("v2")
    );
}

/// A dropped tracking connection empties the tier: a write made while it
/// was down is seen by the next read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_tracking_connection_empties_the_tier() {
    let server = RedisServer::start();
    let writer = Cache::redis(&server.url()).expect("valid URL");
    writer.set("k", &"before", TTL).await.expect("stored");
    let reader = serving(&server, "k").await;
    let flushes = reader.stats().near_flushes;
    let mut raw = server
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    // Every other client: the reader's tracking and data connections, the
    // writer's.
    let _: redis::Value = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(&mut raw)
        .await
        .expect("CLIENT KILL");
    let writer = Cache::redis(&server.url()).expect("valid URL");
    writer.set("k", &"after", TTL).await.expect("stored");
    seen_after(&reader, "k", "after").await;
    assert!(
        reader.stats().near_flushes > flushes,
        "{:?}",
        reader.stats()
    );
    // Tracking again: served from memory again.
    near_hit_on(&reader, "k").await;
    assert_eq!(
        reader.get_near::<String>("k", NEAR).await.as_deref(),
        Some("after")
    );
}

/// A server that stops answering (SIGSTOP) stops the near hits within the
/// lease: nothing is served that Redis may have changed unheard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_stops_near_hits_within_the_lease() {
    let server = RedisServer::start();
    let writer = Cache::redis(&server.url()).expect("valid URL");
    writer.set("k", &"v", TTL).await.expect("stored");
    let reader = serving(&server, "k").await;
    server.pause();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let hits = reader.stats().near_hits;
    let got = reader.get_near::<String>("k", NEAR).await;
    assert_eq!(
        reader.stats().near_hits,
        hits,
        "no near hit while Redis is silent"
    );
    assert_eq!(got, None, "Redis did not answer in time: a miss");
    server.resume();
    near_hit_on(&reader, "k").await;
}

/// A tracking connection that still answers but no longer delivers
/// invalidations (a proxy dropping RESP3 pushes): the tier stops within
/// its lease, so no read later than the lease after another cache's write
/// gets the older value; and while pushes stay lost it serves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_delivers_no_invalidation_stops_the_tier_within_the_lease() {
    let server = RedisServer::start();
    let proxy = Proxy::start(server.port());
    let writer = Cache::redis(&server.url()).expect("valid URL");
    writer.set("k", &"v1", TTL).await.expect("stored");
    let reader = Cache::builder(&proxy.url())
        .op_timeout(Duration::from_millis(500))
        .build()
        .expect("valid URL");
    near_hit_on(&reader, "k").await;

    proxy.set_drop_pushes(true);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let wrote = Instant::now();
    writer.set("k", &"v2", TTL).await.expect("stored");
    let mut stale_after = Duration::ZERO;
    while wrote.elapsed() < LEASE * 3 {
        let started = wrote.elapsed();
        if reader.get_near::<String>("k", NEAR).await.as_deref() == Some("v1") {
            stale_after = started;
        }
        tokio::task::yield_now().await;
    }
    eprintln!("pushes lost: the older value served until {stale_after:?} after the write");
    assert!(
        stale_after < LEASE,
        "the older value served {stale_after:?} after the write"
    );
    let hits = reader.stats().near_hits;
    for _ in 0..50 {
        assert_eq!(
            reader.get_near::<String>("k", NEAR).await.as_deref(),
            Some("v2")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        reader.stats().near_hits,
        hits,
        "no near hit while no invalidation is delivered"
    );

    // Delivered again: served from memory again.
    proxy.set_drop_pushes(false);
    near_hit_on(&reader, "k").await;
}

/// On a Sentinel master the tier serves (its delivery proven through the
/// cache's own connection to the master), and after a failover a write to
/// the new master is seen within the lease, then served from memory again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sentinel_the_tier_follows_a_failover() {
    use support::cluster::{cli, SentinelSetup, MASTER_NAME};
    let setup = SentinelSetup::start();
    let urls = setup.sentinel_urls();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let cache = redis_cached::Cache::sentinel_builder(&urls, MASTER_NAME)
        .op_timeout(Duration::from_millis(500))
        .build()
        .expect("valid settings");
    cache.set("k", &"v1", TTL).await.expect("stored");
    near_hit_on(&cache, "k").await;

    let old = setup.master_port();
    let out = cli(
        setup.sentinels[0].port,
        &["SENTINEL", "FAILOVER", MASTER_NAME],
    );
    assert!(out.contains("OK"), "SENTINEL FAILOVER: {out}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while setup.master_port() == old {
        assert!(Instant::now() < deadline, "no failover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let writer =
        Cache::redis(&format!("redis://127.0.0.1:{}/", setup.master_port())).expect("valid URL");
    let deadline = Instant::now() + Duration::from_secs(30);
    // The new master may still be taking over: until a write lands.
    while writer.set("k", &"v2", TTL).await.is_err() {
        assert!(Instant::now() < deadline, "the new master took no write");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let wrote = Instant::now();
    while wrote.elapsed() < LEASE * 2 {
        let started = wrote.elapsed();
        let found = cache.get_near::<String>("k", NEAR).await;
        assert!(
            started < LEASE || found.as_deref() == Some("v2"),
            "{found:?} read {started:?} after the write"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    near_hit_on(&cache, "k").await;
    assert_eq!(
        cache.get_near::<String>("k", NEAR).await.as_deref(),
        Some("v2")
    );
}

/// The near tier holds a value no longer than `near`, nor past its Redis
/// TTL even when Redis has not expired the key yet (it expires lazily
/// here: active expiry off, so no invalidation comes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_lives_no_longer_than_its_bound_nor_its_ttl() {
    let server = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let cache = Cache::redis(&server.url()).expect("valid URL");
    cache.set("k", &"v", TTL).await.expect("stored");
    near_hit_on(&cache, "k").await;
    let short = Duration::from_millis(100);
    // A read with a shorter bound keeps what it reads that long.
    cache.set("s", &"v", TTL).await.expect("stored");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        cache.get_near::<String>("s", short).await;
        if cache.near_entry_count().unwrap_or(0) >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "never kept");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hits = cache.stats().near_hits;
    tokio::time::sleep(short * 2).await;
    assert_eq!(
        cache.get_near::<String>("s", short).await.as_deref(),
        Some("v")
    );
    assert_eq!(
        cache.stats().near_hits,
        hits,
        "past its bound: read from Redis"
    );

    let mut raw = server
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let () = redis::cmd("DEBUG")
        .arg("SET-ACTIVE-EXPIRE")
        .arg(0)
        .query_async(&mut raw)
        .await
        .expect("active expiry off");
    cache
        .set("t", &"v", Duration::from_millis(300))
        .await
        .expect("stored");
    near_hit_on(&cache, "t").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let hits = cache.stats().near_hits;
    assert_eq!(
        cache.get_near::<String>("t", NEAR).await,
        None,
        "past its TTL"
    );
    assert_eq!(cache.stats().near_hits, hits);
}

/// A server that refuses `CLIENT TRACKING` with a plain error (here the
/// `CLIENT` command is renamed away): one warning, and no new attempt for
/// a minute, not a reconnection every 2 s; calls read Redis.
#[test]
fn a_server_refusing_tracking_is_warned_about_once_and_left_alone() {
    let logs = support::logs::Captured::default();
    let _guard = tracing::subscriber::set_default(logs.subscriber(tracing::Level::DEBUG));
    // A current-thread runtime: the tracker's task logs on this thread.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let server = RedisServer::start_with(&["--rename-command", "CLIENT", ""]);
        let cache = Cache::redis(&server.url()).expect("valid URL");
        cache.set("k", &"v", TTL).await.expect("stored");
        let mut raw = server
            .client()
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let before = connections(&mut raw).await;
        let until = Instant::now() + Duration::from_millis(4_500);
        while Instant::now() < until {
            assert_eq!(
                cache.get_near::<String>("k", NEAR).await.as_deref(),
                Some("v")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let opened = connections(&mut raw).await - before;
        assert_eq!(cache.stats().near_hits, 0);
        assert!(
            opened <= 1,
            "{opened} connections in 4.5 s: the tracker tried again"
        );
    });
    let logs = logs.text();
    let warnings = logs
        .lines()
        .filter(|line| line.contains("WARN") && line.contains("client tracking"))
        .count();
    assert_eq!(warnings, 1, "{logs}");
}

/// How many connections the server has accepted.
async fn connections(raw: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(raw)
        .await
        .expect("INFO");
    info.lines()
        .find_map(|line| line.strip_prefix("total_connections_received:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("a connection count")
}

/// On the in-memory backend and with `near_capacity(0)`, `near` changes
/// nothing: every read goes to the backend.
#[tokio::test]
async fn without_a_tier_near_reads_the_backend() {
    let memory = Cache::in_memory();
    memory.set("k", &"v", TTL).await.expect("stored");
    assert_eq!(
        memory.get_near::<String>("k", NEAR).await.as_deref(),
        Some("v")
    );
    assert_eq!(memory.near_entry_count(), None);
    assert_eq!(memory.stats().near_hits, 0);
    let server = RedisServer::start();
    let off = Cache::builder(&server.url())
        .near_capacity(0)
        .build()
        .expect("valid URL");
    off.set("k", &"v", TTL).await.expect("stored");
    for _ in 0..5 {
        assert_eq!(
            off.get_near::<String>("k", NEAR).await.as_deref(),
            Some("v")
        );
    }
    assert_eq!(off.near_entry_count(), None);
    assert_eq!(off.stats().near_hits, 0);
}

/// `near` with `lock = true` and with `stale`: filled by the call's own
/// read, and never served past the value's freshness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_works_with_lock_and_stale() {
    static LOCKED: AtomicU64 = AtomicU64::new(0);
    static STALE: AtomicU64 = AtomicU64::new(0);
    #[redis_cached(key = "locked:<id>", ttl = 600, lock = true, near = "30s", cache = cache)]
    async fn locked(cache: &Cache, id: u64) -> String {
        LOCKED.fetch_add(1, Ordering::SeqCst);
        format!("locked {id}")
    }
    #[redis_cached(key = "stale:<id>", ttl = 1, stale = "60s", near = "30s", cache = cache)]
    async fn stale(cache: &Cache, id: u64) -> String {
        let n = STALE.fetch_add(1, Ordering::SeqCst);
        format!("stale {id} #{n}")
    }
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).expect("valid URL");
    let deadline = Instant::now() + Duration::from_secs(5);
    while cache.stats().near_hits == 0 {
        assert_eq!(locked(&cache, 1).await, "locked 1");
        assert!(
            Instant::now() < deadline,
            "a lock function is never served from memory"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(LOCKED.load(Ordering::SeqCst), 1);

    let first = stale(&cache, 1).await;
    let hits = cache.stats().near_hits;
    let deadline = Instant::now() + Duration::from_secs(5);
    while cache.stats().near_hits == hits {
        assert_eq!(stale(&cache, 1).await, first);
        assert!(Instant::now() < deadline, "never served from memory");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Past its TTL (1 s) the value is stale: the near tier serves it no
    // more; the call serves it stale from Redis and refreshes it.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let stale_serves = cache.stats().stale_serves;
    let hits = cache.stats().near_hits;
    assert_eq!(stale(&cache, 1).await, first, "served stale");
    assert_eq!(cache.stats().near_hits, hits, "not from memory");
    assert_eq!(cache.stats().stale_serves, stale_serves + 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while stale(&cache, 1).await == first {
        assert!(Instant::now() < deadline, "never refreshed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
