//! The near tier's tracking connection: one RESP3 connection per cache
//! with `CLIENT TRACKING ON` (default mode), on which the near tier's
//! fills read their keys, so that Redis remembers which keys this process
//! holds and pushes an invalidation on the same connection when anyone
//! changes one (a write, a delete, an expiry, an eviction, `FLUSHALL`).
//! Redis tracks only the keys read here: a fill elsewhere broadcasts
//! nothing.
//!
//! Pushes are handled in the connection's reader, in the order they
//! arrive, before the replies after them. The connection is pinged every
//! [`PING_EVERY`]; each answer lets the tier serve for [`LEASE`] from the
//! ping's sending (see `near.rs`). A drop, a failed or late ping, or a
//! refused `CLIENT TRACKING` empties the tier, which serves nothing until
//! a new connection tracks and answers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use redis::Value;
use tokio::sync::Notify;

use super::link::SentinelTarget;
use crate::backend::Bytes;
use crate::error::{Error, Result};
use crate::near::{Flush, NearStore, LEASE, PING_EVERY};

/// Where the tracking connection goes.
// One per cache: boxing the client would gain nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum TrackFeed {
    /// One server: its RESP3 client.
    Server(redis::Client),
    /// The master the sentinels name at each connect.
    Sentinel(Arc<SentinelTarget>),
}

/// The live tracking connection, with the generation it serves and what
/// wakes its keep-alive to give it up.
struct Tracked {
    conn: MultiplexedConnection,
    generation: u64,
    restart: Arc<Notify>,
}

pub(crate) struct Tracker {
    pub(crate) store: Arc<NearStore>,
    feed: TrackFeed,
    connect_timeout: Duration,
    live: ArcSwapOption<Tracked>,
    /// Whether the tracking task is alive; its guard clears it.
    running: Arc<AtomicBool>,
    /// Whether `CLIENT TRACKING` was refused (logged once).
    refused: AtomicBool,
}

/// What a tracked read found: the entry and its remaining TTL in ms
/// (negative: none), or nothing.
pub(crate) type TrackedRead = Option<(Bytes, i64)>;

impl Tracker {
    pub(crate) fn new(store: Arc<NearStore>, feed: TrackFeed, connect_timeout: Duration) -> Self {
        Tracker {
            store,
            feed,
            connect_timeout,
            live: ArcSwapOption::empty(),
            running: Arc::new(AtomicBool::new(false)),
            refused: AtomicBool::new(false),
        }
    }

    /// Starts the tracking task unless one is alive (on the caller's
    /// runtime; it ends when the cache is dropped or its runtime ends).
    pub(crate) fn ensure_running(self: &Arc<Self>) {
        if self.running.load(Ordering::Acquire) || self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let running = Running(Arc::clone(&self.running));
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let tracker = Arc::downgrade(self);
        runtime.spawn(async move {
            let _running = running;
            track_loop(tracker).await;
        });
    }

    /// Reads `key` (at most `limit + 1` bytes of it, with `bounded_reads`)
    /// and its TTL on the tracking connection, in one round trip, so that
    /// Redis tracks it; `None` when no connection tracks now.
    pub(crate) fn read(
        &self,
        key: &str,
        limit: Option<usize>,
    ) -> Option<impl std::future::Future<Output = Result<TrackedRead>> + 'static> {
        let tracked = self.live.load_full()?;
        let key = key.to_owned();
        Some(async move {
            let mut conn = tracked.conn.clone();
            let mut pipe = redis::pipe();
            match limit {
                Some(limit) => pipe.cmd("GETRANGE").arg(&key).arg(0).arg(limit),
                None => pipe.cmd("GET").arg(&key),
            };
            let (value, pttl): (Option<Vec<u8>>, i64) = pipe
                .cmd("PTTL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .map_err(|e| Error::from_redis(&e))?;
            // `GETRANGE` of a missing key is "": no entry is empty.
            Ok(value
                .filter(|v| !v.is_empty())
                .map(|v| (Bytes::Owned(v), pttl)))
        })
    }

    /// The master failed over: what the tracking connection heard of the
    /// old one says nothing of the new; track the new one.
    pub(crate) fn failed_over(&self) {
        if let Some(tracked) = self.live.load_full() {
            self.store.disconnected(tracked.generation);
            tracked.restart.notify_one();
        }
    }
}

struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// After Redis refused tracking: it will not change its mind soon.
const REFUSED_BACKOFF: Duration = Duration::from_secs(60);
/// How long an answer to a ping may take: past it the lease lapses anyway.
const PING_TIMEOUT: Duration = LEASE;

async fn track_loop(tracker: Weak<Tracker>) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let Some(t) = tracker.upgrade() else {
            return;
        };
        // Before the master is looked up: a failover during the lookup
        // voids what it found.
        let switches = match &t.feed {
            TrackFeed::Sentinel(sentinel) => Some((Arc::clone(sentinel), sentinel.switches())),
            TrackFeed::Server(_) => None,
        };
        let tracked = connect(&t, switches.as_ref().map(|(_, at)| *at)).await;
        let store = Arc::clone(&t.store);
        drop(t);
        let mut pause = backoff;
        match tracked {
            Ok(tracked) => {
                // Backing off again unless it worked (a server loading its
                // data accepts connections but answers no ping).
                backoff = if keep_alive(&tracker, &store, tracked, switches).await {
                    FIRST_BACKOFF
                } else {
                    (backoff * 2).min(MAX_BACKOFF)
                };
                pause = backoff;
            }
            Err(err) => {
                if let Some(t) = tracker.upgrade() {
                    let refused = match &err {
                        Error::Refused(_) | Error::Rejected(_) | Error::Config(_) => true,
                        // Before Redis 6: no RESP3 (HELLO), no tracking.
                        Error::Redis(message) => {
                            let message = message.to_ascii_lowercase();
                            message.contains("resp3") || message.contains("unknown")
                        }
                        _ => false,
                    };
                    if refused {
                        pause = REFUSED_BACKOFF;
                    }
                    if refused && !t.refused.swap(true, Ordering::Relaxed) {
                        tracing::warn!(target: "redis_cached", error = %err, "the near tier is off: Redis refused client tracking (it needs Redis 6 or later, RESP3, and the CLIENT command allowed); calls read Redis, and tracking is tried again every minute");
                    } else {
                        tracing::debug!(target: "redis_cached", error = %err, "near tier: tracking connection failed; calls read Redis meanwhile");
                    }
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        if tracker.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(pause).await;
    }
}

/// Opens a RESP3 connection whose pushes go to the store, and turns
/// tracking on. The store is emptied and starts a new generation first:
/// nothing from an earlier connection is served. On Sentinel, `switches`
/// is the failover count before the lookup: a failover since voids the
/// connection.
async fn connect(t: &Tracker, switches: Option<u64>) -> Result<Arc<Tracked>> {
    let bound = t.connect_timeout.saturating_add(LEASE);
    let client = match &t.feed {
        TrackFeed::Server(client) => client.clone(),
        TrackFeed::Sentinel(sentinel) => {
            let master = tokio::time::timeout(bound, sentinel.master())
                .await
                .map_err(|_| Error::Timeout(bound))??;
            super::link::resp3(&master).map_err(|e| Error::from_redis(&e))?
        }
    };
    let generation = t.store.connected();
    let store = Arc::downgrade(&t.store);
    let restart = Arc::new(Notify::new());
    let woken = Arc::clone(&restart);
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(t.connect_timeout))
        .set_response_timeout(Some(LEASE))
        .set_push_sender(move |push: redis::PushInfo| {
            if let Some(store) = store.upgrade() {
                pushed(&store, &woken, generation, push);
            }
            Ok::<(), ()>(())
        });
    let open = async {
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| Error::from_redis(&e))?;
        redis::cmd("CLIENT")
            .arg("TRACKING")
            .arg("ON")
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| tracking_refused(&e))?;
        Ok::<_, Error>(conn)
    };
    let conn = tokio::time::timeout(bound, open)
        .await
        .map_err(|_| Error::Timeout(bound))??;
    if let (TrackFeed::Sentinel(sentinel), Some(at)) = (&t.feed, switches) {
        if sentinel.switches() != at {
            return Err(Error::Redis(
                "the master failed over while tracking started".into(),
            ));
        }
    }
    let tracked = Arc::new(Tracked {
        conn,
        generation,
        restart,
    });
    t.live.store(Some(Arc::clone(&tracked)));
    Ok(tracked)
}

/// The error of a `CLIENT TRACKING ON` that failed. Redis answering it
/// with a plain error (`ERR`: an unknown or renamed command, tracking
/// unsupported or its options refused) or `NOPERM` (an ACL) refuses
/// tracking: asking again soon would get the same answer. Other failures
/// (a timeout, a server loading its data) are worth another try.
fn tracking_refused(err: &redis::RedisError) -> Error {
    match err.code() {
        Some(code @ ("ERR" | "NOPERM")) => Error::Refused(format!("CLIENT TRACKING: {code}")),
        _ => Error::from_redis(err),
    }
}

/// What the tracking connection's reader does with a push: drops the named
/// keys, or everything; a dropped connection empties the tier and wakes
/// the keep-alive to reconnect.
fn pushed(store: &NearStore, restart: &Notify, generation: u64, push: redis::PushInfo) {
    match push.kind {
        redis::PushKind::Invalidate => match push.data.first() {
            Some(Value::Array(keys)) => {
                for key in keys {
                    let Value::BulkString(key) = key else {
                        // Not a key: take it as everything.
                        store.flush(Flush::Everything);
                        return;
                    };
                    // A key that is not UTF-8 is none of this cache's.
                    if let Ok(key) = std::str::from_utf8(key) {
                        store.invalidated(key);
                    }
                }
            }
            // `nil`: every key (FLUSHALL, FLUSHDB).
            _ => store.flush(Flush::Everything),
        },
        redis::PushKind::Disconnection => {
            store.disconnected(generation);
            restart.notify_one();
        }
        _ => {}
    }
}

/// Ends a tracking connection however its keep-alive ends (the runtime
/// shutting down included): the tier serves nothing it may have missed,
/// and no read goes to the connection.
struct Ended<'a> {
    tracker: &'a Weak<Tracker>,
    store: &'a NearStore,
    tracked: Arc<Tracked>,
}

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.store.disconnected(self.tracked.generation);
        if let Some(t) = self.tracker.upgrade() {
            t.live
                .compare_and_swap(&Some(Arc::clone(&self.tracked)), None::<Arc<Tracked>>);
        }
    }
}

/// Pings the connection until it fails, the cache is gone, its generation
/// is over, or (Sentinel) a failover was heard of; then ends it. Whether a
/// ping was answered at all.
async fn keep_alive(
    tracker: &Weak<Tracker>,
    store: &NearStore,
    tracked: Arc<Tracked>,
    switches: Option<(Arc<SentinelTarget>, u64)>,
) -> bool {
    let ended = Ended {
        tracker,
        store,
        tracked,
    };
    let tracked = &ended.tracked;
    let mut conn = tracked.conn.clone();
    let mut proven = false;
    loop {
        let sent = Instant::now();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<Value>(&mut conn);
        let answered = tokio::select! {
            answered = tokio::time::timeout(PING_TIMEOUT, ping) => matches!(answered, Ok(Ok(_))),
            () = tracked.restart.notified() => false,
        };
        if let Some((sentinel, at)) = &switches {
            if sentinel.switches() != *at {
                break; // the master changed: track the new one
            }
        }
        if !answered || !store.answered(sent, tracked.generation) {
            break;
        }
        proven = true;
        let woken = tokio::select! {
            () = tokio::time::sleep(PING_EVERY.saturating_sub(sent.elapsed())) => false,
            () = tracked.restart.notified() => true,
        };
        if woken || tracker.strong_count() == 0 {
            break;
        }
    }
    proven
}
