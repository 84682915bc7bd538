//! `crate = "my_cache"`: the attributes through a renamed dependency.

use my_cache::{cache_evict, cache_put, redis_cached, Cache, CacheKey};

/// A derived key through the renamed dependency.
#[derive(CacheKey)]
#[cache_key(crate = "my_cache")]
pub struct Cell(pub u32, pub u32);

/// Sums a cell, cached.
#[redis_cached(key = "cell:<cell>", crate = "my_cache", cache = cache)]
pub async fn sum(cache: &Cache, cell: Cell) -> u32 {
    cell.0 + cell.1
}

/// Doubles `n`, cached.
#[redis_cached(key = "double:<n>", crate = "my_cache", cache = cache)]
pub async fn double(cache: &Cache, n: u32) -> u32 {
    n * 2
}

/// Writes `n` through.
#[cache_put(key = "double:<n>", crate = "my_cache", cache = cache)]
pub async fn put(cache: &Cache, n: u32) -> u32 {
    n * 2
}

/// Evicts `n`.
#[cache_evict(key = "double:<n>", crate = "my_cache", cache = cache)]
pub async fn evict(cache: &Cache, n: u32) -> Result<(), ()> {
    let _ = n;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn renamed_dependency_works() {
        let cache = Cache::in_memory();
        assert_eq!(put(&cache, 4).await, 8);
        assert_eq!(cache.get::<u32>("double:4").await, Some(8));
        assert_eq!(double(&cache, 4).await, 8);
        assert_eq!(cache.stats().hits, 2);
        evict(&cache, 4).await.unwrap();
        assert_eq!(cache.get::<u32>("double:4").await, None);
        assert_eq!(sum(&cache, Cell(1, 2)).await, 3);
        assert_eq!(cache.get::<u32>("cell:%[%,1%,2%]").await, Some(3));
    }
}
