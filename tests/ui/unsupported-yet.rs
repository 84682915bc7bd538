use redis_cached::redis_cached;

#[redis_cached(key = "user:<id>", stale = "5m", early = 1.0)]
async fn get_user(id: u64) -> u64 {
    id
}

fn main() {}
