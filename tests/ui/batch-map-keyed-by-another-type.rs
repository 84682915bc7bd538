use std::collections::HashMap;

use redis_cached::redis_cached;

#[redis_cached(key = "user:<ids[]>")]
async fn users(ids: Vec<u64>) -> Result<HashMap<String, String>, ()> {
    Ok(ids.iter().map(|id| (id.to_string(), String::new())).collect())
}

#[redis_cached(key = "name:<ids[]>")]
async fn names(ids: Vec<u64>) -> Vec<String> {
    ids.iter().map(u64::to_string).collect()
}

fn main() {}
