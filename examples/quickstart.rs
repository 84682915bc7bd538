//! The quickstart: a repository whose slow lookups are cached.
//!
//! Runs on the in-memory backend with no set-up; with `REDIS_URL` set
//! (e.g. `REDIS_URL=redis://127.0.0.1:6379/`) it caches in Redis instead.
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::time::{Duration, Instant};

use redis_cached::{cache_evict, cache_put, redis_cached, Cache};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
}

#[derive(Debug)]
struct DbError;

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("database error")
    }
}

impl std::error::Error for DbError {}

/// Stands in for a database: every query takes 50 ms.
struct UserRepo;

impl UserRepo {
    #[redis_cached(key = "user:<id>", ttl = "10m", cache_none = "30s")]
    async fn get_user(&self, id: u64) -> Result<Option<User>, DbError> {
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok((id != 0).then(|| User {
            id,
            name: format!("user #{id}"),
        }))
    }

    #[cache_put(key = "user:<user.id>", ttl = "10m")]
    async fn rename(&self, user: User, name: &str) -> Result<Option<User>, DbError> {
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(Some(User {
            name: name.to_owned(),
            ..user
        }))
    }

    #[cache_evict(key = "user:<id>")]
    async fn delete(&self, id: u64) -> Result<(), DbError> {
        let _ = id;
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(())
    }
}

async fn timed<T>(label: &str, call: impl std::future::Future<Output = T>) -> T {
    let start = Instant::now();
    let value = call.await;
    println!(
        "{label:<34} {:>9.3} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    value
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .init();

    let (cache, backend) = match std::env::var("REDIS_URL") {
        Ok(url) => (
            Cache::builder(&url).namespace("quickstart").build()?,
            "Redis (REDIS_URL)",
        ),
        Err(_) => (Cache::in_memory(), "in-memory (set REDIS_URL to use Redis)"),
    };
    println!("backend: {backend}");
    redis_cached::set_global(cache.clone());

    let repo = UserRepo;
    // Start clean, in case an earlier run left the key in Redis.
    cache.invalidate("user:42").await.ok();

    let user = timed("get_user(42), miss: runs the query", repo.get_user(42)).await?;
    timed("get_user(42), hit", repo.get_user(42)).await?;
    timed("get_user(0), missing row, cached", repo.get_user(0)).await?;
    timed("get_user(0), absence hit", repo.get_user(0)).await?;
    if let Some(user) = user {
        timed("rename(42), writes through", repo.rename(user, "Ada")).await?;
    }
    let renamed = timed("get_user(42), hit after write", repo.get_user(42)).await?;
    println!("  -> {renamed:?}");
    timed("delete(42), evicts", repo.delete(42)).await?;
    timed("get_user(42), miss after evict", repo.get_user(42)).await?;

    let stats = cache.stats();
    println!(
        "stats: {} hits, {} misses, {} computes, {} writes, {} errors, {} timeouts, hit rate {:.0}%",
        stats.hits,
        stats.misses,
        stats.computes,
        stats.writes,
        stats.errors,
        stats.timeouts,
        stats.hit_rate() * 100.0
    );
    if cache.is_degraded() || stats.errors + stats.timeouts > 0 {
        println!("note: Redis was unreachable; every value above was computed, uncached");
    }
    Ok(())
}
