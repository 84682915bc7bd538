use std::fmt::Display;

use redis_cached::{redis_cached, CacheKey};

#[redis_cached(key = "g:<id>:<label>:<tag>", ttl = "1h30m")]
async fn generic<'a, K>(id: K, label: &'a str, tag: impl CacheKey + Display) -> String
where
    K: CacheKey + Display + Send,
{
    format!("{id}{label}{tag}")
}

fn main() {
    let _ = generic(1u8, "a", 2u32);
}
