//! Generated code uses absolute paths only: it compiles next to a local
//! `mod core` (which would capture a relative `core::…`) and under
//! `deny(unused_qualifications)`.

#![deny(unused_qualifications)]
#![allow(dead_code)]

mod core {}
mod std {}

use redis_cached::{cache_evict, cache_put, redis_cached, Cache};

struct Repo {
    cache: Cache,
}

impl Repo {
    #[redis_cached(key = "h:<id>", ttl = "1m", cache_none = "5s", version = 1, cache = self.cache)]
    async fn get(&self, id: u64) -> Result<Option<u64>, ::std::string::String> {
        Ok(Some(id))
    }

    #[cache_put(key = "h:<id>", version = 1, cache = self.cache)]
    async fn put(&self, id: u64) -> Option<u64> {
        Some(id)
    }

    #[cache_evict(key = "h:<id>", version = 1, cache = self.cache)]
    async fn evict(&self, id: u64) {
        let _ = id;
    }

    #[redis_cached(cache = self.cache)]
    async fn default_key(&self, a: u8, b: u8) -> u16 {
        u16::from(a) + u16::from(b)
    }
}

#[test]
fn expands_with_shadowed_core_and_std() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let repo = Repo {
            cache: Cache::in_memory(),
        };
        assert_eq!(repo.put(3).await, Some(3));
        assert_eq!(repo.get(3).await, Ok(Some(3)));
        assert_eq!(repo.cache.stats().hits, 1);
        repo.evict(3).await;
        assert_eq!(repo.default_key(1, 2).await, 3);
    });
}
