use redis_cached::redis_cached;

const TTL_TEXT: &str = "1h";

#[redis_cached(key = "user:<id>", ttl = TTL_TEXT)]
async fn user(id: u64) -> u64 {
    id
}

fn main() {}
