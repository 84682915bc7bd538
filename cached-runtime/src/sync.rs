//! The locks and atomics of the near store and of the merged lookups'
//! queue: std's, or loom's in the unit tests built to run the models of
//! their protocols (`RUSTFLAGS="--cfg redis_cached_loom"`, see
//! `scripts/test.sh`), so that loom explores the interleavings of the very
//! code that ships.

#[cfg(not(all(test, redis_cached_loom)))]
pub(crate) use std::sync::atomic::AtomicU64;
#[cfg(not(all(test, redis_cached_loom)))]
pub(crate) use std::sync::{Mutex, MutexGuard};

#[cfg(all(test, redis_cached_loom))]
pub(crate) use loom::sync::atomic::AtomicU64;
#[cfg(all(test, redis_cached_loom))]
pub(crate) use loom::sync::{Mutex, MutexGuard};

/// Runs `f` under loom over every interleaving of its threads with at
/// most 3 preemptions each, and reports how many there were.
#[cfg(all(test, redis_cached_loom))]
pub(crate) fn model(name: &str, f: impl Fn() + Sync + Send + 'static) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let runs = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&runs);
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(move || {
        counted.fetch_add(1, Ordering::Relaxed);
        f();
    });
    eprintln!(
        "model {name}: {} interleavings",
        runs.load(Ordering::Relaxed)
    );
}
