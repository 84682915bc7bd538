//! An outside writer changes rows in SQL while the cached service is under
//! load (a short open loop): without a listener, reads show rows older
//! than they were by then; with `redis-cached-pg`'s listener on a real
//! Postgres, none is staler than a bound (far above the listener's own
//! lag: what it must show is that no entry outlives it, whatever the
//! machine's speed), while the same run without it has reads staler.

#[path = "../../../cached-pg/tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use demo::db::Db;
use demo::load::{self, LoadConfig, LoadReport};
use demo::outside::{self, OutsideConfig, OutsideWrite, OutsideWriter, Staleness};
use demo::repo::Repo;
use demo::service::{prometheus, App};
use redis_cached::Cache;

/// The cached service over the database at `url`, warmed up.
async fn service(url: &str) -> (SocketAddr, Cache) {
    prometheus();
    let db = Db::open(url)
        .await
        .expect("the database opens and is seeded");
    db.reset().await.expect("reset");
    let cache = demo::cache(None, "demo").expect("an in-memory cache");
    let addr = demo::spawn(App {
        repo: Repo {
            db,
            cache: cache.clone(),
        },
        cached: true,
    })
    .await
    .expect("the service listens");
    let warm = LoadConfig {
        requests: 2_000,
        concurrency: 8,
        ..LoadConfig::default()
    };
    let warmed = load::run(addr, &warm).await.expect("the warm-up runs");
    assert_eq!(warmed.failures, 0);
    (addr, cache)
}

/// An open loop of user reads (and the service's own writes) while an
/// outside writer updates rows at 200 a second; the run and the writes.
async fn run_with_writer(
    addr: SocketAddr,
    url: &str,
    seed: u64,
    first_version: u64,
) -> (LoadReport, Vec<OutsideWrite>) {
    let writer = OutsideWriter::start(
        url,
        OutsideConfig {
            rate: 200.0,
            users: demo::db::USERS as u64,
            zipf_s: 1.0,
            seed,
            first_version,
        },
    )
    .await
    .expect("the outside writer connects");
    let config = LoadConfig {
        requests: 4_000,
        rate: Some(1_000.0),
        concurrency: 64,
        seed,
        record_reads: true,
        ..LoadConfig::default()
    };
    let run = load::run(addr, &config).await.expect("the load runs");
    let writes = writer.stop().await.expect("the outside writer ends");
    assert_eq!((run.requests, run.failures), (4_000, 0));
    assert!(
        run.reads.len() > 3_000,
        "about 85% are user reads: {}",
        run.reads.len()
    );
    assert!(!writes.is_empty());
    (run, writes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_listener_outside_writes_are_read_stale() {
    let dir = std::env::temp_dir().join(format!("demo-outside-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let url = format!("sqlite://{}/demo.sqlite3?mode=rwc", dir.display());
    let (addr, _cache) = service(&url).await;
    let (run, writes) = run_with_writer(addr, &url, 11, 1).await;
    let found = outside::staleness(&run.reads, &writes, Duration::ZERO);
    assert_eq!(found.reads, run.reads.len() as u64);
    // The most read users are the most written: their entries, made
    // before, are served after the rows changed, until their TTL.
    assert!(found.stale > 0, "{found:?}");
    assert_eq!(found.beyond_bound, found.stale);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_listener_no_read_is_staler_than_the_bound() {
    let pg = support::Postgres::start(&[], &[]);
    let database = pg.database("demo_outside");
    // (`url` is a libpq string: "host=… port=… user=… dbname=…")
    let port = pg
        .url(&database)
        .split(' ')
        .find_map(|kv| kv.strip_prefix("port="))
        .expect("a port")
        .to_owned();
    let url = format!("postgres://postgres@127.0.0.1:{port}/{database}");
    let (addr, cache) = service(&url).await;
    let bound = Duration::from_secs(1);

    let (run, mut writes) = run_with_writer(addr, &url, 21, 1).await;
    let without = outside::staleness(&run.reads, &writes, bound);
    assert!(
        without.beyond_bound > 0,
        "a 4 s run with entries made before its writes: {without:?}"
    );

    let listener = outside::listen(&url, cache, "demo_test")
        .await
        .expect("the listener streams");
    let next = writes.last().map_or(1, |w| w.version + 1);
    let (run, more) = run_with_writer(addr, &url, 22, next).await;
    writes.extend(more);
    let stats = listener.stats();
    listener.stop().await;
    redis_cached_pg::drop_slot(&url, "demo_test")
        .await
        .expect("the slot is dropped");
    let with = outside::staleness(&run.reads, &writes, bound);
    assert_eq!(
        with,
        Staleness {
            beyond_bound: 0,
            ..with
        },
        "(without the listener: {without:?})"
    );
    assert!(stats.resets >= 1, "its start invalidated what it maps");
    assert!(stats.keys > 0, "{stats:?}");
}
