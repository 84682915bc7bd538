//! The engine every call runs on: the per-function settings (`policy`),
//! the store layer (`store`: read and decode, store, tombstone, run a
//! backend operation under the timeout and the breaker), in-process
//! coalescing (`flight`), the background refreshes this process holds
//! (`refresh_claims`), the keys it invalidated lately
//! (`recent_invalidations`), tags (`tags`: recording keys under a tag and
//! invalidating them together), and the circuit breaker (`breaker`).
//!
//! May import `backend`, `near`, `encoding`, `observe` and the leaves;
//! never `call`, the handle, nor `write_behind`.

pub(crate) mod breaker;
pub(crate) mod flight;
pub(crate) mod policy;
pub(crate) mod recent_invalidations;
pub(crate) mod refresh_claims;
pub(crate) mod store;
pub(crate) mod tags;
