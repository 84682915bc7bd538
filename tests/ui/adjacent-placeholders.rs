use redis_cached::redis_cached;

#[redis_cached(key = "user:<a><b>")]
async fn get_user(a: u64, b: u64) -> u64 {
    a + b
}

fn main() {}
