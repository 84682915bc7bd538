use std::collections::HashMap;

use redis_cached::redis_cached;

#[redis_cached(key = "user:<ids[]>", near = "30s")]
async fn users(ids: Vec<u64>) -> HashMap<u64, String> {
    ids.into_iter().map(|id| (id, id.to_string())).collect()
}

fn main() {}
