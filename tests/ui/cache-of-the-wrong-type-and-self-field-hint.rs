use redis_cached::redis_cached;

struct Repo {
    tenant: String,
    cache_url: String,
}

impl Repo {
    #[redis_cached(key = "user:<tenant>:<id>")]
    async fn user(&self, id: u64) -> u64 {
        id
    }

    #[redis_cached(key = "order:<id>", cache = self.cache_url)]
    async fn order(&self, id: u64) -> u64 {
        let _ = &self.tenant;
        id
    }
}

fn main() {}
