//! The process-wide cache used by attributes that name no `cache = …`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwapOption;

use crate::cache::Cache;

/// Read on every call of a cached function: an `ArcSwap` load takes no lock.
static GLOBAL: ArcSwapOption<Cache> = ArcSwapOption::const_empty();
static WARNED: AtomicBool = AtomicBool::new(false);

/// Sets the cache that `#[redis_cached]` functions use when they name no
/// `cache = …`. Calling it again replaces the previous one.
///
/// ```
/// # extern crate cached_runtime as redis_cached;
/// redis_cached::set_global(redis_cached::Cache::in_memory());
/// ```
pub fn set_global(cache: Cache) {
    GLOBAL.store(Some(Arc::new(cache)));
}

/// The global cache, if one was set.
pub fn global() -> Option<Cache> {
    GLOBAL.load_full().map(|cache| Cache::clone(&cache))
}

/// The global cache, shared rather than cloned.
pub(crate) fn global_shared() -> Option<Arc<Cache>> {
    GLOBAL.load_full()
}

/// Says, once per process, that cached functions run uncached: as a
/// warning, and on standard error too, since a service that forgot
/// `set_global` may have no log subscriber to show the warning.
pub(crate) fn warn_unset() {
    if !WARNED.swap(true, Ordering::Relaxed) {
        const MESSAGE: &str = "a cached function ran with no cache: call \
            redis_cached::set_global(…) at start-up or pass `cache = …`; \
            running uncached";
        tracing::warn!(target: "redis_cached", "{MESSAGE}");
        eprintln!("redis_cached: {MESSAGE}");
    }
}
