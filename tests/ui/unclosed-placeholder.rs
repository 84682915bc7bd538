use redis_cached::redis_cached;

#[redis_cached(key = "user:<id")]
async fn get_user(id: u64) -> u64 {
    id
}

fn main() {}
