use std::fmt::Display;

use redis_cached::redis_cached;

struct Repo;

impl Repo {
    // `&self` and `name: &T` are cloned for a refresh; `&mut`, `mut`,
    // borrowed patterns, `impl`, `dyn` and borrowed contents cannot be.
    #[redis_cached(key = "user:<id>", stale = "5m")]
    async fn get_user(
        &mut self,
        id: u64,
        name: &mut String,
        (a, b): &(u8, u8),
        mut c: &str,
        d: &impl Display,
        e: &[&str],
    ) -> u64 {
        let _ = (name, a, b, &mut c, d, e);
        id
    }
}

fn main() {}
