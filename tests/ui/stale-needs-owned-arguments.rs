use redis_cached::redis_cached;

struct Repo;

impl Repo {
    #[redis_cached(key = "user:<id>", stale = "5m")]
    async fn get_user(&self, id: u64, name: &str) -> u64 {
        let _ = name;
        id
    }
}

fn main() {}
