//! Redis Cluster and Sentinel when their topology changes under the cache:
//! a master killed and replaced by its replica, a slot moved to another
//! node, a Sentinel failover. Callers always get the right value; once the
//! new topology is in place the cache hits again, by itself.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis_cached::{redis_cached, Cache, Error};
use support::cluster::{cli, key_slot, RedisCluster, Sentinel, SentinelSetup, MASTER_NAME};

/// A repository whose row `id` is `id * 10`, counting its queries.
struct Repo {
    cache: Cache,
    queries: AtomicU32,
}

impl Repo {
    fn new(cache: Cache) -> Repo {
        Repo {
            cache,
            queries: AtomicU32::new(0),
        }
    }

    #[redis_cached(key = "row:<id>", ttl = "10m", lock = true, cache = self.cache)]
    async fn row(&self, id: u32) -> u32 {
        self.queries.fetch_add(1, Ordering::SeqCst);
        id * 10
    }

    #[redis_cached(key = "member:<id>", ttl = "10m", tags = ["team"], cache = self.cache)]
    async fn member(&self, id: u32) -> u32 {
        self.queries.fetch_add(1, Ordering::SeqCst);
        id * 100
    }

    #[redis_cached(key = "plan:<id>", ttl = "10m", near = "30s", cache = self.cache)]
    async fn plan(&self, id: u32) -> u32 {
        self.queries.fetch_add(1, Ordering::SeqCst);
        id * 1000
    }

    fn queries(&self) -> u32 {
        self.queries.load(Ordering::SeqCst)
    }

    /// Calls `row(id)` until a call is answered from the cache (the value
    /// checked on every call), or panics after `limit`.
    async fn until_cached(&self, id: u32, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let before = self.queries();
            assert_eq!(self.row(id).await, id * 10);
            if self.queries() == before {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not cached again after {limit:?}: {:?}",
                self.cache.stats()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Eight tasks calling `row` over a set of ids in a loop, every value
/// checked (a wrong one panics the task), until [`Load::finish`].
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(u64, Duration)>>,
}

impl Load {
    fn start(repo: &Arc<Repo>, ids: &[u32]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..8)
            .map(|task| {
                let (repo, stop, ids) = (repo.clone(), stop.clone(), ids.to_vec());
                tokio::spawn(async move {
                    let (mut calls, mut worst) = (0u64, Duration::ZERO);
                    for id in ids.iter().cycle().skip(task) {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let call = Instant::now();
                        assert_eq!(repo.row(*id).await, id * 10);
                        worst = worst.max(call.elapsed());
                        calls += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    (calls, worst)
                })
            })
            .collect();
        Load { stop, tasks }
    }

    /// Stops the tasks; returns how many calls they made and the slowest.
    async fn finish(self) -> (u64, Duration) {
        self.stop.store(true, Ordering::SeqCst);
        let (mut calls, mut worst) = (0, Duration::ZERO);
        for task in self.tasks {
            let (made, slowest) = task.await.expect("every value was right");
            calls += made;
            worst = worst.max(slowest);
        }
        (calls, worst)
    }
}

/// Waits until the lock subscriber listens on the shard channel of `key`'s
/// slot at the node that serves it now.
async fn wait_subscribed(cluster: &RedisCluster, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cluster.has_shard_subscriber(key, "app:redis-cached:filled") {
        assert!(
            Instant::now() < deadline,
            "no lock subscriber at the new owner of {key}'s slot"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn cluster_cache(cluster: &RedisCluster) -> Cache {
    cluster_cache_within(cluster, Duration::from_millis(300))
}

fn cluster_cache_within(cluster: &RedisCluster, op_timeout: Duration) -> Cache {
    let urls = cluster.urls();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    Cache::cluster_builder(&urls)
        .namespace("app")
        .op_timeout(op_timeout)
        .build()
        .expect("valid settings")
}

fn sentinel_cache(setup: &SentinelSetup, op_timeout: Duration) -> Cache {
    let urls = setup.sentinel_urls();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    Cache::sentinel_builder(&urls, MASTER_NAME)
        .namespace("app")
        .op_timeout(op_timeout)
        .build()
        .expect("valid settings")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_cluster_master_is_replaced_without_a_caller_noticing() {
    let mut cluster = RedisCluster::start();
    let repo = Arc::new(Repo::new(cluster_cache(&cluster)));
    repo.cache.connect().await.expect("connect");
    repo.until_cached(7, Duration::from_secs(10)).await;
    wait_subscribed(&cluster, "app:row:7").await;
    // Eight tasks keep calling over ids spread across the three masters
    // while the one serving row 7 dies.
    let load = Load::start(&repo, &(0..24).collect::<Vec<_>>());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let port = cluster.master_of("app:row:7").port();
    let victim = cluster
        .nodes
        .iter_mut()
        .find(|node| node.port() == port)
        .expect("the master is one of the nodes");
    victim.kill();
    // Until its replica takes over (node timeout 2 s), every call still
    // returns the right value: from the cache, or computed.
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    repo.until_cached(7, Duration::from_secs(30)).await;
    let cached_again = started.elapsed();
    let (calls, worst) = load.finish().await;
    println!(
        "cluster master killed under 8 tasks: {calls} calls, slowest {worst:?} (op_timeout 300 ms); cached again after {cached_again:?}"
    );
    assert!(calls > 8, "the load ran through the failover");
    repo.until_cached(8, Duration::from_secs(10)).await;
    // Lock wake-ups for the slot reach this process again, from the
    // promoted replica.
    wait_subscribed(&cluster, "app:row:7").await;
    assert_eq!(
        cluster.crossslot_errors(),
        0,
        "{:?}",
        cluster.rejected_commands()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moved_to_another_node_is_followed() {
    let cluster = RedisCluster::start();
    let repo = Arc::new(Repo::new(cluster_cache(&cluster)));
    repo.until_cached(3, Duration::from_secs(10)).await;
    let key = "app:row:3";
    wait_subscribed(&cluster, key).await;
    let slot = cli(cluster.nodes[0].port(), &["CLUSTER", "KEYSLOT", key])
        .trim()
        .to_owned();
    let from = cluster.master_of(key).port();
    let to = cluster
        .nodes
        .iter()
        .map(|node| node.port())
        .find(|&port| port != from && cli(port, &["ROLE"]).starts_with("master"))
        .expect("another master");
    let id = |port: u16| cli(port, &["CLUSTER", "MYID"]).trim().to_owned();
    let (from_id, to_id) = (id(from), id(to));
    // Eight tasks call row 3 (in the moving slot) and others throughout
    // the migration: while the slot is MIGRATING, missing keys are
    // answered with ASK.
    let load = Load::start(&repo, &[3, 4, 3, 5, 3, 6]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The slot's migration, as redis-cli --cluster reshard does it; the
    // load may store keys at the source meanwhile, so move until empty.
    cli(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]);
    cli(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]);
    let mut moved = 0;
    loop {
        let keys = cli(from, &["CLUSTER", "GETKEYSINSLOT", &slot, "100"]);
        let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
        if keys.is_empty() {
            break;
        }
        for key in keys {
            let out = cli(
                from,
                &["MIGRATE", "127.0.0.1", &to.to_string(), key, "0", "5000"],
            );
            assert!(
                out.contains("OK") || out.contains("NOKEY"),
                "MIGRATE {key}: {out}"
            );
            moved += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for port in cluster.nodes.iter().map(|node| node.port()) {
        cli(port, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (calls, worst) = load.finish().await;
    println!("slot moved under 8 tasks: {moved} keys migrated, {calls} calls, slowest {worst:?}");
    assert!(moved >= 1, "the cached entry moved with its slot");
    assert!(calls > 8, "the load ran through the migration");
    // Still a hit after the move, found through MOVED.
    repo.until_cached(3, Duration::from_secs(10)).await;
    let before = repo.queries();
    assert_eq!(repo.row(3).await, 30);
    assert_eq!(repo.queries(), before, "served from the moved slot");
    repo.until_cached(4, Duration::from_secs(10)).await;
    // Redis unsubscribed the moved slot's channel at the old owner; the
    // subscriber listens at the new one.
    wait_subscribed(&cluster, key).await;
    assert_eq!(
        cluster.crossslot_errors(),
        0,
        "{:?}",
        cluster.rejected_commands()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_subscriber_comes_back_on_every_slot_after_its_connections_drop() {
    let cluster = RedisCluster::start();
    let repo = Repo::new(cluster_cache(&cluster));
    // Locked misses over 24 keys: their slots, spread over the three
    // masters, are all subscribed.
    let keys: Vec<String> = (0..24).map(|id| format!("app:row:{id}")).collect();
    for id in 0..24 {
        repo.until_cached(id, Duration::from_secs(10)).await;
    }
    for key in &keys {
        wait_subscribed(&cluster, key).await;
    }
    for node in &cluster.nodes {
        cli(node.port(), &["CLIENT", "KILL", "TYPE", "pubsub"]);
    }
    // Every channel is subscribed again, each with a command of its own.
    for key in &keys {
        wait_subscribed(&cluster, key).await;
    }
    assert_eq!(
        cluster.crossslot_errors(),
        0,
        "{:?}",
        cluster.rejected_commands()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_is_followed() {
    let setup = SentinelSetup::start();
    let repo = Repo::new(sentinel_cache(&setup, Duration::from_millis(300)));
    repo.cache.connect().await.expect("connect");
    repo.until_cached(1, Duration::from_secs(10)).await;
    let old = setup.master_port();
    assert_eq!(old, setup.master.port());
    let out = cli(
        setup.sentinels[0].port,
        &["SENTINEL", "FAILOVER", MASTER_NAME],
    );
    assert!(out.contains("OK"), "SENTINEL FAILOVER: {out}");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    let mut worst = Duration::ZERO;
    while setup.master_port() == old {
        assert!(Instant::now() < deadline, "no failover");
        let call = Instant::now();
        assert_eq!(repo.row(1).await, 10);
        worst = worst.max(call.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let switched = started.elapsed();
    // The cache follows the new master (told by the sentinels), while the
    // old one still takes writes: Sentinel demotes it only later. A value
    // stored now must land on the new master.
    let new_master = setup.master_port();
    let mut id = 100;
    loop {
        id += 1;
        assert_eq!(repo.row(id).await, id * 10);
        let on_new = cli(new_master, &["EXISTS", &format!("app:row:{id}")]);
        if on_new.trim() == "1" {
            break;
        }
        assert!(Instant::now() < deadline, "never stored on the new master");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "sentinel failover: slowest call during the switch {worst:?}; switched after {switched:?}, storing on the new master after {:?}",
        started.elapsed()
    );
    repo.until_cached(id, Duration::from_secs(10)).await;
    assert_eq!(repo.row(1).await, 10);
    assert_eq!(
        repo.cache.stats().refused,
        0,
        "followed on the sentinels' word, before the old master refused a write"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_that_answer_late_hold_no_caller_up() {
    let setup = SentinelSetup::start();
    for sentinel in &setup.sentinels {
        sentinel.pause();
    }
    let repo = Repo::new(sentinel_cache(&setup, Duration::from_millis(200)));
    // A caller that gives up while the master is being looked up.
    let gave_up = tokio::time::timeout(Duration::from_millis(50), repo.row(1)).await;
    assert!(gave_up.is_err(), "the lookup cannot have been answered");
    // The others get their values, computed, while the sentinels say
    // nothing.
    let mut worst = Duration::ZERO;
    for id in 0..5 {
        let call = Instant::now();
        assert_eq!(repo.row(id).await, id * 10);
        worst = worst.max(call.elapsed());
    }
    for sentinel in &setup.sentinels {
        sentinel.resume();
    }
    // Once they answer, the cache finds the master and stores again.
    repo.until_cached(1, Duration::from_secs(20)).await;
    println!(
        "sentinels frozen: slowest call {worst:?} (op_timeout 200 ms); {:?}",
        repo.cache.stats()
    );
}

/// A locked function whose body waits until it is let through.
struct Gated {
    cache: Cache,
    entered: tokio::sync::Notify,
    gate: tokio::sync::Semaphore,
}

impl Gated {
    fn new(cache: Cache, open: bool) -> Gated {
        Gated {
            cache,
            entered: tokio::sync::Notify::new(),
            gate: tokio::sync::Semaphore::new(if open { 1 << 20 } else { 0 }),
        }
    }

    #[redis_cached(key = "gated:<id>", ttl = "10m", lock = true, cache = self.cache)]
    async fn gated(&self, id: u32) -> u32 {
        self.entered.notify_one();
        let _pass = self.gate.acquire().await.expect("never closed");
        id * 10
    }
}

/// Ends `migration` after `after`, from a thread of its own.
fn end_after(
    migration: support::cluster::Migration,
    after: Duration,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        std::thread::sleep(after);
        migration.end();
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_in_migration_keeps_locks_and_tags_working() {
    let cluster = RedisCluster::start();
    let repo = Repo::new(cluster_cache(&cluster));
    repo.cache.connect().await.expect("connect");

    // A locked miss while its slot migrates (for longer than op_timeout):
    // it takes its lock once the migration ends, with nothing counted as a
    // Redis failure.
    let migration = cluster.start_migration(key_slot("app:row:1"));
    let ended = end_after(migration, Duration::from_secs(1));
    assert_eq!(repo.row(1).await, 10);
    ended.join().expect("ended");
    let stats = repo.cache.stats();
    assert_eq!(
        (
            stats.lock_acquired,
            stats.errors,
            stats.timeouts,
            stats.breaker_opens
        ),
        (1, 0, 0, 0),
        "{stats:?}"
    );
    repo.until_cached(1, Duration::from_secs(5)).await;

    // A tag invalidated while its set's slot migrates.
    assert_eq!(repo.member(1).await, 100);
    let migration = cluster.start_migration(key_slot("app:~tag:team"));
    let ended = end_after(migration, Duration::from_secs(1));
    assert_eq!(repo.cache.invalidate_tag("team").await, Ok(1));
    ended.join().expect("ended");
    let before = repo.queries();
    assert_eq!(repo.member(1).await, 100);
    assert_eq!(repo.queries(), before + 1, "invalidated");
    let stats = repo.cache.stats();
    assert_eq!(
        (stats.errors, stats.timeouts, stats.breaker_opens),
        (0, 0, 0),
        "{stats:?}"
    );

    // A holder that releases its lock while the slot migrates: the release
    // lands once the migration ends, rather than the lock staying for its
    // TTL (10 s), or another process waiting `lock_wait` (5 s).
    let holder = Arc::new(Gated::new(cluster_cache(&cluster), false));
    let other = Gated::new(cluster_cache(&cluster), true);
    let entered = holder.entered.notified();
    let held = tokio::spawn({
        let holder = holder.clone();
        async move { holder.gated(1).await }
    });
    entered.await;
    let migration = cluster.start_migration(key_slot("app:gated:1"));
    holder.gate.add_permits(1);
    assert_eq!(held.await.expect("no panic"), 10);
    let ended = end_after(migration, Duration::from_secs(1));
    let waited = Instant::now();
    assert_eq!(other.gated(1).await, 10);
    let waited = waited.elapsed();
    ended.join().expect("ended");
    let lock = "app:~lock{app:gated:1}";
    let owner = cluster.master_of("app:gated:1").port();
    let deadline = Instant::now() + Duration::from_secs(3);
    while cli(owner, &["EXISTS", lock]).trim() != "0" {
        assert!(Instant::now() < deadline, "the lock outlived the migration");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = other.cache.stats();
    println!("a release during a migration: the other process waited {waited:?}; {stats:?}");
    assert_eq!(stats.lock_wait_timeouts, 0, "{stats:?}");
    assert!(waited < Duration::from_secs(4), "waited {waited:?}");
    for cache in [&holder.cache, &other.cache] {
        let stats = cache.stats();
        assert_eq!((stats.errors, stats.breaker_opens), (0, 0), "{stats:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reshard_of_a_thousand_slots_under_load_reaches_no_caller() {
    let cluster = RedisCluster::start();
    // A generous op_timeout: what is measured is how migrations are met,
    // not how fast a loaded machine answers.
    let cache = cluster_cache_within(&cluster, Duration::from_secs(1));
    let repo = Arc::new(Repo::new(cache));
    repo.cache.connect().await.expect("connect");
    // `--cluster reshard` moves the source's first slots.
    let id = |port: u16| cli(port, &["CLUSTER", "MYID"]).trim().to_owned();
    let from = cluster.master_of("app:row:0").port();
    let to = cluster
        .nodes
        .iter()
        .map(|node| node.port())
        .find(|&port| port != from && cli(port, &["ROLE"]).starts_with("master"))
        .expect("another master");
    let first = cluster.first_slot_of(from);
    let moving = first..first + 1000;
    let ids: Vec<u32> = (0..)
        .filter(|id| moving.contains(&key_slot(&format!("app:row:{id}"))))
        .take(200)
        .collect();
    // Eight tasks: locked misses (each key invalidated now and then) and
    // hits on keys of the moving slots, tagged values and invalidations of
    // their tag.
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..8)
        .map(|task| {
            let (repo, stop, ids) = (repo.clone(), stop.clone(), ids.clone());
            tokio::spawn(async move {
                let mut calls = 0u64;
                for (n, id) in ids.iter().cycle().skip(task * 25).enumerate() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if n % 4 == task % 4 {
                        let _ = repo.cache.invalidate(&format!("row:{id}")).await;
                    }
                    assert_eq!(repo.row(*id).await, id * 10);
                    assert_eq!(repo.member(*id).await, id * 100);
                    if task == 0 && n % 50 == 0 {
                        match repo.cache.invalidate_tag("team").await {
                            // See below.
                            Ok(_) | Err(Error::Timeout(_)) => {}
                            Err(err) => panic!("invalidate_tag: {err}; {:?}", repo.cache.stats()),
                        }
                    }
                    calls += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                calls
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let reshard = tokio::task::spawn_blocking(move || {
        std::process::Command::new("redis-cli")
            .args(["--cluster", "reshard", &format!("127.0.0.1:{from}")])
            .args(["--cluster-from", &id(from), "--cluster-to", &id(to)])
            .args(["--cluster-slots", "1000", "--cluster-yes"])
            .output()
            .expect("redis-cli runs")
    })
    .await
    .expect("no panic");
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let mut calls = 0;
    for task in tasks {
        calls += task.await.expect("every value was right");
    }
    assert!(
        reshard.status.success(),
        "{}",
        String::from_utf8_lossy(&reshard.stdout)
    );
    assert_eq!(cluster.master_of_slot(first), to, "the slots moved");
    let stats = repo.cache.stats();
    println!("reshard of 1,000 slots in {took:?} under 8 tasks: {calls} calls; {stats:?}");
    assert!(calls > 100, "the load ran through the reshard");
    // Timeouts may happen: redis-rs's cluster connection sometimes stalls
    // for good while slots move (a refresh of its slot map waits for a lock
    // that a request it no longer polls holds). The cache finds it stuck
    // and replaces it, and holds the operations that were out on it
    // against no master's breaker.
    assert_eq!(
        (stats.errors, stats.breaker_opens, stats.lock_wait_timeouts),
        (0, 0, 0),
        "{stats:?}"
    );
}

/// A sentinel listed first names a master of its own (a compromised or
/// misconfigured sentinel): the cache asks the others too, follows the
/// address two sentinels agree on, and never sends the master's password
/// to the lone sentinel's master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_sentinel_gets_no_password_sent_to_its_master() {
    let setup = SentinelSetup::start_with_password("secret");
    let rogue_master = support::RedisServer::start_with(&["--requirepass", "rogue"]);
    let rogue = Sentinel::start(
        rogue_master.port(),
        false,
        &format!("sentinel auth-pass {MASTER_NAME} rogue\n"),
    );
    let mut urls = vec![format!("redis://127.0.0.1:{}/", rogue.port)];
    urls.extend(setup.sentinel_urls());
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let cache = Cache::sentinel_builder(&urls, MASTER_NAME)
        .master_credentials(None, "secret")
        .namespace("app")
        .op_timeout(Duration::from_millis(500))
        .build()
        .expect("valid settings");
    cache.connect().await.expect("the master the others name");
    let repo = Repo::new(cache);
    repo.until_cached(1, Duration::from_secs(10)).await;
    let refused = cli(
        rogue_master.port(),
        &["-a", "rogue", "--no-auth-warning", "ACL", "LOG"],
    );
    assert!(
        refused.trim().is_empty(),
        "the rogue master was sent credentials: {refused}"
    );
}

/// Twenty caches on Sentinel under load while the master is frozen for ten
/// seconds, with no failover (its replica may not be promoted): the data
/// connection's probes, the lock subscriber and the near tier's tracking of
/// each cache share one lookup at a time, on connections to the sentinels
/// that they keep, so the sentinels are not dialled again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_master_does_not_make_the_caches_dial_the_sentinels() {
    const CACHES: u64 = 20;
    let setup = SentinelSetup::start();
    let replica = setup.replica.port();
    assert!(cli(replica, &["CONFIG", "SET", "replica-priority", "0"]).contains("OK"));
    let repos: Vec<Arc<Repo>> = (0..CACHES)
        .map(|_| {
            Arc::new(Repo::new(sentinel_cache(
                &setup,
                Duration::from_millis(200),
            )))
        })
        .collect();
    for repo in &repos {
        repo.cache.connect().await.expect("connect");
        repo.until_cached(1, Duration::from_secs(10)).await;
        assert_eq!(repo.plan(1).await, 1000);
    }
    let before: Vec<u64> = setup
        .sentinels
        .iter()
        .map(|s| s.connections_received())
        .collect();
    let master = setup.master_port();
    assert_eq!(master, setup.master.port());
    setup.master.pause();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = repos
        .iter()
        .map(|repo| {
            let (repo, stop) = (repo.clone(), stop.clone());
            tokio::spawn(async move {
                let mut id = 0;
                while !stop.load(Ordering::SeqCst) {
                    id += 1;
                    assert_eq!(repo.row(id % 7).await, (id % 7) * 10);
                    assert_eq!(repo.plan(id % 5).await, (id % 5) * 1000);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after: Vec<u64> = setup
        .sentinels
        .iter()
        .map(|s| s.connections_received())
        .collect();
    setup.master.resume();
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.expect("every value was right");
    }
    assert_eq!(setup.master_port(), master, "no failover");
    let grew: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    println!("a master frozen for 10 s under {CACHES} caches: connections each sentinel received {grew:?}");
    for grown in grew {
        assert!(grown <= 2 * CACHES, "a sentinel was dialled {grown} times");
    }
    for repo in &repos {
        repo.until_cached(1, Duration::from_secs(20)).await;
    }
}

/// Waits until the masters have subscribers on `count` lock notification
/// channels of the namespace `app`.
async fn wait_channels(cluster: &RedisCluster, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let subscribed = cluster.shard_channels("app:redis-cached:filled");
        if subscribed == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{subscribed} of {count} channels subscribed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A process waiting in 2,000 slots: a slot that moves costs one
/// subscription (two if the slot map it reads is a moment late), not 2,000;
/// a master that drops the subscriber's connection has its own slots
/// subscribed again, and no other master sees a subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_subscriber_resubscribes_only_what_changed() {
    const SLOTS: usize = 2000;
    let cluster = RedisCluster::start();
    let repo = Arc::new(Repo::new(cluster_cache(&cluster)));
    repo.cache.connect().await.expect("connect");
    // Locked misses on keys of 2,000 slots: each slot's channel is
    // subscribed.
    let mut seen = std::collections::HashSet::new();
    let ids: Vec<u32> = (0..)
        .filter(|id| seen.insert(key_slot(&format!("app:row:{id}"))))
        .take(SLOTS)
        .collect();
    let tasks: Vec<_> = ids
        .chunks(SLOTS / 16)
        .map(|chunk| {
            let (repo, chunk) = (repo.clone(), chunk.to_vec());
            tokio::spawn(async move {
                for id in chunk {
                    assert_eq!(repo.row(id).await, id * 10);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("every value was right");
    }
    wait_channels(&cluster, SLOTS).await;

    // One of them, emptied, moves to another master.
    let key = format!("app:row:{}", ids[0]);
    cli(cluster.master_of(&key).port(), &["DEL", &key]);
    let slot = key_slot(&key);
    let before = cluster.command_calls("ssubscribe");
    let migration = cluster.start_migration(slot);
    migration.end_at_target();
    wait_subscribed(&cluster, &key).await;
    wait_channels(&cluster, SLOTS).await;
    let moved = cluster.command_calls("ssubscribe") - before;
    println!("a slot moved: {moved} SSUBSCRIBE");
    assert!(moved <= 2, "{moved} SSUBSCRIBE for one moved slot");

    // One master drops its pub/sub connections.
    let masters = cluster.master_ports();
    let calls = |cluster: &RedisCluster| -> Vec<u64> {
        masters
            .iter()
            .map(|&port| cluster.node_command_calls(port, "ssubscribe"))
            .collect()
    };
    let before = calls(&cluster);
    cli(masters[0], &["CLIENT", "KILL", "TYPE", "pubsub"]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    wait_channels(&cluster, SLOTS).await;
    let after = calls(&cluster);
    let grew: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    println!("a master dropped its subscribers: SSUBSCRIBE per master {grew:?}");
    assert!(grew[0] > 0, "{grew:?}");
    assert!(grew[1..].iter().all(|&n| n == 0), "{grew:?}");
    assert_eq!(
        cluster.crossslot_errors(),
        0,
        "{:?}",
        cluster.rejected_commands()
    );
}

/// The master serving a waited-in slot freezes (SIGSTOP: its connections
/// stay open) and its replica takes over: the subscriber's pings find the
/// frozen connection, and the slot's channel is subscribed at the new
/// master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_masters_subscriptions_move_to_its_replica() {
    let mut cluster = RedisCluster::start();
    let repo = Repo::new(cluster_cache(&cluster));
    repo.cache.connect().await.expect("connect");
    repo.until_cached(1, Duration::from_secs(10)).await;
    let key = "app:row:1";
    wait_subscribed(&cluster, key).await;
    let port = cluster.master_of(key).port();
    let frozen = cluster
        .nodes
        .iter_mut()
        .find(|node| node.port() == port)
        .expect("the master is one of the nodes");
    frozen.pause();
    // Until its replica is promoted (node timeout 2 s), then the channel
    // is subscribed at the replica.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let owner = cluster.master_of_slot_but(key_slot(key), port);
        let subscribed = owner.is_some_and(|owner| {
            cli(
                owner,
                &["PUBSUB", "SHARDCHANNELS", "app:redis-cached:filled*"],
            )
            .lines()
            .any(|channel| !channel.is_empty() && key_slot(channel) == key_slot(key))
        });
        if subscribed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the channel was not subscribed at the promoted replica"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let frozen = cluster
        .nodes
        .iter_mut()
        .find(|node| node.port() == port)
        .expect("the old master is one of the nodes");
    frozen.resume();
}

/// A slot that no master serves (its slots deleted, the cluster told to
/// serve the others all the same) holds up the subscriptions of no other
/// slot when the subscriber's connections drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_no_master_serves_holds_up_no_other() {
    let cluster = RedisCluster::start();
    let repo = Repo::new(cluster_cache(&cluster));
    repo.cache.connect().await.expect("connect");
    let keys: Vec<String> = (0..12).map(|id| format!("app:row:{id}")).collect();
    for id in 0..12 {
        repo.until_cached(id, Duration::from_secs(10)).await;
    }
    let mut slots: Vec<u16> = keys.iter().map(|key| key_slot(key)).collect();
    slots.sort_unstable();
    slots.dedup();
    wait_channels(&cluster, slots.len()).await;
    let bad = key_slot(&keys[0]);
    for node in &cluster.nodes {
        cli(
            node.port(),
            &["CONFIG", "SET", "cluster-require-full-coverage", "no"],
        );
    }
    cli(cluster.master_of(&keys[0]).port(), &["DEL", &keys[0]]);
    for node in &cluster.nodes {
        cli(node.port(), &["CLUSTER", "DELSLOTS", &bad.to_string()]);
    }
    for port in cluster.master_ports() {
        cli(port, &["CLIENT", "KILL", "TYPE", "pubsub"]);
    }
    // Every other slot's channel is subscribed again.
    wait_channels(&cluster, slots.len() - 1).await;
}
