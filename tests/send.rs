//! A cached function's future is `Send` whenever the plain function's is,
//! whatever its error type: the runtime never holds a whole result (with
//! its error) across an `.await`. Checked at compile time, for every
//! attribute and option.

use std::error::Error;
use std::rc::Rc;
use std::sync::Arc;

use redis_cached::{cache_evict, cache_put, redis_cached, Cache};

type BoxError = Box<dyn Error>;

fn assert_send<F: std::future::Future + Send>(_: &F) {}

struct Repo {
    cache: Cache,
}

impl Repo {
    #[redis_cached(key = "plain:<id>", cache = self.cache)]
    async fn plain(&self, id: u64) -> Result<u64, BoxError> {
        tokio::task::yield_now().await;
        Ok(id)
    }

    #[redis_cached(key = "rc:<id>", cache = self.cache)]
    async fn rc_error(&self, id: u64) -> Result<u64, Rc<str>> {
        tokio::task::yield_now().await;
        Ok(id)
    }

    #[redis_cached(key = "lock:<id>", lock = true, cache = self.cache)]
    async fn locked(&self, id: u64) -> Result<u64, BoxError> {
        tokio::task::yield_now().await;
        Ok(id)
    }

    #[redis_cached(key = "none:<id>", cache_none = "1m", version = 2, tags = ["t:<id>"], ttl = "1h", cache = self.cache)]
    async fn optional(&self, id: u64) -> Result<Option<u64>, BoxError> {
        tokio::task::yield_now().await;
        Ok(Some(id))
    }

    #[redis_cached(key = "stale:<id>", stale = "1m", cache = self.cache)]
    async fn stale(self: Arc<Self>, id: u64) -> Result<u64, BoxError> {
        tokio::task::yield_now().await;
        Ok(id)
    }

    #[redis_cached(key = "early:<id>", early = 1.0, lock = true, cache = self.cache)]
    async fn early(self: Arc<Self>, id: u64) -> Result<u64, BoxError> {
        tokio::task::yield_now().await;
        Ok(id)
    }

    #[redis_cached(key = "near:<id>", near = "30s", lock = true, cache = self.cache)]
    async fn near(&self, id: u64) -> Result<Option<u64>, Rc<str>> {
        tokio::task::yield_now().await;
        Ok(Some(id))
    }

    #[redis_cached(key = "near-stale:<id>", near = "30s", stale = "1m", cache = self.cache)]
    async fn near_stale(self: Arc<Self>, id: u64) -> Result<u64, BoxError> {
        tokio::task::yield_now().await;
        Ok(id)
    }

    #[cache_put(key = "plain:<id>", cache = self.cache)]
    async fn put(&self, id: u64) -> Result<u64, BoxError> {
        tokio::task::yield_now().await;
        Ok(id)
    }

    #[cache_evict(key = "plain:<id>", cache = self.cache)]
    async fn evict(&self, id: u64) -> Result<(), BoxError> {
        let _ = id;
        tokio::task::yield_now().await;
        Ok(())
    }
}

#[redis_cached(key = "free:<id>")]
async fn free(id: u64) -> Result<u64, BoxError> {
    tokio::task::yield_now().await;
    Ok(id)
}

#[test]
fn every_option_keeps_the_future_send() {
    let repo = Arc::new(Repo {
        cache: Cache::in_memory(),
    });
    assert_send(&repo.plain(1));
    assert_send(&repo.rc_error(1));
    assert_send(&repo.locked(1));
    assert_send(&repo.optional(1));
    assert_send(&repo.clone().stale(1));
    assert_send(&repo.clone().early(1));
    assert_send(&repo.near(1));
    assert_send(&repo.clone().near_stale(1));
    assert_send(&repo.put(1));
    assert_send(&repo.evict(1));
    assert_send(&free(1));
}

#[tokio::test]
async fn and_they_run() {
    let repo = Arc::new(Repo {
        cache: Cache::in_memory(),
    });
    assert_eq!(repo.plain(1).await.ok(), Some(1));
    assert_eq!(repo.plain(1).await.ok(), Some(1));
    assert_eq!(repo.optional(2).await.ok(), Some(Some(2)));
    assert_eq!(repo.clone().stale(3).await.ok(), Some(3));
    assert_eq!(repo.put(1).await.ok(), Some(1));
    assert!(repo.evict(1).await.is_ok());
    assert_eq!(repo.cache.stats().hits, 1);
}
