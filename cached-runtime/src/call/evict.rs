//! Eviction: a `#[cache_evict]` call runs its body, then, if it
//! succeeded, invalidates its key and every key of its tags.

use std::future::Future;
use std::sync::Arc;

use tracing::Span;

use crate::call::directive::{self, Directive};
use crate::engine::store::Inner;
use crate::observe::redis_time::InSpan;
use crate::observe::site::Site;

/// A `#[cache_evict]` call: run the body, then, if it succeeded,
/// invalidate the key (if it names one) and every key of the tags. Only the
/// successful part of the result is held across the invalidations, so an
/// error type need not be `Send`.
pub(crate) async fn evict<R, Fut>(
    inner: Option<&Arc<Inner>>,
    unset: fn(),
    site: &'static Site,
    key: Option<String>,
    tags: &[String],
    succeeded: impl Success<R>,
    body: Fut,
) -> R
where
    Fut: Future<Output = R>,
{
    let directive = directive::take();
    if directive == Some(Directive::Capture) {
        // An eviction reads nothing: its key is the entry it deletes.
        if let (Some(inner), Some(key)) = (inner, key) {
            directive::capture(Some((inner.full_key(key), inner)), None);
        }
        return std::future::pending().await;
    }
    let span = tracing::debug_span!(
        target: "redis_cached",
        "cache_evict",
        function = site.name(),
        outcome = tracing::field::Empty,
        evicted = tracing::field::Empty,
        redis_ms = tracing::field::Empty,
        key = tracing::field::Empty,
    );
    let inner = directive::writing_with(directive, inner, unset);
    let evict = invalidate_after(inner, key, tags, succeeded, body, span.clone());
    InSpan::new(span, evict).await
}

/// [`evict`] once its span is open; `inner` is `None` when it runs
/// uncached.
async fn invalidate_after<R, Fut>(
    inner: Option<&Arc<Inner>>,
    key: Option<String>,
    tags: &[String],
    succeeded: impl Success<R>,
    body: Fut,
    span: Span,
) -> R
where
    Fut: Future<Output = R>,
{
    let Some(inner) = inner else {
        span.record("outcome", "uncached");
        return body.await;
    };
    let key = key.map(|key| inner.full_key(key));
    if let Some(key) = &key {
        inner.record_key(&span, key);
    }
    let kept = match succeeded.split(body.await) {
        Ok(kept) => kept,
        Err(failed) => {
            span.record("outcome", "skipped");
            return failed;
        }
    };
    // Failures are counted inside; the caller gets its value anyway.
    let mut evicted = 0;
    let mut failed = false;
    if let Some(key) = key {
        match inner.tombstone(&key).await {
            Ok(()) => evicted += 1,
            Err(_) => failed = true,
        }
    }
    for tag in tags {
        match inner.invalidate_tag(tag).await {
            Ok(keys) => evicted += keys,
            Err(err) => {
                failed = true;
                tracing::warn!(target: "redis_cached", error = %err, "a tag's eviction failed; its keys live until their TTL");
            }
        }
    }
    span.record("evicted", evicted);
    span.record("outcome", if failed { "failed" } else { "evicted" });
    succeeded.rebuild(kept)
}

/// Which results of a `#[cache_evict]` function count as success.
pub trait Success<R>: Copy {
    /// The part of a successful result kept while the key is deleted.
    type Kept;
    /// The successful part, or the whole result back if it failed.
    fn split(self, result: R) -> Result<Self::Kept, R>;
    /// The result again.
    fn rebuild(self, kept: Self::Kept) -> R;
}

/// Any result is a success: for functions that do not return a `Result`.
#[derive(Debug, Clone, Copy)]
pub struct Always;

impl<R> Success<R> for Always {
    type Kept = R;
    fn split(self, result: R) -> Result<R, R> {
        Ok(result)
    }
    fn rebuild(self, kept: R) -> R {
        kept
    }
}

/// `Ok` is a success.
#[derive(Debug, Clone, Copy)]
pub struct IsOk;

impl<T, E> Success<Result<T, E>> for IsOk {
    type Kept = T;
    fn split(self, result: Result<T, E>) -> Result<T, Result<T, E>> {
        match result {
            Ok(value) => Ok(value),
            failed => Err(failed),
        }
    }
    fn rebuild(self, kept: T) -> Result<T, E> {
        Ok(kept)
    }
}

/// `#[cache_evict]` on a function that does not return a `Result`.
#[allow(non_upper_case_globals)] // named like the function it replaced
pub const always: Always = Always;

/// `#[cache_evict]` on a function that returns a `Result`.
#[allow(non_upper_case_globals)] // named like the function it replaced
pub const is_ok: IsOk = IsOk;
