use redis_cached::redis_cached;

#[redis_cached(key = "user:<nope>", ttl = 0, colour = "red")]
fn get_user(id: u64) -> u64 {
    id
}

fn main() {}
