//! The near tier's tracking connection: one RESP3 connection per cache
//! with `CLIENT TRACKING ON` (default mode), on which the near tier's
//! fills read their keys, so that Redis remembers which keys this process
//! holds and pushes an invalidation on the same connection when anyone
//! changes one (a write, a delete, an expiry, an eviction, `FLUSHALL`).
//! Redis tracks only the keys read here: a fill elsewhere broadcasts
//! nothing.
//!
//! Pushes are handled in the connection's reader, in the order they
//! arrive, before the replies after them.
//!
//! Delivery is proven, not assumed: a connection that answers commands
//! may still deliver no invalidation (a proxy that drops pushes, a
//! connection left on a demoted master while writes go to the new one).
//! Every [`PROVE_EVERY`] a round reads a canary key of this cache's own on
//! the tracking connection (so Redis tracks it there), then changes it
//! from the cache's main connection, where every write of this process
//! goes; when Redis's invalidation of the canary arrives on the tracking
//! connection, every invalidation Redis sent there before it has been
//! handled, so the tier may serve for [`LEASE`] from the round's start
//! (see `near.rs`). A round whose invalidation does not arrive within the
//! lease ends the connection; a drop, an unanswered read, or a refused
//! `CLIENT TRACKING` empties the tier, which serves nothing until a new
//! connection proves delivery again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use redis::Value;
use tokio::sync::{watch, Notify};

use super::link::{Link, SentinelTarget};
use crate::backend::Bytes;
use crate::error::{Error, Result};
use crate::near::{Flush, NearStore, LEASE, PROVE_EVERY};

/// Where the tracking connection goes.
// One per cache: boxing the client would gain nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum TrackFeed {
    /// One server: its RESP3 client.
    Server(redis::Client),
    /// The master the sentinels name at each connect.
    Sentinel(Arc<SentinelTarget>),
}

/// The live tracking connection, with the generation it serves, what
/// wakes its keep-alive to give it up, and how many invalidations of the
/// canary it has heard.
struct Tracked {
    conn: MultiplexedConnection,
    generation: u64,
    restart: Arc<Notify>,
    heard: watch::Receiver<u64>,
}

pub(crate) struct Tracker {
    pub(crate) store: Arc<NearStore>,
    feed: TrackFeed,
    connect_timeout: Duration,
    /// The cache's main connection, which changes the canary.
    main: Arc<ArcSwapOption<Link>>,
    /// A key of this cache's own whose invalidations prove delivery.
    canary: Arc<str>,
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
    /// A tracker of `store` on `feed`, whose rounds change `canary` on the
    /// cache's `main` connection.
    pub(crate) fn new(
        store: Arc<NearStore>,
        feed: TrackFeed,
        connect_timeout: Duration,
        main: Arc<ArcSwapOption<Link>>,
        canary: String,
    ) -> Self {
        Tracker {
            store,
            feed,
            connect_timeout,
            main,
            canary: canary.into(),
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
/// How long a round of proof may take: past it the lease lapses anyway.
const PROOF_TIMEOUT: Duration = LEASE;

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
        let prover = Prover {
            main: Arc::clone(&t.main),
            canary: Arc::clone(&t.canary),
        };
        drop(t);
        let mut pause = backoff;
        match tracked {
            Ok(tracked) => {
                // Backing off again unless it worked (a server loading its
                // data accepts connections but answers nothing; a proxy
                // may drop every push).
                backoff = if keep_alive(&tracker, &store, &prover, tracked, switches).await {
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
    let (hear, heard) = watch::channel(0u64);
    let canary = Arc::clone(&t.canary);
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(t.connect_timeout))
        .set_response_timeout(Some(LEASE))
        .set_push_sender(move |push: redis::PushInfo| {
            if let Some(store) = store.upgrade() {
                let heard = Heard {
                    canary: &canary,
                    count: &hear,
                };
                pushed(&store, &woken, &heard, generation, push);
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
        heard,
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

/// Where a tracking connection counts the invalidations of the canary.
struct Heard<'a> {
    canary: &'a str,
    count: &'a watch::Sender<u64>,
}

impl Heard<'_> {
    fn one(&self) {
        self.count.send_modify(|count| *count += 1);
    }
}

/// What the tracking connection's reader does with a push: drops the named
/// keys, or everything; counts the canary's invalidations (an invalidation
/// of every key counts too: Redis sent it after what came before it); a
/// dropped connection empties the tier and wakes the keep-alive to
/// reconnect.
fn pushed(
    store: &NearStore,
    restart: &Notify,
    heard: &Heard<'_>,
    generation: u64,
    push: redis::PushInfo,
) {
    match push.kind {
        redis::PushKind::Invalidate => match push.data.first() {
            Some(Value::Array(keys)) => {
                for key in keys {
                    let Value::BulkString(key) = key else {
                        // Not a key: take it as everything.
                        store.flush(Flush::Everything);
                        heard.one();
                        return;
                    };
                    // A key that is not UTF-8 is none of this cache's.
                    match std::str::from_utf8(key) {
                        Ok(key) if key == heard.canary => heard.one(),
                        Ok(key) => store.invalidated(key),
                        Err(_) => {}
                    }
                }
            }
            // `nil`: every key (FLUSHALL, FLUSHDB).
            _ => {
                store.flush(Flush::Everything);
                heard.one();
            }
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

/// What proves a tracking connection's delivery: the cache's main
/// connection, and the canary it changes.
struct Prover {
    main: Arc<ArcSwapOption<Link>>,
    canary: Arc<str>,
}

impl Prover {
    /// Changes the canary from the main connection, within `bound`;
    /// whether Redis took it. `false` with no main connection open yet
    /// (the first read through Redis opens it).
    async fn touch(&self, round: u64, bound: Duration) -> bool {
        let Some(main) = self.main.load_full() else {
            return false;
        };
        let mut conn = Link::clone(&main);
        let mut set = redis::cmd("SET");
        // Gone by itself a while after the cache is.
        set.arg(&*self.canary).arg(round).arg("PX").arg(60_000);
        let sent = set.query_async::<()>(&mut conn);
        matches!(tokio::time::timeout(bound, sent).await, Ok(Ok(())))
    }
}

/// How one round of the keep-alive ended.
enum Round {
    /// The canary's invalidation arrived: delivery proven.
    Proven,
    /// The main connection could not change the canary: nothing proven,
    /// nothing against the tracking connection either.
    Unproven,
    /// The tracking connection did not answer, or did not deliver the
    /// canary's invalidation in time, or is to be given up.
    Failed,
}

/// One round of proof on `tracked`, started at `sent`: reads the canary
/// there (Redis tracks it from then on), changes it from the main
/// connection, and waits for its invalidation, all within the lease.
async fn prove(tracked: &Tracked, prover: &Prover, round: u64, sent: Instant) -> Round {
    let deadline = sent + PROOF_TIMEOUT;
    let mut conn = tracked.conn.clone();
    let mut heard = tracked.heard.clone();
    let mut read = redis::cmd("GET");
    read.arg(&*prover.canary);
    let answered = tokio::select! {
        answered = tokio::time::timeout(PROOF_TIMEOUT, read.query_async::<Value>(&mut conn)) => {
            matches!(answered, Ok(Ok(_)))
        }
        () = tracked.restart.notified() => false,
    };
    if !answered {
        return Round::Failed;
    }
    // Counted before the reply was handed over: what is heard from now on
    // was sent by Redis after the read.
    let before = *heard.borrow_and_update();
    if !prover
        .touch(round, deadline.saturating_duration_since(Instant::now()))
        .await
    {
        return Round::Unproven;
    }
    let arrived = tokio::select! {
        arrived = tokio::time::timeout_at(deadline.into(), heard.wait_for(|n| *n > before)) => {
            matches!(arrived, Ok(Ok(_)))
        }
        () = tracked.restart.notified() => false,
    };
    if arrived {
        Round::Proven
    } else {
        Round::Failed
    }
}

/// Proves the connection's delivery every [`PROVE_EVERY`] until it fails,
/// the cache is gone, its generation is over, or (Sentinel) a failover was
/// heard of; then ends it. Whether delivery was proven at all.
async fn keep_alive(
    tracker: &Weak<Tracker>,
    store: &NearStore,
    prover: &Prover,
    tracked: Arc<Tracked>,
    switches: Option<(Arc<SentinelTarget>, u64)>,
) -> bool {
    let ended = Ended {
        tracker,
        store,
        tracked,
    };
    let tracked = &ended.tracked;
    let mut proven = false;
    for round in 0u64.. {
        let sent = Instant::now();
        let outcome = prove(tracked, prover, round, sent).await;
        if let Some((sentinel, at)) = &switches {
            if sentinel.switches() != *at {
                break; // the master changed: track the new one
            }
        }
        match outcome {
            Round::Proven if store.delivered(sent, tracked.generation) => proven = true,
            Round::Unproven => {}
            Round::Proven | Round::Failed => break,
        }
        let woken = tokio::select! {
            () = tokio::time::sleep(PROVE_EVERY.saturating_sub(sent.elapsed())) => false,
            () = tracked.restart.notified() => true,
        };
        if woken || tracker.strong_count() == 0 {
            break;
        }
    }
    proven
}
