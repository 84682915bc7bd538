use std::sync::Arc;

use redis_cached::{cache_evict, cache_put, redis_cached, Cache};

trait Repo {
    async fn load(&self, id: u64) -> Result<Option<String>, std::io::Error>;
}

struct Pg {
    cache: Cache,
    tenant: u32,
}

impl Repo for Pg {
    /// Docs and attributes stay on the function.
    #[redis_cached(key = "t:<self.tenant>:<id>", cache_none = "30s", cache = self.cache)]
    #[allow(clippy::needless_question_mark)]
    async fn load(&self, id: u64) -> Result<Option<String>, std::io::Error> {
        Ok(Some(id.to_string()))
    }
}

impl Pg {
    #[redis_cached(key = "arc:<id>", cache = self.cache.clone())]
    async fn owned(self: Arc<Self>, id: u64) -> u64 {
        id + u64::from(self.tenant)
    }

    #[cache_put(key = "t:<self.tenant>:<id>", cache = self.cache)]
    async fn save(&self, id: u64) -> Result<Option<String>, std::io::Error> {
        Ok(Some(id.to_string()))
    }

    #[cache_evict(key = "t:<self.tenant>:<id>", cache = self.cache)]
    async fn remove(&self, id: u64) -> Result<(), std::io::Error> {
        let _ = id;
        Ok(())
    }
}

#[redis_cached(key = "tuple:<pair.0>:<pair.1>")]
async fn tuple(pair: (u32, String)) -> u32 {
    pair.0
}

fn main() {
    let _ = tuple((1, String::new()));
}
