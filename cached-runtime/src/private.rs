//! What generated code calls. Not a stable API: reached only through
//! `redis_cached::__private`, by code the attributes write.

use std::borrow::Borrow;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use crate::key::KeyBuilder;
pub use crate::lock::LockPolicy;
use crate::shape::Stored;
pub use crate::shape::{OptionOf, Plain, ResultOf, ResultOptionOf, Shape};
use crate::{global, Cache};

/// The per-function settings of a cached function.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    /// TTL of stored values; `None`: the cache's default.
    pub ttl: Option<Duration>,
    /// TTL of a stored absence; `None`: absences are not stored.
    pub cache_none: Option<Duration>,
    /// The cross-process lock, for `lock = true`.
    pub lock: Option<LockPolicy>,
    /// How long a value is served stale after its TTL while it is refreshed.
    pub stale: Option<Duration>,
    /// The XFetch beta of early refresh.
    pub early: Option<f64>,
}

/// The cache one call uses, held for the call: borrowed where the
/// attribute can prove the borrow outlives the call, owned otherwise.
/// Borrowing spares each call an atomic reference-count update that all
/// threads would contend for.
#[derive(Debug)]
pub enum CacheHold<'a> {
    /// `cache = self.field` with a `&self` receiver, or a `&Cache` parameter.
    Borrowed(&'a Cache),
    /// Any other `cache = …` expression, evaluated and cloned.
    Owned(Cache),
    /// The global cache, if set.
    Global(Option<Arc<Cache>>),
}

impl CacheHold<'_> {
    /// The cache, if there is one.
    pub fn get(&self) -> Option<&Cache> {
        match self {
            CacheHold::Borrowed(cache) => Some(cache),
            CacheHold::Owned(cache) => Some(cache),
            CacheHold::Global(cache) => cache.as_deref(),
        }
    }
}

/// Borrows the cache of a `cache = …` argument: anything that borrows as a
/// `Cache` (`Cache`, `&Cache`, `Arc<Cache>`).
pub fn cache_ref<C: Borrow<Cache> + ?Sized>(cache: &C) -> CacheHold<'_> {
    CacheHold::Borrowed(cache.borrow())
}

/// Clones the cache of a `cache = …` argument.
pub fn cache_of<C: Borrow<Cache> + ?Sized>(cache: &C) -> CacheHold<'static> {
    CacheHold::Owned(cache.borrow().clone())
}

/// The global cache, for attributes without `cache = …`.
pub fn global_cache() -> CacheHold<'static> {
    CacheHold::Global(global::global_shared())
}

/// The body of a `#[redis_cached]` function. (An `async` block rather
/// than an `async fn`, which would keep its arguments twice in its state;
/// see `Cache::fill`.)
#[allow(clippy::manual_async_fn)] // deliberate: see `Cache::fill`
pub fn cached<'a, S, R, Fut>(
    cache: Option<&'a Cache>,
    key: String,
    tags: &'a [String],
    policy: Policy,
    body: Fut,
) -> impl Future<Output = R> + 'a
where
    S: Shape<R> + 'a,
    R: 'a,
    Fut: Future<Output = R> + 'a,
{
    async move {
        let Some(cache) = cache else {
            global::warn_unset();
            return body.await;
        };
        let key = cache.full_key(key);
        cache.fill::<S, R, _, _>(key, tags, &policy, || body).await
    }
}

/// The body of a `#[redis_cached]` function with `stale` or `early`: its
/// body may run as a background refresh, so it must be `Send + 'static`.
pub async fn cached_refreshing<S, R, Fut>(
    cache: Option<&Cache>,
    key: String,
    tags: &[String],
    policy: Policy,
    body: Fut,
) -> R
where
    S: Shape<R> + 'static,
    R: Send + 'static,
    Fut: Future<Output = R> + Send + 'static,
{
    let Some(cache) = cache else {
        global::warn_unset();
        return body.await;
    };
    let key = cache.full_key(key);
    cache
        .fill_refreshing::<S, R, Fut>(key, tags, policy, body)
        .await
}

/// The body of a `#[cache_put]` function: run it, then write its value.
pub async fn put<S, R, Fut>(cache: Option<&Cache>, key: String, policy: Policy, body: Fut) -> R
where
    S: Shape<R>,
    Fut: Future<Output = R>,
{
    let result = body.await;
    let Some(cache) = cache else {
        global::warn_unset();
        return result;
    };
    let key = cache.full_key(key);
    // A write-through is the newest state: it overwrites whatever is there.
    // A `None` that may not be cached, or a value that cannot be encoded,
    // leaves the old value wrong: invalidate it instead.
    // Failures are counted inside; the caller gets its value anyway.
    let _ = match cache.encode_result::<S, R>(&result, &policy, Duration::ZERO) {
        Some((entry, Some(ttl))) => cache.store(&key, entry, ttl).await,
        Some((_, None)) => cache.tombstone(&key).await,
        None if matches!(S::view(&result), Stored::Skip) => return result,
        None => cache.tombstone(&key).await,
    };
    result
}

/// The body of a `#[cache_evict]` function: run it, then delete the key if
/// it succeeded.
pub async fn evict<R, Fut>(
    cache: Option<&Cache>,
    key: String,
    succeeded: fn(&R) -> bool,
    body: Fut,
) -> R
where
    Fut: Future<Output = R>,
{
    let result = body.await;
    let Some(cache) = cache else {
        global::warn_unset();
        return result;
    };
    if succeeded(&result) {
        let key = cache.full_key(key);
        // Failures are counted inside; the caller gets its value anyway.
        let _ = cache.tombstone(&key).await;
    }
    result
}

/// `true` for any result: functions that do not return a `Result` always
/// succeed.
pub fn always<R>(_: &R) -> bool {
    true
}

/// Whether a `Result` is `Ok`.
pub fn is_ok<T, E>(result: &Result<T, E>) -> bool {
    result.is_ok()
}

/// Decodes `bytes` as stored entries of a few types, for the fuzz targets;
/// returns how many decoded.
pub fn fuzz_decode(bytes: &[u8]) -> usize {
    use crate::codec::Codec;
    let ok = [
        Codec::Json.decode::<u64>(bytes).is_ok(),
        Codec::Json.decode::<String>(bytes).is_ok(),
        Codec::Json.decode::<Vec<Option<i32>>>(bytes).is_ok(),
        Codec::Json
            .decode::<std::collections::BTreeMap<String, (bool, f64)>>(bytes)
            .is_ok(),
    ];
    ok.iter().filter(|ok| **ok).count()
}
