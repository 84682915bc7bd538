//! The public handle: [`WriteBehind`] takes writes (journal, then cache)
//! and reports; the handle's last clone closes it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::flusher;
use super::shared::Shared;
use super::{JournalId, Sink, WriteBehindStats};
use crate::backend::JournalKeys;
use crate::encoding::key::KeyParts;
use crate::engine::store::Inner;
use crate::error::{Error, Result};

/// Write-behind over a [`Cache`](crate::Cache) on Redis: [`WriteBehind::write`] and
/// [`WriteBehind::delete`] change the cache at once and return once the
/// write is journaled in a Redis Stream; a flusher applies the journal to
/// a [`Sink`] in batches, and removes writes only after the sink took them.
///
/// **Guarantee.** Every write acknowledged with `Ok` reaches the sink at
/// least once, in key order (a later write of a key never lands before an
/// earlier one), or lands in the dead-letter stream (`<ns>:~wb-dead:{name}`,
/// counted), as long as Redis keeps the journal: with `appendonly yes` and
/// `appendfsync always` through a Redis crash, with `everysec` up to about
/// a second of writes can be lost, and with persistence off a Redis restart
/// loses every write not flushed yet. A flusher that crashes mid-batch
/// leaves its writes pending; the next lease holder (any process, after
/// `takeover_after`) claims them and flushes them again, before newer ones.
///
/// One process flushes at a time (a lease in Redis). The holder never
/// polls a sink call past the lease's end by its own clock, but a call
/// already sent to the database when the process was paused or cut off may
/// still land after the next holder's: a sink that must rule this out
/// keeps each row's [`Write::id`](crate::Write::id) and ignores older ones.
///
/// **The cache follows the database.** Once the sink took a write, the
/// flusher puts it in the cache again (unless a later write of its key is
/// there), before it removes it from the journal: a process that crashed
/// between journaling a write and updating the cache, a cache update that
/// failed, or a reader that filled the entry from the database's older row
/// meanwhile, all end with the cache at the write the database holds. A
/// write given up on (dead-lettered) is invalidated in the cache, unless a
/// later write of its key is there. Once the journal is drained, the cache
/// and the database agree on every key the write-behind wrote.
///
/// **Failures.** A failed sink call is retried with back-off, the lease
/// kept meanwhile; a batch that keeps failing is split in halves. A key
/// whose write fails alone is held back in the journal and tried again
/// alone with a back-off of its own while other keys flow (a later write
/// of the key joins its held ones, and their count). It goes to the dead
/// letters once it failed `max_attempts` times, counting only failures
/// after which the sink had taken other writes: never in an outage, when
/// calls are paced by a back-off that grows with the failures in a row.
/// The dead letters are never trimmed: while they hold
/// `max_dead_letters`, a write given up on stays in the journal. A
/// journaled write this process cannot decode or check waits for one that
/// can (`park_undecodable_for`).
/// When Redis cannot journal a write, `write` returns the error: there is
/// no silent fallback, and no automatic synchronous write to the sink,
/// since that could be overtaken by an older journaled write of the same
/// key; a caller that prefers the database to an error can write it
/// directly and accept that risk.
///
/// ```no_run
/// # extern crate cached_runtime as redis_cached;
/// # use redis_cached::{Cache, Sink, Write, WriteBehind};
/// # struct Users;
/// # impl Sink<u64, String> for Users {
/// #     type Error = std::io::Error;
/// #     async fn write_batch(&self, _: Vec<Write<u64, String>>) -> Result<(), Self::Error> { Ok(()) }
/// # }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), redis_cached::Error> {
/// use std::time::Duration;
///
/// let cache = Cache::redis("redis://127.0.0.1:6379/")?;
/// let users = WriteBehind::builder("users", &cache, Users)
///     .key_template("user:<id>") // the getter's `key = "user:<id>"`
///     .ttl(Duration::from_secs(3600))
///     .start()?;
/// users.write(7, &"Ada".to_string()).await?; // in the cache now, in the database soon
/// users.delete(8).await?;
/// users.shutdown(Duration::from_secs(5)).await?; // flushes what is left
/// # Ok(())
/// # }
/// ```
pub struct WriteBehind<K, V> {
    pub(super) handle: Arc<Handle<K, V>>,
}

impl<K, V> Clone for WriteBehind<K, V> {
    fn clone(&self) -> Self {
        WriteBehind {
            handle: Arc::clone(&self.handle),
        }
    }
}

impl<K, V> std::fmt::Debug for WriteBehind<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBehind")
            .field("stream", &self.handle.0.journal().stream)
            .finish_non_exhaustive()
    }
}

impl<K, V> WriteBehind<K, V>
where
    K: Serialize + Send + Sync + 'static,
    V: Serialize + Send + Sync + 'static,
{
    /// Writes `value` at `key`: in the cache at once, in the sink after
    /// the flush. Returns once the write is journaled.
    ///
    /// A caller that gives up waiting (its future dropped) leaves the write
    /// journaled or not at all; once journaled, its cache update finishes
    /// in a task of its own (and the flusher puts it in the cache in any
    /// case once the sink took it). A write given up on before it was sent
    /// is never sent later, behind a later write of its key.
    ///
    /// # Errors
    /// [`Error::Closed`] after [`WriteBehind::shutdown`];
    /// [`Error::Backlog`] when the journal is full; a Redis error, timeout
    /// or open breaker when it could not be journaled (then it may still
    /// have been journaled if Redis answered too late: writing again is
    /// safe); [`Error::Config`] when the journal's server is too old; an
    /// invalid key or an unserializable value.
    pub async fn write(&self, key: K, value: &V) -> Result<JournalId> {
        let entry = self.handle.0.inner().settings.codec.encode(value, None)?;
        self.submit(&key, entry).await
    }

    /// Deletes `key`: the cache holds a cached absence at once (a getter
    /// returning `Option` sees `None`), the sink gets [`Change::Delete`](super::Change::Delete).
    ///
    /// # Errors
    /// As [`WriteBehind::write`].
    pub async fn delete(&self, key: K) -> Result<JournalId> {
        let entry = self.handle.0.inner().settings.codec.encode_absent(None);
        self.submit(&key, entry).await
    }

    async fn submit(&self, key: &K, entry: Vec<u8>) -> Result<JournalId> {
        let journal = Arc::clone(&self.handle.0);
        if journal.closed() {
            return Err(Error::Closed);
        }
        let inner = journal.inner();
        let full = journal.cache_key(key);
        inner.check_size(&entry)?;
        let key_bytes = inner.settings.codec.encode(key, None)?;
        // In the caller's future: a caller that gives up before the append
        // is sent leaves nothing that could land after its next write.
        let id = journal.append(&full, &key_bytes, &entry).await?;
        let update = async move {
            journal.cache_update(&full, &id, &entry).await;
            journal.ensure_flusher();
            id
        };
        // A task of its own: a caller dropped now does not leave the cache
        // behind the journal until the flush.
        let id = match tokio::runtime::Handle::try_current() {
            Ok(runtime) => runtime
                .spawn(update)
                .await
                .map_err(|_| Error::Redis("the write's task ended early".into()))?,
            Err(_) => update.await,
        };
        JournalId::parse(&id).ok_or_else(|| Error::Redis("unexpected stream id".into()))
    }
}

impl<K, V> WriteBehind<K, V> {
    /// This process's counters.
    pub fn stats(&self) -> WriteBehindStats {
        self.handle.0.stats()
    }

    /// How many writes the journal holds (not yet flushed, all processes).
    ///
    /// # Errors
    /// When Redis fails, times out or is skipped by the open breaker.
    pub async fn pending(&self) -> Result<u64> {
        self.handle.0.pending().await
    }

    /// Stops accepting writes (later ones return [`Error::Closed`], on
    /// every clone of this handle), flushes what is pending without
    /// waiting for batches to fill, waits until the journal is empty or
    /// `within` passed, then stops this process's flusher: a sink call in
    /// progress finishes first (the flusher is waited for until `within`
    /// ends, at least 1 s), then the lease is given up and another process
    /// takes over at once. Returns how many writes were still pending:
    /// they stay journaled for the next flusher.
    ///
    /// # Errors
    /// When Redis fails while it looks at the journal (the flusher is
    /// stopped all the same).
    pub async fn shutdown(&self, within: Duration) -> Result<u64> {
        let journal = &self.handle.0;
        journal.close();
        journal.drain();
        let deadline = Instant::now()
            .checked_add(within)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));
        let left = loop {
            match journal.pending().await {
                Ok(left) if left > 0 && Instant::now() < deadline => {}
                done => break done,
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        journal.stop();
        let wait = deadline.saturating_duration_since(Instant::now());
        journal.ended(wait.max(Duration::from_secs(1))).await;
        left
    }
}

/// What a handle needs of its shared state, without the sink's type.
pub(super) trait Journal<K, V>: Send + Sync {
    fn inner(&self) -> &Inner;
    fn journal(&self) -> &JournalKeys;
    fn cache_key(&self, key: &K) -> String;
    /// Journals a write; its stream id.
    fn append<'a>(
        &'a self,
        full: &'a str,
        key: &'a [u8],
        entry: &'a [u8],
    ) -> BoxFuture<'a, Result<String>>;
    /// Puts a journaled write in the cache.
    fn cache_update<'a>(&'a self, full: &'a str, id: &'a str, entry: &'a [u8])
        -> BoxFuture<'a, ()>;
    fn stats(&self) -> WriteBehindStats;
    fn pending(&self) -> BoxFuture<'_, Result<u64>>;
    fn closed(&self) -> bool;
    fn close(&self);
    fn drain(&self);
    fn stop(&self);
    /// Starts the flusher again if its task ended (the runtime that ran it
    /// shut down) while the handle lives.
    fn ensure_flusher(self: Arc<Self>);
    /// Waits, at most `within`, until the flusher task has ended.
    fn ended(&self, within: Duration) -> BoxFuture<'_, ()>;
}

/// Closes the write-behind and stops its flusher when the last
/// [`WriteBehind`] clone is dropped.
pub(super) struct Handle<K, V>(pub(super) Arc<dyn Journal<K, V>>);

impl<K, V> Drop for Handle<K, V> {
    fn drop(&mut self) {
        self.0.close();
        self.0.stop();
    }
}

impl<K, V, S> Journal<K, V> for Shared<K, V, S>
where
    K: Serialize + DeserializeOwned + KeyParts + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    S: Sink<K, V>,
{
    fn inner(&self) -> &Inner {
        &self.cache.inner
    }

    fn journal(&self) -> &JournalKeys {
        &self.journal
    }

    fn cache_key(&self, key: &K) -> String {
        Shared::cache_key(self, key)
    }

    fn append<'a>(
        &'a self,
        full: &'a str,
        key: &'a [u8],
        entry: &'a [u8],
    ) -> BoxFuture<'a, Result<String>> {
        Box::pin(Shared::append(self, full, key, entry))
    }

    fn cache_update<'a>(
        &'a self,
        full: &'a str,
        id: &'a str,
        entry: &'a [u8],
    ) -> BoxFuture<'a, ()> {
        Box::pin(Shared::cache_update(self, full, id, entry))
    }

    fn stats(&self) -> WriteBehindStats {
        self.counters.snapshot()
    }

    fn pending(&self) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            let redis = self.redis()?;
            let inner = &self.cache.inner;
            let depth = inner
                .guarded(redis.stream_len(&self.journal.stream))
                .await?;
            self.counters.depth(depth);
            Ok(depth)
        })
    }

    fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.wake.notify_one();
        self.urgent.notify_one();
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake.notify_one();
        self.urgent.notify_one();
    }

    fn ensure_flusher(self: Arc<Self>) {
        if self.limits.flusher && !self.stopping() && !self.running.load(Ordering::Acquire) {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                flusher::spawn(&self, &runtime);
            }
        }
    }

    fn ended(&self, within: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.running.load(Ordering::Acquire) {
                let _ = tokio::time::timeout(within, ended).await;
            }
        })
    }
}
