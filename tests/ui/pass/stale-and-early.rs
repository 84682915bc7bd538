use std::sync::Arc;

use redis_cached::{redis_cached, Cache};

struct Repo {
    cache: Cache,
}

impl Repo {
    #[redis_cached(key = "user:<id>", ttl = "1m", stale = "5m", cache = self.cache)]
    async fn get_user(self: Arc<Self>, id: u64) -> Result<Option<String>, String> {
        Ok(Some(id.to_string()))
    }

    #[redis_cached(key = "score:<id>", ttl = "1m", early = 0.5, lock = true, cache = self.cache)]
    async fn score(self: Arc<Self>, id: u64) -> u64 {
        id
    }
}

fn main() {
    let repo = Arc::new(Repo { cache: Cache::in_memory() });
    let _ = (repo.clone().get_user(1), repo.score(2));
}
