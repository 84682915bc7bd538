//! Write-behind: writes made visible in the cache at once, journaled in a
//! Redis Stream before they are acknowledged, and flushed to the user's
//! [`Sink`] in batches by one flusher at a time.
//!
//! Ordering rests on two things. The journal is read in id order by the
//! one process holding the flusher lease, and a batch holds one write per
//! key (the last), so a later write of a key never reaches the sink before
//! an earlier one. The cache entry a write leaves is versioned by its
//! journal id, so whatever order cache updates land in (two writers, a
//! flusher settling what it applied, a buried write's invalidation), the
//! cache ends at the latest write.
//!
//! Layers, each importing only those below it: `handle` (the public
//! [`WriteBehind`]) and `builder` over `flusher` (lease, batches,
//! failures, settling) over `shared` (the state both sides use, and the
//! write path) over `stats` and this module's vocabulary.
//!
//! The top folder: may import the [`Cache`](crate::Cache) handle and
//! everything below it.

mod builder;
mod flusher;
mod handle;
mod integrity;
mod shared;
mod stats;

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use builder::WriteBehindBuilder;
pub use handle::WriteBehind;
pub use stats::WriteBehindStats;

/// Where write-behind writes end up: a batch writer, usually one database
/// transaction per batch.
///
/// A batch holds at most one write per key, the last one journaled, in
/// journal order. It may be given again after a crash or a lost lease (at
/// least once): applying it twice must leave the same rows, which upserts
/// and deletes do. A sink that must also refuse a batch overtaken by a
/// newer one (see [`WriteBehind`]'s guarantee) compares [`Write::id`]s.
///
/// ```
/// # extern crate cached_runtime as redis_cached;
/// use redis_cached::{Change, Sink, Write};
///
/// struct Users;
///
/// impl Sink<u64, String> for Users {
///     type Error = std::io::Error;
///
///     async fn write_batch(&self, batch: Vec<Write<u64, String>>) -> Result<(), Self::Error> {
///         for write in batch {
///             match write.change {
///                 Change::Upsert(name) => { /* INSERT … ON CONFLICT DO UPDATE */ let _ = name; }
///                 Change::Delete => { /* DELETE … WHERE id = write.key */ }
///             }
///         }
///         Ok(())
///     }
/// }
/// ```
///
/// A shared sink works too: `Sink` is implemented for `Arc<S>` of any sink,
/// so that the application keeps a handle on it.
pub trait Sink<K, V>: Send + Sync + 'static {
    /// Why a batch failed; logged and kept with a dead letter.
    type Error: std::fmt::Display + Send + 'static;

    /// Applies `batch`; an `Err` leaves every write of it in the journal,
    /// to be tried again.
    fn write_batch(
        &self,
        batch: Vec<Write<K, V>>,
    ) -> impl Future<Output = std::result::Result<(), Self::Error>> + Send;
}

impl<K, V, S: Sink<K, V>> Sink<K, V> for std::sync::Arc<S> {
    type Error = S::Error;

    fn write_batch(
        &self,
        batch: Vec<Write<K, V>>,
    ) -> impl Future<Output = std::result::Result<(), Self::Error>> + Send {
        (**self).write_batch(batch)
    }
}

/// One change for the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write<K, V> {
    /// The key written.
    pub key: K,
    /// What happened to it.
    pub change: Change<V>,
    /// The journal id of the write; later writes have greater ids.
    pub id: JournalId,
}

/// An upsert or a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change<V> {
    /// The key now holds this value.
    Upsert(V),
    /// The key holds nothing.
    Delete,
}

/// A write's id in the journal (its Redis Stream entry id): when it was
/// accepted (ms, by the Redis server's clock) and a sequence number within
/// that millisecond. Ordered as the journal is.
///
/// Redis gives each new entry an id above the stream's last one, so ids
/// only grow while the stream lives, across restarts of Redis that keep
/// it. A stream that is deleted and made again starts from the server's
/// clock; ids stay above the old ones unless that clock went back (or a
/// replica with an older copy of the stream was promoted: see the
/// durability notes on [`WriteBehind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JournalId {
    /// Unix time in ms at which Redis journaled the write.
    pub ms: u64,
    /// Its place among the writes of that millisecond.
    pub seq: u64,
}

impl JournalId {
    pub(crate) fn parse(id: &str) -> Option<JournalId> {
        let (ms, seq) = id.split_once('-')?;
        Some(JournalId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// When the write was journaled.
    pub fn accepted_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.ms)
    }
}

impl std::fmt::Display for JournalId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_ids_order_as_the_stream_does() {
        let a = JournalId::parse("1700000000000-5").expect("valid");
        let b = JournalId::parse("1700000000000-12").expect("valid");
        let c = JournalId::parse("1700000000001-0").expect("valid");
        assert!(a < b && b < c);
        assert_eq!(b.to_string(), "1700000000000-12");
        assert!(JournalId::parse("17-x").is_none());
        assert!(JournalId::parse("17").is_none());
    }
}
