//! How values are stored: a four-byte header, then the serialized value.
//!
//! ```text
//! byte 0   0xCA     magic: this is a redis-cached entry
//! byte 1   1        format version
//! byte 2   codec    1 = JSON, 2 = postcard
//! byte 3   flags    bit 0: a cached "absent" (`None`), no payload
//!                   bit 1: timed: 12 bytes of freshness data follow
//!                   bit 2: a tombstone left by an invalidation: 8 random bytes follow
//! [4..16]  timed    soft expiry (u64 LE, Unix ms), last computation time (u32 LE, ms)
//! ..       payload  the value in the codec's format
//! ```
//!
//! Freshness data is written only for functions with `stale` or `early`, so
//! the usual overhead is the 4-byte header. A tombstone marks a key as
//! invalidated: it reads as a miss, and because each one is unique, a fill
//! that began before the invalidation sees the key changed and does not
//! store its stale result (see `Cache::fill`).
//!
//! Anything else at a key (another program's data, an older format, a
//! truncated write, a value of another type) fails to decode and is treated
//! as a miss by the cache, which then overwrites it.

#[cfg(any(feature = "postcard", test))]
mod depth;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

const MAGIC: u8 = 0xCA;
const FORMAT_VERSION: u8 = 1;
const HEADER_LEN: usize = 4;
const FLAG_ABSENT: u8 = 0b0000_0001;
const FLAG_TIMED: u8 = 0b0000_0010;
const FLAG_TOMBSTONE: u8 = 0b0000_0100;
const KNOWN_FLAGS: u8 = FLAG_ABSENT | FLAG_TIMED | FLAG_TOMBSTONE;
const TIMED_LEN: usize = 12;
const TOMBSTONE_ID_LEN: usize = 8;

/// Freshness data stored with a value of a `stale` or `early` function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timing {
    /// When the value stops being fresh (Unix ms): served stale after it
    /// (`stale`), or the expiry XFetch refreshes ahead of (`early`).
    pub(crate) soft_expiry_ms: u64,
    /// How long the computation that produced the value took (ms).
    pub(crate) delta_ms: u32,
}

/// A decoded entry.
#[derive(Debug, PartialEq)]
pub(crate) enum Entry<T> {
    /// A value (`None`: a cached absence), with its freshness data if timed.
    Value(Option<T>, Option<Timing>),
    /// An invalidated key: a miss.
    Tombstone,
}

/// The serialization format of cached values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Codec {
    /// `serde_json`: readable with `redis-cli`, works with every serde type.
    #[default]
    Json,
    /// `postcard`: compact and fast, not human-readable; for types whose
    /// serde impls do not rely on self-description (no
    /// `#[serde(flatten)]`, untagged enums or `deserialize_any`).
    #[cfg(feature = "postcard")]
    Postcard,
}

impl Codec {
    fn id(self) -> u8 {
        match self {
            Codec::Json => 1,
            #[cfg(feature = "postcard")]
            Codec::Postcard => 2,
        }
    }

    fn header(self, flags: u8, timing: Option<Timing>) -> Vec<u8> {
        let mut buf = Vec::with_capacity(64);
        let timed = if timing.is_some() { FLAG_TIMED } else { 0 };
        buf.extend_from_slice(&[MAGIC, FORMAT_VERSION, self.id(), flags | timed]);
        if let Some(t) = timing {
            buf.extend_from_slice(&t.soft_expiry_ms.to_le_bytes());
            buf.extend_from_slice(&t.delta_ms.to_le_bytes());
        }
        buf
    }

    /// Encodes `value` with the entry header in front.
    pub(crate) fn encode<T: Serialize + ?Sized>(
        self,
        value: &T,
        timing: Option<Timing>,
    ) -> Result<Vec<u8>> {
        let mut buf = self.header(0, timing);
        match self {
            Codec::Json => {
                serde_json::to_writer(&mut buf, value).map_err(|e| json_error("serialize", &e))?
            }
            #[cfg(feature = "postcard")]
            Codec::Postcard => {
                buf = postcard::to_extend(value, buf)
                    .map_err(|e| Error::Codec(format!("cannot serialize value: {e}")))?;
            }
        }
        Ok(buf)
    }

    /// The entry that records a cached absence (a `None` result).
    pub(crate) fn encode_absent(self, timing: Option<Timing>) -> Vec<u8> {
        self.header(FLAG_ABSENT, timing)
    }

    /// Whether the near tier may keep `bytes`: an entry of this format
    /// that is not a tombstone; with its soft expiry (Unix ms) if timed.
    pub(crate) fn near_kept(bytes: &[u8]) -> Option<Option<u64>> {
        match bytes {
            [MAGIC, FORMAT_VERSION, _, flags, rest @ ..]
                if flags & !KNOWN_FLAGS == 0 && flags & FLAG_TOMBSTONE == 0 =>
            {
                if flags & FLAG_TIMED == 0 {
                    return Some(None);
                }
                let soft = rest.get(..8)?.try_into().ok()?;
                Some(Some(u64::from_le_bytes(soft)))
            }
            _ => None,
        }
    }

    /// Whether `bytes` are a tombstone (of any codec).
    pub(crate) fn is_tombstone(bytes: &[u8]) -> bool {
        matches!(bytes, [MAGIC, FORMAT_VERSION, _, flags, ..] if flags & FLAG_TOMBSTONE != 0)
    }

    /// A tombstone with a fresh random id, unlike any other.
    pub(crate) fn encode_tombstone(self) -> Vec<u8> {
        let mut buf = self.header(FLAG_TOMBSTONE, None);
        buf.extend_from_slice(&crate::token::random_bytes::<TOMBSTONE_ID_LEN>());
        buf
    }

    /// Decodes an entry written by this codec.
    pub(crate) fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<Entry<T>> {
        self.decode_with(bytes, |payload| match self {
            Codec::Json => {
                serde_json::from_slice(payload).map_err(|e| json_error("deserialize", &e))
            }
            // postcard has no bound on nesting of its own.
            #[cfg(feature = "postcard")]
            Codec::Postcard => {
                let mut de = postcard::Deserializer::from_bytes(payload);
                serde::Deserialize::deserialize(depth::Limited::new(&mut de))
                    .map_err(cannot_deserialize)
            }
        })
    }

    /// Decodes an entry written by this codec, with an estimate of the heap
    /// bytes its value holds (see `weigh.rs`).
    pub(crate) fn decode_weighed<T: DeserializeOwned>(
        self,
        bytes: &[u8],
    ) -> Result<(Entry<T>, usize)> {
        let tally = std::cell::Cell::new(0);
        let entry = self.decode_with(bytes, |payload| match self {
            Codec::Json => {
                let mut de = serde_json::Deserializer::from_slice(payload);
                let value = crate::encoding::weigh::deserialize(&mut de, &tally);
                value
                    .and_then(|value| de.end().map(|()| value))
                    .map_err(|e| json_error("deserialize", &e))
            }
            #[cfg(feature = "postcard")]
            Codec::Postcard => {
                let mut de = postcard::Deserializer::from_bytes(payload);
                crate::encoding::weigh::deserialize(depth::Limited::new(&mut de), &tally)
                    .map_err(cannot_deserialize)
            }
        })?;
        Ok((entry, tally.get()))
    }

    /// Decodes an entry written by this codec, its payload by `value`.
    fn decode_with<T>(
        self,
        bytes: &[u8],
        value: impl FnOnce(&[u8]) -> Result<T>,
    ) -> Result<Entry<T>> {
        let Some((header, rest)) = bytes.split_first_chunk::<HEADER_LEN>() else {
            return Err(Error::Codec(format!(
                "entry of {} bytes is shorter than its header",
                bytes.len()
            )));
        };
        let [magic, version, codec, flags] = *header;
        if magic != MAGIC || version != FORMAT_VERSION {
            return Err(Error::Codec(
                "not a redis-cached entry of a known format".into(),
            ));
        }
        if codec != self.id() {
            return Err(Error::Codec(format!("entry written by codec {codec}")));
        }
        if flags & !KNOWN_FLAGS != 0 {
            return Err(Error::Codec(format!("unknown entry flags {flags:#04x}")));
        }
        if flags & FLAG_TOMBSTONE != 0 {
            return if flags == FLAG_TOMBSTONE && rest.len() == TOMBSTONE_ID_LEN {
                Ok(Entry::Tombstone)
            } else {
                Err(Error::Codec("malformed tombstone".into()))
            };
        }
        let (timing, payload) = if flags & FLAG_TIMED != 0 {
            let Some((timed, payload)) = rest.split_first_chunk::<TIMED_LEN>() else {
                return Err(Error::Codec(
                    "timed entry shorter than its freshness data".into(),
                ));
            };
            let (expiry, delta) = timed.split_at(8);
            let timing = Timing {
                soft_expiry_ms: u64::from_le_bytes(expiry.try_into().map_err(|_| bad_timing())?),
                delta_ms: u32::from_le_bytes(delta.try_into().map_err(|_| bad_timing())?),
            };
            (Some(timing), payload)
        } else {
            (None, rest)
        };
        if flags & FLAG_ABSENT != 0 {
            return if payload.is_empty() {
                Ok(Entry::Value(None, timing))
            } else {
                Err(Error::Codec("absent entry with a payload".into()))
            };
        }
        Ok(Entry::Value(Some(value(payload)?), timing))
    }
}

/// A JSON error without the data it quotes (serde's messages repeat the
/// value that did not fit, which may be personal): its kind and place.
fn json_error(what: &str, err: &serde_json::Error) -> Error {
    let kind = match err.classify() {
        serde_json::error::Category::Io => "an I/O error",
        serde_json::error::Category::Syntax => "malformed JSON",
        serde_json::error::Category::Data => "JSON of another shape than the type",
        serde_json::error::Category::Eof => "truncated JSON",
    };
    if err.line() == 0 {
        return Error::Codec(format!("cannot {what} value: {kind}"));
    }
    Error::Codec(format!(
        "cannot {what} value: {kind} at line {} column {}",
        err.line(),
        err.column()
    ))
}

/// A postcard error: its kind (postcard's errors never name the data).
#[cfg(feature = "postcard")]
fn cannot_deserialize(err: postcard::Error) -> Error {
    Error::Codec(format!("cannot deserialize value: {err}"))
}

fn bad_timing() -> Error {
    Error::Codec("malformed freshness data".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct User {
        id: u64,
        name: String,
    }

    #[test]
    fn round_trip() {
        let user = User {
            id: 7,
            name: "ada".into(),
        };
        let bytes = Codec::Json.encode(&user, None).unwrap();
        assert_eq!(&bytes[..4], &[MAGIC, FORMAT_VERSION, 1, 0]);
        assert_eq!(
            Codec::Json.decode::<User>(&bytes).unwrap(),
            Entry::Value(Some(user), None)
        );
    }

    #[cfg(feature = "postcard")]
    #[test]
    fn postcard_round_trip_and_codec_mismatch() {
        let user = User {
            id: 7,
            name: "ada".into(),
        };
        let bytes = Codec::Postcard.encode(&user, None).unwrap();
        assert_eq!(&bytes[..4], &[MAGIC, FORMAT_VERSION, 2, 0]);
        assert!(bytes.len() < Codec::Json.encode(&user, None).unwrap().len());
        assert_eq!(
            Codec::Postcard.decode::<User>(&bytes).unwrap(),
            Entry::Value(Some(user), None)
        );
        assert!(
            Codec::Json.decode::<User>(&bytes).is_err(),
            "another codec's entry is a miss"
        );
        assert!(Codec::Postcard
            .decode::<User>(&bytes[..bytes.len() - 1])
            .is_err());
    }

    #[test]
    fn timed_round_trip() {
        let timing = Timing {
            soft_expiry_ms: 1_700_000_000_123,
            delta_ms: 250,
        };
        let bytes = Codec::Json.encode(&7u32, Some(timing)).unwrap();
        assert_eq!(bytes.len(), 4 + 12 + 1);
        assert_eq!(
            Codec::Json.decode::<u32>(&bytes).unwrap(),
            Entry::Value(Some(7), Some(timing))
        );
        let absent = Codec::Json.encode_absent(Some(timing));
        assert_eq!(
            Codec::Json.decode::<u32>(&absent).unwrap(),
            Entry::Value(None, Some(timing))
        );
    }

    #[test]
    fn absent_round_trip() {
        let bytes = Codec::Json.encode_absent(None);
        assert_eq!(
            Codec::Json.decode::<User>(&bytes).unwrap(),
            Entry::Value(None, None)
        );
    }

    #[test]
    fn tombstones_are_unique() {
        let a = Codec::Json.encode_tombstone();
        let b = Codec::Json.encode_tombstone();
        assert_ne!(a, b);
        assert_eq!(Codec::Json.decode::<User>(&a).unwrap(), Entry::Tombstone);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let user = User {
            id: 1,
            name: "x".into(),
        };
        let good = Codec::Json.encode(&user, None).unwrap();
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![MAGIC],
            b"{\"id\":1}".to_vec(),
            vec![MAGIC, 9, 1, 0, b'1'],
            vec![MAGIC, FORMAT_VERSION, 2, 0, b'1'],
            vec![MAGIC, FORMAT_VERSION, 1, 0x80, b'1'],
            vec![MAGIC, FORMAT_VERSION, 1, FLAG_ABSENT, b'1'],
            good[..good.len() - 3].to_vec(),
            Codec::Json.encode(&"a string, not a user", None).unwrap(),
            vec![MAGIC, FORMAT_VERSION, 1, FLAG_TIMED, 1, 2, 3],
            vec![MAGIC, FORMAT_VERSION, 1, FLAG_TOMBSTONE, 1, 2],
            vec![
                MAGIC,
                FORMAT_VERSION,
                1,
                FLAG_TOMBSTONE | FLAG_ABSENT,
                1,
                2,
                3,
                4,
                5,
                6,
                7,
                8,
            ],
        ];
        for bytes in cases {
            assert!(Codec::Json.decode::<User>(&bytes).is_err(), "{bytes:?}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

            #[test]
            fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
                let _ = Codec::Json.decode::<User>(&bytes);
                let _ = Codec::Json.decode::<Vec<String>>(&bytes);
            }

            #[test]
            fn damaged_entries_never_panic_or_misread(
                id in any::<u64>(),
                name in ".{0,12}",
                cut in any::<prop::sample::Index>(),
                flip in any::<prop::sample::Index>(),
                bit in 0u8..8,
            ) {
                let user = User { id, name };
                let timing = Some(Timing { soft_expiry_ms: id, delta_ms: 7 });
                let good = Codec::Json.encode(&user, timing).unwrap();
                // Truncated anywhere: an error, never a panic, never another user.
                let truncated = &good[..cut.index(good.len())];
                prop_assert!(Codec::Json.decode::<User>(truncated).is_err());
                // One bit flipped: whatever decodes is only ever a User.
                let mut flipped = good.clone();
                flipped[flip.index(good.len())] ^= 1 << bit;
                let _ = Codec::Json.decode::<User>(&flipped);
            }
        }
    }
}
