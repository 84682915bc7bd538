//! Claims on keys: which keys this process is refreshing in the background.
//! A claim is a guard: however its holder ends (done, panicked, cancelled,
//! its runtime shut down), dropping it gives the key back.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

#[derive(Debug, Default)]
pub(crate) struct Claims {
    keys: Arc<Mutex<HashSet<String>>>,
}

/// The claim on one key; dropping it releases the key.
#[derive(Debug)]
pub(crate) struct Claim {
    keys: Arc<Mutex<HashSet<String>>>,
    key: String,
}

fn lock(keys: &Mutex<HashSet<String>>) -> MutexGuard<'_, HashSet<String>> {
    keys.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Claims {
    /// Claims `key`; `None` if it is claimed already.
    pub(crate) fn claim(&self, key: &str) -> Option<Claim> {
        lock(&self.keys).insert(key.to_owned()).then(|| Claim {
            keys: Arc::clone(&self.keys),
            key: key.to_owned(),
        })
    }

    #[cfg(test)]
    pub(crate) fn is_claimed(&self, key: &str) -> bool {
        lock(&self.keys).contains(key)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        lock(&self.keys).remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_exclusive_until_dropped() {
        let claims = Claims::default();
        let claim = claims.claim("k").expect("free");
        assert!(claims.claim("k").is_none());
        drop(claim);
        assert!(!claims.is_claimed("k"));
        assert!(claims.claim("k").is_some());
    }

    #[test]
    fn a_panicking_holder_releases_its_claim() {
        let claims = Claims::default();
        let claim = claims.claim("k").expect("free");
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _claim = claim;
            panic!("refresh panicked");
        }));
        assert!(result.is_err());
        assert!(!claims.is_claimed("k"));
    }
}
