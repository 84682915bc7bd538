use redis_cached::redis_cached;

#[redis_cached(key = "user:<id>", expire = 60)]
async fn get_user(id: u64) -> u64 {
    id
}

fn main() {}
