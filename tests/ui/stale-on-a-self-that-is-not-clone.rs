use redis_cached::redis_cached;

struct Repo {
    pool: u32,
}

impl Repo {
    #[redis_cached(key = "user:<id>", stale = "5m")]
    async fn user(&self, id: u64) -> String {
        format!("{}/{id}", self.pool)
    }
}

fn main() {}
