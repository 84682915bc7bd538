use redis_cached::redis_cached;

struct Repo;

impl Repo {
    // `&self` and `name: &str` are cloned for a refresh; `&mut` and
    // borrowed patterns cannot be.
    #[redis_cached(key = "user:<id>", stale = "5m")]
    async fn get_user(&mut self, id: u64, name: &mut String, (a, b): &(u8, u8)) -> u64 {
        let _ = (name, a, b);
        id
    }
}

fn main() {}
