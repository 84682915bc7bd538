//! The journal's integrity check: an HMAC-SHA256 (RFC 2104) over each
//! journaled write, with a key the application holds, so that an entry
//! that another program added to the stream (a neighbour whose ACL is too
//! wide) is never handed to the sink as a database write.
//!
//! The MAC covers the journal's name, the time the writer journaled the
//! write by its own clock, the key and the entry, each length-prefixed. The
//! flusher refuses an entry whose MAC does not match, and one whose time is
//! far from its stream id's (an old entry added again: a replay).

use sha2::{Digest, Sha256};

/// How far a write's own time may be from its stream id's time.
pub(super) const MAX_SKEW_MS: u64 = 5 * 60 * 1000;

const BLOCK: usize = 64;

/// An HMAC-SHA256 key, expanded to its inner and outer pads.
#[derive(Clone)]
pub(super) struct IntegrityKey {
    inner: [u8; BLOCK],
    outer: [u8; BLOCK],
}

impl std::fmt::Debug for IntegrityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IntegrityKey(…)")
    }
}

impl IntegrityKey {
    pub(super) fn new(secret: &[u8]) -> Self {
        let mut key = [0u8; BLOCK];
        if secret.len() > BLOCK {
            key[..32].copy_from_slice(&Sha256::digest(secret));
        } else {
            key[..secret.len()].copy_from_slice(secret);
        }
        IntegrityKey {
            inner: key.map(|b| b ^ 0x36),
            outer: key.map(|b| b ^ 0x5c),
        }
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut inner = Sha256::new();
        inner.update(self.inner);
        for part in parts {
            inner.update((part.len() as u64).to_le_bytes());
            inner.update(part);
        }
        let mut outer = Sha256::new();
        outer.update(self.outer);
        outer.update(inner.finalize());
        outer.finalize().into()
    }

    /// The MAC of a write of `entry` at `key` in `journal`, journaled at
    /// `stamp` (Unix ms, the writer's clock).
    pub(super) fn sign(&self, journal: &str, stamp: u64, key: &[u8], entry: &[u8]) -> [u8; 32] {
        self.mac(&[journal.as_bytes(), &stamp.to_le_bytes(), key, entry])
    }

    /// Whether `mac` is the MAC of that write (compared in constant time).
    pub(super) fn verify(
        &self,
        journal: &str,
        stamp: u64,
        key: &[u8],
        entry: &[u8],
        mac: &[u8],
    ) -> bool {
        let expected = self.sign(journal, stamp, key, entry);
        mac.len() == expected.len()
            && mac
                .iter()
                .zip(expected)
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn matches_rfc_4231() {
        // Test case 2: key "Jefe", data "what do ya want for nothing?".
        let key = IntegrityKey::new(b"Jefe");
        let mut inner = Sha256::new();
        inner.update(key.inner);
        inner.update(b"what do ya want for nothing?");
        let mut outer = Sha256::new();
        outer.update(key.outer);
        outer.update(inner.finalize());
        assert_eq!(
            hex(&outer.finalize()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than a block is hashed first.
        let long = IntegrityKey::new(&[0xaa; 131]);
        let mut inner = Sha256::new();
        inner.update(long.inner);
        inner.update(b"Test Using Larger Than Block-Size Key - Hash Key First");
        let mut outer = Sha256::new();
        outer.update(long.outer);
        outer.update(inner.finalize());
        assert_eq!(
            hex(&outer.finalize()),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn a_changed_field_or_key_fails_the_check() {
        let key = IntegrityKey::new(b"secret");
        let mac = key.sign("j", 7, b"k", b"v");
        assert!(key.verify("j", 7, b"k", b"v", &mac));
        assert!(!key.verify("j", 8, b"k", b"v", &mac));
        assert!(!key.verify("j", 7, b"kv", b"", &mac));
        assert!(!key.verify("other", 7, b"k", b"v", &mac));
        assert!(!IntegrityKey::new(b"other").verify("j", 7, b"k", b"v", &mac));
        assert!(!key.verify("j", 7, b"k", b"v", &mac[..31]));
    }
}
