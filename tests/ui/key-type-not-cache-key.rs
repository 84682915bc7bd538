use redis_cached::redis_cached;

struct Filter {
    active: bool,
}

#[redis_cached(key = "users:<filter>")]
async fn list_users(filter: Filter) -> Vec<u64> {
    let _ = filter.active;
    Vec::new()
}

fn main() {}
