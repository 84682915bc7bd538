//! What several benchmarks share: the value they cache, and how they
//! summarise and judge rounds.

#![allow(dead_code)] // each benchmark uses a different part

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A small row, as a service caches them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub id: u64,
    pub name: String,
    pub email: String,
    pub active: bool,
}

/// The row with id `id`.
pub fn user(id: u64) -> User {
    User {
        id,
        name: format!("user {id}"),
        email: format!("user{id}@example.com"),
        active: true,
    }
}

/// The median of `values` (sorts them).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The `p` quantile (0 to 1) of `sorted`: the element at the rounded
/// fractional index.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Sequential rounds over `sides` contenders that take turns, a different
/// one first in each round: `call(side, i)` is timed `ops` times per side
/// and round. Each round's p50 of each side, by side.
pub async fn sequential_p50s<F, Fut>(
    sides: usize,
    rounds: usize,
    ops: usize,
    mut call: F,
) -> Vec<Vec<Duration>>
where
    F: FnMut(usize, usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut p50s = vec![Vec::with_capacity(rounds); sides];
    for round in 0..rounds {
        for k in 0..sides {
            let side = (round + k) % sides;
            let mut samples = Vec::with_capacity(ops);
            for i in 0..ops {
                let start = std::time::Instant::now();
                call(side, i).await;
                samples.push(start.elapsed());
            }
            samples.sort();
            p50s[side].push(percentile(&samples, 0.5));
        }
    }
    p50s
}

/// How a line reports a target.
pub fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT MET"
    }
}

/// What a cache has answered without a hit so far: its misses and its
/// bodies' runs.
pub fn not_hits(cache: &redis_cached::Cache) -> (u64, u64) {
    let stats = cache.stats();
    (stats.misses, stats.computes)
}

/// Fails the benchmark if `cache` (named `name`) answered a call without a
/// hit since `before` ([`not_hits`]): a call that fell back to its body
/// would have measured the body, not the cache.
pub fn assert_all_hits(name: &str, cache: &redis_cached::Cache, before: (u64, u64)) {
    let stats = cache.stats();
    assert_eq!(
        not_hits(cache),
        before,
        "{name}: every measured call must be a hit ({} errors, {} timeouts)",
        stats.errors,
        stats.timeouts
    );
}
