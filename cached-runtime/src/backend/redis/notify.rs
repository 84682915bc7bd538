//! Lock notifications: one subscriber connection per cache listens on the
//! cache's channel for every key, and wakes this process's waiters of the
//! key a message names.
//!
//! On a cluster, a notification goes to a shard channel of the value's slot
//! (`SPUBLISH`, from the release script, which may only touch its own
//! slot): one channel per slot, `<channel>{<tag>}`, the tag a short text of
//! that slot. The subscriber subscribes (`SSUBSCRIBE`) to the channel of
//! each slot this process has lock waiters in (until a minute after the
//! last one left), on a RESP3 connection to the master serving the slot;
//! a slot that moves, or a connection that drops or stops answering, has
//! its own channels subscribed again, and no others (see [`super::shard`]).
//!
//! A message is `<key length>:<key><kind>[entry]` (see the release script):
//! the waiter learns what happened without a further read when the entry
//! is small, and otherwise what to do next.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch, Notify};

use super::link::{ClusterTarget, SentinelTarget};
use super::shard::{shard_channel, Event, Subscriptions, Wanted, LINGER};
use crate::backend::Bytes;
use crate::encoding::key::slot;
use crate::error::{Error, Result};

/// Where notifications are heard.
// One per cache: boxing the client would gain nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Feed {
    /// One channel on one server.
    Server(redis::Client),
    /// One channel on the master the sentinels name at each connect.
    Sentinel(Arc<SentinelTarget>),
    /// A shard channel per slot of a cluster.
    Sharded(Arc<ClusterTarget>),
}

/// The shard channels a cluster subscriber listens to.
#[derive(Default)]
struct Shards {
    /// Slots whose channel this process wants.
    wanted: Wanted,
    /// Tells the live subscriber of a newly wanted slot; `None` while
    /// none is.
    events: Option<mpsc::UnboundedSender<Event>>,
}

/// What a notification said about a key.
#[derive(Debug, Clone)]
pub(crate) enum Landing {
    /// This entry was stored (or shared), by the holder with this token
    /// (`None`: a message that names no holder, from an earlier version).
    Value(Bytes, Option<Box<[u8]>>),
    /// An entry too large to carry was stored: read it.
    Fetch,
    /// The lock was released with nothing stored: try it again.
    Retry,
    /// The holder's computation failed: compute without waiting.
    Failed,
}

pub(crate) struct Notifier {
    channel: String,
    feed: Feed,
    shards: Mutex<Shards>,
    waiters: Mutex<HashMap<String, Slot>>,
    /// Whether a subscriber task is alive; its guard clears this when the
    /// task ends, however it ends (its runtime shutting down included).
    running: Arc<AtomicBool>,
    /// Whether the subscription is confirmed and listening.
    listening: watch::Sender<bool>,
    /// Tells the subscriber to connect afresh (the master changed).
    restart: Arc<Notify>,
}

/// The waiters of one key in this process.
struct Slot {
    notify: Arc<Notify>,
    watches: usize,
    /// How many notifications arrived, and the last one.
    count: u64,
    last: Option<Landing>,
}

/// Interest in one key's notifications; dropping it ends the interest.
pub(crate) struct Watch {
    notifier: Arc<Notifier>,
    key: String,
    notify: Arc<Notify>,
    /// Notifications already seen through this watch.
    seen: AtomicU64,
}

impl Watch {
    /// Resolves at the next notification for the key; create it before
    /// checking the key, then await it.
    pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    /// The last notification since this watch last looked, if any.
    pub(crate) fn landed(&self) -> Option<Landing> {
        let waiters = self.notifier.lock();
        let slot = waiters.get(&self.key)?;
        if self.seen.swap(slot.count, Ordering::Relaxed) == slot.count {
            return None;
        }
        slot.last.clone()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Feed::Sharded(_) = self.notifier.feed {
            let slot = slot(self.key.as_bytes());
            self.notifier.shards().wanted.leave(slot, Instant::now());
        }
        let mut waiters = self.notifier.lock();
        if let Some(slot) = waiters.get_mut(&self.key) {
            slot.watches -= 1;
            if slot.watches == 0 {
                waiters.remove(&self.key);
            }
        }
    }
}

/// Clears the notifier's `running` flag when the subscriber task ends.
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Notifier {
    pub(crate) fn new(channel: String, feed: Feed) -> Arc<Notifier> {
        Arc::new(Notifier {
            channel,
            feed,
            shards: Mutex::new(Shards::default()),
            waiters: Mutex::new(HashMap::new()),
            running: Arc::new(AtomicBool::new(false)),
            listening: watch::Sender::new(false),
            restart: Arc::new(Notify::new()),
        })
    }

    /// Has the subscriber drop its connection and connect afresh, looking
    /// the master up again.
    pub(crate) fn restart(&self) {
        self.restart.notify_one();
    }

    /// The channel `key`'s notifications go to, and the command that
    /// publishes there (`PUBLISH`, or `SPUBLISH` for a shard channel).
    pub(crate) fn channel_for(&self, key: &str) -> (Cow<'_, str>, &'static str) {
        match self.feed {
            Feed::Sharded(_) => (
                Cow::Owned(shard_channel(&self.channel, slot(key.as_bytes()))),
                "SPUBLISH",
            ),
            Feed::Server(_) | Feed::Sentinel(_) => (Cow::Borrowed(&self.channel), "PUBLISH"),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn shards(&self) -> MutexGuard<'_, Shards> {
        self.shards.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn register(self: &Arc<Self>, key: &str) -> Watch {
        if let Feed::Sharded(_) = self.feed {
            let slot = slot(key.as_bytes());
            let mut shards = self.shards();
            if shards.wanted.enter(slot) {
                if let Some(events) = &shards.events {
                    let _ = events.send(Event::Want(slot));
                }
            }
        }
        let mut waiters = self.lock();
        let slot = waiters.entry(key.to_owned()).or_insert_with(|| Slot {
            notify: Arc::new(Notify::new()),
            watches: 0,
            count: 0,
            last: None,
        });
        slot.watches += 1;
        let (notify, seen) = (slot.notify.clone(), slot.count);
        drop(waiters);
        Watch {
            notifier: Arc::clone(self),
            key: key.to_owned(),
            notify,
            seen: AtomicU64::new(seen),
        }
    }

    /// Handles one message.
    fn wake(&self, message: &[u8]) {
        let Some((key, landing)) = parse(message) else {
            return;
        };
        if let Some(slot) = self.lock().get_mut(key) {
            slot.count += 1;
            slot.last = Some(landing);
            slot.notify.notify_waiters();
        }
    }

    /// Starts the subscriber if need be and waits until it listens.
    pub(crate) async fn subscribed(self: &Arc<Self>, timeout: Duration) -> Result<()> {
        let mut listening = self.listening.subscribe();
        self.ensure_subscribed();
        let confirmed = tokio::time::timeout(timeout, listening.wait_for(|&on| on))
            .await
            .is_ok_and(|r| r.is_ok());
        if confirmed {
            Ok(())
        } else {
            Err(Error::Timeout(timeout))
        }
    }

    /// Starts the subscriber task unless one is alive; it reconnects by
    /// itself, and ends when the cache is dropped or its runtime ends (the
    /// next watch then starts another on the caller's runtime).
    pub(crate) fn ensure_subscribed(self: &Arc<Self>) {
        if self.running.load(Ordering::Acquire) || self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let running = Running(Arc::clone(&self.running));
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // `running` clears the flag
        };
        let notifier = Arc::downgrade(self);
        runtime.spawn(async move {
            let _running = running;
            subscribe_loop(notifier).await;
        });
    }
}

/// `<length>:<that many bytes>` at the start of `bytes` → those bytes and
/// the rest.
fn counted(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = bytes.iter().position(|&b| b == b':')?;
    let len: usize = std::str::from_utf8(&bytes[..colon]).ok()?.parse().ok()?;
    let rest = &bytes[colon + 1..];
    Some((rest.get(..len)?, rest.get(len..)?))
}

/// `<key length>:<key><kind>[…]` → the key and what happened.
fn parse(message: &[u8]) -> Option<(&str, Landing)> {
    let (key, rest) = counted(message)?;
    let key = std::str::from_utf8(key).ok()?;
    let (&kind, entry) = rest.split_first()?;
    let landing = match (kind, entry.is_empty()) {
        (b'V', false) => {
            let (token, entry) = counted(entry)?;
            if entry.is_empty() {
                return None;
            }
            Landing::Value(Bytes::Owned(entry.to_vec()), Some(token.into()))
        }
        (b'v', false) => Landing::Value(Bytes::Owned(entry.to_vec()), None),
        (b'f', true) => Landing::Fetch,
        (b'r', true) => Landing::Retry,
        (b'x', true) => Landing::Failed,
        _ => return None,
    };
    Some((key, landing))
}

const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long a subscription must have lasted for its end to be retried at
/// once.
const STEADY: Duration = Duration::from_secs(10);

async fn subscribe_loop(notifier: Weak<Notifier>) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let started = std::time::Instant::now();
        let (listened, outcome) = match notifier.upgrade() {
            // Upgraded only to start: the listener holds a weak reference.
            Some(n) => match &n.feed {
                Feed::Server(client) => {
                    let (client, channel) = (client.clone(), n.channel.clone());
                    drop(n);
                    listen(&notifier, Ok(client), &channel).await
                }
                Feed::Sentinel(sentinel) => {
                    let (sentinel, channel) = (Arc::clone(sentinel), n.channel.clone());
                    drop(n);
                    let master = match tokio::time::timeout(CONNECT, sentinel.master()).await {
                        Ok(master) => master,
                        Err(_) => Err(Error::Timeout(CONNECT)),
                    };
                    listen(&notifier, master, &channel).await
                }
                Feed::Sharded(cluster) => {
                    let cluster = Arc::clone(cluster);
                    drop(n);
                    listen_sharded(&notifier, cluster).await
                }
            },
            None => return,
        };
        if outcome.is_ok() {
            return;
        }
        if let Some(n) = notifier.upgrade() {
            n.listening.send_replace(false);
        }
        if listened && started.elapsed() >= STEADY {
            // It worked for a while: reconnect promptly. (Not after a
            // short listen: a node that keeps dropping its connections
            // must not get a new one every 50 ms.)
            backoff = FIRST_BACKOFF;
        }
        if let Err(err) = outcome {
            tracing::debug!(target: "redis_cached", error = %err, "lock notifications interrupted; waiters poll meanwhile");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

const CONNECT: Duration = Duration::from_secs(2);

/// Listens until the connection fails (`Err`) or the cache is gone (`Ok`);
/// also says whether it got as far as listening.
async fn listen(
    notifier: &Weak<Notifier>,
    client: Result<redis::Client>,
    channel: &str,
) -> (bool, Result<()>) {
    let client = match client {
        Ok(client) => client,
        Err(err) => return (false, Err(err)),
    };
    let connect = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    let pubsub = match tokio::time::timeout(CONNECT, connect).await {
        Ok(Ok(pubsub)) => pubsub,
        Ok(Err(err)) => return (false, Err(Error::from_redis(&err))),
        Err(_) => return (false, Err(Error::Timeout(CONNECT))),
    };
    let mut messages = pubsub.into_on_message();
    // Upgraded only for the moment: a strong reference held here would
    // keep the cache alive.
    let restart = match notifier.upgrade() {
        Some(n) => {
            n.listening.send_replace(true);
            Arc::clone(&n.restart)
        }
        None => return (true, Ok(())),
    };
    loop {
        // Wake up now and then to notice a dropped cache.
        let next = tokio::select! {
            next = tokio::time::timeout(Duration::from_secs(1), messages.next()) => next,
            () = restart.notified() => {
                return (true, Err(Error::Redis("the master changed".into())));
            }
        };
        match next {
            Ok(Some(msg)) => match notifier.upgrade() {
                Some(n) => n.wake(msg.get_payload_bytes()),
                None => return (true, Ok(())),
            },
            Ok(None) => return (true, Err(Error::Redis("subscription closed".into()))),
            Err(_) if notifier.strong_count() == 0 => return (true, Ok(())),
            Err(_) => {}
        }
    }
}

/// How often (in seconds of the subscriber's tick) shard connections are
/// pinged.
const PING_EVERY: u64 = 5;

/// [`listen`] on a cluster: keeps the shard channel of every wanted slot
/// subscribed at the master serving it (see [`super::shard`]), until the cache is
/// gone (`Ok`) or the slot map cannot be read to start with (`Err`).
///
/// Each change is met by itself: a newly wanted slot is subscribed; a slot
/// that moved (its master unsubscribed its channel) or the slots of a
/// connection that dropped are subscribed again where the slot map, read
/// again, says; every second, slots with no waiter for a minute are
/// forgotten and slots not subscribed yet are tried again; every few
/// seconds each connection is pinged.
async fn listen_sharded(
    notifier: &Weak<Notifier>,
    cluster: Arc<ClusterTarget>,
) -> (bool, Result<()>) {
    // Where the slots are, first: without it no channel has a master.
    if let Err(err) = cluster.topology().read().await {
        return (false, Err(err));
    }
    let (events, mut heard) = mpsc::unbounded_channel();
    let (channel, wanted) = match notifier.upgrade() {
        Some(n) => {
            let mut shards = n.shards();
            shards.events = Some(events.clone());
            (n.channel.clone(), shards.wanted.slots())
        }
        None => return (false, Ok(())),
    };
    // Clears `events` however this ends, so that newly wanted slots wait
    // for the next subscriber (which starts from `wanted`).
    struct Detach<'a>(&'a Weak<Notifier>);
    impl Drop for Detach<'_> {
        fn drop(&mut self) {
            if let Some(n) = self.0.upgrade() {
                n.shards().events = None;
            }
        }
    }
    let _detach = Detach(notifier);
    let wake = {
        let notifier = notifier.clone();
        Arc::new(move |payload: &[u8]| {
            if let Some(n) = notifier.upgrade() {
                n.wake(payload);
            }
        })
    };
    let mut subscriptions = Subscriptions::new(Arc::clone(&cluster), channel, events, wake);
    subscriptions.want(wanted);
    subscriptions.place().await;
    match notifier.upgrade() {
        Some(n) => n.listening.send_replace(true),
        None => return (true, Ok(())),
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            event = heard.recv() => {
                // `subscriptions` holds a sender: the channel never closes.
                let mut next = event;
                let mut moved = false;
                while let Some(event) = next {
                    match event {
                        Event::Want(slot) => subscriptions.want([slot]),
                        Event::Moved(shard, slot) => {
                            subscriptions.moved(shard, slot);
                            moved = true;
                        }
                        Event::Dropped(shard) => {
                            subscriptions.dropped(shard);
                            moved = true;
                        }
                    }
                    next = heard.try_recv().ok();
                }
                if moved {
                    // Where the moved slots are now; if it cannot be read,
                    // they wait for the next tick.
                    let _ = cluster.topology().read().await;
                }
                subscriptions.place().await;
            }
            _ = tick.tick() => {
                let Some(n) = notifier.upgrade() else {
                    return (true, Ok(()));
                };
                let idle = n.shards().wanted.forget_idle(Instant::now(), LINGER);
                drop(n);
                if !idle.is_empty() {
                    subscriptions.forget(&idle).await;
                }
                ticks += 1;
                if ticks.is_multiple_of(PING_EVERY) {
                    subscriptions.ping().await;
                }
                if subscriptions.has_pending() {
                    cluster.topology().refresh();
                    subscriptions.place().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_say_what_happened() {
        let client = redis::Client::open("redis://127.0.0.1:1/").unwrap();
        let notifier = Notifier::new("c".into(), Feed::Server(client));
        let watch = notifier.register("a:b");
        let other = notifier.register("a");
        notifier.wake(b"3:a:bvENTRY");
        assert!(matches!(watch.landed(), Some(Landing::Value(b, None)) if &*b == b"ENTRY"));
        notifier.wake(b"3:a:bV5:tokenENTRY");
        assert!(
            matches!(watch.landed(), Some(Landing::Value(b, Some(t))) if &*b == b"ENTRY" && &*t == b"token")
        );
        assert!(watch.landed().is_none(), "seen once");
        assert!(other.landed().is_none());
        notifier.wake(b"1:ar");
        assert!(matches!(other.landed(), Some(Landing::Retry)));
        notifier.wake(b"1:ax");
        assert!(matches!(other.landed(), Some(Landing::Failed)));
        notifier.wake(b"1:af");
        assert!(matches!(other.landed(), Some(Landing::Fetch)));
        for garbage in [
            &b""[..],
            b"x",
            b"9:a",
            b"-1:a",
            b"1:",
            b"1:a",
            b"1:av",
            b"1:aV",
            b"1:aV5:tok",
            b"1:aV3:tok",
            b"1:aVx:tokE",
            b"1:arX",
        ] {
            notifier.wake(garbage);
        }
        assert!(other.landed().is_none(), "garbage is ignored");
        drop((watch, other));
        assert!(notifier.lock().is_empty());
    }
}
