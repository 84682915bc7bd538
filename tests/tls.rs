//! `rediss://` against a real `redis-server` that speaks only TLS, with a
//! certificate made at test time: cached with the right CA; with a CA it
//! does not trust, the cache falls back to computing, counted, never failing.
//! The same through sentinels that speak only TLS.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use redis_cached::{redis_cached, BreakerConfig, Cache};
use support::cluster::{Sentinel, MASTER_NAME};
use support::RedisServer;

static COMPUTES: AtomicU32 = AtomicU32::new(0);

#[redis_cached(key = "tls:<n>", cache = cache)]
async fn square(cache: &Cache, n: u64) -> u64 {
    COMPUTES.fetch_add(1, Ordering::SeqCst);
    n * n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_servers_ca() {
    let (server, ca) = RedisServer::start_tls();
    let url = format!("rediss://127.0.0.1:{}/", server.port());
    // A first TLS handshake on a cold machine (just after the packages were
    // installed) took longer than the default 200 ms op_timeout, so the
    // first value fell back uncached. Connect first, with room to spare;
    // calls are then ordinary round trips.
    let cache = Cache::builder(&url)
        .tls_root_cert(&ca)
        .connect_timeout(Duration::from_secs(10))
        .op_timeout(Duration::from_secs(2))
        .build()
        .expect("valid settings");
    cache
        .connect()
        .await
        .expect("TLS connection with the server's CA");
    assert_eq!(square(&cache, 12).await, 144);
    let before = COMPUTES.load(Ordering::SeqCst);
    assert_eq!(square(&cache, 12).await, 144);
    assert_eq!(
        COMPUTES.load(Ordering::SeqCst),
        before,
        "served from Redis over TLS"
    );
    let stats = cache.stats();
    assert_eq!(
        (stats.hits, stats.writes, stats.errors),
        (1, 1, 0),
        "{stats:?}"
    );

    // A CA the server's certificate does not chain to: no connection, no failure.
    let (_other, wrong_ca) = RedisServer::start_tls();
    let untrusting = Cache::builder(&url)
        .tls_root_cert(&wrong_ca)
        .op_timeout(Duration::from_millis(200))
        .breaker(BreakerConfig {
            failure_threshold: 2,
            cooldown: Duration::from_secs(5),
        })
        .build()
        .expect("valid settings");
    for _ in 0..5 {
        assert_eq!(square(&untrusting, 13).await, 169);
    }
    let stats = untrusting.stats();
    assert_eq!(stats.hits, 0, "{stats:?}");
    assert!(
        stats.errors + stats.timeouts >= 2 && stats.breaker_opens >= 1,
        "{stats:?}"
    );
}

/// A master that speaks only TLS, with a certificate from a private CA, and
/// two sentinels that speak only TLS, named by URLs whose schemes differ in
/// spelling only: the master is reached with TLS, trusting the CA given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_and_their_master_over_tls_with_a_private_ca() {
    let (master, ca) = RedisServer::start_tls();
    let files = master.tls_files();
    let sentinels: Vec<Sentinel> = (0..2)
        .map(|_| Sentinel::start_tls(master.port(), &files))
        .collect();
    for sentinel in &sentinels {
        sentinel.wait_knows(1);
    }
    let urls = [
        format!("valkeys://127.0.0.1:{}/", sentinels[0].port),
        format!("REDISS://127.0.0.1:{}/", sentinels[1].port),
    ];
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let cache = Cache::sentinel_builder(&urls, MASTER_NAME)
        .tls_root_cert(&ca)
        .connect_timeout(Duration::from_secs(10))
        .op_timeout(Duration::from_secs(2))
        .build()
        .expect("a private CA is accepted with Sentinel");
    cache
        .connect()
        .await
        .expect("the master found and reached over TLS");
    assert_eq!(square(&cache, 21).await, 441);
    let before = COMPUTES.load(Ordering::SeqCst);
    assert_eq!(square(&cache, 21).await, 441);
    assert_eq!(
        COMPUTES.load(Ordering::SeqCst),
        before,
        "served from the master over TLS"
    );
    let stats = cache.stats();
    assert_eq!((stats.errors, stats.timeouts), (0, 0), "{stats:?}");
}
