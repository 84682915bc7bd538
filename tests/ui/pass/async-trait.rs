// Cached methods of an `#[async_trait]` impl: the attribute sees what
// `#[async_trait]` made of them and caches the `async fn` they were.
use std::sync::Arc;

use async_trait::async_trait;
use redis_cached::redis_cached;

#[async_trait]
pub trait Users: Send + Sync {
    async fn user(&self, id: u64) -> String;
    async fn team(self: Arc<Self>, id: u64) -> Option<u64>;
}

pub struct Repo;

#[async_trait]
impl Users for Repo {
    #[redis_cached(key = "user:<id>", lock = true)]
    async fn user(&self, id: u64) -> String {
        format!("user {id}")
    }

    #[redis_cached(key = "team:<id>", cache_none = "1m")]
    async fn team(self: Arc<Self>, id: u64) -> Option<u64> {
        Some(id)
    }
}

fn main() {
    let _repo: Arc<dyn Users> = Arc::new(Repo);
}
