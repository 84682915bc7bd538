//! Cached methods of `#[async_trait]` impls, called through
//! `Arc<dyn Trait>`: the repository trait of an axum service, with a test
//! double behind the same trait.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use redis_cached::{redis_cached, Cache};

#[async_trait]
trait UserRepo: Send + Sync {
    async fn name(&self, id: u64) -> Result<Option<String>, String>;
    async fn names(&self, ids: Vec<u64>) -> HashMap<u64, String>;
    async fn plan(&self, tenant: &str) -> String;
    async fn score(self: Arc<Self>, id: u64) -> u64;
}

#[derive(Clone)]
struct Db {
    cache: Cache,
    queries: Arc<AtomicU32>,
}

#[async_trait]
impl UserRepo for Db {
    #[redis_cached(key = "name:<id>", ttl = 60, cache_none = "1m", lock = true, cache = self.cache)]
    async fn name(&self, id: u64) -> Result<Option<String>, String> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        Ok((id < 100).then(|| format!("user {id}")))
    }

    #[redis_cached(key = "name:<ids[]>", ttl = 60, cache = self.cache)]
    async fn names(&self, ids: Vec<u64>) -> HashMap<u64, String> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        ids.into_iter()
            .map(|id| (id, format!("user {id}")))
            .collect()
    }

    #[redis_cached(key = "plan:<tenant>", stale = "1m", cache = self.cache)]
    async fn plan(&self, tenant: &str) -> String {
        self.queries.fetch_add(1, Ordering::SeqCst);
        tenant.to_uppercase()
    }

    #[redis_cached(key = "score:<id>", cache = self.cache)]
    async fn score(self: Arc<Self>, id: u64) -> u64 {
        self.queries.fetch_add(1, Ordering::SeqCst);
        id * 2
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_methods_of_an_async_trait_impl_work_through_dyn() {
    let cache = Cache::in_memory();
    let db = Arc::new(Db {
        cache: cache.clone(),
        queries: Arc::default(),
    });
    let repo: Arc<dyn UserRepo> = db.clone();
    let queries = || db.queries.load(Ordering::SeqCst);
    assert_eq!(repo.name(7).await, Ok(Some("user 7".into())));
    assert_eq!(repo.name(7).await, Ok(Some("user 7".into())));
    assert_eq!(repo.name(700).await, Ok(None));
    assert_eq!(repo.name(700).await, Ok(None));
    assert_eq!(queries(), 2, "each once, a hit after");
    assert_eq!(
        cache.get::<String>("name:7").await.as_deref(),
        Some("user 7")
    );
    // A batch reads what the single-key method stored.
    let names = repo.names(vec![7, 8]).await;
    assert_eq!(names.len(), 2);
    assert_eq!(queries(), 3, "one query, for 8 alone");
    assert_eq!(repo.plan("acme").await, "ACME");
    assert_eq!(repo.plan("acme").await, "ACME");
    assert_eq!(queries(), 4);
    assert_eq!(repo.clone().score(3).await, 6);
    assert_eq!(repo.clone().score(3).await, 6);
    assert_eq!(queries(), 5);
    assert_eq!(
        redis_cached::key_of(repo.name(7)).as_deref(),
        Some("name:7")
    );
}
