use std::collections::HashMap;

use redis_cached::redis_cached;

#[redis_cached(key = "user:<id[]>")]
async fn users(id: u64) -> HashMap<u64, String> {
    HashMap::from([(id, String::new())])
}

fn main() {}
