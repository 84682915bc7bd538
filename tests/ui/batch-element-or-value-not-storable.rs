use std::collections::HashMap;

use redis_cached::redis_cached;

#[derive(Clone, PartialEq, Eq, Hash)]
struct NoKey(u64);

struct NoSerialize;

#[redis_cached(key = "k:<ids[]>")]
async fn by_unkeyed(ids: Vec<NoKey>) -> HashMap<NoKey, u64> {
    ids.into_iter().map(|id| (id.clone(), id.0)).collect()
}

#[redis_cached(key = "v:<ids[]>")]
async fn unserializable(ids: Vec<u64>) -> HashMap<u64, NoSerialize> {
    ids.into_iter().map(|id| (id, NoSerialize)).collect()
}

fn main() {}
