//! The Redis backend: one multiplexed connection per cache (to a server,
//! a cluster or a Sentinel-managed master, see [`link`]), which reconnects
//! in the background, and one subscriber connection for lock
//! notifications. Every Redis command the cache sends, every Lua script and
//! every reply it parses is here, behind typed operations.
//!
//! The connection is created on first use, inside the caller's Tokio
//! runtime, so building a cache never touches the network and works outside
//! a runtime. When the breaker opens, the connection is dropped and the next
//! probe builds a fresh one: redis-rs only reconnects after I/O errors, so a
//! connection that failed for another reason (a wrong password that has
//! since been fixed, a master demoted by Sentinel) would otherwise stay
//! failed (on a cluster, see [`RedisBackend::failing`]).
//!
//! On a cluster every script's keys share one slot (a value and its
//! companions), a lock notification goes to a shard channel of the value's
//! slot, and the operations on many keys (tag records, tombstones of a
//! tag) are sent per key, in parallel, so that none spans two slots. The
//! master serving each slot ([`topology`]) gives each master a breaker of
//! its own.

mod flag;
mod journal;
mod link;
mod merge;
mod notify;
mod scripts;
mod sentinel;
mod shard;
mod topology;
mod track;
mod url;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use futures_util::future::{join_all, try_join_all};
use redis::aio::ConnectionManagerConfig;

use self::flag::ClearOnDrop;
use self::journal::JournalScripts;
pub(crate) use self::journal::{Buried, DeadLetter, JournalKeys, JournalPut, Journaled, Signed};
use self::link::Link;
pub(crate) use self::link::{ClusterTarget, SentinelTarget, Target};
use self::merge::{Busy, Merger, Reply, Route};
use self::notify::Feed;
pub(crate) use self::notify::{Landing, Notifier, Watch};
use self::scripts::{px, Scripts, SOURCES};
pub(crate) use self::topology::MASTER_NUMBERS;
use self::track::TrackFeed;
pub(crate) use self::track::Tracker;
use super::{Acquire, Backend, Bytes, Seen, StoreIf};
use crate::encoding::key::slot;
use crate::error::{is_migrating_code, Error, Result};
use crate::observe::meters::Counting;
use crate::observe::stats::Event;

/// The largest entry a lock notification carries; waiters fetch larger
/// ones, so that no message nears Redis's pub/sub output-buffer limits.
pub(crate) const NOTIFY_INLINE_MAX: usize = 16 * 1024;

pub(crate) struct RedisBackend {
    target: Target,
    scripts: Scripts,
    journal: JournalScripts,
    config: ConnectionManagerConfig,
    /// How long a command refused while its slot moves between cluster
    /// nodes is tried again (see [`Pacing`]).
    migration_window: Duration,
    /// The largest entry the cache reads or writes.
    limit: usize,
    /// Read on every operation: an `ArcSwap` load shares no cache line
    /// between threads, where a mutex would.
    /// Shared with the Sentinel failover watcher, which drops the link
    /// when the master changes.
    link: Arc<ArcSwapOption<Link>>,
    /// The Sentinel lookup in flight, which the callers that need it
    /// share.
    lookup: Arc<Lookup>,
    notifier: Arc<Notifier>,
    /// Merges the reads of many tasks into one `MGET`, when on.
    merger: Option<Arc<Merger>>,
    /// The near tier's tracking, on a server or a Sentinel master.
    tracker: Option<Arc<Tracker>>,
    /// Whether a check of a cluster connection runs, and when the last
    /// one started (see [`RedisBackend::check_cluster_link`]).
    link_check: Arc<AtomicBool>,
    last_link_check: std::sync::Mutex<Option<Instant>>,
    /// How many cluster connections were found stuck and replaced.
    stuck_links: Arc<AtomicU64>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// A Sentinel lookup: whether one runs, and its end.
struct Lookup {
    running: AtomicBool,
    done: tokio::sync::Notify,
    bound: Duration,
}

impl Default for Lookup {
    fn default() -> Self {
        Lookup {
            running: AtomicBool::new(false),
            done: tokio::sync::Notify::new(),
            bound: LOOKUP_BOUND,
        }
    }
}

/// How long a Sentinel lookup may take: redis-rs gives each sentinel 1 s
/// to connect, so this lets it pass over two that do not answer.
const LOOKUP_BOUND: Duration = Duration::from_secs(5);

/// Ends a lookup however its task ends: clears `running`, wakes waiters.
struct Done(Arc<Lookup>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Release);
        self.0.done.notify_waiters();
    }
}

/// Paces the retries of a command refused while its slot moves between
/// cluster nodes: `TRYAGAIN` (a command on two keys of a migrating slot,
/// one of them missing: a lock, a drain set), or a redirection that
/// outlasted redis-rs's own retries. A move of a slot with few keys takes
/// milliseconds: the command is sent again after a short pause, doubled
/// each time, as long as the next attempt starts within the window (from
/// the first attempt), which leaves it time to end within `op_timeout`
/// (see [`MIGRATION_ATTEMPT`]).
struct Pacing {
    window: Duration,
    /// `None` off a cluster (no `TRYAGAIN` there): no clock read.
    started: Option<Instant>,
    pause: Duration,
}

impl Pacing {
    const FIRST_PAUSE: Duration = Duration::from_millis(2);
    const MAX_PAUSE: Duration = Duration::from_millis(40);

    fn new(window: Duration) -> Self {
        Pacing {
            window,
            started: (!window.is_zero()).then(Instant::now),
            pause: Self::FIRST_PAUSE,
        }
    }

    /// After `err`: whether to send the command again, having paused.
    async fn again(&mut self, err: &redis::RedisError) -> bool {
        let Some(started) = self.started else {
            return false;
        };
        if !err.code().is_some_and(is_migrating_code)
            || started.elapsed() + self.pause >= self.window
        {
            return false;
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(Self::MAX_PAUSE);
        true
    }
}

/// How long one attempt of a command may take while its slot migrates:
/// redis-rs's own retries of a `TRYAGAIN` pause up to 140 ms, plus their
/// round trips.
const MIGRATION_ATTEMPT: Duration = Duration::from_millis(150);

/// What a merged read came to.
enum Merged<'m> {
    /// The `MGET` that carried it answered.
    Value(Option<Vec<u8>>),
    /// The caller reads it alone, holding this (if any) while on the wire.
    Alone(Option<Busy<'m>>),
}

/// How a lock is released.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Release<'a> {
    /// With a value to store (entry, TTL); waiters get it.
    Store(&'a [u8], Duration),
    /// With a result to hand to the waiters without storing it (an absence
    /// that is not cached).
    Share(&'a [u8]),
    /// The computation failed, or its result cannot be stored or shared;
    /// waiters compute by themselves.
    Failed,
}

impl RedisBackend {
    /// Prepares the connection settings for `target`; connects nothing.
    /// Connections take at most `connect_timeout`, operations
    /// `op_timeout`. `channel` names where lock notifications go; `limit`
    /// is the largest entry; with `merge`, concurrent reads are merged,
    /// each merged read bounded by it (not on a cluster). A near tier of at
    /// most `near` entries (none for 0) and about `near_bytes` bytes is
    /// kept on a server or a Sentinel master, its delivery proven by
    /// changing the key `canary`.
    pub(crate) fn new(
        target: Target,
        (connect_timeout, op_timeout): (Duration, Duration),
        channel: String,
        limit: usize,
        merge: Option<Duration>,
        (near, near_bytes, canary): (usize, usize, String),
    ) -> Result<Self> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            // Every operation is already bounded by the cache's own
            // op_timeout; a second timer per request inside redis-rs would
            // only cost hit-path throughput.
            .set_response_timeout(None)
            // No retries inside redis-rs: a refused connection fails at once and
            // the breaker paces the next attempts.
            .set_number_of_retries(0)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(500));
        let feed = match &target {
            Target::Server(client) => Feed::Server(client.clone()),
            Target::Sentinel(sentinel) => Feed::Sentinel(Arc::clone(sentinel)),
            Target::Cluster(cluster) => Feed::Sharded(Arc::clone(cluster)),
        };
        // Off a cluster no slot migrates.
        let migration_window = match &target {
            Target::Cluster(_) => op_timeout.saturating_sub(MIGRATION_ATTEMPT),
            _ => Duration::ZERO,
        };
        let link = Arc::new(ArcSwapOption::empty());
        let merger = merge
            .filter(|_| !matches!(target, Target::Cluster(_)))
            .map(|bound| Arc::new(Merger::new(bound, Arc::clone(&link))));
        let track = match &target {
            _ if near == 0 => None,
            Target::Server(client) => Some(TrackFeed::Server(
                url::resp3(client).map_err(|e| Error::from_redis(&e))?,
            )),
            Target::Sentinel(sentinel) => Some(TrackFeed::Sentinel(Arc::clone(sentinel))),
            Target::Cluster(_) => None,
        };
        let tracker = track.map(|feed| {
            let store = Arc::new(crate::near::NearStore::new(near, near_bytes));
            let main = Arc::clone(&link);
            Arc::new(Tracker::new(store, feed, connect_timeout, main, canary))
        });
        Ok(RedisBackend {
            tracker,
            merger,
            target,
            scripts: Scripts::default(),
            journal: JournalScripts::default(),
            config,
            migration_window,
            limit,
            link,
            lookup: Arc::new(Lookup::default()),
            link_check: Arc::new(AtomicBool::new(false)),
            last_link_check: std::sync::Mutex::new(None),
            stuck_links: Arc::new(AtomicU64::new(0)),
            notifier: Notifier::new(channel, feed),
        })
    }

    /// The near tier's tracking, if this backend has one.
    pub(crate) fn tracker(&self) -> Option<&Arc<Tracker>> {
        self.tracker.as_ref()
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(_))
    }

    /// The current connection, made now if that needs no lookup; `None`
    /// for a Sentinel master not looked up yet.
    fn current(&self) -> Result<Option<Link>> {
        if let Some(link) = self.link.load().as_ref() {
            return Ok(Some(Link::clone(link)));
        }
        match Link::lazy(&self.target, &self.config)? {
            Some(fresh) => Ok(Some(self.keep(fresh))),
            None => Ok(None),
        }
    }

    /// Stores `fresh` as the connection unless another caller stored one
    /// first (then `fresh` is dropped unused); returns the one kept.
    fn keep(&self, fresh: Link) -> Link {
        let fresh = Arc::new(fresh);
        let previous = self
            .link
            .compare_and_swap(&None::<Arc<Link>>, Some(fresh.clone()));
        Link::clone(previous.as_ref().unwrap_or(&fresh))
    }

    async fn connection(&self) -> Result<Link> {
        let Target::Sentinel(sentinel) = &self.target else {
            // A server or a cluster connects lazily: always a link.
            return self
                .current()?
                .ok_or_else(|| Error::Redis("no connection".into()));
        };
        if !sentinel.is_watched() {
            self.watch_failovers(sentinel);
        }
        let looked_up = self.lookup.done.notified();
        tokio::pin!(looked_up);
        looked_up.as_mut().enable();
        if let Some(link) = self.current()? {
            return Ok(link);
        }
        self.look_up(sentinel);
        looked_up.await;
        self.current()?
            .ok_or_else(|| Error::Redis("no master found through Sentinel".into()))
    }

    /// Starts, unless one is running, a lookup of `sentinel`'s master in a
    /// task of its own, which keeps the link it finds: a caller that gives
    /// up waiting (its `op_timeout`) does not cancel it, and the lookup has
    /// its own bound, long enough to try the next sentinel when one does
    /// not answer. A failover heard of meanwhile voids what it found.
    fn look_up(&self, sentinel: &Arc<SentinelTarget>) {
        if self.lookup.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let lookup = Arc::clone(&self.lookup);
        let done = Done(Arc::clone(&lookup));
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // `done` clears `running`
        };
        let (link, sentinel, config) = (
            Arc::downgrade(&self.link),
            Arc::clone(sentinel),
            self.config.clone(),
        );
        let bound = lookup.bound;
        runtime.spawn(async move {
            let _done = done;
            let switches = sentinel.switches();
            match tokio::time::timeout(bound, Link::to_master(&sentinel, &config)).await {
                Ok(Ok(fresh)) if sentinel.switches() == switches => {
                    if let Some(link) = link.upgrade() {
                        link.compare_and_swap(&None::<Arc<Link>>, Some(Arc::new(fresh)));
                    }
                }
                Ok(Ok(_)) => tracing::debug!(target: "redis_cached", "the master failed over during its lookup"),
                Ok(Err(err)) => tracing::debug!(target: "redis_cached", error = %err, "no master found through Sentinel"),
                Err(_) => tracing::debug!(target: "redis_cached", "no sentinel answered within {bound:?}"),
            }
        });
    }

    /// Has `sentinel`'s failovers drop the connection and restart the lock
    /// subscriber, so that both move to the new master at once.
    fn watch_failovers(&self, sentinel: &Arc<SentinelTarget>) {
        let (link, notifier) = (Arc::downgrade(&self.link), Arc::downgrade(&self.notifier));
        let tracker = self.tracker.as_ref().map(Arc::downgrade);
        let alive = {
            let link = link.clone();
            move || link.strong_count() > 0
        };
        sentinel.watch_failovers(alive, move || {
            if let Some(link) = link.upgrade() {
                link.store(None);
            }
            if let Some(notifier) = notifier.upgrade() {
                notifier.restart();
            }
            if let Some(tracker) = tracker.as_ref().and_then(Weak::upgrade) {
                tracker.failed_over();
            }
        });
    }

    /// Drops the current connection; the next operation connects afresh.
    pub(crate) fn reset(&self) {
        self.link.store(None);
    }

    /// The number of the cluster master serving `key` (see
    /// [`topology`]); `None` off a cluster or while the slot map is not
    /// known.
    pub(crate) fn node_of(&self, key: &str) -> Option<usize> {
        match &self.target {
            Target::Cluster(cluster) => cluster.topology().node_of(slot(key.as_bytes())),
            _ => None,
        }
    }

    /// The address of cluster master number `node`.
    pub(crate) fn master_address(&self, node: usize) -> Option<(String, u16)> {
        match &self.target {
            Target::Cluster(cluster) => cluster.topology().address(node),
            _ => None,
        }
    }

    /// An operation on a cluster timed out: checks, in a task of its own,
    /// that the cluster connection still answers, and replaces it if not.
    /// redis-rs's cluster connection can stall for good: a refresh of its
    /// slot map (after a `MOVED`, which a resharding brings by the hundred)
    /// waits for a lock that a request it no longer polls holds, and every
    /// command waits behind the refresh. The check is a `PING` through the
    /// connection, within `bound`, to a master that is not failing
    /// (`healthy`) other than `avoid` (the one that timed out, which may
    /// only be frozen): if even it does not answer, the connection is
    /// stuck. At most one check a second.
    pub(crate) fn check_cluster_link(
        &self,
        avoid: Option<usize>,
        healthy: impl Fn(usize) -> bool,
        bound: Duration,
    ) {
        let Target::Cluster(cluster) = &self.target else {
            return;
        };
        if self.link_check.swap(true, Ordering::AcqRel) {
            return;
        }
        let checking = ClearOnDrop(Arc::clone(&self.link_check));
        {
            let mut last = self
                .last_link_check
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
                return;
            }
            *last = Some(Instant::now());
        }
        let topology = cluster.topology();
        let Some((host, port)) = topology
            .masters()
            .into_iter()
            .find(|&master| Some(master) != avoid && healthy(master))
            .and_then(|master| topology.address(master))
        else {
            return;
        };
        let (Ok(runtime), Some(link)) =
            (tokio::runtime::Handle::try_current(), self.link.load_full())
        else {
            return;
        };
        let (links, stuck_links) = (Arc::downgrade(&self.link), Arc::clone(&self.stuck_links));
        runtime.spawn(async move {
            let _checking = checking;
            let Link::Cluster(mut conn) = Link::clone(&link) else {
                return;
            };
            use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
            let ping = conn.route_command(
                redis::cmd("PING"),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port }),
            );
            if tokio::time::timeout(bound, ping).await.is_ok() {
                return;
            }
            let Some(links) = links.upgrade() else {
                return;
            };
            let previous = links.compare_and_swap(&Some(link), None::<Arc<Link>>);
            if previous.is_some() {
                stuck_links.fetch_add(1, Ordering::AcqRel);
                tracing::warn!(target: "redis_cached",
                    "the cluster connection stopped answering (a healthy master did not answer a PING \
                     within {bound:?}); replaced"
                );
            }
        });
    }

    /// How many cluster connections were found stuck and replaced (see
    /// [`RedisBackend::check_cluster_link`]): an operation that failed on
    /// one of them says nothing of the master it was sent to.
    pub(crate) fn stuck_links(&self) -> u64 {
        self.stuck_links.load(Ordering::Acquire)
    }

    /// A breaker opened (`reopened`: a probe failed): that of cluster
    /// master number `master`, or the whole one.
    ///
    /// On one server or a Sentinel master the connection is dropped, so
    /// that the probe connects afresh: redis-rs reconnects only after I/O
    /// errors, and one that failed for another reason (a wrong password
    /// since fixed, a master since demoted) would stay failed. A cluster
    /// connection reconnects to each node by itself: it is dropped only
    /// when the whole breaker opens (not at each failed probe, which would
    /// dial every node again), and a master's failure only has the slot map
    /// read again, since its replica may be taking over.
    pub(crate) fn failing(&self, master: Option<usize>, reopened: bool) {
        match (&self.target, master) {
            (Target::Cluster(cluster), Some(_)) => cluster.topology().refresh(),
            (Target::Cluster(cluster), None) => {
                cluster.topology().refresh();
                if !reopened {
                    self.reset();
                }
            }
            _ => self.reset(),
        }
    }

    /// A failed command's error. A Sentinel master that refuses writes
    /// (`READONLY`) was demoted: the next operation looks the master up.
    fn failed(&self, err: &redis::RedisError) -> Error {
        let err = Error::from_redis(err);
        if matches!(self.target, Target::Sentinel(_))
            && matches!(&err, Error::Refused(code) if code == "READONLY")
        {
            self.reset();
        }
        err
    }

    /// Connects if need be and loads every script, so that no later call
    /// pays for a `NOSCRIPT` retry: in one round trip on a server, on every
    /// node of a cluster.
    pub(crate) async fn prepare(&self) -> Result<()> {
        let mut conn = self.connection().await?;
        if self.is_cluster() {
            // A pipeline would go to one node: one command per script,
            // each to every master.
            for source in SOURCES {
                let load = redis::cmd("SCRIPT").arg("LOAD").arg(source).clone();
                conn.on_every_master(&load)
                    .await
                    .map_err(|e| self.failed(&e))?;
            }
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for source in SOURCES {
            pipe.cmd("SCRIPT").arg("LOAD").arg(source);
        }
        let _: Vec<String> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(&e))?;
        Ok(())
    }

    /// Starts the subscriber if need be and waits until it listens.
    pub(crate) async fn subscribed(&self, timeout: Duration) -> Result<()> {
        self.notifier.subscribed(timeout).await
    }

    /// Registers interest in `key`'s lock notifications, starting the
    /// subscriber on first use (or again, if its runtime has ended).
    pub(crate) fn watch(&self, key: &str) -> Watch {
        self.notifier.ensure_subscribed();
        self.notifier.register(key)
    }

    /// Runs a script; again after a pause while its slot moves between
    /// cluster nodes (see [`Pacing`]).
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        let mut conn = self.connection().await?;
        let mut pacing = Pacing::new(self.migration_window);
        loop {
            match invocation.invoke_async(&mut conn).await {
                Err(err) if pacing.again(&err).await => {}
                done => return done.map_err(|e| self.failed(&e)),
            }
        }
    }

    /// Runs a command, as [`RedisBackend::invoke`] runs a script.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T> {
        let mut conn = self.connection().await?;
        let mut pacing = Pacing::new(self.migration_window);
        loop {
            match cmd.query_async(&mut conn).await {
                Err(err) if pacing.again(&err).await => {}
                done => return done.map_err(|e| self.failed(&e)),
            }
        }
    }

    /// A read of `key` through the merger: beside others, part of the next
    /// `MGET`; alone (or not sent by the flusher), for the caller to read.
    async fn merged_get<'m>(&self, merger: &'m Arc<Merger>, key: &str) -> Result<Merged<'m>> {
        if self.link.load().is_none() {
            // Sets the connection up here (looking a Sentinel master up),
            // so that the flusher finds one; it connects on first use.
            self.connection().await?;
        }
        Ok(match merger.route(key) {
            Route::Direct(busy) => Merged::Alone(Some(busy)),
            Route::Queued(reply) => match reply.await {
                Ok(Reply::Value(value)) => Merged::Value(value),
                Ok(Reply::Failed(err)) => return Err(err),
                // Not sent (no connection open, or the flusher's runtime
                // ended): read alone, connecting if need be.
                Ok(Reply::Retry) | Err(_) => Merged::Alone(None),
            },
        })
    }

    /// The compare arguments (mode, seen) of `seen`; `None` when it is unknown.
    fn compare_args<'a>(&self, seen: &'a Seen) -> Option<(&'static str, CompareArg<'a>)> {
        match seen {
            Seen::Nothing => Some(("0", CompareArg::Bytes(&[]))),
            Seen::Bytes(bytes) => Some(("1", CompareArg::Bytes(bytes))),
            Seen::Oversized => Some(("2", CompareArg::Number(self.limit))),
            Seen::Unknown => None,
        }
    }

    /// One attempt at `lock` for `key`, which held `seen` when read.
    pub(crate) async fn acquire(
        &self,
        key: &str,
        lock: &str,
        seen: &Seen,
        token: &str,
        ttl: Duration,
    ) -> Result<Acquire> {
        let Some((mode, compare)) = self.compare_args(seen) else {
            return Err(Error::Redis("acquire needs a known value".into()));
        };
        let mut invocation = self.scripts.acquire.key(key);
        invocation.key(lock).arg(mode);
        compare.push(&mut invocation);
        invocation.arg(token).arg(px(ttl)).arg(self.limit);
        let reply: Vec<redis::Value> = self.invoke(&invocation).await?;
        parse_acquire(&reply)
    }

    /// Starts the watchdog of a held lock: a task of its own that extends
    /// `lock` to `ttl` every `ttl / 3` while `token` holds it (each attempt
    /// bounded by `timeout`), calling `extended` after each extension, and
    /// that ends when the lock is lost or the returned handle is aborted. A
    /// task rather than a part of the holder's future, so that the holder's
    /// computation is never paused by a slow Redis; `None` without a
    /// runtime or a connection.
    pub(crate) fn spawn_watchdog(
        &self,
        lock: &str,
        token: &str,
        ttl: Duration,
        timeout: Duration,
        counting: Counting,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let mut conn = self.current().ok()??;
        let script = self.scripts.extend.clone();
        let (lock, token) = (lock.to_owned(), token.to_owned());
        let period = (ttl / 3).max(Duration::from_millis(1));
        Some(runtime.spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let mut invocation = script.key(&lock);
                invocation.arg(&token).arg(px(ttl));
                let extend = invocation.invoke_async::<i64>(&mut conn);
                match tokio::time::timeout(timeout, extend).await {
                    Ok(Ok(1)) => counting.count(Event::lock_extends),
                    // Lost (expired and taken): nothing left to extend.
                    Ok(Ok(_)) => return,
                    // Redis slow or failing: counted; tried again next period.
                    Ok(Err(_)) => counting.count(Event::errors),
                    Err(_) => counting.count(Event::timeouts),
                }
            }
        }))
    }

    /// Releases `lock` if `token` holds it, stores by compare-and-set
    /// against `seen` if asked, and tells the waiters; whether it stored.
    pub(crate) async fn release(
        &self,
        key: &str,
        lock: &str,
        token: &str,
        seen: &Seen,
        release: Release<'_>,
    ) -> Result<bool> {
        let invocation = self.release_invocation(key, lock, token, seen, release);
        let stored: i64 = self.invoke(&invocation).await?;
        Ok(stored == 1)
    }

    fn release_invocation<'a>(
        &'a self,
        key: &'a str,
        lock: &'a str,
        token: &'a str,
        seen: &'a Seen,
        release: Release<'a>,
    ) -> redis::ScriptInvocation<'a> {
        // An unknown `seen` stores nothing: a stale set cannot be ruled out.
        let compare = self.compare_args(seen);
        let release = match (release, &compare) {
            (Release::Store(entry, _), None) => Release::Share(entry),
            (release, _) => release,
        };
        let (what, entry, ttl, failed) = match release {
            Release::Store(entry, ttl) => ("1", entry, px(ttl), "0"),
            Release::Share(entry) => ("2", entry, 1, "0"),
            Release::Failed => ("0", &[][..], 1, "1"),
        };
        let (mode, compare) = compare.unwrap_or(("1", CompareArg::Bytes(&[])));
        let (channel, publish) = self.notifier.channel_for(key);
        let mut invocation = self.scripts.release.key(key);
        invocation.key(lock).arg(token).arg(what).arg(mode);
        compare.push(&mut invocation);
        invocation
            .arg(entry)
            .arg(ttl)
            .arg(&*channel)
            .arg(key)
            .arg(failed)
            .arg(NOTIFY_INLINE_MAX)
            .arg(publish);
        invocation
    }

    /// Releases `lock` in a task of its own, storing nothing: for a holder
    /// that was cancelled (its future dropped), that does not know whether
    /// its acquire ran, whose computation `failed`, or whose release was
    /// refused while the slot moved between cluster nodes. Waiters are
    /// told to try again, or (`failed`) to compute by themselves. Each
    /// attempt is bounded by `timeout`; one refused while the slot moves is
    /// made again after a pause for as long as the lock may live (`ttl`),
    /// so that no lock outlives a migration. Without a runtime (it is
    /// shutting down), the lock expires by its TTL.
    pub(crate) fn release_detached(
        &self,
        key: &str,
        lock: &str,
        token: &str,
        failed: bool,
        (timeout, ttl): (Duration, Duration),
        counting: Counting,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Ok(Some(mut conn)) = self.current() else {
            return;
        };
        let script = self.scripts.release.clone();
        let (channel, publish) = self.notifier.channel_for(key);
        let channel = channel.into_owned();
        let (key, lock, token) = (key.to_owned(), lock.to_owned(), token.to_owned());
        runtime.spawn(async move {
            // As `release_invocation` with nothing to store.
            let mut invocation = script.key(&key);
            invocation
                .key(&lock)
                .arg(&token)
                .arg("0")
                .arg("1")
                .arg("")
                .arg("")
                .arg(1)
                .arg(&channel)
                .arg(&key)
                .arg(if failed { "1" } else { "0" })
                .arg(NOTIFY_INLINE_MAX)
                .arg(publish);
            let mut pacing = Pacing::new(ttl.max(timeout));
            loop {
                let release = invocation.invoke_async::<i64>(&mut conn);
                match tokio::time::timeout(timeout, release).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) if pacing.again(&err).await => continue,
                    Ok(Err(err)) => {
                        let err = Error::from_redis(&err);
                        counting.count(if err.is_migrating() {
                            Event::rejected
                        } else {
                            Event::errors
                        });
                        tracing::debug!(target: "redis_cached",
                            error = %err,
                            "releasing a lock in the background failed; it expires by its TTL"
                        );
                    }
                    Err(_) => {
                        counting.count(Event::timeouts);
                        tracing::debug!(target: "redis_cached",
                            "releasing a lock in the background timed out; it expires by its TTL"
                        );
                    }
                }
                return;
            }
        });
    }
}

/// The second compare argument of a script.
enum CompareArg<'a> {
    Bytes(&'a [u8]),
    Number(usize),
}

impl CompareArg<'_> {
    fn push(&self, invocation: &mut redis::ScriptInvocation<'_>) {
        match self {
            CompareArg::Bytes(bytes) => invocation.arg(*bytes),
            CompareArg::Number(n) => invocation.arg(*n),
        };
    }

    fn push_to(&self, cmd: &mut redis::Cmd) {
        match self {
            CompareArg::Bytes(bytes) => cmd.arg(*bytes),
            CompareArg::Number(n) => cmd.arg(*n),
        };
    }
}

fn parse_acquire(values: &[redis::Value]) -> Result<Acquire> {
    let int = |v: Option<&redis::Value>| match v {
        Some(redis::Value::Int(i)) => Some(*i),
        _ => None,
    };
    let bytes = |v: Option<&redis::Value>| match v {
        Some(redis::Value::BulkString(b)) if !b.is_empty() => Some(Bytes::Owned(b.clone())),
        _ => None,
    };
    let seen = |v: Option<&redis::Value>| bytes(v).map_or(Seen::Oversized, Seen::Bytes);
    match (int(values.first()), int(values.get(1))) {
        (Some(1), _) => Ok(Acquire::Landed(seen(values.get(1)))),
        (Some(2), Some(0)) => Ok(Acquire::Acquired(Seen::Nothing)),
        (Some(2), Some(1)) => Ok(Acquire::Acquired(seen(values.get(2)))),
        (Some(2), Some(2)) => Ok(Acquire::Acquired(Seen::Oversized)),
        (Some(3), _) => Ok(Acquire::Held(match values.get(1) {
            Some(redis::Value::BulkString(token)) if !token.is_empty() => {
                Some(token.as_slice().into())
            }
            _ => None,
        })),
        _ => Err(Error::Redis("unexpected reply to a lock attempt".into())),
    }
}

impl Backend for RedisBackend {
    async fn get(&self, key: &str, limit: Option<usize>) -> Result<Option<Bytes>> {
        let value: Option<Vec<u8>> = match limit {
            // GETRANGE reads at most limit + 1 bytes: an oversized value
            // costs no more than that to reject.
            Some(limit) => {
                self.query(redis::cmd("GETRANGE").arg(key).arg(0).arg(limit))
                    .await?
            }
            None => {
                let merged = match &self.merger {
                    Some(merger) => self.merged_get(merger, key).await?,
                    None => Merged::Alone(None),
                };
                match merged {
                    Merged::Value(value) => value,
                    // Counted as on the wire while it is.
                    Merged::Alone(_busy) => self.query(redis::cmd("GET").arg(key)).await?,
                }
            }
        };
        // A missing key reads as empty through GETRANGE; no entry is empty.
        Ok(value.filter(|v| !v.is_empty()).map(Bytes::Owned))
    }

    async fn get_many(&self, keys: &[String], limit: Option<usize>) -> Result<Vec<Option<Bytes>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let values: Vec<Option<Vec<u8>>> = match limit {
            // On a cluster, redis-rs splits an MGET by slot and sends the
            // parts in parallel.
            None => {
                let mut mget = redis::cmd("MGET");
                for key in keys {
                    mget.arg(key);
                }
                self.query(&mget).await?
            }
            // Another type at a key reads as absent, as it does through
            // MGET; the other keys are read as usual.
            Some(limit) if self.is_cluster() => {
                try_join_all(keys.iter().map(|key| async move {
                    let range = redis::cmd("GETRANGE").arg(key).arg(0).arg(limit).clone();
                    match self.query::<Option<Vec<u8>>>(&range).await {
                        Err(Error::Rejected(code)) if code == "WRONGTYPE" => Ok(None),
                        read => read,
                    }
                }))
                .await?
            }
            Some(limit) => {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for key in keys {
                    pipe.cmd("GETRANGE").arg(key).arg(0).arg(limit);
                }
                let mut conn = self.connection().await?;
                let reads: Vec<redis::RedisResult<Option<Vec<u8>>>> = pipe
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.failed(&e))?;
                reads
                    .into_iter()
                    .map(|read| match read {
                        Ok(value) => Ok(value),
                        Err(err) if err.code() == Some("WRONGTYPE") => Ok(None),
                        Err(err) => Err(self.failed(&err)),
                    })
                    .collect::<Result<_>>()?
            }
        };
        if values.len() != keys.len() {
            return Err(Error::Redis(
                "a multi-key read answered with the wrong count".into(),
            ));
        }
        Ok(values
            .into_iter()
            .map(|value| value.filter(|v| !v.is_empty()).map(Bytes::Owned))
            .collect())
    }

    async fn set(&self, key: &str, value: Arc<[u8]>, ttl: Duration) -> Result<()> {
        self.query(
            redis::cmd("SET")
                .arg(key)
                .arg(&*value)
                .arg("PX")
                .arg(px(ttl)),
        )
        .await
    }

    async fn set_if(
        &self,
        key: &str,
        seen: &Seen,
        value: Arc<[u8]>,
        ttl: Duration,
    ) -> Result<bool> {
        let Some((mode, compare)) = self.compare_args(seen) else {
            return Ok(false);
        };
        let mut invocation = self.scripts.set_if.key(key);
        invocation.arg(mode);
        compare.push(&mut invocation);
        invocation.arg(&*value).arg(px(ttl));
        let stored: i64 = self.invoke(&invocation).await?;
        Ok(stored == 1)
    }

    async fn set_many_if(&self, stores: &[StoreIf]) -> Result<Vec<bool>> {
        if self.is_cluster() {
            // One slot each: one script call each, in parallel. A key that
            // refuses (another type at it) is not stored; the others are.
            let results =
                join_all(stores.iter().map(|store| {
                    self.set_if(&store.key, &store.seen, store.value.clone(), store.ttl)
                }))
                .await;
            return results
                .into_iter()
                .map(|result| match result {
                    Err(Error::Rejected(_)) => Ok(false),
                    other => other,
                })
                .collect();
        }
        // One pipeline of EVALSHA; the stores whose key was never read
        // (`Seen::Unknown`) are not sent.
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut sent = Vec::with_capacity(stores.len());
        for store in stores {
            let Some((mode, compare)) = self.compare_args(&store.seen) else {
                sent.push(false);
                continue;
            };
            sent.push(true);
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(self.scripts.set_if.get_hash())
                .arg(1)
                .arg(&store.key)
                .arg(mode);
            compare.push_to(&mut cmd);
            cmd.arg(&*store.value).arg(px(store.ttl));
            pipe.add_command(cmd);
        }
        if !sent.contains(&true) {
            return Ok(sent);
        }
        let mut conn = self.connection().await?;
        let mut replies: Vec<redis::RedisResult<i64>> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(&e))?;
        if replies
            .iter()
            .any(|r| r.as_ref().is_err_and(|e| e.code() == Some("NOSCRIPT")))
        {
            // A server that lost its scripts (restarted, flushed): load
            // it, then send the pipeline again.
            redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(SOURCES[0]) // set_if's
                .query_async::<String>(&mut conn)
                .await
                .map_err(|e| self.failed(&e))?;
            replies = pipe
                .query_async(&mut conn)
                .await
                .map_err(|e| self.failed(&e))?;
        }
        // Each store alone: one that Redis refused (another program's
        // value of another type at its key) is not stored.
        let mut replies = replies.into_iter();
        Ok(sent
            .into_iter()
            .map(|sent| sent && matches!(replies.next(), Some(Ok(1))))
            .collect())
    }

    async fn tag(&self, keys: &[String], tag_keys: &[String], ttl: Duration) -> Result<()> {
        if keys.is_empty() || tag_keys.is_empty() {
            return Ok(());
        }
        if self.is_cluster() {
            // Tag sets live in slots of their own: one call per set.
            try_join_all(tag_keys.iter().map(|tag_key| async move {
                let mut invocation = self.scripts.tag.key(tag_key);
                invocation.arg(px(ttl)).arg(keys);
                self.invoke::<i64>(&invocation).await
            }))
            .await?;
            return Ok(());
        }
        let mut invocation = self.scripts.tag.prepare_invoke();
        for tag_key in tag_keys {
            invocation.key(tag_key);
        }
        invocation.arg(px(ttl)).arg(keys);
        let _: i64 = self.invoke(&invocation).await?;
        Ok(())
    }

    async fn tagged(&self, tag_key: &str, limit: usize) -> Result<Vec<(String, u64)>> {
        let members: Vec<(String, f64)> = self
            .query(
                redis::cmd("ZRANGE")
                    .arg(tag_key)
                    .arg(0)
                    .arg(limit.saturating_sub(1))
                    .arg("WITHSCORES"),
            )
            .await?;
        Ok(members
            .into_iter()
            .map(|(key, score)| (key, score as u64))
            .collect())
    }

    async fn set_many(&self, entries: &[(String, Arc<[u8]>)], ttl: Duration) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        if self.is_cluster() {
            // The keys live in many slots: one command each, in parallel
            // (a cluster connection pipelines them per node by itself).
            try_join_all(entries.iter().map(|(key, value)| async move {
                let set = redis::cmd("SET")
                    .arg(key)
                    .arg(&**value)
                    .arg("PX")
                    .arg(px(ttl))
                    .clone();
                self.query::<()>(&set).await
            }))
            .await?;
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (key, value) in entries {
            pipe.cmd("SET")
                .arg(key)
                .arg(&**value)
                .arg("PX")
                .arg(px(ttl))
                .ignore();
        }
        let mut conn = self.connection().await?;
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.failed(&e))
    }

    async fn drain_tag(&self, tag_key: &str, drain_key: &str) -> Result<bool> {
        let mut invocation = self.scripts.drain.key(tag_key);
        invocation.key(drain_key);
        let moved: i64 = self.invoke(&invocation).await?;
        Ok(moved == 1)
    }

    async fn untag(&self, tag_key: &str, members: &[(String, u64)]) -> Result<()> {
        if members.is_empty() {
            return Ok(());
        }
        let mut invocation = self.scripts.untag.key(tag_key);
        for (key, expiry) in members {
            invocation.arg(key).arg(*expiry);
        }
        let _: i64 = self.invoke(&invocation).await?;
        Ok(())
    }
}
