//! Invalidation from Postgres, end to end, against a Postgres and a
//! Redis the benchmark starts itself (see `tests/support`):
//!
//! - latency: single-row `UPDATE`s committed one at a time by another
//!   connection, from the moment the statement is sent to the moment the
//!   entry's tombstone lands in Redis (seen through Redis's keyspace
//!   notifications, outside the listener); p50, p99 and max, against the
//!   baseline of the writer's own `UPDATE` round trip measured in the same
//!   run;
//! - throughput: rows invalidated per second, for one `UPDATE` of 200,000
//!   rows (from its commit to the last invalidation), and for a backlog of
//!   200 transactions of 1,000 rows committed while the listener was
//!   stopped (from its start to the last invalidation: what it sustains
//!   over many transactions, whatever the writer's own pace); against the
//!   baseline of the same keys sent straight to the cache
//!   (`Cache::invalidate_many`, pipelines of 512, as many in flight as the
//!   listener) in the same run. Target: at least 50,000 rows/s. Then the
//!   same 200 transactions with the listener running: the writer's pace,
//!   the largest lag seen, and the time from the last commit to the last
//!   invalidation.
//!
//! `cargo bench -p redis-cached-pg --bench invalidation`

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use redis_cached::Cache;
use redis_cached_pg::{Listener, Mapping, Table};
use support::{Db, Postgres, Redis};

const ROWS: u32 = 200_000;
const LATENCY_SAMPLES: u32 = 1_000;
/// Pause between two latency samples' commits.
const PACE: Duration = Duration::from_millis(3);
const IN_FLIGHT: usize = 16;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let pg = Postgres::start(&[], &["fsync=on", "synchronous_commit=on"]);
    let database = pg.database("bench");
    pg.psql(
        &database,
        &format!(
            "CREATE TABLE users (id bigint PRIMARY KEY, team_id int NOT NULL, n bigint NOT NULL);
             INSERT INTO users SELECT g, g % 10, 0 FROM generate_series(1, {ROWS}) g;"
        ),
    );
    pg.psql(&database, "VACUUM ANALYZE users");
    let redis = Redis::start();
    redis.cli(&["CONFIG", "SET", "notify-keyspace-events", "K$"]);
    let cache = Cache::builder(&redis.url())
        .namespace("bench")
        .build()
        .expect("a cache");
    let mapping = Mapping::new().table(
        Table::new("users", "users")
            .key("user:<id>")
            .tag("team:<team_id>"),
    );
    let url = pg.url(&database);
    let listen = || async {
        let listener = Listener::builder(&url, cache.clone(), mapping.clone())
            .slot("bench")
            .in_flight(IN_FLIGHT)
            .start()
            .await
            .expect("the listener starts");
        assert!(listener.wait_streaming(Duration::from_secs(30)).await);
        listener
    };
    let listener = listen().await;
    let writer = Db::connect(&url).await;

    println!(
        "redis-cached-pg: invalidation from Postgres (Postgres fsync on, loopback, one machine)"
    );
    latency(&redis, &writer, &listener).await;
    let direct = baseline(&cache).await;
    bulk(&writer, &listener, direct).await;
    listener.stop().await;
    transactions(&writer, direct, listen).await;
}

/// Commit-to-invalidation latency of single-row updates.
async fn latency(redis: &Redis, writer: &Db, listener: &Listener) {
    let client = redis::Client::open(redis.url()).expect("a Redis URL");
    let mut pubsub = client.get_async_pubsub().await.expect("subscribe");
    pubsub
        .psubscribe("__keyspace@0__:bench:user:*")
        .await
        .expect("psubscribe");
    let (landed_tx, mut landed) = tokio::sync::mpsc::unbounded_channel();
    let watcher = tokio::spawn(async move {
        let mut messages = pubsub.into_on_message();
        while let Some(message) = messages.next().await {
            let channel = message.get_channel_name().to_owned();
            let at = Instant::now();
            if let Some(id) = channel
                .rsplit(':')
                .next()
                .and_then(|id| id.parse::<u32>().ok())
            {
                if landed_tx.send((id, at)).is_err() {
                    return;
                }
            }
        }
    });

    let mut sent = HashMap::new();
    let mut round_trips = Vec::new();
    for n in 0..LATENCY_SAMPLES {
        let id = 1 + n * 97 % ROWS;
        let at = Instant::now();
        writer
            .execute(&format!("UPDATE users SET n = n + 1 WHERE id = {id}"))
            .await;
        round_trips.push(at.elapsed());
        sent.insert(id, at);
        tokio::time::sleep(PACE).await;
    }
    let mut latencies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sent.is_empty() && Instant::now() < deadline {
        let Ok(Some((id, at))) = tokio::time::timeout(Duration::from_secs(5), landed.recv()).await
        else {
            break;
        };
        if let Some(start) = sent.remove(&id) {
            latencies.push(at.duration_since(start));
        }
    }
    watcher.abort();
    assert!(sent.is_empty(), "{} updates never invalidated", sent.len());
    latencies.sort_unstable();
    round_trips.sort_unstable();
    let p50 = percentile(&latencies, 0.5);
    let base = percentile(&round_trips, 0.5);
    println!(
        "latency, commit to invalidation ({LATENCY_SAMPLES} single-row UPDATEs, one every {} ms):",
        PACE.as_millis()
    );
    println!(
        "  p50 {}  p99 {}  max {}",
        ms(p50),
        ms(percentile(&latencies, 0.99)),
        ms(*latencies.last().expect("samples"))
    );
    println!(
        "  baseline, the writer's UPDATE+COMMIT round trip: p50 {}  p99 {}  (invalidation p50 = {:.2}x it)",
        ms(base),
        ms(percentile(&round_trips, 0.99)),
        p50.as_secs_f64() / base.as_secs_f64()
    );
    println!(
        "  listener's own last_latency: {:?}",
        listener.stats().last_latency
    );
}

/// The cache's own rate: the keys of every row, straight to the cache,
/// as many pipelines in flight as the listener has.
async fn baseline(cache: &Cache) -> f64 {
    let keys: Vec<String> = (1..=ROWS).map(|id| format!("user:{id}")).collect();
    let started = Instant::now();
    stream::iter(keys.chunks(512))
        .for_each_concurrent(IN_FLIGHT, |chunk| async move {
            cache.invalidate_many(chunk).await.expect("invalidate_many");
        })
        .await;
    let direct = f64::from(ROWS) / started.elapsed().as_secs_f64();
    println!("throughput (each row: one key, and one of 10 tags):");
    println!(
        "  baseline, Cache::invalidate_many of {ROWS} keys, {IN_FLIGHT} pipelines in flight: {direct:.0} keys/s"
    );
    direct
}

/// One transaction of every row, from its commit.
async fn bulk(writer: &Db, listener: &Listener, direct: f64) {
    let before = listener.stats().keys;
    writer.execute("UPDATE users SET n = n + 1").await;
    let committed = Instant::now();
    until_keys(listener, before + u64::from(ROWS)).await;
    let rate = f64::from(ROWS) / committed.elapsed().as_secs_f64();
    println!(
        "  one UPDATE of {ROWS} rows, commit to last invalidation: {rate:.0} rows/s ({:.2}x the baseline; target 50000)",
        rate / direct
    );
}

/// `ROWS / 1000` transactions of 1,000 rows, one after the other.
async fn write_transactions(writer: &Db) {
    for first in (1..=ROWS).step_by(1_000) {
        writer
            .execute(&format!(
                "UPDATE users SET n = n + 1 WHERE id BETWEEN {first} AND {}",
                first + 999
            ))
            .await;
    }
}

/// Many transactions: as a backlog caught up, then live.
async fn transactions<L, Fut>(writer: &Db, direct: f64, listen: L)
where
    L: Fn() -> Fut,
    Fut: std::future::Future<Output = Listener>,
{
    let count = ROWS / 1_000;
    // Committed while no listener runs: the slot keeps them.
    write_transactions(writer).await;
    let started = Instant::now();
    let listener = listen().await;
    until_keys(&listener, u64::from(ROWS)).await;
    let rate = f64::from(ROWS) / started.elapsed().as_secs_f64();
    println!(
        "  a backlog of {count} UPDATEs of 1000 rows, start to last invalidation: {rate:.0} rows/s ({:.2}x the baseline; target 50000)",
        rate / direct
    );

    // Live: how far behind the writer the listener falls.
    let before = listener.stats().keys;
    let started = Instant::now();
    let sampler = async {
        let mut worst = Duration::ZERO;
        loop {
            worst = worst.max(listener.stats().lag);
            tokio::time::sleep(Duration::from_millis(2)).await;
            if listener.stats().keys >= before + u64::from(ROWS) {
                return worst;
            }
        }
    };
    let writing = async {
        write_transactions(writer).await;
        Instant::now()
    };
    let (worst, last_commit) = tokio::join!(sampler, writing);
    let writer_rate = f64::from(ROWS) / last_commit.duration_since(started).as_secs_f64();
    println!(
        "  live, {count} UPDATEs of 1000 rows: the writer committed {writer_rate:.0} rows/s; \
         largest lag {}; last commit to last invalidation {}",
        ms(worst),
        ms(last_commit.elapsed())
    );
    let stats = listener.stats();
    println!(
        "  batches {}  largest {}  keys {}  tags {}",
        stats.batches, stats.largest_batch, stats.keys, stats.tags
    );
    listener.stop().await;
}

/// Waits until `listener` has invalidated `target` keys.
async fn until_keys(listener: &Listener, target: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while listener.stats().keys < target {
        assert!(
            Instant::now() < deadline,
            "not invalidated within 120 s: {:?}",
            listener.stats()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
