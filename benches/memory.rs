//! Resident memory of the in-memory backend: 1 000 000 distinct inserts into
//! a cache bounded at 100 000 entries must leave memory bounded by the
//! capacity, not by the number of inserts. Prints RSS (from
//! /proc/self/status) at each stage, against the baseline before any insert
//! measured in the same run.
//!
//! `cargo bench --bench memory`

use std::time::Duration;

use redis_cached::{Cache, MemoryConfig};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
    email: String,
    active: bool,
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

const CAPACITY: usize = 100_000;
const INSERTS: u64 = 1_000_000;

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let cache = Cache::builder(redis_cached::MEMORY_URL)
            .memory(MemoryConfig {
                max_entries: CAPACITY,
                ..MemoryConfig::default()
            })
            .build()
            .expect("valid settings");
        let base = rss_kib();
        let mut at_capacity = 0;
        for id in 0..INSERTS {
            let user = User {
                id,
                name: format!("user {id}"),
                email: format!("user{id}@example.com"),
                active: true,
            };
            cache
                .set(&format!("user:{id}"), &user, Duration::from_secs(3600))
                .await
                .expect("in-memory set");
            if id + 1 == CAPACITY as u64 {
                at_capacity = rss_kib();
            }
        }
        let end = rss_kib();
        let entries = cache.memory_entry_count().unwrap_or(0);
        let grown_cap = at_capacity.saturating_sub(base);
        let grown_end = end.saturating_sub(base);
        println!("In-memory backend, capacity {CAPACITY} entries, {INSERTS} inserts of a small struct");
        println!("  RSS before inserts          {:>8} KiB", base);
        println!("  RSS after {CAPACITY} inserts     {:>8} KiB (+{grown_cap} KiB)", at_capacity);
        println!("  RSS after {INSERTS} inserts    {:>8} KiB (+{grown_end} KiB)", end);
        println!("  entries held at the end     {entries:>8}");
        let ratio = grown_end as f64 / grown_cap.max(1) as f64;
        println!(
            "  growth ratio (1M inserts / 100k inserts): {ratio:.2}x   bounded if well under 10x   {}",
            if entries <= CAPACITY && ratio < 3.0 { "bounded" } else { "NOT BOUNDED" }
        );
    });
}
