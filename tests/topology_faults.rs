//! The fault scenarios of `tests/redis_faults.rs` on every Redis
//! deployment: the node serving a key frozen (SIGSTOP) then resumed, and
//! killed; each scenario gets a deployment of its own, since it stops a
//! node. Callers always get the right value within the fallback bound, and
//! the cache hits again afterwards by itself.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use redis_cached::{redis_cached, Cache, CacheBuilder};
use support::cluster::{RedisCluster, SentinelSetup, MASTER_NAME};
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
