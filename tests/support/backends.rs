//! One scenario, every backend: `per_backend!` turns a list of scenario
//! functions into one named test per scenario and backend, so that a new
//! backend runs the whole list by adding one line here.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use redis_cached::{Cache, CacheBuilder};

use super::cluster::{RedisCluster, SentinelSetup, MASTER_NAME};
use super::RedisServer;

/// Where a scenario runs.
pub enum Env {
    /// The in-memory backend.
    Memory,
    /// A `redis-server` of its own.
    Redis(RedisServer),
    /// The process's shared cluster, under a namespace of its own.
    Cluster {
        cluster: &'static RedisCluster,
        namespace: String,
    },
    /// The process's shared Sentinel set-up, under a namespace of its own.
    Sentinel {
        setup: &'static SentinelSetup,
        namespace: String,
    },
}

/// A namespace no other scenario of this process uses.
fn fresh_namespace() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("t{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

impl Env {
    pub fn memory() -> Env {
        Env::Memory
    }

    pub fn redis() -> Env {
        Env::Redis(RedisServer::start())
    }

    pub fn cluster() -> Env {
        Env::Cluster {
            cluster: RedisCluster::shared(),
            namespace: fresh_namespace(),
        }
    }

    pub fn sentinel() -> Env {
        Env::Sentinel {
            setup: SentinelSetup::shared(),
            namespace: fresh_namespace(),
        }
    }

    /// A builder for a cache on this backend; each cache stands for one
    /// process (its own in-process coalescing).
    pub fn builder(&self) -> CacheBuilder {
        let builder = match self {
            Env::Memory => Cache::builder("memory://"),
            Env::Redis(server) => Cache::builder(&server.url()),
            Env::Cluster { cluster, namespace } => {
                let urls = cluster.urls();
                let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
                Cache::cluster_builder(&urls).namespace(namespace)
            }
            Env::Sentinel { setup, namespace } => {
                let urls = setup.sentinel_urls();
                let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
                Cache::sentinel_builder(&urls, MASTER_NAME).namespace(namespace)
            }
        };
        builder.op_timeout(Duration::from_secs(1))
    }

    pub fn cache(&self) -> Cache {
        self.builder().build().expect("valid settings")
    }

    /// The Redis key of the cache key `key` (the scenario's namespace
    /// prefixed, if it has one).
    pub fn key(&self, key: &str) -> String {
        match self {
            Env::Memory | Env::Redis(_) => key.to_owned(),
            Env::Cluster { namespace, .. } | Env::Sentinel { namespace, .. } => {
                format!("{namespace}:{key}")
            }
        }
    }

    /// The Redis key of the lock of the cache key `key`.
    pub fn lock_key(&self, key: &str) -> String {
        let key = self.key(key);
        match key.split_once(':') {
            Some((ns, _)) if !matches!(self, Env::Memory | Env::Redis(_)) => {
                format!("{ns}:~lock{{{key}}}")
            }
            _ => format!("~lock{{{key}}}"),
        }
    }

    /// Runs `cmd` on the Redis deployment, bypassing the cache, to look at
    /// or tamper with what is stored; not for the in-memory backend.
    pub async fn raw<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        match self {
            Env::Memory => panic!("the in-memory backend has no raw access"),
            Env::Redis(server) => server.cmd(cmd).await,
            Env::Cluster { cluster, .. } => {
                let mut conn = redis::cluster::ClusterClient::new(cluster.urls())
                    .expect("valid URLs")
                    .get_async_connection()
                    .await
                    .expect("connect to the test cluster");
                cmd.query_async(&mut conn).await.expect("command succeeds")
            }
            Env::Sentinel { setup, .. } => {
                let url = format!("redis://127.0.0.1:{}/", setup.master_port());
                let mut conn = redis::Client::open(url)
                    .expect("valid URL")
                    .get_multiplexed_async_connection()
                    .await
                    .expect("connect to the test master");
                cmd.query_async(&mut conn).await.expect("command succeeds")
            }
        }
    }

    /// Checks what every scenario must leave true of its backend: on a
    /// cluster, no command was refused for spanning two slots.
    pub fn check_after(&self) {
        if let Env::Cluster { cluster, .. } = self {
            assert_eq!(cluster.crossslot_errors(), 0, "CROSSSLOT errors");
        }
    }
}

/// `per_shared_backend!(a)`: as [`per_backend!`] on the backends whose
/// store several caches share (every Redis deployment), for scenarios of
/// several processes (tests `redis_shared::a`, `cluster_shared::a`, …).
#[macro_export]
macro_rules! per_shared_backend {
    ($($scenario:ident),* $(,)?) => {
        $crate::per_backend!(@on redis_shared, redis, $($scenario),*);
        $crate::per_backend!(@on cluster_shared, cluster, $($scenario),*);
        $crate::per_backend!(@on sentinel_shared, sentinel, $($scenario),*);
    };
}

/// `per_backend!(a, b)` defines `memory::a`, `redis::a`, `cluster::a`,
/// `sentinel::a`, `memory::b`, … as tests that run `async fn a(env: &Env)`
/// on each backend.
#[macro_export]
macro_rules! per_backend {
    ($($scenario:ident),* $(,)?) => {
        $crate::per_backend!(@on memory, memory, $($scenario),*);
        $crate::per_backend!(@on redis, redis, $($scenario),*);
        $crate::per_backend!(@on cluster, cluster, $($scenario),*);
        $crate::per_backend!(@on sentinel, sentinel, $($scenario),*);
    };
    (@on $module:ident, $env:ident, $($scenario:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let env = $crate::support::backends::Env::$env();
                    super::$scenario(&env).await;
                    env.check_after();
                }
            )*
        }
    };
}
