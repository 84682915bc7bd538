//! Time a cached call spends waiting for Redis, for its tracing span.
//!
//! A call sets the thread's running total aside while it polls; each
//! backend operation that ends within that poll adds its time; the call
//! then takes what was added and gives the total back. A cached call
//! inside another's body keeps its own sum.

use std::cell::Cell;
use std::time::Duration;

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
