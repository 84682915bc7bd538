use redis_cached::redis_cached;

#[redis_cached(key = "user:<idd>")]
async fn get_user(id: u64, name: String) -> u64 {
    let _ = name;
    id
}

fn main() {}
