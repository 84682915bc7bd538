//! The cross-process stampede lock of `lock = true`, and the notifications
//! that wake its waiters.
//!
//! On a miss, this process's computing caller runs one script that either
//! finds the value has landed meanwhile, or takes the lock (`SET lock token
//! NX PX lock_ttl`, the token 128 random bits), or reports it held. The
//! holder computes, extending its lock every `lock_ttl / 3` while it does
//! (a watchdog), then runs one script that releases the lock only if it still
//! holds its token (compare-and-delete), stores the value by compare-and-set
//! and publishes the key on the cache's notification channel. A waiter is
//! woken by that message (one subscriber connection per cache, for all
//! keys); as pub/sub can lose messages, it also retries on a short timer
//! (jittered, so waiters do not retry in step), and after `lock_wait` it
//! computes by itself. A crashed holder's lock expires after `lock_ttl` and
//! the next retry takes it.
//!
//! The lock key shares the value's hash slot: `{key}:lock` when the key has
//! no hash tag of its own, `key:lock` when it has one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{watch, Notify};

use crate::backend::redis::px;
use crate::backend::{AnyBackend, Bytes, RedisBackend};
use crate::cache::Cache;
use crate::error::Result;

/// Lock settings of one cached function.
#[derive(Debug, Clone, Copy)]
pub struct LockPolicy {
    /// How long a lock lives without its holder extending it.
    pub ttl: Duration,
    /// How long a caller waits for another's computation before computing itself.
    pub wait: Duration,
}

/// Takes the lock unless the value changed since it was read.
/// KEYS: value, lock. ARGV: `1` if a value was seen (else `0`), that value,
/// the token, the lock TTL in ms.
/// Returns `{1, entry}` when a new entry landed, `{2, seen?, entry}` when the
/// lock was taken (with what the key holds now), `{3}` when it is held.
const ACQUIRE: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur == '' then cur = false end
if cur and (ARGV[1] == '0' or cur ~= ARGV[2]) then
  return {1, cur}
end
if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[4]) then
  if cur then return {2, 1, cur} end
  return {2, 0, ''}
end
return {3}
";

/// Releases the lock if this token holds it, stores the value by
/// compare-and-set if asked, and publishes `<key length>:<key><entry>` (the
/// entry only if it was stored), so that waiters need no further read.
/// KEYS: value, lock. ARGV: token, `1` to store, `1` if a value was seen,
/// that value, the new value, its TTL in ms, the channel, the key as given.
const RELEASE: &str = r"
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
local stored = 0
if ARGV[2] == '1' then
  local cur = redis.call('GET', KEYS[1])
  if (ARGV[3] == '0' and (not cur or cur == '')) or (ARGV[3] == '1' and cur == ARGV[4]) then
    redis.call('SET', KEYS[1], ARGV[5], 'PX', ARGV[6])
    stored = 1
  end
end
local message = #ARGV[8] .. ':' .. ARGV[8]
if stored == 1 then message = message .. ARGV[5] end
redis.call('PUBLISH', ARGV[7], message)
return stored
";

/// Extends the lock if this token still holds it. KEYS: lock. ARGV: token, TTL in ms.
const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// The sources of the scripts above, in [`Scripts`]' order; also loaded
/// ahead of use by `Cache::connect`.
pub(crate) const SCRIPTS: [&str; 3] = [ACQUIRE, RELEASE, EXTEND];

/// The scripts, hashed once per cache.
pub(crate) struct Scripts {
    acquire: redis::Script,
    release: redis::Script,
    extend: redis::Script,
}

impl Default for Scripts {
    fn default() -> Self {
        let [acquire, release, extend] = SCRIPTS.map(redis::Script::new);
        Scripts {
            acquire,
            release,
            extend,
        }
    }
}

/// What an acquire attempt found.
pub(crate) enum Acquire {
    /// A new entry landed at the key since it was read.
    Landed(Bytes),
    /// The lock is ours; the key holds this now.
    Acquired(Option<Bytes>),
    /// Another caller holds the lock.
    Held,
}

/// The key of `key`'s lock, in the same hash slot.
pub(crate) fn lock_key(key: &str) -> String {
    companion(key, "lock")
}

fn companion(key: &str, suffix: &str) -> String {
    let has_tag = key
        .find('{')
        .and_then(|open| key[open + 1..].find('}'))
        .is_some_and(|len| len > 0);
    if has_tag || key.contains(['{', '}']) {
        // Appending keeps the key's own tag. (A key with braces but no valid
        // tag hashes whole; its companion may then land in another slot,
        // which matters only on Redis Cluster.)
        format!("{key}:{suffix}")
    } else {
        format!("{{{key}}}:{suffix}")
    }
}

impl Cache {
    fn redis_backend(&self) -> Option<&RedisBackend> {
        match &self.inner.backend {
            AnyBackend::Redis(redis) => Some(redis),
            AnyBackend::Memory(_) => None,
        }
    }

    /// One acquire attempt; `None` on the in-memory backend, where
    /// in-process coalescing is already the whole story.
    pub(crate) async fn try_acquire(
        &self,
        key: &str,
        lock: &str,
        seen: Option<&[u8]>,
        token: &str,
        policy: &LockPolicy,
    ) -> Option<Result<Acquire>> {
        let redis = self.redis_backend()?;
        let mut invocation = self.inner.scripts.acquire.key(key);
        invocation
            .key(lock)
            .arg(if seen.is_some() { "1" } else { "0" })
            .arg(seen.unwrap_or_default())
            .arg(token)
            .arg(px(policy.ttl));
        let reply = self
            .guarded(redis.invoke::<Vec<redis::Value>>(&invocation))
            .await;
        Some(reply.map(|values| parse_acquire(&values)))
    }

    /// Extends the lock while its holder computes.
    pub(crate) async fn extend_lock(&self, lock: &str, token: &str, policy: &LockPolicy) {
        let Some(redis) = self.redis_backend() else {
            return;
        };
        let mut invocation = self.inner.scripts.extend.key(lock);
        invocation.arg(token).arg(px(policy.ttl));
        if let Ok(1) = self.guarded(redis.invoke::<i64>(&invocation)).await {
            crate::stats::Counters::bump(&self.inner.counters.lock_extends);
        }
    }

    /// Releases the lock, stores `store` (entry, TTL) if the key still holds
    /// `seen`, and wakes the waiters; returns whether it stored.
    pub(crate) async fn release_lock(
        &self,
        key: &str,
        lock: &str,
        token: &str,
        seen: Option<&[u8]>,
        store: Option<(&[u8], Duration)>,
    ) -> Result<bool> {
        let Some(redis) = self.redis_backend() else {
            return Ok(false);
        };
        let mut invocation = self.inner.scripts.release.key(key);
        invocation
            .key(lock)
            .arg(token)
            .arg(if store.is_some() { "1" } else { "0" })
            .arg(if seen.is_some() { "1" } else { "0" })
            .arg(seen.unwrap_or_default())
            .arg(store.map(|(entry, _)| entry).unwrap_or_default())
            .arg(store.map_or(1, |(_, ttl)| px(ttl)))
            .arg(&self.inner.notifier.channel)
            .arg(key);
        let stored: i64 = self.guarded(redis.invoke(&invocation)).await?;
        Ok(stored == 1)
    }

    /// Registers interest in `key`'s notifications, starting the
    /// subscriber on first use.
    pub(crate) fn watch(&self, key: &str) -> Watch {
        if let Some(redis) = self.redis_backend() {
            self.inner
                .notifier
                .ensure_subscribed(redis.client().clone());
        }
        self.inner.notifier.register(key)
    }
}

fn parse_acquire(values: &[redis::Value]) -> Acquire {
    let int = |v: Option<&redis::Value>| match v {
        Some(redis::Value::Int(i)) => *i,
        _ => 0,
    };
    let bytes = |v: Option<&redis::Value>| match v {
        Some(redis::Value::BulkString(b)) => Bytes::Owned(b.clone()),
        _ => Bytes::Owned(Vec::new()),
    };
    match int(values.first()) {
        1 => Acquire::Landed(bytes(values.get(1))),
        2 if int(values.get(1)) == 1 => Acquire::Acquired(Some(bytes(values.get(2)))),
        2 => Acquire::Acquired(None),
        _ => Acquire::Held,
    }
}

/// Wakes this process's lock waiters when a value lands. One subscriber
/// connection per cache listens on one channel for every key.
pub(crate) struct Notifier {
    pub(crate) channel: String,
    waiters: Mutex<HashMap<String, Slot>>,
    subscribed: std::sync::atomic::AtomicBool,
    /// Whether the subscription is confirmed and listening.
    listening: watch::Sender<bool>,
}

/// The waiters of one key in this process.
struct Slot {
    notify: Arc<Notify>,
    watches: usize,
    /// The entry the last notification carried.
    landed: Option<Bytes>,
}

/// Interest in one key's notifications; dropping it ends the interest.
pub(crate) struct Watch {
    notifier: Arc<Notifier>,
    key: String,
    notify: Arc<Notify>,
}

impl Watch {
    /// Resolves at the next notification for the key; create it before
    /// checking the key, then await it.
    pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    /// The entry a notification carried since this watch began, if any.
    pub(crate) fn landed(&self) -> Option<Bytes> {
        self.notifier
            .lock()
            .get(&self.key)
            .and_then(|slot| slot.landed.clone())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut waiters = self.notifier.lock();
        if let Some(slot) = waiters.get_mut(&self.key) {
            slot.watches -= 1;
            if slot.watches == 0 {
                waiters.remove(&self.key);
            }
        }
    }
}

impl Notifier {
    pub(crate) fn new(namespace: Option<&str>) -> Arc<Notifier> {
        let channel = match namespace {
            Some(ns) => format!("{ns}:redis-cached:filled"),
            None => "redis-cached:filled".to_owned(),
        };
        Arc::new(Notifier {
            channel,
            waiters: Mutex::new(HashMap::new()),
            subscribed: std::sync::atomic::AtomicBool::new(false),
            listening: watch::Sender::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn register(self: &Arc<Self>, key: &str) -> Watch {
        let mut waiters = self.lock();
        let slot = waiters.entry(key.to_owned()).or_insert_with(|| Slot {
            notify: Arc::new(Notify::new()),
            watches: 0,
            landed: None,
        });
        slot.watches += 1;
        let notify = slot.notify.clone();
        drop(waiters);
        Watch {
            notifier: Arc::clone(self),
            key: key.to_owned(),
            notify,
        }
    }

    /// Handles one message: `<key length>:<key><entry or nothing>`.
    fn wake(&self, message: &[u8]) {
        let Some(colon) = message.iter().position(|&b| b == b':') else {
            return;
        };
        let Some(len) = std::str::from_utf8(&message[..colon])
            .ok()
            .and_then(|digits| digits.parse::<usize>().ok())
        else {
            return;
        };
        let rest = &message[colon + 1..];
        let (Some(key), Some(entry)) = (rest.get(..len), rest.get(len..)) else {
            return;
        };
        let Ok(key) = std::str::from_utf8(key) else {
            return;
        };
        if let Some(slot) = self.lock().get_mut(key) {
            if !entry.is_empty() {
                slot.landed = Some(Bytes::Owned(entry.to_vec()));
            }
            slot.notify.notify_waiters();
        }
    }

    /// Starts the subscriber if need be and waits until it listens.
    pub(crate) async fn subscribed(
        self: &Arc<Self>,
        client: redis::Client,
        timeout: Duration,
    ) -> Result<()> {
        let mut listening = self.listening.subscribe();
        self.ensure_subscribed(client);
        let confirmed = tokio::time::timeout(timeout, listening.wait_for(|&on| on))
            .await
            .is_ok_and(|r| r.is_ok());
        if confirmed {
            Ok(())
        } else {
            Err(crate::Error::Timeout(timeout))
        }
    }

    /// Starts the subscriber task once; it reconnects by itself and ends
    /// when the cache is dropped.
    fn ensure_subscribed(self: &Arc<Self>, client: redis::Client) {
        use std::sync::atomic::Ordering;
        if self.subscribed.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.subscribed.store(false, Ordering::Release);
            return;
        };
        runtime.spawn(subscribe_loop(
            Arc::downgrade(self),
            client,
            self.channel.clone(),
        ));
    }
}

async fn subscribe_loop(notifier: Weak<Notifier>, client: redis::Client, channel: String) {
    let mut backoff = Duration::from_millis(50);
    while notifier.strong_count() > 0 {
        match listen(&notifier, &client, &channel).await {
            Ok(()) => return,
            Err(err) => {
                if let Some(n) = notifier.upgrade() {
                    n.listening.send_replace(false);
                }
                tracing::debug!(error = %err, "lock notifications interrupted; waiters poll meanwhile");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Listens until the connection fails (`Err`) or the cache is gone (`Ok`).
async fn listen(notifier: &Weak<Notifier>, client: &redis::Client, channel: &str) -> Result<()> {
    let connect = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    let pubsub = tokio::time::timeout(Duration::from_secs(2), connect)
        .await
        .map_err(|_| crate::Error::Timeout(Duration::from_secs(2)))?
        .map_err(|e| crate::Error::from_redis(&e))?;
    let mut messages = pubsub.into_on_message();
    // Upgraded only for the moment: a strong reference held here would
    // keep the cache alive.
    if let Some(n) = notifier.upgrade() {
        n.listening.send_replace(true);
    } else {
        return Ok(());
    }
    loop {
        // Wake up now and then to notice a dropped cache.
        match tokio::time::timeout(Duration::from_secs(1), messages.next()).await {
            Ok(Some(msg)) => match notifier.upgrade() {
                Some(n) => n.wake(msg.get_payload_bytes()),
                None => return Ok(()),
            },
            Ok(None) => return Err(crate::Error::Redis("subscription closed".into())),
            Err(_) if notifier.strong_count() == 0 => return Ok(()),
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_carry_the_key_and_the_entry() {
        let notifier = Notifier::new(None);
        let watch = notifier.register("a:b");
        let other = notifier.register("a");
        notifier.wake(b"3:a:bENTRY");
        assert_eq!(watch.landed().as_deref(), Some(&b"ENTRY"[..]));
        assert_eq!(other.landed().as_deref(), None);
        notifier.wake(b"1:a");
        assert_eq!(other.landed().as_deref(), None, "no entry: only a wake-up");
        for garbage in [&b""[..], b"x", b"9:a", b"-1:a", b"1:"] {
            notifier.wake(garbage);
        }
        drop((watch, other));
        assert!(notifier.lock().is_empty());
    }

    #[test]
    fn lock_keys_share_the_value_slot() {
        assert_eq!(lock_key("user:42"), "{user:42}:lock");
        assert_eq!(lock_key("t:{7}:user:42"), "t:{7}:user:42:lock");
        assert_eq!(lock_key("odd{}key"), "odd{}key:lock");
    }
}
