use redis_cached::{cache_evict, redis_cached};

#[cache_evict(key = "user:<ids[]>")]
async fn delete(ids: Vec<u64>) -> Result<(), ()> {
    let _ = ids;
    Ok(())
}

#[redis_cached(key = "user:<id>", tags = ["group:<ids[]>"])]
async fn user(id: u64, ids: Vec<u64>) -> u64 {
    let _ = ids;
    id
}

fn main() {}
