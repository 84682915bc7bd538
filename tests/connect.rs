//! `Cache::connect`: connecting ahead of the first call loads the scripts
//! and starts the lock subscriber, so the first calls send only their own
//! commands; a wrong address or password is reported, and the cache still
//! works.

mod support;

use std::time::{Duration, Instant};

use redis_cached::{redis_cached, Cache, Error};
use support::RedisServer;

#[redis_cached(key = "locked:<id>", lock = true, cache = cache)]
async fn locked(cache: &Cache, id: u64) -> u64 {
    id + 1
}

#[redis_cached(key = "plain:<id>", cache = cache)]
async fn plain(cache: &Cache, id: u64) -> u64 {
    id + 2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_loads_the_scripts_and_subscribes() {
    let server = RedisServer::start();
    let cache = Cache::builder(&server.url())
        .namespace("app")
        .build()
        .expect("valid URL");
    cache.connect().await.expect("connect");
    let subscribers: (String, u64) = server
        .cmd(
            redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg("app:redis-cached:filled"),
        )
        .await;
    assert_eq!(subscribers.1, 1, "the lock subscriber listens");

    // The very first misses find their scripts loaded: no NOSCRIPT retry,
    // no SCRIPT LOAD.
    let monitor = server.monitor();
    monitor.take_client_commands().await;
    assert_eq!(locked(&cache, 1).await, 2);
    let commands = monitor.take_client_commands().await;
    assert_eq!(commands.len(), 3, "GET, acquire, release: {commands:?}");
    assert!(commands[1..].iter().all(|c| c.starts_with("\"EVALSHA\"")));
    assert_eq!(plain(&cache, 1).await, 3);
    let commands = monitor.take_client_commands().await;
    assert_eq!(commands.len(), 2, "GET, compare-and-set: {commands:?}");
    assert!(commands[1].starts_with("\"EVALSHA\""), "{commands:?}");
    let stats = cache.stats();
    assert_eq!((stats.errors, stats.writes), (0, 2), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_reports_an_unreachable_server_and_the_cache_still_works() {
    let port = support::free_port();
    let cache = Cache::builder(&format!("redis://127.0.0.1:{port}"))
        .op_timeout(Duration::from_millis(100))
        .build()
        .expect("valid URL");
    let started = Instant::now();
    let err = cache.connect().await.expect_err("nothing listens there");
    assert!(
        matches!(err, Error::Redis(_) | Error::Timeout(_)),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2), "bounded");
    assert_eq!(plain(&cache, 5).await, 7, "computed without Redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_reports_a_wrong_password_without_showing_it() {
    let server = RedisServer::start_with(&["--requirepass", "right-pw"]);
    let url = format!("redis://:wrong-pw@127.0.0.1:{}", server.port());
    let cache = Cache::redis(&url).expect("valid URL");
    let err = cache.connect().await.expect_err("wrong password");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("wrong-pw"), "{shown}");
    assert_eq!(locked(&cache, 8).await, 9, "computed without Redis");

    let good = format!("redis://:right-pw@127.0.0.1:{}", server.port());
    let cache = Cache::redis(&good).expect("valid URL");
    cache.connect().await.expect("right password");
}

#[tokio::test]
async fn connect_does_nothing_in_memory() {
    let cache = Cache::in_memory();
    cache.connect().await.expect("nothing to connect");
    assert_eq!(plain(&cache, 1).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_errors_say_what_to_fix() {
    let server = RedisServer::start_with(&["--requirepass", "right-pw"]);
    let missing = Cache::redis(&format!("redis://127.0.0.1:{}", server.port())).unwrap();
    let err = missing.connect().await.expect_err("no password given");
    assert!(err.to_string().contains("authentication required"), "{err}");
    let wrong = Cache::redis(&format!("redis://:nope@127.0.0.1:{}", server.port())).unwrap();
    let err = wrong.connect().await.expect_err("wrong password");
    assert!(err.to_string().contains("authentication failed"), "{err}");
    assert!(!err.to_string().contains("nope"), "{err}");
}

#[test]
fn url_errors_name_the_scheme_but_never_the_password() {
    let err = Cache::redis("reddis://:s3cret@127.0.0.1:6379").unwrap_err();
    let shown = err.to_string();
    assert!(shown.contains("unknown scheme `reddis`"), "{shown}");
    assert!(
        shown.contains("redis://") && shown.contains("rediss://"),
        "{shown}"
    );
    assert!(!shown.contains("s3cret"), "{shown}");
    let shown = Cache::redis("127.0.0.1:6379").unwrap_err().to_string();
    assert!(shown.contains("no `scheme://`"), "{shown}");
    let shown = Cache::redis_cluster(&["redis://127.0.0.1:7000", "redsi://127.0.0.1:7001"])
        .unwrap_err()
        .to_string();
    assert!(shown.contains("`redsi`"), "{shown}");
    // A database number that is not one is named.
    let shown = Cache::redis("redis://:s3cret@127.0.0.1:7401/5x")
        .unwrap_err()
        .to_string();
    assert!(shown.contains("database number"), "{shown}");
    assert!(
        !shown.contains("s3cret") && !shown.contains("5x"),
        "{shown}"
    );
}
