//! `stale` with `&self` and borrowed arguments: what the body may hold
//! (nested items and `use` with their own `self`, a raw identifier, a
//! `&'static str`, an argument only the key reads).
use redis_cached::{redis_cached, Cache};

#[derive(Clone)]
struct Repo {
    cache: Cache,
    base: u64,
}

fn needs_static(s: &'static str) -> usize {
    s.len()
}

impl Repo {
    #[redis_cached(key = "row:<id>:<sku>", stale = "5m", cache = self.cache)]
    async fn row(&self, id: u64, r#type: &str, kind: &'static str, sku: &str, ids: &[u64]) -> String {
        use std::fmt::{self, Write};
        struct R(u64);
        impl fmt::Display for R {
            fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
        let mut out = String::new();
        let _ = write!(out, "{}{}{}{}", R(id + self.base), r#type, needs_static(kind), ids.len());
        out
    }
}

fn main() {}
