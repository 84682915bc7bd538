use std::collections::HashMap;

use redis_cached::redis_cached;

#[redis_cached(key = "user:<ids[]>", lock = true)]
async fn users(ids: Vec<u64>) -> HashMap<u64, String> {
    ids.into_iter().map(|id| (id, String::new())).collect()
}

#[redis_cached(key = "user:<ids[]>", stale = "1m")]
async fn stale_users(ids: Vec<u64>) -> HashMap<u64, String> {
    ids.into_iter().map(|id| (id, String::new())).collect()
}

fn main() {}
