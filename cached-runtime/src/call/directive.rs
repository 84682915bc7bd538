//! What one call of a cached function is told to do differently: give its
//! key instead of running, skip the cache, or recompute and store. The
//! public wrappers ([`key_of`], [`invalidate_call`], [`bypass`],
//! [`refresh`]) run the call's future in a task-local scope; the first
//! cached call that future makes takes the directive, so the cached calls
//! its body makes behave as usual.
//!
//! They take the call itself, written as usual, so a key is never typed
//! twice: `invalidate_call(repo.get_user(7))` invalidates exactly the entry
//! `repo.get_user(7)` reads, namespace, version and escaping included.
//!
//! (The examples below need the attribute, so they are compiled and run
//! as part of the `redis-cached` crate's README, not here.)

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Waker};

use crate::engine::store::Inner;
use crate::error::Result;
use crate::observe::site::Site;
use crate::observe::stats::Stats;

/// A directive for the next cached call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Directive {
    /// Record the call's key and cache, and run nothing.
    Capture,
    /// Run the body; read and write nothing.
    Bypass,
    /// Run the body, store its result (unless the key changed meanwhile),
    /// return it: the read is not used.
    Refresh,
}

/// What a captured call would have read (its key, on its cache), and
/// which function it is.
#[derive(Default)]
struct Call {
    entry: Option<(String, Arc<Inner>)>,
    /// A batch call's keys, one per element.
    elements: Vec<String>,
    site: Option<&'static Site>,
}

type Captured = Arc<Mutex<Call>>;

struct Scope {
    directive: Cell<Option<Directive>>,
    captured: Captured,
}

tokio::task_local! {
    static SCOPE: Scope;
}

/// How many directive scopes exist in the process: every cached call asks
/// for a directive, and while there is none (nearly always) the answer
/// costs one load, not a task-local lookup. A scope is counted before its
/// future is first polled, on the thread that polls it, so a call inside
/// it always sees the count.
static SCOPES: AtomicUsize = AtomicUsize::new(0);

/// Counts a scope while it exists.
struct Counted;

impl Counted {
    fn new() -> Self {
        SCOPES.fetch_add(1, Ordering::Relaxed);
        Counted
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        SCOPES.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The directive for this call, if the caller gave one (and none is left
/// for the calls after it).
pub(crate) fn take() -> Option<Directive> {
    if SCOPES.load(Ordering::Relaxed) == 0 {
        return None;
    }
    SCOPE
        .try_with(|scope| scope.directive.take())
        .ok()
        .flatten()
}

/// Whether a directive waits for the next cached call (which will take it).
pub(crate) fn pending() -> bool {
    if SCOPES.load(Ordering::Relaxed) == 0 {
        return false;
    }
    SCOPE
        .try_with(|scope| scope.directive.get().is_some())
        .unwrap_or(false)
}

/// Records what a captured call would have read (its key, on `inner`'s
/// cache; `None` without a cache) and which function it is.
pub(crate) fn capture(entry: Option<(String, &Arc<Inner>)>, site: Option<&'static Site>) {
    let _ = SCOPE.try_with(|scope| {
        *scope
            .captured
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Call {
            entry: entry.map(|(key, inner)| (key, Arc::clone(inner))),
            elements: Vec::new(),
            site,
        };
    });
}

/// Records what a captured batch call would have read: its elements' keys
/// (none without a cache), and which function it is.
pub(crate) fn capture_batch(elements: Vec<String>, site: Option<&'static Site>) {
    let _ = SCOPE.try_with(|scope| {
        *scope
            .captured
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Call {
            entry: None,
            elements,
            site,
        };
    });
}

/// The cache a write (`#[cache_put]`, `#[cache_evict]`) goes to: none
/// under `bypass(…)`, or when no cache is set (`unset` warns).
pub(crate) fn writing_with(
    directive: Option<Directive>,
    inner: Option<&Arc<Inner>>,
    unset: fn(),
) -> Option<&Arc<Inner>> {
    match (directive, inner) {
        (Some(Directive::Bypass), _) => None,
        (_, None) => {
            unset();
            None
        }
        (_, Some(inner)) => Some(inner),
    }
}

fn scope(directive: Directive) -> (Scope, Captured) {
    let captured = Captured::default();
    let scope = Scope {
        directive: Cell::new(Some(directive)),
        captured: Arc::clone(&captured),
    };
    (scope, captured)
}

/// Polls `call` once as a captured call and drops it: its body never runs.
fn captured<F: Future>(call: F) -> Call {
    let _counted = Counted::new();
    let (scope, captured) = scope(Directive::Capture);
    let mut call = std::pin::pin!(call);
    let mut cx = Context::from_waker(Waker::noop());
    SCOPE.sync_scope(scope, || {
        let _ = call.as_mut().poll(&mut cx);
    });
    let taken = std::mem::take(&mut *captured.lock().unwrap_or_else(PoisonError::into_inner));
    taken
}

/// The Redis key (namespace and version included) that this call of a
/// `#[redis_cached]` or `#[cache_put]` function reads or writes, without
/// running it; `None` when it has no cache (no global cache set), or is a
/// batch (one key per element).
///
/// ```ignore
/// use redis_cached::{key_of, redis_cached, Cache};
///
/// #[redis_cached(key = "user:<id>", version = 2, cache = cache)]
/// async fn user(cache: &Cache, id: u64) -> String {
///     format!("user {id}")
/// }
///
/// let cache = Cache::builder("memory://").namespace("shop").build().unwrap();
/// assert_eq!(key_of(user(&cache, 7)).as_deref(), Some("shop:user:7@v2"));
/// ```
pub fn key_of<F: Future>(call: F) -> Option<String> {
    captured(call).entry.map(|(key, _)| key)
}

/// The Redis keys that this call reads, without running it: the one key
/// of [`key_of`], or for a batch function (`<ids[]>`) one key per element,
/// in the order of its elements; empty when it has no cache.
///
/// ```ignore
/// use redis_cached::{keys_of, redis_cached, Cache};
/// use std::collections::HashMap;
///
/// #[redis_cached(key = "user:<ids[]>", cache = cache)]
/// async fn users(cache: &Cache, ids: Vec<u64>) -> HashMap<u64, String> {
///     ids.into_iter().map(|id| (id, format!("user {id}"))).collect()
/// }
///
/// let cache = Cache::in_memory();
/// assert_eq!(keys_of(users(&cache, vec![1, 2])), ["user:1", "user:2"]);
/// ```
pub fn keys_of<F: Future>(call: F) -> Vec<String> {
    let call = captured(call);
    match call.entry {
        Some((key, _)) => vec![key],
        None => call.elements,
    }
}

/// The counters of the cached function that `call` calls, without running
/// it: the same as [`Cache::stats`](crate::Cache::stats), counted for this
/// function alone (on every cache it used); `None` for a `#[cache_evict]`
/// function or a future that is no cached call.
///
/// ```ignore
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use redis_cached::{redis_cached, stats_of, Cache};
///
/// #[redis_cached(key = "n:<id>", cache = cache)]
/// async fn n(cache: &Cache, id: u64) -> u64 { id }
///
/// let cache = Cache::in_memory();
/// n(&cache, 1).await;
/// n(&cache, 1).await;
/// let stats = stats_of(n(&cache, 0)).expect("a cached function");
/// assert_eq!((stats.hits, stats.misses), (1, 1));
/// # }
/// ```
pub fn stats_of<F: Future>(call: F) -> Option<Stats> {
    captured(call).site.map(|site| site.counters().snapshot())
}

/// Invalidates the entry that this call of a `#[redis_cached]` function
/// reads, as [`Cache::invalidate`](crate::Cache::invalidate) does, without
/// running it. Returns `true` when the invalidation was written: the entry
/// is gone now, whether or not there was one (an invalidation writes
/// without reading, so that no fill that read the key before can store
/// over it); `false` when the call has no cache or is a batch, which has
/// no one entry.
///
/// ```ignore
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), redis_cached::Error> {
/// use redis_cached::{invalidate_call, redis_cached, Cache};
///
/// #[redis_cached(key = "team:<name>", cache = cache)]
/// async fn team(cache: &Cache, name: &str) -> Vec<String> {
///     vec![name.to_uppercase()]
/// }
///
/// let cache = Cache::in_memory();
/// team(&cache, "red team").await;                         // stored as team:red%20team
/// assert!(invalidate_call(team(&cache, "red team")).await?);
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// As [`Cache::invalidate`](crate::Cache::invalidate).
pub async fn invalidate_call<F: Future>(call: F) -> Result<bool> {
    let Some((key, inner)) = captured(call).entry else {
        return Ok(false);
    };
    inner.tombstone(&key).await?;
    Ok(true)
}

/// Runs this call of a cached function without the cache: its body runs,
/// nothing is read or written, and no other caller shares it. Cached calls
/// its body makes use the cache as usual.
///
/// ```ignore
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use redis_cached::{bypass, redis_cached, Cache};
///
/// #[redis_cached(key = "n:<id>", cache = cache)]
/// async fn n(cache: &Cache, id: u64) -> u64 { id }
///
/// let cache = Cache::in_memory();
/// assert_eq!(bypass(n(&cache, 1)).await, 1);
/// assert_eq!(cache.stats().writes, 0);
/// # }
/// ```
pub async fn bypass<F: Future>(call: F) -> F::Output {
    let _counted = Counted::new();
    let (scope, _) = scope(Directive::Bypass);
    SCOPE.scope(scope, call).await
}

/// Runs this call of a cached function's body now, whatever the cache
/// holds, and stores the result as a miss would (so not over an
/// invalidation or a write that lands while it runs); returns it.
///
/// ```ignore
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use redis_cached::{redis_cached, refresh, Cache};
///
/// static VERSION: AtomicU64 = AtomicU64::new(1);
///
/// #[redis_cached(key = "config", cache = cache)]
/// async fn config(cache: &Cache) -> u64 { VERSION.load(Ordering::SeqCst) }
///
/// let cache = Cache::in_memory();
/// assert_eq!(config(&cache).await, 1);
/// VERSION.store(2, Ordering::SeqCst);
/// assert_eq!(config(&cache).await, 1);            // cached
/// assert_eq!(refresh(config(&cache)).await, 2);   // recomputed and stored
/// assert_eq!(config(&cache).await, 2);
/// # }
/// ```
pub async fn refresh<F: Future>(call: F) -> F::Output {
    let _counted = Counted::new();
    let (scope, _) = scope(Directive::Refresh);
    SCOPE.scope(scope, call).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directive_is_taken_once() {
        let _counted = Counted::new();
        let (scope, _) = scope(Directive::Bypass);
        SCOPE.sync_scope(scope, || {
            assert_eq!(take(), Some(Directive::Bypass));
            assert_eq!(take(), None, "the calls after the first behave as usual");
        });
        assert_eq!(take(), None);
    }
}
