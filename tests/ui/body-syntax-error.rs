use redis_cached::redis_cached;

// A syntax error in the body is rustc's to report, at the bad token: the
// attribute keeps the body as tokens and never parses it.
#[redis_cached(key = "user:<id>")]
async fn get(id: u64) -> u64 {
    let doubled = id * ;
    doubled
}

fn main() {}
