//! The lock subscriber's share of a cluster: which slots' shard channels
//! this process wants ([`Wanted`]: the slots it has lock waiters in, kept
//! for a minute after the last one leaves), and the subscriptions that
//! serve them ([`Subscriptions`]: one RESP3 connection per master, each
//! channel subscribed at the master serving its slot).
//!
//! Each change is met by itself: a slot that moves away from a master
//! (which then unsubscribes its channel) is subscribed again at its new
//! master alone; a connection that drops, or stops answering its pings
//! (a frozen master keeps its sockets open), has only its own slots
//! subscribed again; a slot that no master is known to serve waits, and
//! is tried again, without holding up the others.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use redis::aio::MultiplexedConnection;
use tokio::sync::mpsc;

use super::link::ClusterTarget;
use crate::encoding::key::{slot, slot_tag};
use crate::error::{Error, Result};

/// How long a slot's channel stays subscribed after its last waiter left.
pub(crate) const LINGER: Duration = Duration::from_secs(60);

/// The slots this process has lock waiters in, or had lately.
#[derive(Debug, Default)]
pub(crate) struct Wanted {
    slots: HashMap<u16, Want>,
}

#[derive(Debug)]
struct Want {
    waiters: usize,
    /// When the last waiter left.
    idle_since: Option<Instant>,
}

impl Wanted {
    /// A waiter enters `slot`: whether the slot was not wanted before.
    pub(crate) fn enter(&mut self, slot: u16) -> bool {
        match self.slots.get_mut(&slot) {
            Some(want) => {
                want.waiters += 1;
                want.idle_since = None;
                false
            }
            None => {
                self.slots.insert(
                    slot,
                    Want {
                        waiters: 1,
                        idle_since: None,
                    },
                );
                true
            }
        }
    }

    /// A waiter leaves `slot` (at `now`).
    pub(crate) fn leave(&mut self, slot: u16, now: Instant) {
        if let Some(want) = self.slots.get_mut(&slot) {
            want.waiters = want.waiters.saturating_sub(1);
            if want.waiters == 0 {
                want.idle_since = Some(now);
            }
        }
    }

    /// Forgets the slots that have had no waiter for `linger` by `now`,
    /// and returns them.
    pub(crate) fn forget_idle(&mut self, now: Instant, linger: Duration) -> Vec<u16> {
        let idle: Vec<u16> = self
            .slots
            .iter()
            .filter(|(_, want)| {
                want.idle_since
                    .is_some_and(|since| now.saturating_duration_since(since) >= linger)
            })
            .map(|(&slot, _)| slot)
            .collect();
        for slot in &idle {
            self.slots.remove(slot);
        }
        idle
    }

    /// Every slot wanted.
    pub(crate) fn slots(&self) -> Vec<u16> {
        self.slots.keys().copied().collect()
    }
}

/// What the subscriber is told.
#[derive(Debug)]
pub(crate) enum Event {
    /// A slot is newly wanted.
    Want(u16),
    /// Connection number `shard` had its channel of `slot` unsubscribed
    /// by the server: the slot moved away from that master.
    Moved(u64, u16),
    /// Connection number `shard` dropped.
    Dropped(u64),
}

/// The shard channel of `slot`: `<channel>{<tag>}`, hashed to that slot.
pub(crate) fn shard_channel(channel: &str, slot: u16) -> String {
    format!("{channel}{{{}}}", slot_tag(slot))
}

/// What a subscriber does with a message's payload (wakes waiters).
pub(crate) type OnMessage = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// How long one subscription command or ping may take.
const ANSWER: Duration = Duration::from_secs(2);

/// The subscriptions of one subscriber task: a connection per master, and
/// where each slot's channel is subscribed.
pub(crate) struct Subscriptions {
    cluster: Arc<ClusterTarget>,
    channel: String,
    events: mpsc::UnboundedSender<Event>,
    /// Handles a message's payload (wakes waiters).
    on_message: OnMessage,
    shards: HashMap<(String, u16), Shard>,
    /// The master each subscribed slot's channel is subscribed at.
    placed: HashMap<u16, (String, u16)>,
    /// Wanted slots not subscribed anywhere yet.
    pending: BTreeSet<u16>,
    next_shard: u64,
}

/// A connection to one master, and the slots subscribed on it.
struct Shard {
    id: u64,
    conn: MultiplexedConnection,
    slots: HashSet<u16>,
}

impl Subscriptions {
    pub(crate) fn new(
        cluster: Arc<ClusterTarget>,
        channel: String,
        events: mpsc::UnboundedSender<Event>,
        on_message: OnMessage,
    ) -> Self {
        Subscriptions {
            cluster,
            channel,
            events,
            on_message,
            shards: HashMap::new(),
            placed: HashMap::new(),
            pending: BTreeSet::new(),
            next_shard: 0,
        }
    }

    /// Whether some wanted slot is not subscribed anywhere yet.
    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Marks `slots` to be subscribed (by the next [`Subscriptions::place`]).
    pub(crate) fn want(&mut self, slots: impl IntoIterator<Item = u16>) {
        for slot in slots {
            if !self.placed.contains_key(&slot) {
                self.pending.insert(slot);
            }
        }
    }

    /// Connection number `shard` says `slot` moved: if that is where the
    /// slot's channel is, it is to be subscribed again.
    pub(crate) fn moved(&mut self, shard: u64, slot: u16) {
        let Some(address) = self.placed.get(&slot) else {
            return;
        };
        if let Some(found) = self.shards.get_mut(address).filter(|s| s.id == shard) {
            found.slots.remove(&slot);
            self.placed.remove(&slot);
            self.pending.insert(slot);
        }
    }

    /// Connection number `shard` dropped: its slots are to be subscribed
    /// again.
    pub(crate) fn dropped(&mut self, shard: u64) {
        let Some(address) = self
            .shards
            .iter()
            .find(|(_, s)| s.id == shard)
            .map(|(address, _)| address.clone())
        else {
            return;
        };
        if let Some(gone) = self.shards.remove(&address) {
            for slot in gone.slots {
                self.placed.remove(&slot);
                self.pending.insert(slot);
            }
        }
    }

    /// Stops listening to `slots` (no waiter wants them any more).
    pub(crate) async fn forget(&mut self, slots: &[u16]) {
        let mut unsubscribed = Vec::new();
        for &slot in slots {
            self.pending.remove(&slot);
            let Some(address) = self.placed.remove(&slot) else {
                continue;
            };
            if let Some(shard) = self.shards.get_mut(&address) {
                shard.slots.remove(&slot);
                let mut conn = shard.conn.clone();
                let unsubscribe = redis::cmd("SUNSUBSCRIBE")
                    .arg(shard_channel(&self.channel, slot))
                    .clone();
                unsubscribed.push(async move {
                    let _ = tokio::time::timeout(
                        ANSWER,
                        unsubscribe.query_async::<redis::Value>(&mut conn),
                    )
                    .await;
                });
            }
        }
        join_all(unsubscribed).await;
        self.shards.retain(|_, shard| !shard.slots.is_empty());
    }

    /// Subscribes each pending slot's channel at the master that the slot
    /// map names, the slots of one master in one pipeline; a slot whose
    /// master is unknown, or whose subscription fails, stays pending (and
    /// a master that fails loses its connection). Whether every pending
    /// slot is subscribed.
    pub(crate) async fn place(&mut self) -> bool {
        let topology = Arc::clone(self.cluster.topology());
        let mut by_master: HashMap<(String, u16), Vec<u16>> = HashMap::new();
        for &slot in &self.pending {
            if let Some(address) = topology
                .node_of(slot)
                .and_then(|node| topology.address(node))
            {
                by_master.entry(address).or_default().push(slot);
            }
        }
        for (address, slots) in by_master {
            match self.subscribe_at(&address, &slots).await {
                Ok(subscribed) => {
                    for slot in subscribed {
                        self.pending.remove(&slot);
                        self.placed.insert(slot, address.clone());
                    }
                }
                Err(err) => {
                    tracing::debug!(target: "redis_cached", error = %err, "a cluster master's lock notifications could not be subscribed");
                    if let Some(shard) = self.shards.get(&address) {
                        self.dropped(shard.id);
                    }
                }
            }
        }
        self.pending.is_empty()
    }

    /// Subscribes `slots`' channels at the master at `address`, on its
    /// connection (made now if need be); the slots it subscribed (a slot
    /// the master does not serve, by a stale slot map, is refused).
    async fn subscribe_at(&mut self, address: &(String, u16), slots: &[u16]) -> Result<Vec<u16>> {
        if !self.shards.contains_key(address) {
            let shard = self.connect(address).await?;
            self.shards.insert(address.clone(), shard);
        }
        let Some(shard) = self.shards.get_mut(address) else {
            return Ok(Vec::new());
        };
        // One command per channel (channels of two slots in one command
        // are refused as CROSSSLOT), all sent at once on the connection.
        let subscribing = slots.iter().map(|&slot| {
            let mut conn = shard.conn.clone();
            let subscribe = redis::cmd("SSUBSCRIBE")
                .arg(shard_channel(&self.channel, slot))
                .clone();
            async move {
                let answer =
                    tokio::time::timeout(ANSWER, subscribe.query_async::<redis::Value>(&mut conn))
                        .await;
                (slot, answer)
            }
        });
        let mut subscribed = Vec::with_capacity(slots.len());
        for (slot, answer) in join_all(subscribing).await {
            match answer {
                Ok(Ok(_)) => {
                    shard.slots.insert(slot);
                    subscribed.push(slot);
                }
                // Refused for this slot (MOVED: it is elsewhere now).
                Ok(Err(err)) if err.code().is_some() => {}
                Ok(Err(err)) => return Err(Error::from_redis(&err)),
                Err(_) => return Err(Error::Timeout(ANSWER)),
            }
        }
        Ok(subscribed)
    }

    /// A RESP3 connection to the master at `address`, whose pushes wake
    /// waiters or tell this subscriber what changed.
    async fn connect(&mut self, (host, port): &(String, u16)) -> Result<Shard> {
        self.next_shard += 1;
        let id = self.next_shard;
        let client = self.cluster.node_client(host, *port)?;
        let (events, on_message) = (self.events.clone(), Arc::clone(&self.on_message));
        let pushes = move |push: redis::PushInfo| {
            match push.kind {
                redis::PushKind::SMessage => {
                    if let Some(redis::Value::BulkString(payload)) = push.data.get(1) {
                        on_message(payload);
                    }
                }
                redis::PushKind::SUnsubscribe => {
                    if let Some(redis::Value::BulkString(channel)) = push.data.first() {
                        let _ = events.send(Event::Moved(id, slot(channel)));
                    }
                }
                redis::PushKind::Disconnection => {
                    let _ = events.send(Event::Dropped(id));
                }
                _ => {}
            }
            Ok::<(), ()>(())
        };
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.cluster.connect_timeout()))
            .set_response_timeout(Some(ANSWER))
            .set_push_sender(pushes);
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| Error::from_redis(&e))?;
        Ok(Shard {
            id,
            conn,
            slots: HashSet::new(),
        })
    }

    /// Pings every connection: one that does not answer (its master
    /// frozen, or a connection silently lost) is dropped, and its slots
    /// are subscribed again once the slot map names their masters.
    pub(crate) async fn ping(&mut self) {
        let pings = self.shards.values().map(|shard| {
            let (id, mut conn) = (shard.id, shard.conn.clone());
            async move {
                let answered = tokio::time::timeout(
                    ANSWER,
                    redis::cmd("PING").query_async::<redis::Value>(&mut conn),
                )
                .await;
                (id, matches!(answered, Ok(Ok(_))))
            }
        });
        for (id, answered) in join_all(pings).await {
            if !answered {
                self.dropped(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_forgotten_a_while_after_their_last_waiter() {
        let mut wanted = Wanted::default();
        let start = Instant::now();
        assert!(wanted.enter(1));
        assert!(!wanted.enter(1), "already wanted");
        assert!(wanted.enter(2));
        wanted.leave(1, start);
        assert!(
            wanted.forget_idle(start + LINGER, LINGER).is_empty(),
            "one waiter left"
        );
        wanted.leave(1, start);
        wanted.leave(2, start + LINGER);
        assert_eq!(wanted.forget_idle(start + LINGER, LINGER), [1]);
        assert_eq!(wanted.slots(), [2]);
        // A waiter coming back keeps it.
        assert!(!wanted.enter(2));
        assert!(wanted.forget_idle(start + 3 * LINGER, LINGER).is_empty());
        assert_eq!(wanted.slots(), [2]);
    }
}
