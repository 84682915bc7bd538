use redis_cached::redis_cached;

#[redis_cached(key = "user:<id>", lock_ttl = "10s")]
async fn get_user(id: u64) -> u64 {
    id
}

fn main() {}
