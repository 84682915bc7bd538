//! The `metrics` feature: every counter exported exactly, per function and
//! per cache, with the names the README lists, through a debugging
//! recorder and through the Prometheus exposition text.
//!
//! `cargo test --features metrics --test metrics`

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::MetricKind;
use redis_cached::{redis_cached, stats_of, BreakerConfig, Cache};
use support::RedisServer;

struct Repo {
    cache: Cache,
    computes: AtomicU32,
}

impl Repo {
    #[redis_cached(key = "plain:<id>", cache = self.cache)]
    async fn plain(&self, id: u64) -> u64 {
        self.computes.fetch_add(1, Ordering::SeqCst);
        id
    }

    #[redis_cached(key = "stale:<id>", ttl = 1, stale = "30s", cache = self.cache)]
    async fn stale(self: Arc<Self>, id: u64) -> u64 {
        self.computes.fetch_add(1, Ordering::SeqCst);
        id
    }

    #[redis_cached(key = "locked:<id>", lock = true, cache = self.cache)]
    async fn locked(&self, id: u64) -> u64 {
        self.computes.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        id
    }
}

/// Runs `scenario` on a current-thread runtime with `recorder` as this
/// thread's recorder: every metric it registers lands there, and tests
/// running at once do not share one.
fn recorded(recorder: &impl metrics::Recorder, scenario: impl std::future::Future<Output = ()>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    metrics::with_local_recorder(recorder, || runtime.block_on(scenario));
}

/// The exported counters and gauges: (name, labels sorted) → value.
type Exported = HashMap<(String, Vec<(String, String)>), f64>;

fn snapshot(recorder: &DebuggingRecorder) -> Exported {
    recorder
        .snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| {
            let value = match value {
                DebugValue::Counter(n) => n as f64,
                DebugValue::Gauge(g) => g.into_inner(),
                DebugValue::Histogram(h) => h.len() as f64,
            };
            let mut labels: Vec<(String, String)> = key
                .key()
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            let kind = key.kind();
            (kind == MetricKind::Counter
                || kind == MetricKind::Gauge
                || kind == MetricKind::Histogram)
                .then(|| ((key.key().name().to_owned(), labels), value))
        })
        .collect()
}

/// The value of `name` for the function whose path ends with `function`
/// (`""`: the cache's own series) on `cache`.
fn value(exported: &Exported, name: &str, function: &str, cache: &str) -> f64 {
    exported
        .iter()
        .filter(|((n, labels), _)| {
            let function_label = labels.iter().find(|(k, _)| k == "fn").map(|(_, v)| v);
            n == name
                && labels.iter().any(|(k, v)| k == "cache" && v == cache)
                && match function_label {
                    // The cache's own series: `fn=""`, or no `fn` at all.
                    None => function.is_empty(),
                    Some(v) if function.is_empty() => v.is_empty(),
                    Some(v) => v.ends_with(function),
                }
        })
        .map(|(_, v)| *v)
        .sum()
}

#[test]
fn every_counter_is_exact_on_a_scripted_sequence() {
    let server = RedisServer::start();
    let recorder = DebuggingRecorder::new();
    recorded(&recorder, async {
        let cache = |ns: &str| {
            Cache::builder(&server.url())
                .namespace(ns)
                .build()
                .expect("valid")
        };
        let repo = Arc::new(Repo {
            cache: cache("shop"),
            computes: AtomicU32::new(0),
        });
        // 1 miss, then 4 hits.
        for _ in 0..5 {
            repo.plain(1).await;
        }
        // 1 miss, then after the TTL a stale serve (and its refresh).
        Arc::clone(&repo).stale(1).await;
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        Arc::clone(&repo).stale(1).await;
        // The refresh runs in the background: wait for it to end.
        for _ in 0..100 {
            let stats = stats_of(Arc::clone(&repo).stale(1)).expect("cached");
            if stats.refreshes == 1 && stats.writes == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Another process waits for this one's lock.
        let other = Arc::new(Repo {
            cache: cache("shop"),
            computes: AtomicU32::new(0),
        });
        let holder = {
            let repo = Arc::clone(&repo);
            tokio::spawn(async move { repo.locked(1).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(other.locked(1).await, 1);
        assert_eq!(holder.await.expect("no panic"), 1);
        // A cache whose Redis is gone: the breaker opens once.
        let down = Repo {
            cache: Cache::builder("redis://127.0.0.1:1/")
                .namespace("down")
                .breaker(BreakerConfig {
                    failure_threshold: 2,
                    cooldown: Duration::from_secs(60),
                })
                .build()
                .expect("valid"),
            computes: AtomicU32::new(0),
        };
        for _ in 0..4 {
            down.plain(1).await;
        }

        let exported = snapshot(&recorder);
        let plain = stats_of(repo.plain(0)).expect("cached");
        // Counted on both caches it ran on: 1 miss on `shop`, 4 on `down`.
        assert_eq!((plain.hits, plain.misses), (4, 5), "{plain}");
        let shop = |name: &str, function: &str| value(&exported, name, function, "shop");
        assert_eq!(shop("redis_cached_hits_total", "Repo::plain"), 4.0);
        assert_eq!(shop("redis_cached_misses_total", "Repo::plain"), 1.0);
        assert_eq!(shop("redis_cached_computes_total", "Repo::plain"), 1.0);
        assert_eq!(shop("redis_cached_writes_total", "Repo::plain"), 1.0);
        assert_eq!(shop("redis_cached_misses_total", "Repo::stale"), 1.0);
        assert_eq!(shop("redis_cached_stale_serves_total", "Repo::stale"), 1.0);
        assert_eq!(shop("redis_cached_refreshes_total", "Repo::stale"), 1.0);
        assert_eq!(
            shop("redis_cached_lock_acquired_total", "Repo::locked"),
            1.0
        );
        assert_eq!(shop("redis_cached_lock_waits_total", "Repo::locked"), 1.0);
        assert_eq!(
            shop("redis_cached_lock_wait_timeouts_total", "Repo::locked"),
            0.0
        );
        assert_eq!(
            shop("redis_cached_compute_seconds", "Repo::plain"),
            1.0,
            "one sample"
        );
        assert_eq!(shop("redis_cached_compute_seconds", "Repo::locked"), 1.0);
        // A function's handles export its own events only.
        assert!(
            !exported.iter().any(|((n, labels), _)| {
                n == "redis_cached_breaker_skips_total"
                    && labels.iter().any(|(k, v)| k == "fn" && !v.is_empty())
            }),
            "a cache-wide counter under a function"
        );
        // Every Redis operation of the shop caches was timed.
        assert!(shop("redis_cached_redis_operation_seconds", "") >= 10.0);
        // The function that ran on two caches: each has its series.
        let down = |name: &str, function: &str| value(&exported, name, function, "down");
        assert_eq!(down("redis_cached_misses_total", "Repo::plain"), 4.0);
        assert_eq!(down("redis_cached_breaker_opens_total", ""), 1.0);
        assert_eq!(down("redis_cached_breaker_skips_total", ""), 2.0);
        assert_eq!(down("redis_cached_breaker_open", ""), 1.0);
        let errors: f64 = ["error", "timeout"]
            .iter()
            .map(|kind| {
                exported
                    .iter()
                    .filter(|((n, labels), _)| {
                        n == "redis_cached_redis_errors_total"
                            && labels.contains(&("cache".into(), "down".into()))
                            && labels.contains(&("kind".into(), (*kind).into()))
                    })
                    .map(|(_, v)| *v)
                    .sum::<f64>()
            })
            .sum();
        assert_eq!(errors, 2.0, "two failures opened the breaker");
        // The exported sums equal the caches' own counters.
        let hits: f64 = exported
            .iter()
            .filter(|((n, labels), _)| {
                n == "redis_cached_hits_total" && labels.contains(&("cache".into(), "shop".into()))
            })
            .map(|(_, v)| *v)
            .sum();
        let own = repo.cache.stats().hits + other.cache.stats().hits;
        assert_eq!(hits, own as f64);
    });
}

#[test]
fn the_prometheus_text_shows_the_same_counts() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    recorded(&recorder, async {
        #[redis_cached(key = "p:<id>", cache = cache)]
        async fn prom(cache: &Cache, id: u64) -> u64 {
            id
        }
        let cache = Cache::builder("memory://")
            .namespace("prom")
            .build()
            .expect("valid");
        for id in 0..10 {
            for _ in 0..3 {
                prom(&cache, id).await;
            }
        }
        let stats = cache.stats();
        let text = handle.render();
        let sample = |name: &str| -> f64 {
            text.lines()
                .filter(|line| line.starts_with(name) && line.contains("cache=\"prom\""))
                .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        assert_eq!(
            sample("redis_cached_hits_total{"),
            stats.hits as f64,
            "{text}"
        );
        assert_eq!(
            sample("redis_cached_misses_total{"),
            stats.misses as f64,
            "{text}"
        );
        assert_eq!((stats.hits, stats.misses), (20, 10));
        assert!(
            text.contains("# TYPE redis_cached_hits_total counter"),
            "{text}"
        );
    });
}

/// A sink that takes everything.
struct Accept;

impl redis_cached::Sink<u32, String> for Accept {
    type Error = String;

    async fn write_batch(&self, _: Vec<redis_cached::Write<u32, String>>) -> Result<(), String> {
        Ok(())
    }
}

#[test]
fn write_behind_exports_its_counters_depth_and_lag() {
    let server = RedisServer::start();
    let recorder = DebuggingRecorder::new();
    recorded(&recorder, async {
        let cache = Cache::redis(&server.url()).expect("valid URL");
        let wb = redis_cached::WriteBehind::builder("orders", &cache, Accept)
            .key_template("order:<id>")
            .max_delay(Duration::from_millis(300))
            .start()
            .expect("valid");
        for n in 0..5 {
            wb.write(n % 2, &format!("v{n}")).await.expect("journaled");
        }
        assert_eq!(wb.shutdown(Duration::from_secs(10)).await, Ok(0));
        let exported = snapshot(&recorder);
        let get = |name: &str| -> f64 {
            exported
                .iter()
                .filter(|((n, labels), _)| {
                    n == name
                        && labels.contains(&("journal".into(), "orders".into()))
                        && labels.contains(&("cache".into(), "default".into()))
                })
                .map(|(_, v)| *v)
                .sum()
        };
        let stats = wb.stats();
        assert_eq!(get("redis_cached_write_behind_accepted_total"), 5.0);
        assert_eq!(
            get("redis_cached_write_behind_flushed_total"),
            stats.flushed as f64
        );
        assert_eq!(
            get("redis_cached_write_behind_coalesced_total"),
            stats.coalesced as f64
        );
        assert_eq!(stats.flushed + stats.coalesced, 5, "{stats:?}");
        assert_eq!(
            get("redis_cached_write_behind_batches_total"),
            stats.batches as f64
        );
        assert_eq!(get("redis_cached_write_behind_dead_letters_total"), 0.0);
        assert_eq!(get("redis_cached_write_behind_queue_depth"), 0.0);
        assert_eq!(
            get("redis_cached_write_behind_flush_lag_seconds"),
            stats.batches as f64,
            "one lag sample per batch"
        );
    });
}
