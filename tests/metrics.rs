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
use redis_cached::{cache_put, redis_cached, stats_of, BreakerConfig, Cache};
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

/// The metric names of a Prometheus exposition that `kind` lines
/// (`# HELP` or `# TYPE`) name.
fn named_by<'a>(text: &'a str, kind: &str) -> Vec<&'a str> {
    text.lines()
        .filter_map(|line| line.strip_prefix(kind)?.split(' ').nth(1))
        .collect()
}

/// Functions of every kind, on a Redis cache with a near tier and a
/// write-behind: every metric of the crate is exported.
struct Shop {
    cache: Cache,
}

impl Shop {
    #[redis_cached(key = "user:<id>", lock = true, near = "10s", cache = self.cache)]
    async fn user(&self, id: u64) -> u64 {
        id
    }

    #[redis_cached(key = "name:<id>", cache = self.cache)]
    async fn name(&self, id: u64) -> String {
        format!("user {id}")
    }

    #[cache_put(key = "name:<id>", cache = self.cache)]
    async fn rename(&self, id: u64) -> String {
        format!("renamed {id}")
    }
}

/// The Prometheus text after [`Shop`] and a write-behind ran on a
/// server's cache, with the histograms' buckets set as documented; made
/// once (a function's handles belong to the recorder of its first call, so
/// the tests that read it share one).
fn shop_exposition() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
        let mut builder = PrometheusBuilder::new();
        for (name, bounds) in redis_cached::HISTOGRAM_BUCKETS {
            builder = builder
                .set_buckets_for_metric(Matcher::Full((*name).to_owned()), bounds)
                .expect("bounds");
        }
        let server = RedisServer::start();
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        recorded(&recorder, async {
            let shop = Shop {
                cache: Cache::builder(&server.url())
                    .namespace("shop")
                    .build()
                    .expect("valid"),
            };
            for id in 0..3 {
                shop.user(id).await;
                shop.user(id).await;
                shop.name(id).await;
                shop.rename(id).await;
                shop.name(id).await;
            }
            shop.cache.invalidate("user:1").await.expect("invalidated");
            let wb = redis_cached::WriteBehind::builder("orders", &shop.cache, Accept)
                .key_template("order:<id>")
                .max_delay(Duration::from_millis(50))
                .start()
                .expect("valid");
            wb.write(1, &"one".to_owned()).await.expect("journaled");
            assert_eq!(wb.shutdown(Duration::from_secs(10)).await, Ok(0));
        });
        handle.run_upkeep();
        handle.render()
    })
}

#[test]
fn every_exported_metric_has_help() {
    let text = shop_exposition();
    let typed = named_by(text, "# TYPE");
    let helped = named_by(text, "# HELP");
    assert!(typed.len() >= 20, "{text}");
    for name in &typed {
        assert!(helped.contains(name), "no # HELP for {name}:\n{text}");
    }
    assert!(
        text.contains("# HELP redis_cached_hits_total Lookups answered from the cache."),
        "{text}"
    );
}

#[test]
fn the_timings_render_as_histograms_with_the_documented_buckets() {
    let text = shop_exposition();
    for name in [
        "redis_cached_compute_seconds",
        "redis_cached_redis_operation_seconds",
        "redis_cached_write_behind_flush_lag_seconds",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} histogram")),
            "{name} is not a histogram:\n{text}"
        );
        assert!(
            text.contains(&format!("{name}_bucket{{")),
            "{name} has no buckets:\n{text}"
        );
        assert!(
            text.lines()
                .any(|line| line.starts_with(&format!("{name}_bucket{{"))
                    && line.contains("le=\"+Inf\"")),
            "{name} has no +Inf bucket:\n{text}"
        );
    }
    assert!(!text.contains("quantile="), "no summaries left:\n{text}");
}

#[test]
fn a_function_exports_only_the_series_it_can_produce() {
    let text = shop_exposition();
    let series_of = |function: &str| -> Vec<&str> {
        text.lines()
            .filter(|line| !line.starts_with('#') && line.contains(&format!("{function}\"")))
            .filter_map(|line| line.split('{').next())
            .collect()
    };
    let rename = series_of("Shop::rename");
    let name = series_of("Shop::name");
    let user = series_of("Shop::user");
    // A `#[cache_put]` stores: no lookups, no near tier, no lock.
    assert!(rename.contains(&"redis_cached_writes_total"), "{text}");
    for absent in [
        "redis_cached_hits_total",
        "redis_cached_misses_total",
        "redis_cached_near_hits_total",
        "redis_cached_lock_waits_total",
        "redis_cached_stale_serves_total",
    ] {
        assert!(!rename.contains(&absent), "{absent} for a put:\n{text}");
    }
    // A plain function: lookups, without near, lock or refresh series.
    assert!(name.contains(&"redis_cached_hits_total"), "{text}");
    assert!(
        name.contains(&"redis_cached_compute_seconds_count"),
        "{text}"
    );
    for absent in [
        "redis_cached_near_hits_total",
        "redis_cached_near_misses_total",
        "redis_cached_lock_acquired_total",
        "redis_cached_refreshes_total",
    ] {
        assert!(
            !name.contains(&absent),
            "{absent} for a plain function:\n{text}"
        );
    }
    // `lock` and `near`: theirs too, at zero before they happen.
    for present in [
        "redis_cached_near_hits_total",
        "redis_cached_near_misses_total",
        "redis_cached_lock_acquired_total",
        "redis_cached_lock_wait_timeouts_total",
    ] {
        assert!(user.contains(&present), "no {present} for `user`:\n{text}");
    }
    assert!(!user.contains(&"redis_cached_stale_serves_total"), "{text}");
    // The cache's own series: its failures at zero, but no lookups of the
    // runtime API, which this program never called.
    let cache_wide: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("fn=\"\""))
        .filter_map(|line| line.split('{').next())
        .collect();
    assert!(
        cache_wide.contains(&"redis_cached_breaker_opens_total"),
        "{text}"
    );
    assert!(
        cache_wide.contains(&"redis_cached_invalidations_total"),
        "{text}"
    );
    assert!(!cache_wide.contains(&"redis_cached_hits_total"), "{text}");
    assert!(
        !cache_wide.contains(&"redis_cached_near_hits_total"),
        "{text}"
    );
}

/// Redis down for a few seconds while calls keep coming: the breaker
/// probes every cool-down, and each probe fails, but that is one outage.
#[test]
fn one_outage_counts_one_opening_and_its_failed_probes_apart() {
    struct Outage {
        cache: Cache,
    }
    impl Outage {
        #[redis_cached(key = "o:<id>", cache = self.cache)]
        async fn plain(&self, id: u64) -> u64 {
            id
        }
    }
    let mut server = RedisServer::start();
    let recorder = DebuggingRecorder::new();
    recorded(&recorder, async {
        let repo = Outage {
            cache: Cache::builder(&server.url())
                .namespace("outage")
                .op_timeout(Duration::from_millis(100))
                .breaker(BreakerConfig {
                    failure_threshold: 2,
                    cooldown: Duration::from_millis(200),
                })
                .build()
                .expect("valid"),
        };
        repo.plain(1).await;
        server.kill();
        let until = std::time::Instant::now() + Duration::from_millis(2_500);
        while std::time::Instant::now() < until {
            repo.plain(2).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        server.restart();
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while repo.cache.is_degraded() && std::time::Instant::now() < until {
            repo.plain(3).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!repo.cache.is_degraded(), "recovered");
        let exported = snapshot(&recorder);
        let outage = |name: &str| value(&exported, name, "", "outage");
        assert_eq!(
            outage("redis_cached_breaker_opens_total"),
            1.0,
            "one outage: {:?}",
            repo.cache.stats()
        );
        assert_eq!(repo.cache.stats().breaker_opens, 1);
        // A probe every cool-down (200 ms) for 2.5 s: most of them failed.
        let probes = outage("redis_cached_breaker_failed_probes_total");
        assert!(probes >= 3.0, "{probes} failed probes");
        assert_eq!(probes, repo.cache.stats().breaker_failed_probes as f64);
        assert_eq!(outage("redis_cached_breaker_open"), 0.0, "closed again");
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
