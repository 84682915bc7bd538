//! Soak: three worker processes mix hits, misses, locked misses, stale
//! refreshes and invalidations on a shared key space, through the tests'
//! fault proxy, while the parent injects faults at random. At the end no
//! call failed, every value read belongs to the key it was read for, and no
//! value was older than its TTL (plus `stale`) allows.
//!
//! Runs for 6 s in the test command; `REDIS_CACHED_SOAK_SECS=300 cargo test
//! --test soak -- --nocapture` soaks for longer.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis_cached::{redis_cached, BreakerConfig, Cache};
use serde::{Deserialize, Serialize};
use support::proxy::Proxy;
use support::RedisServer;

const ENV: &str = "REDIS_CACHED_SOAK_WORKER";
const KEYS: u64 = 40;
const TTL: Duration = Duration::from_secs(1);
const STALE: Duration = Duration::from_secs(1);
const OP_TIMEOUT: Duration = Duration::from_millis(50);

#[derive(Debug, Serialize, Deserialize)]
struct Row {
    key: u64,
    computed_at_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn query(key: u64, salt: u64) -> Row {
    tokio::time::sleep(Duration::from_millis(2 + salt % 8)).await;
    Row {
        key,
        computed_at_ms: now_ms(),
    }
}

#[redis_cached(key = "soak-plain:<key>", ttl = 1, cache = cache)]
async fn plain(cache: Cache, key: u64, salt: u64) -> Row {
    query(key, salt).await
}

#[redis_cached(key = "soak-locked:<key>", ttl = 1, lock = true, lock_ttl = "500ms", lock_wait = "1s", cache = cache)]
async fn locked(cache: Cache, key: u64, salt: u64) -> Result<Row, String> {
    Ok(query(key, salt).await)
}

#[redis_cached(key = "soak-fresh:<key>", ttl = 1, stale = "1s", cache = cache)]
async fn fresh(cache: Cache, key: u64, salt: u64) -> Option<Row> {
    Some(query(key, salt).await)
}

/// xorshift64*: deterministic, seedable, enough for picking operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[derive(Default, Debug)]
struct Tally {
    calls: u64,
    wrong: u64,
    too_old: u64,
    failed: u64,
}

async fn worker_task(cache: Cache, seed: u64, until: Instant) -> Tally {
    let mut rng = Rng(seed | 1);
    let mut tally = Tally::default();
    while Instant::now() < until {
        let (key, op, salt) = (rng.next() % KEYS, rng.next() % 10, rng.next());
        let (row, window) = match op {
            0..=5 => (Some(plain(cache.clone(), key, salt).await), TTL),
            6..=7 => (locked(cache.clone(), key, salt).await.ok(), TTL),
            8 => (fresh(cache.clone(), key, salt).await, TTL + STALE),
            _ => {
                let prefix = ["soak-plain", "soak-locked", "soak-fresh"][(salt % 3) as usize];
                // An invalidation may fail under faults; that is allowed.
                let _ = cache.invalidate(&format!("{prefix}:{key}")).await;
                continue;
            }
        };
        tally.calls += 1;
        match row {
            None => tally.failed += 1,
            Some(row) if row.key != key => tally.wrong += 1,
            Some(row) => {
                // A stored value lives its window from when it was written,
                // which is at most one operation after it was computed.
                let limit = window + OP_TIMEOUT + Duration::from_millis(250);
                if now_ms().saturating_sub(row.computed_at_ms) > limit.as_millis() as u64 {
                    tally.too_old += 1;
                }
            }
        }
    }
    tally
}

/// Not a test: the entry point of the worker processes `soak` spawns.
#[test]
#[ignore = "worker process of the soak test"]
fn soak_worker() {
    let (Ok(url), Ok(secs), Ok(seed)) = (
        std::env::var(format!("{ENV}_URL")),
        std::env::var(format!("{ENV}_SECS")),
        std::env::var(format!("{ENV}_SEED")),
    ) else {
        return;
    };
    let secs: u64 = secs.parse().expect("seconds");
    let seed: u64 = seed.parse().expect("seed");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let cache = Cache::builder(&url)
            .op_timeout(OP_TIMEOUT)
            .breaker(BreakerConfig { failure_threshold: 3, cooldown: Duration::from_millis(100) })
            .build()
            .expect("valid settings");
        let until = Instant::now() + Duration::from_secs(secs);
        let tasks: Vec<_> = (0..8).map(|t| tokio::spawn(worker_task(cache.clone(), seed * 31 + t, until))).collect();
        let mut total = Tally::default();
        for task in tasks {
            match task.await {
                Ok(t) => {
                    total.calls += t.calls;
                    total.wrong += t.wrong;
                    total.too_old += t.too_old;
                    total.failed += t.failed;
                }
                Err(_) => total.failed += 1,
            }
        }
        let s = cache.stats();
        println!(
            "SOAK calls={} wrong={} too_old={} failed={} computes={} hits={} misses={} errors={} timeouts={} breaker_opens={} stale_sets_refused={} lock_waits={}",
            total.calls, total.wrong, total.too_old, total.failed, s.computes, s.hits, s.misses, s.errors, s.timeouts, s.breaker_opens, s.stale_sets_refused, s.lock_waits
        );
    });
}

fn field(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

#[test]
fn soak() {
    let secs: u64 = std::env::var("REDIS_CACHED_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let server = RedisServer::start();
    let proxy = Proxy::start(server.port());
    let exe = std::env::current_exe().expect("test binary");
    let workers: Vec<_> = (1..=3u64)
        .map(|seed| {
            Command::new(&exe)
                .args([
                    "soak_worker",
                    "--exact",
                    "--ignored",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env(format!("{ENV}_URL"), proxy.url())
                .env(format!("{ENV}_SECS"), secs.to_string())
                .env(format!("{ENV}_SEED"), seed.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn a soak worker")
        })
        .collect();
    // Random faults, each for a few hundred ms, with healthy spells between.
    let mut rng = Rng(0x5eed);
    let until = Instant::now() + Duration::from_secs(secs);
    let mut injected = [0u32; 5];
    while Instant::now() < until {
        let fault = (rng.next() % 5) as usize;
        injected[fault] += 1;
        match fault {
            0 => proxy.set_latency(Duration::from_millis(120)),
            1 => proxy.set_blackhole(true),
            2 => proxy.cut_next_reply(),
            3 => proxy.reset_all(),
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(100 + rng.next() % 300));
        proxy.heal();
        if fault == 1 {
            proxy.reset_all();
        }
        std::thread::sleep(Duration::from_millis(100 + rng.next() % 300));
    }
    proxy.heal();
    println!(
        "faults injected: latency {}, black hole {}, cut reply {}, reset {}, none {}",
        injected[0], injected[1], injected[2], injected[3], injected[4]
    );
    for worker in workers {
        let output = worker.wait_with_output().expect("worker exits");
        let text = String::from_utf8_lossy(&output.stdout);
        let line = text
            .lines()
            .find_map(|l| l.find("SOAK ").map(|at| &l[at..]))
            .expect("a worker report");
        println!("{line}");
        assert!(field(line, "calls") > 0, "{line}");
        assert_eq!(field(line, "wrong"), 0, "no value for another key: {line}");
        assert_eq!(
            field(line, "too_old"),
            0,
            "no value past its TTL window: {line}"
        );
        assert_eq!(field(line, "failed"), 0, "no call failed: {line}");
        assert!(
            field(line, "hits") > 0,
            "caching worked between faults: {line}"
        );
        assert!(field(line, "computes") < field(line, "calls"), "{line}");
    }
}
