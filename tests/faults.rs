//! Fault injection: the tests' own TCP proxy between the cache and its
//! `redis-server` adds latency, swallows traffic, cuts replies in half and
//! resets connections; the server is also flushed, killed under load, run
//! out of memory and given a password. In every case each caller gets the
//! right value and no error, each call stays bounded, nothing panics, the
//! breaker opens where Redis is unusable and recovers, and stats count it.
//!
//! Latency checks are liveness bounds far above the expected figures; the
//! measured worst cases are printed.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis_cached::{redis_cached, BreakerConfig, Cache, Stats};
use support::proxy::Proxy;
use support::RedisServer;

const OP_TIMEOUT: Duration = Duration::from_millis(100);
const BODY: Duration = Duration::from_millis(5);
/// Two Redis operations (op_timeout each) plus the body, with slack for a
/// loaded machine: a call that hangs on a sick server would blow it.
const LIVENESS_BOUND: Duration = Duration::from_secs(2);

struct Repo {
    cache: Cache,
    computes: AtomicU32,
}

fn cache_at(url: &str) -> Cache {
    Cache::builder(url)
        .op_timeout(OP_TIMEOUT)
        .connect_timeout(Duration::from_millis(200))
        .breaker(BreakerConfig {
            failure_threshold: 3,
            cooldown: Duration::from_millis(200),
        })
        .build()
        .expect("valid settings")
}

impl Repo {
    fn new(url: &str) -> Arc<Repo> {
        Arc::new(Repo {
            cache: cache_at(url),
            computes: AtomicU32::new(0),
        })
    }

    #[redis_cached(key = "cube:<n>", ttl = 60, cache = self.cache)]
    async fn cube(&self, n: u64) -> Result<u64, String> {
        self.computes.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(BODY).await;
        Ok(n * n * n)
    }

    /// Calls `cube` for `0..count`, checking each value; the slowest call.
    async fn run(&self, count: u64) -> Duration {
        let mut worst = Duration::ZERO;
        for n in 0..count {
            let start = Instant::now();
            assert_eq!(self.cube(n).await, Ok(n * n * n));
            worst = worst.max(start.elapsed());
        }
        worst
    }

    /// Calls until values are served from Redis again.
    async fn wait_until_cached(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            assert_eq!(self.cube(999).await, Ok(997_002_999));
            let computes = self.computes.load(Ordering::SeqCst);
            assert_eq!(self.cube(999).await, Ok(997_002_999));
            if self.computes.load(Ordering::SeqCst) == computes {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("caching did not resume: {:?}", self.cache.stats());
    }

    fn stats(&self) -> Stats {
        self.cache.stats()
    }
}

fn report(name: &str, worst: Duration, stats: &Stats) {
    println!("{name}: worst call {worst:.1?}; {stats:?}");
    assert!(worst < LIVENESS_BOUND, "{name}: worst call {worst:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_above_op_timeout() {
    let server = RedisServer::start();
    let proxy = Proxy::start(server.port());
    let repo = Repo::new(&proxy.url());
    repo.run(10).await;
    proxy.set_latency(Duration::from_millis(300));
    let worst = repo.run(20).await;
    let stats = repo.stats();
    report("latency 300 ms", worst, &stats);
    assert!(stats.timeouts >= 3 && stats.breaker_opens >= 1, "{stats:?}");
    proxy.heal();
    repo.wait_until_cached().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_black_hole() {
    let server = RedisServer::start();
    let proxy = Proxy::start(server.port());
    let repo = Repo::new(&proxy.url());
    repo.run(10).await;
    proxy.set_blackhole(true);
    let worst = repo.run(20).await;
    let stats = repo.stats();
    report("black hole", worst, &stats);
    assert!(stats.timeouts >= 3 && stats.breaker_opens >= 1, "{stats:?}");
    proxy.heal();
    // The black-holed connection may never answer again: it is replaced.
    proxy.reset_all();
    repo.wait_until_cached().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_cut_in_half() {
    let server = RedisServer::start();
    let proxy = Proxy::start(server.port());
    let repo = Repo::new(&proxy.url());
    repo.run(10).await;
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        proxy.cut_next_reply();
        worst = worst.max(repo.run(10).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = repo.stats();
    report("replies cut mid-way", worst, &stats);
    assert!(stats.errors + stats.timeouts >= 1, "{stats:?}");
    repo.wait_until_cached().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_reset_under_load() {
    let server = RedisServer::start();
    let proxy = Proxy::start(server.port());
    let repo = Repo::new(&proxy.url());
    let load: Vec<_> = (0..4)
        .map(|_| {
            let repo = repo.clone();
            tokio::spawn(async move {
                let mut worst = Duration::ZERO;
                for _ in 0..10 {
                    worst = worst.max(repo.run(20).await);
                }
                worst
            })
        })
        .collect();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(40)).await;
        proxy.reset_all();
    }
    let mut worst = Duration::ZERO;
    for task in load {
        worst = worst.max(task.await.expect("load task"));
    }
    report("connections reset", worst, &repo.stats());
    repo.wait_until_cached().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_under_load_then_restarted() {
    let mut server = RedisServer::start();
    let repo = Repo::new(&server.url());
    let load: Vec<_> = (0..4)
        .map(|_| {
            let repo = repo.clone();
            tokio::spawn(async move {
                let mut worst = Duration::ZERO;
                let end = Instant::now() + Duration::from_millis(1500);
                while Instant::now() < end {
                    worst = worst.max(repo.run(20).await);
                }
                worst
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(600)).await;
    server.restart();
    let mut worst = Duration::ZERO;
    for task in load {
        worst = worst.max(task.await.expect("load task"));
    }
    let stats = repo.stats();
    report("killed under load", worst, &stats);
    assert!(stats.breaker_opens >= 1, "{stats:?}");
    repo.wait_until_cached().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_with_its_data_lost() {
    let server = RedisServer::start();
    let repo = Repo::new(&server.url());
    repo.run(20).await;
    let _: () = server.cmd(&redis::cmd("FLUSHALL")).await;
    let worst = repo.run(20).await;
    let stats = repo.stats();
    report("data lost (FLUSHALL)", worst, &stats);
    assert_eq!(
        repo.computes.load(Ordering::SeqCst),
        40,
        "everything recomputed once"
    );
    assert_eq!((stats.errors, stats.timeouts), (0, 0));
    repo.run(20).await;
    assert_eq!(repo.computes.load(Ordering::SeqCst), 40, "and cached again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_with_noeviction() {
    let server = RedisServer::start_with(&["--maxmemory-policy", "noeviction"]);
    let repo = Repo::new(&server.url());
    repo.run(10).await;
    // Hold more data than the limit about to be set, so every write is refused.
    let filler = vec![b'x'; 64 * 1024];
    for i in 0..48 {
        let _: () = server
            .cmd(redis::cmd("SET").arg(format!("filler:{i}")).arg(&filler))
            .await;
    }
    let _: () = server
        .cmd(redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("1mb"))
        .await;
    let worst = repo.run(30).await;
    let stats = repo.stats();
    report("out of memory, noeviction", worst, &stats);
    assert!(stats.refused >= 1, "writes were refused: {stats:?}");
    assert_eq!(
        stats.breaker_opens, 0,
        "a refusal is not an outage: {stats:?}"
    );
    let computes = repo.computes.load(Ordering::SeqCst);
    repo.run(10).await;
    assert_eq!(
        repo.computes.load(Ordering::SeqCst),
        computes,
        "stored values are still read"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_falls_back_and_is_never_shown() {
    let server = RedisServer::start_with(&["--requirepass", "s3cret-pw"]);
    let url = format!("redis://:wrong-pw-123@127.0.0.1:{}/", server.port());
    let repo = Repo::new(&url);
    let worst = repo.run(20).await;
    let stats = repo.stats();
    report("wrong password", worst, &stats);
    assert!(stats.errors >= 3 && stats.breaker_opens >= 1, "{stats:?}");
    assert!(
        !format!("{:?}", repo.cache).contains("wrong-pw-123"),
        "{:?}",
        repo.cache
    );
    let err = repo
        .cache
        .set("k", &1, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(!err.to_string().contains("wrong-pw-123"), "{err}");
    assert!(!err.to_string().contains("s3cret"), "{err}");

    let good = Repo::new(&format!("redis://:s3cret-pw@127.0.0.1:{}/", server.port()));
    good.run(5).await;
    good.wait_until_cached().await;
    assert_eq!(good.stats().errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_user_in_the_url() {
    let server = RedisServer::start();
    let _: () = server
        .cmd(
            redis::cmd("ACL")
                .arg("SETUSER")
                .arg("app")
                .arg("on")
                .arg(">app-pw")
                .arg("~*")
                .arg("&*")
                .arg("+@all"),
        )
        .await;
    let repo = Repo::new(&format!("redis://app:app-pw@127.0.0.1:{}/", server.port()));
    repo.run(5).await;
    repo.wait_until_cached().await;
    assert_eq!(repo.stats().errors, 0);
    let denied = Repo::new(&format!("redis://app:nope@127.0.0.1:{}/", server.port()));
    denied.run(5).await;
    assert!(denied.stats().errors >= 1);
}
