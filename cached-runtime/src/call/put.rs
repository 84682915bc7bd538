//! Write-through: a `#[cache_put]` call runs its body, then writes the
//! value it returned, the newest state of the key.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Span;

use crate::call::directive::{self, Directive};
use crate::encoding::shape::{Shape, Split};
use crate::engine::policy::Policy;
use crate::engine::store::Inner;
use crate::observe::redis_time::InSpan;
use crate::observe::site::Site;

/// A `#[cache_put]` call: run the body, then write its value; `unset`
/// warns that no cache is set.
///
/// A write-through is the newest state: it overwrites whatever is there.
/// When it cannot (a `None` that may not be cached, a value that cannot be
/// encoded or is over `max_value_bytes`, Redis failing), the old value
/// would be wrong: the key is invalidated instead.
pub(crate) async fn put<S, R, Fut>(
    inner: Option<&Arc<Inner>>,
    unset: fn(),
    key: String,
    tags: &[String],
    policy: Policy,
    body: Fut,
) -> R
where
    S: Shape<R>,
    Fut: Future<Output = R>,
{
    let directive = directive::take();
    if directive == Some(Directive::Capture) {
        let entry = inner.map(|inner| (inner.full_key(key), inner));
        directive::capture(entry, policy.site);
        return std::future::pending().await;
    }
    let span = tracing::debug_span!(
        target: "redis_cached",
        "cache_put",
        function = policy.site.map_or("", Site::name),
        outcome = tracing::field::Empty,
        compute_ms = tracing::field::Empty,
        redis_ms = tracing::field::Empty,
        key = tracing::field::Empty,
    );
    let inner = directive::writing_with(directive, inner, unset);
    let put = write_through::<S, R, Fut>(inner, key, tags, policy, body, span.clone());
    InSpan::new(span, put).await
}

/// [`put`] once its span is open; `inner` is `None` when it runs uncached.
async fn write_through<S, R, Fut>(
    inner: Option<&Arc<Inner>>,
    key: String,
    tags: &[String],
    policy: Policy,
    body: Fut,
    span: Span,
) -> R
where
    S: Shape<R>,
    Fut: Future<Output = R>,
{
    let Some(inner) = inner else {
        span.record("outcome", "uncached");
        return body.await;
    };
    let key = inner.full_key(key);
    inner.record_key(&span, &key);
    // Only the stored part of the result is kept across the writes below.
    let (encoded, kept) = {
        let started = (!span.is_disabled()).then(Instant::now);
        let result = body.await;
        if let Some(started) = started {
            span.record("compute_ms", started.elapsed().as_secs_f64() * 1e3);
        }
        let encoded = inner.encode_result::<S, R>(&result, &policy, Duration::ZERO);
        let kept: Result<S::Value, fn() -> R> = match S::split(result) {
            Split::Value(value) => Ok(value),
            Split::Absent(absent) => Err(absent),
            Split::Other(result) => {
                span.record("outcome", "skipped");
                return result;
            }
        };
        (encoded, kept)
    };
    // The written key lives on: so must its tag records. Before the write,
    // so that an invalidation of a tag from now on reaches it; a key that
    // could not be recorded is invalidated rather than written.
    let tagged = tags.is_empty() || {
        let ttl = encoded
            .as_ref()
            .and_then(|(_, ttl)| *ttl)
            .unwrap_or(inner.settings.default_ttl);
        inner.tag(&key, tags, ttl).await.is_ok()
    };
    let written = match encoded.filter(|_| tagged) {
        Some((entry, Some(ttl))) => inner.store(&key, entry, ttl, policy.site).await,
        _ => Err(crate::Error::Config("not storable".into())),
    };
    if written.is_err() {
        // Failures are counted inside; the caller gets its value anyway.
        let _ = inner.tombstone(&key).await;
    }
    span.record(
        "outcome",
        if written.is_ok() {
            "stored"
        } else {
            "invalidated"
        },
    );
    inner.wrote(&key);
    match kept {
        Ok(value) => S::from_value(value),
        Err(absent) => absent(),
    }
}
