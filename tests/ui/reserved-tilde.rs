use redis_cached::redis_cached;

// `~` marks the runtime's own keys (locks, tag bookkeeping, shortened keys).
#[redis_cached(key = "user~<id>")]
async fn get(id: u64) -> u64 {
    id
}

fn main() {}
