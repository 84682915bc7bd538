use redis_cached::redis_cached;

#[redis_cached(key = "user")]
struct User;

fn main() {}
