//! A short run against the service on a fresh SQLite file: `/metrics`
//! (parsed from the Prometheus text) shows the same hits, misses and SQL
//! statements as the load generator's report, and the cache saved queries.

use demo::db::Db;
use demo::load::{self, LoadConfig};
use demo::repo::Repo;
use demo::report::counter_total;
use demo::service::{prometheus, App};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_what_the_load_generator_counted() {
    prometheus();
    let dir = std::env::temp_dir().join(format!("demo-test-{}", std::process::id()));
    // A directory left by an earlier process of the same id goes first.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let url = format!("sqlite://{}/demo.sqlite3?mode=rwc", dir.display());
    let db = Db::open(&url).await.expect("SQLite opens and is seeded");
    let cache = demo::cache(None, "demo").expect("an in-memory cache");
    let addr = demo::spawn(App {
        repo: Repo { db, cache },
        cached: true,
    })
    .await
    .expect("the service listens");
    let config = LoadConfig {
        requests: 4_000,
        concurrency: 8,
        ..LoadConfig::default()
    };
    let report = load::run(addr, &config).await.expect("the load runs");
    assert_eq!(report.requests, 4_000);
    assert_eq!(report.failures, 0);
    assert!(
        report.counts.hits > 0 && report.counts.misses > 0,
        "{report:?}"
    );
    let reads = (report.counts.hits + report.counts.misses) as f64;
    assert!(
        reads > 3_500.0,
        "about 95% of the requests are reads: {reads}"
    );
    assert!(
        report.counts.sql < 4_000,
        "the cache saved queries: {} for 4,000 requests",
        report.counts.sql
    );

    let mut conn = load::Connection::open(addr).await.expect("connect");
    let (status, body) = conn.send("GET", "/metrics", "").await.expect("/metrics");
    assert_eq!(status, 200);
    let text = String::from_utf8(body).expect("UTF-8");
    let total =
        |name: &str| counter_total(&text, name).unwrap_or_else(|| panic!("{name} in {text}"));
    assert_eq!(total("redis_cached_hits_total"), report.counts.hits as f64);
    assert_eq!(
        total("redis_cached_misses_total"),
        report.counts.misses as f64
    );
    assert_eq!(total("demo_sql_statements_total"), report.counts.sql as f64);
    // Per function: the two cached reads are labelled apart.
    assert!(text.contains("fn=\"demo::repo::Repo::user\""), "{text}");
    assert!(
        text.contains("fn=\"demo::repo::Repo::order_summary\""),
        "{text}"
    );

    // The same service in an open loop: every request answered, on the
    // schedule (the last is due at 249.5 ms), and counted the same way.
    let open = load::run(
        addr,
        &LoadConfig {
            requests: 500,
            rate: Some(2_000.0),
            seed: 2,
            ..config
        },
    )
    .await
    .expect("the open loop runs");
    assert_eq!((open.requests, open.failures), (500, 0));
    assert!(open.elapsed.as_micros() >= 249_500, "{:?}", open.elapsed);
    assert!(open.counts.hits > 0, "{open:?}");
    let (_, body) = conn.send("GET", "/metrics", "").await.expect("/metrics");
    let text = String::from_utf8(body).expect("UTF-8");
    assert_eq!(
        counter_total(&text, "redis_cached_hits_total"),
        Some((report.counts.hits + open.counts.hits) as f64)
    );
    assert_eq!(
        counter_total(&text, "redis_cached_misses_total"),
        Some((report.counts.misses + open.counts.misses) as f64)
    );
    assert_eq!(
        counter_total(&text, "demo_sql_statements_total"),
        Some((report.counts.sql + open.counts.sql) as f64)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
