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

/// Starts one poll of a call: the total set aside, for [`end`].
pub(crate) fn begin() -> Duration {
    SPENT.with(|spent| spent.replace(Duration::ZERO))
}

/// Ends one poll of a call: what its operations spent.
pub(crate) fn end(outer: Duration) -> Duration {
    SPENT.with(|spent| spent.replace(outer))
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
        assert_eq!(end(inner), Duration::from_millis(2));
        add(Duration::from_millis(3));
        assert_eq!(end(outer), Duration::from_millis(4));
        assert_eq!(begin(), Duration::from_millis(100));
    }
}
