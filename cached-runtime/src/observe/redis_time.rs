//! Time a cached call spends waiting for Redis, for its tracing span.
//!
//! A call sets the thread's running total aside while it polls; each
//! backend operation that ends within that poll adds its time; the call
//! then takes what was added and gives the total back. A cached call
//! inside another's body keeps its own sum.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tracing::Span;

thread_local! {
    static SPENT: Cell<Duration> = const { Cell::new(Duration::ZERO) };
}

/// Whether spans of this crate are listened to, so that operations are
/// worth timing.
pub(crate) fn wanted() -> bool {
    tracing::enabled!(target: "redis_cached", tracing::Level::DEBUG)
}

/// Adds one operation's time to the poll under way, if any.
pub(crate) fn add(took: Duration) {
    SPENT.with(|spent| spent.set(spent.get().saturating_add(took)));
}

/// One poll of a call, from [`begin`]: gives the total set aside back
/// when ended, or when dropped (a body that panicked).
pub(crate) struct Polling {
    outer: Option<Duration>,
}

/// Starts one poll of a call, setting the running total aside.
pub(crate) fn begin() -> Polling {
    Polling {
        outer: Some(SPENT.with(|spent| spent.replace(Duration::ZERO))),
    }
}

impl Polling {
    /// Ends the poll: what its operations spent.
    pub(crate) fn end(mut self) -> Duration {
        let outer = self.outer.take().unwrap_or_default();
        SPENT.with(|spent| spent.replace(outer))
    }
}

impl Drop for Polling {
    fn drop(&mut self) {
        if let Some(outer) = self.outer.take() {
            SPENT.with(|spent| spent.set(outer));
        }
    }
}

/// Runs one poll of an operation inside `span`, adding what it waited
/// for Redis to `redis`; records the sum as the span's `redis_ms` when
/// the operation is done. With the span disabled, no clock is read.
pub(crate) fn poll_in<T>(
    span: &Span,
    redis: &mut Duration,
    poll: impl FnOnce() -> Poll<T>,
) -> Poll<T> {
    let _entered = span.enter();
    if span.is_disabled() {
        return poll();
    }
    let polling = begin();
    let polled = poll();
    *redis += polling.end();
    if polled.is_ready() && !redis.is_zero() {
        span.record("redis_ms", redis.as_secs_f64() * 1e3);
    }
    polled
}

pin_project! {
    /// An operation run in its span: see [`poll_in`].
    pub(crate) struct InSpan<F> {
        #[pin]
        op: F,
        span: Span,
        redis: Duration,
    }
}

impl<F: Future> InSpan<F> {
    pub(crate) fn new(span: Span, op: F) -> Self {
        InSpan {
            op,
            span,
            redis: Duration::ZERO,
        }
    }
}

impl<F: Future> Future for InSpan<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let op = this.op;
        poll_in(this.span, this.redis, || op.poll(cx))
    }
}

/// `took` in milliseconds to the microsecond, for a span field: `6.19`,
/// not `6.190074999999999`.
pub(crate) fn millis(took: std::time::Duration) -> f64 {
    took.as_micros() as f64 / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_inside_another_keeps_its_own_sum() {
        add(Duration::from_millis(100)); // outside any call
        let outer = begin();
        add(Duration::from_millis(1));
        let inner = begin();
        add(Duration::from_millis(2));
        assert_eq!(inner.end(), Duration::from_millis(2));
        let panicked = begin();
        add(Duration::from_millis(50));
        drop(panicked); // unwound: its time is dropped with it
        add(Duration::from_millis(3));
        assert_eq!(outer.end(), Duration::from_millis(4));
        // The total outside any call is back as it was.
        let probe = begin();
        assert_eq!(probe.outer, Some(Duration::from_millis(100)));
        assert_eq!(probe.end(), Duration::ZERO);
    }
}
