//! The `metrics` feature: the listener's lag, state and counters, as a
//! Prometheus scrape shows them, while Redis fails and after the stream
//! is cut.
//!
//! `cargo test -p redis-cached-pg --features metrics --test metrics`

mod support;

use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use redis_cached::Cache;
use redis_cached_pg::{Listener, Mapping, Table};
use support::{eventually, Postgres, Redis};

const BOUND: Duration = Duration::from_secs(20);

/// The value of `name{slot="exported"}` in the scrape, if exported.
fn sample(prometheus: &PrometheusHandle, name: &str) -> Option<f64> {
    let prefix = format!("{name}{{slot=\"exported\"}} ");
    prometheus
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(&prefix)?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listeners_lag_state_and_counters_are_exported() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    metrics::set_global_recorder(recorder).expect("the test's only recorder");

    let pg = Postgres::shared();
    let database = pg.database("exported");
    pg.psql(
        &database,
        "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL);
         INSERT INTO users SELECT g, 'user ' || g FROM generate_series(1, 10) g;",
    );
    let redis = Redis::start();
    let cache = Cache::builder(&redis.url())
        .namespace("app")
        .build()
        .expect("a cache");
    let mapping = Mapping::new().table(Table::new("users", "users").key("user:<id>"));
    let listener = Listener::builder(&pg.url(&database), cache, mapping)
        .slot("exported")
        .start()
        .await
        .expect("the listener starts");
    assert!(listener.wait_streaming(BOUND).await);
    let exported = |name: &'static str, wanted: fn(f64) -> bool| {
        let prometheus = prometheus.clone();
        async move {
            eventually(BOUND, || async {
                sample(&prometheus, name).is_some_and(wanted)
            })
            .await
        }
    };
    assert!(exported("redis_cached_pg_streaming", |v| v == 1.0).await);
    assert!(exported("redis_cached_pg_resets_total", |v| v == 1.0).await);

    pg.psql(&database, "UPDATE users SET name = 'x' WHERE id <= 5");
    assert!(exported("redis_cached_pg_transactions_total", |v| v == 1.0).await);
    assert!(exported("redis_cached_pg_keys_total", |v| v == 5.0).await);

    // Redis stops answering: the change is received, not invalidated, and
    // the lag grows where a scrape sees it.
    redis.pause();
    pg.psql(&database, "UPDATE users SET name = 'y' WHERE id = 1");
    assert!(exported("redis_cached_pg_lag_seconds", |v| v >= 1.5).await);
    assert!(exported("redis_cached_pg_lag_bytes", |v| v > 0.0).await);
    assert!(exported("redis_cached_pg_failed_invalidations_total", |v| v >= 1.0).await);
    assert_eq!(
        sample(&prometheus, "redis_cached_pg_transactions_total"),
        Some(1.0)
    );
    redis.resume();
    assert!(exported("redis_cached_pg_transactions_total", |v| v == 2.0).await);
    assert!(exported("redis_cached_pg_lag_seconds", |v| v == 0.0).await);
    assert!(exported("redis_cached_pg_lag_bytes", |v| v == 0.0).await);

    // The stream cut: counted once it is back.
    assert!(pg.kill_walsender(&database, "exported"));
    assert!(exported("redis_cached_pg_reconnects_total", |v| v >= 1.0).await);
    assert!(exported("redis_cached_pg_streaming", |v| v == 1.0).await);

    // Every metric is described.
    let text = prometheus.render();
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split(' ').nth(2).unwrap_or_default();
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "no # HELP for {name}:\n{text}"
        );
    }
    listener.stop().await;
}
