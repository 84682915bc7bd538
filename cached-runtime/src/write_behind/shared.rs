//! What the handle and the flusher share: the journal's keys, the
//! settings, the counters and flags, and the operations both use: the
//! write path (journal, then cache), the lease, the check of the
//! journal's server.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use super::integrity::{IntegrityKey, MAX_SKEW_MS};
use super::stats::{Counters, Tally};
use crate::backend::{JournalKeys, JournalPut, RedisBackend, Signed};
use crate::cache::Cache;
use crate::encoding::key::{companion_key, KeyParts, Template};
use crate::error::{Error, Result};
use crate::failpoint::{self, Action};
use crate::token::now_unix_ms;

/// The settings of a write-behind; see its builder.
#[derive(Debug, Clone)]
pub(super) struct Limits {
    pub(super) ttl: Duration,
    pub(super) batch_size: usize,
    pub(super) max_delay: Duration,
    pub(super) max_len: u64,
    pub(super) lease: Duration,
    pub(super) max_attempts: u32,
    pub(super) retry_base: Duration,
    pub(super) retry_max: Duration,
    pub(super) sink_timeout: Duration,
    pub(super) max_dead_letters: u64,
    pub(super) park_for: Duration,
    pub(super) flusher: bool,
    /// Whether log lines carry the sink's error text.
    pub(super) log_sink_errors: bool,
}

/// The oldest Redis the journal is supported on. Its commands (consumer
/// groups, `XCLAIM`, `XINFO`) exist since 5.0, but releases before 6.2 are
/// out of support and untested here.
const OLDEST_REDIS: (u32, u32) = (6, 2);

/// How long a server found too old is believed so before it is asked
/// again (it may have been upgraded in place). A server found new enough
/// is believed for the handle's life: a failover to an older replica is
/// not looked for.
const RECHECK_SERVER: Duration = Duration::from_secs(5);

/// The state shared by a write-behind's handles and its flusher.
pub(super) struct Shared<K, V, S> {
    pub(super) journal: JournalKeys,
    /// This flusher's consumer name in the group, and its lease token.
    pub(super) consumer: String,
    /// The cache key of a written key, rendered as the attribute renders
    /// the same template.
    pub(super) key: Template,
    pub(super) version: Option<u32>,
    /// Signs and checks journaled writes, if set.
    pub(super) integrity: Option<IntegrityKey>,
    pub(super) cache: Cache,
    pub(super) sink: S,
    pub(super) limits: Limits,
    pub(super) counters: Counters,
    /// Woken by local writes, a drain or a stop.
    pub(super) wake: tokio::sync::Notify,
    /// Woken by a drain or a stop only.
    pub(super) urgent: tokio::sync::Notify,
    /// Flush without waiting for batches to fill.
    pub(super) draining: AtomicBool,
    /// No more writes are accepted (`shutdown`, or the last handle gone).
    pub(super) closed: AtomicBool,
    pub(super) stop: AtomicBool,
    /// Whether a flusher task is alive.
    pub(super) running: AtomicBool,
    pub(super) ended: tokio::sync::Notify,
    /// What the journal's server was found to be, once it answered:
    /// `Err` (why) when it is too old for the journal.
    /// Set once the journal's server was found to run its commands.
    pub(super) server_ok: OnceLock<()>,
    /// Why it does not, and when that was found: asked again after
    /// [`RECHECK_SERVER`] (the server may be upgraded in place).
    pub(super) server_refused: Mutex<Option<(String, Instant)>>,
    pub(super) _types: PhantomData<fn() -> (K, V)>,
}

impl<K: KeyParts, V, S> Shared<K, V, S> {
    pub(super) fn redis(&self) -> Result<&RedisBackend> {
        self.cache
            .inner
            .backend
            .redis()
            .ok_or_else(|| Error::Config("write-behind needs a Redis cache".into()))
    }

    /// The full cache key (namespace included) of `key`'s entry.
    pub(super) fn cache_key(&self, key: &K) -> String {
        let inner = &self.cache.inner;
        inner.full_key(self.key.render(key, self.version))
    }

    /// The companion that holds the journal id of the write stored at
    /// the full cache key `key`.
    pub(super) fn version_key(&self, key: &str) -> String {
        companion_key(self.cache.inner.settings.namespace.as_deref(), key, "wbv")
    }

    /// Journals a write of `entry` at the full cache key `full` (`key`:
    /// the written key, encoded); its stream id.
    pub(super) async fn append(&self, full: &str, key: &[u8], entry: &[u8]) -> Result<String> {
        let inner = &self.cache.inner;
        let redis = self.redis()?;
        if let Err(err) = self.check_server().await {
            self.counters.add(Tally::failed, 1);
            return Err(err);
        }
        let stamp = now_unix_ms();
        let mac = self
            .integrity
            .as_ref()
            .map(|secret| secret.sign(&self.journal.stream, stamp, key, entry));
        let signed = mac.as_ref().map(|mac| Signed {
            stamp,
            mac: &mac[..],
            max_skew_ms: MAX_SKEW_MS,
        });
        let append = redis.journal_append(&self.journal, self.limits.max_len, key, entry, signed);
        let appended = inner.guarded(append).await;
        match appended {
            Ok(Some(id)) => {
                self.counters.add(Tally::accepted, 1);
                Ok(id)
            }
            Ok(None) => {
                self.counters.add(Tally::refused, 1);
                Err(Error::Backlog(self.limits.max_len))
            }
            Err(err @ Error::Rejected(_)) => {
                // The journal cannot take it (a blocked stream, an ACL):
                // nothing was journaled.
                self.counters.add(Tally::failed, 1);
                tracing::error!(target: "redis_cached", stream = %self.journal.stream, error = %err,
                    "a write could not be journaled: JOURNALBLOCKED, the stream holds the largest id \
                     there is (drain it and delete it); JOURNALSKEW, this host's clock is off Redis's \
                     by more than five minutes (see the write-behind's docs)");
                Err(err)
            }
            Err(err) => {
                self.counters.add(Tally::failed, 1);
                // Redis may have journaled it all the same (a reply too
                // late, a connection reset after the send): the cache must
                // not go on serving what the write replaces. The flusher
                // puts the write in the cache once it is applied.
                let _ = inner.tombstone(full).await;
                Err(err)
            }
        }
    }

    /// Puts the journaled write `id` of `entry` in the cache at `full`.
    pub(super) async fn cache_update(&self, full: &str, id: &str, entry: &[u8]) {
        let inner = &self.cache.inner;
        // A crash here leaves the write journaled and not in the cache;
        // the flusher that applies it puts it there.
        failpoint::hit("write-behind/after-append", &self.journal.stream);
        let version = self.version_key(full);
        let put = JournalPut {
            key: full,
            version_key: &version,
            id,
            entry,
            ttl: self.limits.ttl,
        };
        let updated = match failpoint::hit("write-behind/cache-update", &self.journal.stream) {
            Some(Action::Fail) => Err(Error::Redis("failpoint".into())),
            _ => match self.redis() {
                Ok(redis) => inner.guarded(redis.journal_put(&put)).await.map(|_| ()),
                Err(err) => Err(err),
            },
        };
        if let Err(err) = updated {
            self.counters.add(Tally::cache_update_failures, 1);
            tracing::warn!(target: "redis_cached", error = %err, "a journaled write could not update the cache; invalidating it until it is flushed");
            let _ = inner.tombstone(full).await;
        }
        // Newer than anything computed here before: later callers must
        // not join such a computation or take its lock notification.
        inner.wrote(full);
        self.wake.notify_one();
    }

    /// Checks, once it answers, that the journal's server runs the
    /// journal's commands (and warns if it may evict the journal).
    pub(super) async fn check_server(&self) -> Result<()> {
        if self.server_ok.get().is_some() {
            return Ok(());
        }
        {
            let refused = self
                .server_refused
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some((why, when)) = refused.as_ref() {
                if when.elapsed() < RECHECK_SERVER {
                    return Err(Error::Config(why.clone()));
                }
            }
        }
        let redis = self.redis()?;
        let (version, policy) = self
            .cache
            .inner
            .guarded(redis.journal_server(&self.journal))
            .await?;
        let verdict = match parse_version(&version) {
            Some(found) if found >= OLDEST_REDIS => Ok(()),
            _ => Err(format!(
                "write-behind needs Redis {}.{} or newer for its journal; the server is {version:?}",
                OLDEST_REDIS.0, OLDEST_REDIS.1
            )),
        };
        if let Err(why) = &verdict {
            tracing::error!(target: "redis_cached", stream = %self.journal.stream, "{why}");
        }
        if policy.starts_with("allkeys-") {
            tracing::warn!(target: "redis_cached",
                stream = %self.journal.stream,
                policy = %policy,
                "the journal's Redis may evict any key when it is full (maxmemory-policy {policy}): \
                 an evicted journal loses accepted writes; use noeviction (or a volatile-* policy)"
            );
        }
        match &verdict {
            Ok(()) => {
                let _ = self.server_ok.set(());
            }
            Err(why) => {
                *self
                    .server_refused
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some((why.clone(), Instant::now()));
            }
        }
        verdict.map_err(Error::Config)
    }

    /// Extends the lease, or with `take` takes it if it is free; whether
    /// this process holds it.
    pub(super) async fn lease(&self, take: bool) -> Result<bool> {
        let redis = self.redis()?;
        let lease = redis.lease(&self.journal.lease, &self.consumer, self.limits.lease, take);
        self.cache.inner.guarded(lease).await
    }

    /// Waits for a local write, a drain or a stop, at most `period`.
    pub(super) async fn idle(&self, period: Duration) {
        if self.stopping() {
            return;
        }
        let _ = tokio::time::timeout(period, self.wake.notified()).await;
    }

    /// Waits at most `period`, less if a drain or a stop begins.
    pub(super) async fn pause(&self, period: Duration) {
        if self.stopping() {
            return;
        }
        let _ = tokio::time::timeout(period, self.urgent.notified()).await;
    }

    pub(super) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    pub(super) fn hurry(&self) -> bool {
        self.draining.load(Ordering::Acquire) || self.stopping()
    }
}

/// `major.minor` of a `redis_version` such as `7.0.15`.
fn parse_version(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_major_then_minor() {
        assert_eq!(parse_version("7.0.15"), Some((7, 0)));
        assert_eq!(parse_version("6.2.0"), Some((6, 2)));
        assert!(parse_version("6.0.16").is_some_and(|v| v < OLDEST_REDIS));
        assert!(parse_version("10.1.2").is_some_and(|v| v >= OLDEST_REDIS));
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("seven"), None);
    }
}
