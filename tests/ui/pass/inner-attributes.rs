// The body's inner attributes keep their meaning: without the
// `allow(unused_variables)`, `deny(warnings)` would fail the build.
#![deny(warnings)]

use redis_cached::redis_cached;

#[redis_cached(key = "user:<id>")]
async fn get(id: u64) -> u64 {
    #![allow(unused_variables)]
    #![deny(unreachable_code)]
    let unused = 1;
    id
}

fn main() {
    let _ = get(1);
}
