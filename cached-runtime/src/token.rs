//! Randomness: lock tokens, tombstone ids and XFetch draws, from the
//! operating system's CSPRNG.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// `N` random bytes. If the OS generator fails (it practically never does),
/// falls back to a digest of the time, the process id and a counter: still
/// unique, though predictable, and the failure is logged.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    if getrandom::fill(&mut buf).is_ok() {
        return buf;
    }
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    tracing::warn!(target: "redis_cached", "the OS random generator failed; using a time-based unique id");
    let mut hasher = Sha256::new();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.update(nanos.to_le_bytes());
    hasher.update(std::process::id().to_le_bytes());
    hasher.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let digest = hasher.finalize();
    for (dst, src) in buf.iter_mut().zip(digest.iter().cycle()) {
        *dst = *src;
    }
    buf
}

/// A lock token: 128 random bits as 32 hex characters.
pub(crate) fn lock_token() -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(32);
    for b in random_bytes::<16>() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// A uniform draw in (0, 1], for XFetch's `ln(rand())`.
pub(crate) fn unit_interval() -> f64 {
    let bits = u64::from_le_bytes(random_bytes::<8>()) >> 11; // 53 bits
    (bits as f64 + 1.0) / (1u64 << 53) as f64
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_differ() {
        assert_ne!(lock_token(), lock_token());
        assert_eq!(lock_token().len(), 32);
        for _ in 0..1000 {
            let u = unit_interval();
            assert!(u > 0.0 && u <= 1.0, "{u}");
        }
    }
}
