use std::future::Future;

use redis_cached::redis_cached;

#[redis_cached(key = "order:<id>")]
fn order(id: u64) -> impl Future<Output = u64> {
    async move { id }
}

fn main() {}
