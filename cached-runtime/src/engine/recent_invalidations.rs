//! Which keys this process invalidated lately, roughly: a lock notification
//! that carries a value can reach a waiter late, after this process has
//! invalidated the key the value was computed for, so a waiter for a key
//! invalidated here lately reads the key rather than trust the message.
//!
//! Keys are hashed into a fixed array of slots, each holding when a key of
//! that slot was last invalidated: bounded memory whatever the number of
//! keys, and a key that shares a slot with one invalidated lately costs a
//! read, never a wrong value.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const SLOTS: usize = 4096;

#[derive(Debug)]
pub(crate) struct Recent {
    /// Milliseconds since `epoch` (plus one, so that zero means never).
    slots: Box<[AtomicU64]>,
    epoch: Instant,
    hasher: RandomState,
}

impl Default for Recent {
    fn default() -> Self {
        Recent {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
            hasher: RandomState::new(),
        }
    }
}

impl Recent {
    fn slot(&self, key: &str) -> &AtomicU64 {
        &self.slots[self.hasher.hash_one(key) as usize % SLOTS]
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// `key` was invalidated now.
    pub(crate) fn mark(&self, key: &str) {
        self.slot(key).store(self.now(), Ordering::Release);
    }

    /// Whether `key` (or a key of its slot) was invalidated within `window`.
    pub(crate) fn within(&self, key: &str, window: Duration) -> bool {
        let at = self.slot(key).load(Ordering::Acquire);
        let window = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        at != 0 && self.now().saturating_sub(at) <= window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_last_for_the_window() {
        let recent = Recent::default();
        assert!(!recent.within("k", Duration::from_secs(60)));
        recent.mark("k");
        assert!(recent.within("k", Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(20));
        assert!(!recent.within("k", Duration::from_millis(5)));
    }
}
