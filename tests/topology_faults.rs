//! The fault scenarios of `tests/redis_faults.rs` on every Redis
//! deployment: the node serving a key frozen (SIGSTOP) then resumed, and
//! killed; each scenario gets a deployment of its own, since it stops a
//! node. Callers always get the right value within the fallback bound, and
//! the cache hits again afterwards by itself.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis_cached::{redis_cached, Cache, CacheBuilder};
use support::cluster::{cli, RedisCluster, SentinelSetup, MASTER_NAME};
use support::RedisServer;

/// A deployment of its own, and a way to reach the node serving a key.
enum Deployment {
    Server(RedisServer),
    Cluster(RedisCluster),
    Sentinel(SentinelSetup),
}

impl Deployment {
    fn builder(&self) -> CacheBuilder {
        let builder = match self {
            Deployment::Server(server) => Cache::builder(&server.url()),
            Deployment::Cluster(cluster) => {
                let urls = cluster.urls();
                let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
                Cache::cluster_builder(&urls)
            }
            Deployment::Sentinel(setup) => {
                let urls = setup.sentinel_urls();
                let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
                Cache::sentinel_builder(&urls, MASTER_NAME)
            }
        };
        builder
            .namespace("app")
            .op_timeout(Duration::from_millis(200))
    }

    /// The server that holds `key` now (a master).
    fn node_of(&mut self, key: &str) -> &mut RedisServer {
        match self {
            Deployment::Server(server) => server,
            Deployment::Cluster(cluster) => {
                let port = cluster.master_of(key).port();
                cluster
                    .nodes
                    .iter_mut()
                    .find(|node| node.port() == port)
                    .expect("a node serves every slot")
            }
            Deployment::Sentinel(setup) => {
                let port = setup.master_port();
                [&mut setup.master, &mut setup.replica]
                    .into_iter()
                    .find(|node| node.port() == port)
                    .expect("the master is one of the two")
            }
        }
    }
}

struct Repo {
    cache: Cache,
    queries: AtomicU32,
}

impl Repo {
    #[redis_cached(key = "row:<id>", ttl = "10m", cache = self.cache)]
    async fn row(&self, id: u32) -> u32 {
        self.queries.fetch_add(1, Ordering::SeqCst);
        id * 10
    }

    /// Calls `row(id)` until it is answered from the cache, or panics.
    async fn until_cached(&self, id: u32) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let before = self.queries.load(Ordering::SeqCst);
            assert_eq!(self.row(id).await, id * 10);
            if self.queries.load(Ordering::SeqCst) == before {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not cached again: {:?}",
                self.cache.stats()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

macro_rules! per_deployment {
    ($($scenario:ident),* $(,)?) => {
        mod server {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Deployment::Server(super::RedisServer::start())).await
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Deployment::Cluster(super::RedisCluster::start())).await
                }
            )*
        }
        mod sentinel {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Deployment::Sentinel(super::SentinelSetup::start())).await
                }
            )*
        }
    };
}

per_deployment!(a_frozen_node_is_survived, a_killed_node_is_survived);

/// The node serving the key stops answering (SIGSTOP) for a second: every
/// call returns the right value, none waits much past `op_timeout`, and
/// once it answers again the cache hits again.
async fn a_frozen_node_is_survived(mut deployment: Deployment) {
    let repo = Repo {
        cache: deployment.builder().build().expect("valid settings"),
        queries: AtomicU32::new(0),
    };
    repo.cache.connect().await.expect("connect");
    repo.until_cached(1).await;
    let node = deployment.node_of("app:row:1");
    node.pause();
    let frozen = Instant::now();
    let mut worst = Duration::ZERO;
    while frozen.elapsed() < Duration::from_secs(1) {
        let call = Instant::now();
        assert_eq!(repo.row(1).await, 10);
        worst = worst.max(call.elapsed());
    }
    node.resume();
    repo.until_cached(1).await;
    repo.until_cached(2).await;
    let stats = repo.cache.stats();
    println!("frozen node: slowest call {worst:?} (op_timeout 200 ms); {stats:?}");
    assert!(stats.timeouts + stats.breaker_skips >= 1, "{stats:?}");
}

/// The node serving the key dies (SIGKILL): every call returns the right
/// value; the cache hits again once a node serves the key again (the one
/// server restarted, a cluster replica or the Sentinel replica promoted).
async fn a_killed_node_is_survived(mut deployment: Deployment) {
    let repo = Repo {
        cache: deployment.builder().build().expect("valid settings"),
        queries: AtomicU32::new(0),
    };
    repo.cache.connect().await.expect("connect");
    repo.until_cached(1).await;
    deployment.node_of("app:row:1").kill();
    let killed = Instant::now();
    let mut worst = Duration::ZERO;
    while killed.elapsed() < Duration::from_secs(2) {
        let call = Instant::now();
        assert_eq!(repo.row(1).await, 10);
        worst = worst.max(call.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Deployment::Server(server) = &mut deployment {
        server.restart();
    }
    repo.until_cached(1).await;
    repo.until_cached(2).await;
    println!(
        "killed node: slowest call {worst:?} (op_timeout 200 ms); cached again {:?} after the kill",
        killed.elapsed()
    );
}

/// Rows that remember which ids they computed.
struct Rows {
    cache: Cache,
    computed: std::sync::Mutex<Vec<u32>>,
}

impl Rows {
    #[redis_cached(key = "row:<id>", ttl = "10m", cache = self.cache)]
    async fn row(&self, id: u32) -> u32 {
        self.computed.lock().expect("not poisoned").push(id);
        id * 10
    }

    fn computed(&self) -> Vec<u32> {
        std::mem::take(&mut *self.computed.lock().expect("not poisoned"))
    }
}

/// One of three cluster masters frozen (SIGSTOP) while four tasks sweep
/// keys of every master, the frozen master's in a row: after the first
/// failures its keys skip Redis (their calls cost the body alone, but for
/// one probe per cool-down), and the other masters' keys stay hits: each
/// master has a breaker of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_cluster_master_costs_only_its_own_keys() {
    let mut deployment = Deployment::Cluster(RedisCluster::start());
    let rows = Arc::new(Rows {
        cache: deployment.builder().build().expect("valid settings"),
        computed: std::sync::Mutex::new(Vec::new()),
    });
    rows.cache.connect().await.expect("connect");
    let Deployment::Cluster(cluster) = &deployment else {
        unreachable!("a cluster")
    };
    let frozen_port = cluster.master_of("app:row:0").port();
    let (mut sweep, mut healthy): (Vec<u32>, Vec<u32>) =
        (0..30).partition(|id| cluster.master_of(&format!("app:row:{id}")).port() == frozen_port);
    let frozen = sweep.clone();
    sweep.append(&mut healthy.clone());
    healthy.sort_unstable();
    for &id in &sweep {
        assert_eq!(rows.row(id).await, id * 10);
    }
    rows.computed();
    let Deployment::Cluster(cluster) = &mut deployment else {
        unreachable!("a cluster")
    };
    let healthy_masters: Vec<u16> = cluster
        .nodes
        .iter()
        .map(|node| node.port())
        .filter(|&port| port != frozen_port && cli(port, &["ROLE"]).starts_with("master"))
        .collect();
    let dialled = |ports: &[u16]| -> Vec<u64> {
        ports
            .iter()
            .map(|&port| {
                cli(port, &["INFO", "stats"])
                    .lines()
                    .find_map(|line| line.strip_prefix("total_connections_received:"))
                    .and_then(|n| n.trim().parse().ok())
                    .expect("INFO stats counts connections")
            })
            .collect()
    };
    let before = dialled(&healthy_masters);
    let node = cluster
        .nodes
        .iter_mut()
        .find(|node| node.port() == frozen_port)
        .expect("one of the nodes");
    node.pause();
    let frozen_at = Instant::now();
    // Shorter than the cluster's node timeout (2 s), after which the
    // cluster itself refuses every command (`CLUSTERDOWN`) until the
    // frozen master's replica takes over.
    let freeze = Duration::from_millis(1500);
    let tasks: Vec<_> = (0..4)
        .map(|task| {
            let (rows, sweep, frozen) = (rows.clone(), sweep.clone(), frozen.clone());
            tokio::spawn(async move {
                let (mut calls, mut slow) = (0u32, 0u32);
                for &id in sweep.iter().cycle().skip(task * 3) {
                    if frozen_at.elapsed() >= freeze {
                        break;
                    }
                    let call = Instant::now();
                    assert_eq!(rows.row(id).await, id * 10);
                    if frozen.contains(&id) {
                        calls += 1;
                        // The body is instant: anything slower waited for
                        // the frozen master (well under op_timeout's
                        // 200 ms, so that a loaded machine does not count).
                        if call.elapsed() > Duration::from_millis(50) {
                            slow += 1;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                (calls, slow)
            })
        })
        .collect();
    let (mut calls, mut slow) = (0, 0);
    for task in tasks {
        let (made, waited) = task.await.expect("every value was right");
        calls += made;
        slow += waited;
    }
    let recomputed: Vec<u32> = rows
        .computed()
        .into_iter()
        .filter(|id| healthy.binary_search(id).is_ok())
        .collect();
    let after = dialled(&healthy_masters);
    node.resume();
    let stats = rows.cache.stats();
    // No new cluster connection (which dials every node) per failed probe.
    let grew: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    println!("connections the healthy masters received meanwhile: {grew:?}");
    assert!(grew.iter().all(|&n| n <= 2), "{grew:?}");
    println!(
        "a frozen master under 4 tasks for {freeze:?}: {calls} calls for its keys, {slow} waited for it; {stats:?}"
    );
    assert!(
        recomputed.is_empty(),
        "the other masters' keys were recomputed: {recomputed:?}"
    );
    // Until its breaker opens (5 failures, up to 4 at once), then one
    // probe per cool-down (1 s).
    assert!(
        slow <= 5 + 4 + 4 + 4,
        "{slow} of {calls} calls waited for the frozen master"
    );
    assert!(
        calls >= 200,
        "the frozen master's keys were called: {calls}"
    );
    assert!(stats.breaker_opens >= 1, "{stats:?}");
    for &id in &frozen {
        rows_until_cached(&rows, id).await;
    }
}

/// Calls `rows.row(id)` until it is answered from the cache, or panics.
async fn rows_until_cached(rows: &Rows, id: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert_eq!(rows.row(id).await, id * 10);
        if rows.computed().is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not cached again: {:?}",
            rows.cache.stats()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
