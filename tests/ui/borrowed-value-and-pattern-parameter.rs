use redis_cached::redis_cached;

#[redis_cached(key = "name:<id>")]
async fn name<'a>(id: u64, names: &'a [String]) -> Result<&'a str, String> {
    names.get(id as usize).map(String::as_str).ok_or_else(String::new)
}

#[redis_cached(key = "p:<a>")]
async fn pair((a, b): (u32, u32)) -> u32 {
    a + b
}

fn main() {}
