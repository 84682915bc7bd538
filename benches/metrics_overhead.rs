//! What the `metrics` feature costs a hit: the in-memory hit (the cheapest
//! path, where any overhead shows most), timed in one process per build.
//! Built without the feature it prints one line (`off`); built with it,
//! two: before any recorder is installed (`on, no recorder`), and after
//! installing the Prometheus recorder (`on, prometheus`).
//!
//! `scripts/bench_metrics.sh` runs both builds in alternation and prints
//! the ratios against the build without the feature.

use std::hint::black_box;
use std::time::Instant;

use redis_cached::{redis_cached, Cache};

#[redis_cached(key = "user:<id>", cache = cache)]
async fn user(cache: &Cache, id: u64) -> String {
    format!("user {id}")
}

const CALLS: u32 = 200_000;
const ROUNDS: usize = 7;

/// Median ns per hit over `ROUNDS` rounds.
async fn hit_ns(cache: &Cache) -> f64 {
    let mut rounds = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let started = Instant::now();
        for i in 0..CALLS {
            black_box(user(cache, u64::from(i % 100)).await);
        }
        rounds.push(started.elapsed().as_nanos() as f64 / f64::from(CALLS));
    }
    rounds.sort_by(f64::total_cmp);
    rounds[ROUNDS / 2]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let cache = Cache::in_memory();
        for id in 0..100 {
            user(&cache, id).await;
        }
        if cfg!(feature = "metrics") {
            println!("on, no recorder: {:.1} ns", hit_ns(&cache).await);
            #[cfg(feature = "metrics")]
            {
                let recorder =
                    metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
                let handle = recorder.handle();
                metrics::set_global_recorder(recorder).expect("the only recorder");
                // A fresh cache and function sites register with it.
                let cache = Cache::in_memory();
                #[redis_cached(key = "user:<id>", cache = cache)]
                async fn user_recorded(cache: &Cache, id: u64) -> String {
                    format!("user {id}")
                }
                for id in 0..100 {
                    user_recorded(&cache, id).await;
                }
                let mut rounds = Vec::with_capacity(ROUNDS);
                for _ in 0..ROUNDS {
                    let started = Instant::now();
                    for i in 0..CALLS {
                        black_box(user_recorded(&cache, u64::from(i % 100)).await);
                    }
                    rounds.push(started.elapsed().as_nanos() as f64 / f64::from(CALLS));
                }
                rounds.sort_by(f64::total_cmp);
                println!("on, prometheus: {:.1} ns", rounds[ROUNDS / 2]);
                assert!(handle.render().contains("redis_cached_hits_total"));
            }
        } else {
            println!("off: {:.1} ns", hit_ns(&cache).await);
        }
    });
}
