//! How values are stored: a four-byte header, then the serialized value.
//!
//! ```text
//! byte 0   0xCA     magic: this is a redis-cached entry
//! byte 1   1        format version
//! byte 2   codec    1 = JSON
//! byte 3   flags    bit 0: a cached "absent" (`None`) with no payload
//! 4..      payload  the value in the codec's format
//! ```
//!
//! Anything else at a key (another program's data, an older format, a
//! truncated write, a value of another type) fails to decode and is treated
//! as a miss by the cache, which then overwrites it.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

const MAGIC: u8 = 0xCA;
const FORMAT_VERSION: u8 = 1;
const HEADER_LEN: usize = 4;
const FLAG_ABSENT: u8 = 0b0000_0001;
const KNOWN_FLAGS: u8 = FLAG_ABSENT;

/// The serialization format of cached values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Codec {
    /// `serde_json`: readable with `redis-cli`, works with every serde type.
    #[default]
    Json,
}

impl Codec {
    fn id(self) -> u8 {
        match self {
            Codec::Json => 1,
        }
    }

    /// Encodes `value` with the entry header in front.
    pub(crate) fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&[MAGIC, FORMAT_VERSION, self.id(), 0]);
        match self {
            Codec::Json => serde_json::to_writer(&mut buf, value)
                .map_err(|e| Error::Codec(format!("cannot serialize value: {e}")))?,
        }
        Ok(buf)
    }

    /// The entry that records a cached absence (a `None` result).
    pub(crate) fn encode_absent(self) -> Vec<u8> {
        vec![MAGIC, FORMAT_VERSION, self.id(), FLAG_ABSENT]
    }

    /// Decodes an entry written by [`Codec::encode`] or
    /// [`Codec::encode_absent`]: `Ok(None)` for a cached absence.
    pub(crate) fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<Option<T>> {
        let Some((header, payload)) = bytes.split_first_chunk::<HEADER_LEN>() else {
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
        if flags & FLAG_ABSENT != 0 {
            return if payload.is_empty() {
                Ok(None)
            } else {
                Err(Error::Codec("absent entry with a payload".into()))
            };
        }
        match self {
            Codec::Json => serde_json::from_slice(payload)
                .map(Some)
                .map_err(|e| Error::Codec(format!("cannot deserialize value: {e}"))),
        }
    }
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
        let bytes = Codec::Json.encode(&user).unwrap();
        assert_eq!(&bytes[..4], &[MAGIC, FORMAT_VERSION, 1, 0]);
        assert_eq!(Codec::Json.decode::<User>(&bytes).unwrap(), Some(user));
    }

    #[test]
    fn absent_round_trip() {
        let bytes = Codec::Json.encode_absent();
        assert_eq!(Codec::Json.decode::<User>(&bytes).unwrap(), None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let good = Codec::Json
            .encode(&User {
                id: 1,
                name: "x".into(),
            })
            .unwrap();
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![MAGIC],
            b"{\"id\":1}".to_vec(),
            vec![MAGIC, 9, 1, 0, b'1'],
            vec![MAGIC, FORMAT_VERSION, 2, 0, b'1'],
            vec![MAGIC, FORMAT_VERSION, 1, 0x80, b'1'],
            vec![MAGIC, FORMAT_VERSION, 1, FLAG_ABSENT, b'1'],
            good[..good.len() - 3].to_vec(),
            Codec::Json.encode(&"a string, not a user").unwrap(),
        ];
        for bytes in cases {
            assert!(Codec::Json.decode::<User>(&bytes).is_err(), "{bytes:?}");
        }
    }
}
