use redis_cached::redis_cached;

#[redis_cached(key = "user:<id>", cache_none = "60s")]
async fn get_user(id: u64) -> Result<u64, String> {
    Ok(id)
}

fn main() {}
