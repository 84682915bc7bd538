//! `ttl = <expression>`: a constant, or a value read per call (a field of
//! `self`, a parameter), of type `Duration` or whole seconds.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use redis_cached::{cache_put, redis_cached, Cache};
use support::backends::Env;

per_backend!(ttls_come_from_constants_fields_and_parameters);

const PROFILE_TTL: Duration = Duration::from_millis(300);
const REPORT_TTL_SECS: u64 = 120;

struct Repo {
    cache: Cache,
    /// From configuration, read per call.
    user_ttl: Duration,
    calls: AtomicU32,
}

impl Repo {
    #[redis_cached(key = "profile:<id>", ttl = PROFILE_TTL, cache = self.cache)]
    async fn profile(&self, id: u64) -> u64 {
        self.calls.fetch_add(1, Ordering::SeqCst);
        id
    }

    #[redis_cached(key = "user:<id>", ttl = self.user_ttl, cache = self.cache)]
    async fn user(&self, id: u64) -> u64 {
        id
    }

    #[redis_cached(key = "report:<id>", ttl = REPORT_TTL_SECS, cache = self.cache)]
    async fn report(&self, id: u64) -> u64 {
        id
    }

    #[cache_put(key = "user:<id>", ttl = self.user_ttl * 2, cache = self.cache)]
    async fn save_user(&self, id: u64) -> u64 {
        id
    }

    #[redis_cached(key = "custom:<id>", ttl = ttl, cache = self.cache)]
    async fn custom(&self, id: u64, ttl: Duration) -> u64 {
        let _ = ttl;
        id
    }
}

async fn ttls_come_from_constants_fields_and_parameters(env: &Env) {
    let repo = Repo {
        cache: env.cache(),
        user_ttl: Duration::from_secs(900),
        calls: AtomicU32::new(0),
    };
    repo.profile(1).await;
    repo.profile(1).await;
    assert_eq!(repo.calls.load(Ordering::SeqCst), 1, "cached");
    tokio::time::sleep(Duration::from_millis(500)).await;
    repo.profile(1).await;
    assert_eq!(
        repo.calls.load(Ordering::SeqCst),
        2,
        "expired after PROFILE_TTL"
    );
    repo.user(2).await;
    repo.report(3).await;
    repo.custom(4, Duration::from_secs(45)).await;
    if matches!(env, Env::Memory) {
        return;
    }
    let pttl = |key: &str| {
        let key = env.key(key);
        async move { env.raw::<i64>(::redis::cmd("PTTL").arg(key)).await }
    };
    let user = pttl("user:2").await;
    assert!(user > 890_000 && user <= 900_000, "self.user_ttl: {user}");
    let report = pttl("report:3").await;
    assert!(report > 110_000 && report <= 120_000, "seconds: {report}");
    let custom = pttl("custom:4").await;
    assert!(custom > 40_000 && custom <= 45_000, "a parameter: {custom}");
    repo.save_user(2).await;
    let saved = pttl("user:2").await;
    assert!(saved > 1_790_000, "an expression on cache_put: {saved}");
}
