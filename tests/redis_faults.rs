//! Redis down, killed, paused: every call still returns the right value, no
//! error reaches the caller, each call stays bounded by `op_timeout`, and
//! caching resumes by itself when the server is back.
//!
//! The latency checks here are liveness bounds (a call must not hang on a
//! dead or frozen server), set far above the expected figures; the measured
//! worst cases are printed.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use redis_cached::{redis_cached, BreakerConfig, Cache};
use support::{free_port, RedisServer};

const OP_TIMEOUT: Duration = Duration::from_millis(100);
/// A call does at most two Redis operations, each bounded by `OP_TIMEOUT`;
/// the rest is generous slack for a loaded machine.
const LIVENESS_BOUND: Duration = Duration::from_secs(2);

struct Repo {
    cache: Cache,
    calls: AtomicU32,
}

impl Repo {
    fn on_port(port: u16) -> Self {
        let cache = Cache::builder(&format!("redis://127.0.0.1:{port}/"))
            .op_timeout(OP_TIMEOUT)
            .connect_timeout(Duration::from_millis(200))
            .breaker(BreakerConfig {
                failure_threshold: 3,
                cooldown: Duration::from_millis(200),
            })
            .build()
            .expect("valid settings");
        Repo {
            cache,
            calls: AtomicU32::new(0),
        }
    }

    #[redis_cached(key = "sq:<n>", ttl = 60, cache = self.cache)]
    async fn square(&self, n: u64) -> Result<u64, String> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(n * n)
    }

    /// Calls `square` for `0..count`, checking every value; returns the
    /// slowest call's latency.
    async fn run(&self, count: u64) -> Duration {
        let mut worst = Duration::ZERO;
        for n in 0..count {
            let start = Instant::now();
            assert_eq!(self.square(n).await, Ok(n * n));
            worst = worst.max(start.elapsed());
        }
        worst
    }

    /// Keeps calling until a value is served from Redis again.
    async fn wait_until_cached(&self, deadline: Duration) {
        let start = Instant::now();
        while start.elapsed() < deadline {
            let before = self.cache.stats();
            assert_eq!(self.square(1000).await, Ok(1_000_000));
            let after = self.cache.stats();
            if after.writes > before.writes || after.hits > before.hits {
                let calls = self.calls.load(Ordering::SeqCst);
                assert_eq!(self.square(1000).await, Ok(1_000_000));
                if self.calls.load(Ordering::SeqCst) == calls {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "caching did not resume within {deadline:?}: {:?}",
            self.cache.stats()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_at_start_then_started() {
    let port = free_port();
    let repo = Repo::on_port(port);
    let worst = repo.run(30).await;
    println!(
        "down at start: worst call {worst:?}, stats {:?}",
        repo.cache.stats()
    );
    assert!(worst < LIVENESS_BOUND, "worst {worst:?}");
    let stats = repo.cache.stats();
    assert_eq!(stats.computes, 30);
    assert!(stats.errors + stats.timeouts >= 3, "{stats:?}");
    assert!(
        stats.breaker_opens >= 1 && stats.breaker_skips > 0,
        "{stats:?}"
    );

    let _server = RedisServer::start_on(port, &[]);
    repo.wait_until_cached(Duration::from_secs(10)).await;
    assert!(!repo.cache.is_degraded());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_run_then_restarted() {
    let mut server = RedisServer::start();
    let repo = Repo::on_port(server.port());
    repo.run(20).await;
    repo.run(20).await;
    assert_eq!(
        repo.calls.load(Ordering::SeqCst),
        20,
        "second pass all hits"
    );

    server.kill();
    let worst = repo.run(40).await;
    println!(
        "killed: worst call {worst:?}, stats {:?}",
        repo.cache.stats()
    );
    assert!(worst < LIVENESS_BOUND, "worst {worst:?}");
    assert!(repo.cache.stats().breaker_opens >= 1);

    server.restart();
    repo.wait_until_cached(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_then_resumed() {
    let server = RedisServer::start();
    let repo = Repo::on_port(server.port());
    repo.run(10).await;

    server.pause();
    let worst = repo.run(20).await;
    let stats = repo.cache.stats();
    println!("paused: worst call {worst:?}, stats {stats:?}");
    assert!(worst < LIVENESS_BOUND, "worst {worst:?}");
    assert!(stats.timeouts >= 2, "a frozen server times out: {stats:?}");
    assert!(stats.breaker_opens >= 1, "{stats:?}");

    server.resume();
    repo.wait_until_cached(Duration::from_secs(10)).await;
    // What was cached before the pause is still served.
    let calls = repo.calls.load(Ordering::SeqCst);
    repo.run(10).await;
    assert_eq!(repo.calls.load(Ordering::SeqCst), calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_url_is_an_error_not_a_panic() {
    for url in ["", "http://example", "redis://:99999999/", "not a url"] {
        assert!(Cache::redis(url).is_err(), "{url:?}");
    }
}
