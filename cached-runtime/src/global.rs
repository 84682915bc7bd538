//! The process-wide cache used by attributes that name no `cache = …`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{PoisonError, RwLock};

use crate::cache::Cache;

static GLOBAL: RwLock<Option<Cache>> = RwLock::new(None);
static WARNED: AtomicBool = AtomicBool::new(false);

/// Sets the cache that `#[redis_cached]` functions use when they name no
/// `cache = …`. Calling it again replaces the previous one.
///
/// ```
/// cached_runtime::set_global(cached_runtime::Cache::in_memory());
/// ```
pub fn set_global(cache: Cache) {
    *GLOBAL.write().unwrap_or_else(PoisonError::into_inner) = Some(cache);
}

/// The global cache, if one was set.
pub fn global() -> Option<Cache> {
    GLOBAL
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// Logs, once per process, that cached functions run uncached.
pub(crate) fn warn_unset() {
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "a cached function ran with no cache: call redis_cached::set_global(…) \
             or pass `cache = …`; running uncached"
        );
    }
}
