use redis_cached::redis_cached;

struct User {
    id: u64,
}

#[redis_cached(key = "user:<id>")]
async fn get_user(id: u64) -> Option<User> {
    Some(User { id })
}

fn main() {}
