//! Redis Cluster and Sentinel when their topology changes under the cache:
//! a master killed and replaced by its replica, a slot moved to another
//! node, a Sentinel failover. Callers always get the right value; once the
//! new topology is in place the cache hits again, by itself.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use redis_cached::{redis_cached, Cache};
use support::cluster::{cli, RedisCluster, SentinelSetup, MASTER_NAME};

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
    let urls = cluster.urls();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    Cache::cluster_builder(&urls)
        .namespace("app")
        .op_timeout(Duration::from_millis(300))
        .build()
        .expect("valid settings")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_cluster_master_is_replaced_without_a_caller_noticing() {
    let mut cluster = RedisCluster::start();
    let repo = Repo::new(cluster_cache(&cluster));
    repo.cache.connect().await.expect("connect");
    repo.until_cached(7, Duration::from_secs(10)).await;
    wait_subscribed(&cluster, "app:row:7").await;
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
    let mut worst = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(3) {
        let call = Instant::now();
        assert_eq!(repo.row(7).await, 70);
        worst = worst.max(call.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    repo.until_cached(7, Duration::from_secs(30)).await;
    println!(
        "cluster master killed: slowest call during the failover {worst:?}; cached again after {:?}",
        started.elapsed()
    );
    repo.until_cached(8, Duration::from_secs(10)).await;
    // Lock wake-ups for the slot reach this process again, from the
    // promoted replica.
    wait_subscribed(&cluster, "app:row:7").await;
    assert_eq!(cluster.crossslot_errors(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moved_to_another_node_is_followed() {
    let cluster = RedisCluster::start();
    let repo = Repo::new(cluster_cache(&cluster));
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
    // The slot's migration, as redis-cli --cluster reshard does it.
    cli(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]);
    cli(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]);
    let keys = cli(from, &["CLUSTER", "GETKEYSINSLOT", &slot, "100"]);
    for moved in keys.lines().filter(|k| !k.is_empty()) {
        let out = cli(
            from,
            &["MIGRATE", "127.0.0.1", &to.to_string(), moved, "0", "5000"],
        );
        assert!(out.contains("OK"), "MIGRATE {moved}: {out}");
    }
    for port in cluster.nodes.iter().map(|node| node.port()) {
        cli(port, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
    }
    // The entry moved with its slot: still a hit, found through MOVED.
    let before = repo.queries();
    assert_eq!(repo.row(3).await, 30);
    assert_eq!(repo.queries(), before, "served from the moved slot");
    repo.until_cached(4, Duration::from_secs(10)).await;
    // Redis unsubscribed the moved slot's channel at the old owner; the
    // subscriber listens at the new one.
    wait_subscribed(&cluster, key).await;
    assert_eq!(cluster.crossslot_errors(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_is_followed() {
    let setup = SentinelSetup::start();
    let urls = setup.sentinel_urls();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let repo = Repo::new(
        Cache::sentinel_builder(&urls, MASTER_NAME)
            .namespace("app")
            .op_timeout(Duration::from_millis(300))
            .build()
            .expect("valid settings"),
    );
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
