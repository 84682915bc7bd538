use std::collections::HashMap;

use redis_cached::redis_cached;

#[redis_cached(key = "pair:<a[]>:<b[]>")]
async fn pairs(a: Vec<u64>, b: Vec<u64>) -> HashMap<u64, u64> {
    a.into_iter().zip(b).collect()
}

fn main() {}
