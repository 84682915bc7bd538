//! One scenario, every backend: `per_backend!` turns a list of scenario
//! functions into one named test per scenario and backend, so that a new
//! backend runs the whole list by adding one line here.

use std::time::Duration;

use redis_cached::{Cache, CacheBuilder};

use super::RedisServer;

/// Where a scenario runs: the in-memory backend, or a `redis-server` of
/// its own.
pub struct Env {
    pub server: Option<RedisServer>,
}

impl Env {
    pub fn memory() -> Env {
        Env { server: None }
    }

    pub fn redis() -> Env {
        Env {
            server: Some(RedisServer::start()),
        }
    }

    /// A builder for a cache on this backend; each cache stands for one
    /// process (its own in-process coalescing).
    pub fn builder(&self) -> CacheBuilder {
        let url = match &self.server {
            Some(server) => server.url(),
            None => "memory://".to_owned(),
        };
        Cache::builder(&url).op_timeout(Duration::from_secs(1))
    }

    pub fn cache(&self) -> Cache {
        self.builder().build().expect("valid settings")
    }
}

/// `per_backend!(a, b)` defines `memory::a`, `redis::a`, `memory::b`, … as
/// tests that run `async fn a(env: &Env)` on each backend.
#[macro_export]
macro_rules! per_backend {
    ($($scenario:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(&$crate::support::backends::Env::memory()).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(&$crate::support::backends::Env::redis()).await
                }
            )*
        }
    };
}
