//! The cache-aside algorithm behind `#[redis_cached]` and `get_or_compute`:
//! look up the key; on a miss, lead or follow this process's computation
//! (with `lock = true`, under the cross-process lock); store the result only
//! if the key has not changed since it was read.
//!
//! That last rule is the "no stale set" of memcache leases: a computation
//! that began before an invalidation (which leaves a unique tombstone) or a
//! write-through (which leaves a new value) finds the key changed, and its
//! older result is not stored, nor handed to this process's followers.
//!
//! The algorithm is a [`Fill`]: a state machine on bytes, compiled once,
//! and so is the [`Miss`] that drives it for a call (`call::hit` has the rest of
//! a call, the hit path). The work that depends on the result's type
//! (decode, run the body, encode) is handed to the call's own code, a
//! [`Compute`], at each poll. No result is held from one poll to the next
//! (only its stored part), so a cached function's future is `Send`
//! whenever its body's is, whatever its error type.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use crate::backend::{Bytes, Seen};
use crate::call::lock::{LockGuard, LockWait, Waited};
use crate::encoding::shape::{Shape, Split};
use crate::engine::flight::{self, Followed, Leader, Role};
use crate::engine::policy::Policy;
use crate::engine::store::{Encoded, Hit, Inner, StoreOutcome};
use crate::observe::site::Site;
use crate::observe::stats::Event;

tokio::task_local! {
    /// The keys the current task is computing, innermost first: a body
    /// that asks for its own key computes it rather than wait for itself.
    static COMPUTING: Computing;
}

#[derive(Clone)]
struct Computing(Arc<Frame>);

struct Frame {
    /// One key, or a batch's keys.
    keys: Vec<String>,
    outer: Option<Computing>,
}

/// Whether the current task is computing `key` already.
pub(crate) fn reentrant(key: &str) -> bool {
    COMPUTING
        .try_with(|computing| {
            let mut frame = Some(computing);
            while let Some(Computing(f)) = frame {
                if f.keys.iter().any(|k| k == key) {
                    return true;
                }
                frame = f.outer.as_ref();
            }
            false
        })
        .unwrap_or(false)
}

impl Computing {
    /// The keys the current task computes, `key` innermost.
    fn enter(key: &str) -> Self {
        Computing::enter_all(vec![key.to_owned()])
    }

    /// The keys the current task computes, `keys` innermost.
    fn enter_all(keys: Vec<String>) -> Self {
        let outer = COMPUTING.try_with(Computing::clone).ok();
        Computing(Arc::new(Frame { keys, outer }))
    }
}

/// Runs `body` marked as computing `key`.
pub(crate) fn marked<F: Future>(key: &str, body: F) -> impl Future<Output = F::Output> {
    COMPUTING.scope(Computing::enter(key), body)
}

/// Runs `body` marked as computing each of `keys` (a batch).
pub(crate) fn marked_all<F: Future>(keys: Vec<String>, body: F) -> impl Future<Output = F::Output> {
    COMPUTING.scope(Computing::enter_all(keys), body)
}

/// What a [`Fill`] needs from the function's code next.
pub(crate) enum Step {
    /// An entry: decode it, then [`Fill::accept`] or [`Fill::reject`] it.
    Found(Bytes),
    /// Run the body, then [`Fill::finish`] or [`Fill::fail`].
    Compute,
    /// Run the body and share nothing: the leader failed, its value does not
    /// decode as this type, or this task is the leader (a re-entrant call).
    Alone,
}

/// How a call got its result, as its tracing span reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// From the cache.
    Hit,
    /// From the cache, past its TTL, while a refresh runs.
    Stale,
    /// The body ran, and its result was stored (or could not be).
    Miss,
    /// From another caller's computation, in this process or another.
    Coalesced,
    /// The body ran because Redis could not be read.
    Fallback,
    /// The body ran without the cache (none set, or `bypass`).
    Uncached,
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Stale => "stale",
            Outcome::Miss => "miss",
            Outcome::Coalesced => "coalesced",
            Outcome::Fallback => "fallback",
            Outcome::Uncached => "uncached",
        }
    }
}

/// Where a found entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The leader's read of the key (its followers get what it accepts).
    Read,
    /// The leader of this process's computation.
    Leader,
    /// A lock holder in some process.
    Holder,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Join this process's computation; `true` after an earlier leader
    /// ended without a value (read the key again before computing).
    Join(bool),
    /// Leading: read the key.
    Read,
    /// Leading after a miss: record the tags, then lock or compute.
    Lead,
    /// Waiting for the cross-process lock.
    Lock,
    /// Found an entry from this source; waiting for accept or reject.
    Found(Source),
    /// Computing, or done.
    Computing,
}

/// One call's way through the cache-aside algorithm, on bytes.
pub(crate) struct Fill<'a> {
    inner: &'a Inner,
    key: String,
    tags: &'a [String],
    policy: Policy,
    state: State,
    /// What the key held when read, for the compare-and-set.
    seen: Seen,
    leader: Option<Leader<'a>>,
    wait: Option<LockWait>,
    guard: Option<LockGuard<'a>>,
    /// The entry last found, until it is accepted or rejected.
    found: Option<Bytes>,
    /// When the body started (not read on a hit, which never computes).
    started: Option<Instant>,
    /// `refresh(…)`: a result that cannot be stored invalidates the key,
    /// since the entry there is now older than what the caller got.
    forced: bool,
}

impl<'a> Fill<'a> {
    /// A fill for a `lock = true` call, which joins this process's
    /// computation before anyone reads the key (a crowd at a cold key then
    /// sends one read and one lock attempt per process).
    pub(crate) fn new(inner: &'a Inner, key: String, tags: &'a [String], policy: Policy) -> Self {
        Fill::starting(inner, key, tags, policy, Seen::Unknown, State::Join(false))
    }

    /// A fill for a call that read the key, which held `seen` (a miss).
    pub(crate) fn after_miss(
        inner: &'a Inner,
        key: String,
        tags: &'a [String],
        policy: Policy,
        seen: Seen,
    ) -> Self {
        Fill::starting(inner, key, tags, policy, seen, State::Join(false))
    }

    /// A fill for `refresh(…)`: computes at once (joining no computation
    /// and taking no lock), then stores by compare-and-set against `seen`.
    pub(crate) fn forced(
        inner: &'a Inner,
        key: String,
        tags: &'a [String],
        policy: Policy,
        seen: Seen,
    ) -> Self {
        let policy = Policy {
            lock: None,
            ..policy
        };
        let mut fill = Fill::starting(inner, key, tags, policy, seen, State::Lead);
        fill.forced = true;
        fill
    }

    /// A fill for a background refresh of an entry that held `seen`.
    pub(crate) fn for_refresh(
        inner: &'a Inner,
        key: String,
        tags: &'a [String],
        policy: Policy,
        seen: Seen,
    ) -> Self {
        Fill::starting(inner, key, tags, policy, seen, State::Computing)
    }

    fn starting(
        inner: &'a Inner,
        key: String,
        tags: &'a [String],
        policy: Policy,
        seen: Seen,
        state: State,
    ) -> Self {
        Fill {
            inner,
            key,
            tags,
            policy,
            state,
            seen,
            leader: None,
            wait: None,
            guard: None,
            found: None,
            started: None,
            forced: false,
        }
    }

    /// Whether a call reads the key before joining this process's
    /// computation (all but `lock = true` on Redis).
    pub(crate) fn reads_first(inner: &Inner, policy: &Policy) -> bool {
        !(policy.lock.is_some() && inner.backend.is_redis())
    }

    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    pub(crate) fn inner(&self) -> &'a Inner {
        self.inner
    }

    /// Whether this call takes the cross-process lock on a miss.
    fn locked(&self) -> bool {
        !Fill::reads_first(self.inner, &self.policy)
    }

    /// Advances to the next thing the function's code must do.
    pub(crate) async fn next(&mut self) -> Step {
        let inner = self.inner;
        loop {
            match self.state {
                State::Join(retried) => match inner.flights.join(&self.key) {
                    Role::Leader(leader) => {
                        self.leader = Some(leader);
                        // A hot key is read by its leader only; a retry
                        // reads again, since the earlier leader's store was
                        // refused: another writer got there first.
                        self.state = if retried || self.locked() {
                            State::Read
                        } else {
                            State::Lead
                        };
                    }
                    Role::Follower(receiver) => {
                        if reentrant(&self.key) {
                            // This task leads that computation: waiting
                            // would be forever.
                            self.state = State::Computing;
                            return Step::Alone;
                        }
                        inner.count(self.policy.site, Event::coalesced);
                        if self.locked() && !retried {
                            // It read nothing itself (a `lock = true` caller
                            // joins first): its call is a miss all the same,
                            // as a follower's that read the key is.
                            inner.count(self.policy.site, Event::misses);
                        }
                        // Never shorter than the leader may wait for
                        // another process's lock before computing.
                        let bound = match self.policy.lock {
                            Some(lock) => inner.settings.coalesce_wait.max(lock.wait * 2),
                            None => inner.settings.coalesce_wait,
                        };
                        match flight::follow_within(bound, receiver).await {
                            Followed::Value(entry) => {
                                return self.found(Bytes::Shared(entry), Source::Leader)
                            }
                            // Followers of a failure compute at once, side by side.
                            Followed::Failed => {
                                self.state = State::Computing;
                                return Step::Alone;
                            }
                            Followed::Nothing => self.state = State::Join(true),
                            Followed::TimedOut => {
                                inner.count(self.policy.site, Event::coalesce_timeouts);
                                self.state = State::Computing;
                                return Step::Alone;
                            }
                        }
                    }
                },
                State::Read => match inner.read_for(&self.key, &self.policy).await {
                    Ok(bytes) => return self.found(bytes, Source::Read),
                    Err(seen) => {
                        inner.count(self.policy.site, Event::misses);
                        self.seen = seen;
                        self.state = State::Lead;
                    }
                },
                State::Lead => {
                    // Before computing: an invalidation of a tag from now on
                    // reaches this key, and so also refuses this fill's
                    // store if it lands first. A key that could not be
                    // recorded is not stored: no tag would reach it.
                    if !self.record_tags().await {
                        self.seen = Seen::Unknown;
                    }
                    if self.locked() {
                        self.state = State::Lock;
                    } else {
                        self.state = State::Computing;
                        return Step::Compute;
                    }
                }
                State::Lock => {
                    let Some(lock) = self.policy.lock else {
                        self.state = State::Computing;
                        return Step::Compute;
                    };
                    let wait = self
                        .wait
                        .get_or_insert_with(|| LockWait::new(&lock, self.policy.site));
                    let seen = std::mem::replace(&mut self.seen, Seen::Unknown);
                    // Boxed: the lock machinery is several times the size of
                    // the rest, and only a miss's leader needs it, while
                    // every call (a hit, a follower) would carry its space.
                    match Box::pin(wait.next(inner, &self.key, seen, &lock)).await {
                        Waited::Hold(guard, now) => {
                            self.guard = Some(guard);
                            self.seen = now;
                            self.state = State::Computing;
                            return Step::Compute;
                        }
                        Waited::Landed(bytes) => return self.found(bytes, Source::Holder),
                        Waited::Compute { seen, failed } => {
                            self.seen = seen;
                            if failed {
                                // This process's followers compute beside
                                // this caller rather than after it.
                                if let Some(leader) = self.leader.take() {
                                    leader.fail();
                                }
                            }
                            self.state = State::Computing;
                            return Step::Compute;
                        }
                    }
                }
                State::Found(_) | State::Computing => {
                    // Misuse by the caller (no accept/reject): compute.
                    self.state = State::Computing;
                    return Step::Alone;
                }
            }
        }
    }

    fn found(&mut self, bytes: Bytes, source: Source) -> Step {
        // Kept only to share with followers: a plain hit copies nothing.
        if self.leader.is_some() {
            self.found = Some(bytes.clone());
        }
        self.state = State::Found(source);
        Step::Found(bytes)
    }

    /// The entry found decoded to a result: share it with this process's
    /// followers if this call leads them.
    pub(crate) fn accept(&mut self) -> Outcome {
        let outcome = match self.state {
            State::Found(Source::Read) => Outcome::Hit,
            _ => Outcome::Coalesced,
        };
        let found = self.found.take();
        if let State::Found(Source::Read) = self.state {
            self.inner.count(self.policy.site, Event::hits);
        }
        if let (Some(leader), Some(bytes)) = (&self.leader, found) {
            leader.publish(Arc::from(&*bytes));
        }
        self.state = State::Computing;
        outcome
    }

    /// The entry found is no result (a tombstone, garbage, another type, an
    /// absence for a type without one): `seen` is what the key held.
    /// Returns `true` when the caller must then compute alone: the entry
    /// came from this process's leader, whose value does not read back as
    /// this type (a serde impl that does not round-trip), so joining again
    /// would find the same entry.
    #[must_use]
    pub(crate) fn reject(&mut self, seen: Seen) -> bool {
        self.found = None;
        match self.state {
            State::Found(Source::Read) => {
                self.inner.count(self.policy.site, Event::misses);
                self.seen = seen;
                self.state = State::Lead;
                false
            }
            State::Found(Source::Holder) => {
                self.seen = seen;
                self.state = State::Lock;
                false
            }
            _ => {
                self.inner.count(self.policy.site, Event::decode_errors);
                self.state = State::Computing;
                true
            }
        }
    }

    /// For a refresh: takes the lock in one attempt when the function has
    /// one; `false` when another process holds it, the entry changed
    /// meanwhile, or Redis fails (the refresh is then not needed or not
    /// possible).
    pub(crate) async fn lock_once(&mut self) -> bool {
        let Some(lock) = self.policy.lock.filter(|_| self.locked()) else {
            return true;
        };
        match LockWait::try_once(self.inner, &self.key, &self.seen, &lock, self.policy.site).await {
            Some((guard, now)) => {
                self.guard = Some(guard);
                self.seen = now;
                true
            }
            None => false,
        }
    }

    /// Records the key under the function's tags; whether that worked.
    #[must_use]
    pub(crate) async fn record_tags(&self) -> bool {
        if self.tags.is_empty() {
            return true;
        }
        // Kept longer than the value by how long a caller may wait for the
        // lock before computing, since it records before it waits.
        let wait = self.policy.lock.map(|lock| lock.wait).unwrap_or_default();
        let ttl = self.keep_for().saturating_add(wait);
        // Boxed, like the lock: only a tagged miss needs its space.
        Box::pin(self.inner.tag(&self.key, self.tags, ttl))
            .await
            .is_ok()
    }

    /// How long the value is kept.
    fn keep_for(&self) -> Duration {
        self.policy.ttl.unwrap_or(self.inner.settings.default_ttl)
            + self.policy.stale.unwrap_or_default()
    }

    /// Why the body runs: a miss, or Redis could not be read.
    fn computing_outcome(&self) -> Outcome {
        match self.seen {
            Seen::Unknown if !self.forced => Outcome::Fallback,
            _ => Outcome::Miss,
        }
    }

    /// How long the body has run.
    fn computed_for(&self) -> Option<Duration> {
        self.started.map(|started| started.elapsed())
    }

    /// The body starts now (for the computation's time, and counted).
    pub(crate) fn computing(&mut self) {
        self.inner.count(self.policy.site, Event::computes);
        self.started = Some(Instant::now());
    }

    /// Encodes what the body returned, with how long it took.
    pub(crate) fn encode<S: Shape<R>, R>(&self, result: &R) -> Option<Encoded> {
        let took = self
            .started
            .map(|started| started.elapsed())
            .unwrap_or_default();
        self.inner.computed(self.policy.site, took);
        self.inner.encode_result::<S, R>(result, &self.policy, took)
    }

    /// Stores the computed entry (by compare-and-set, or through the
    /// lock's release) and shares it with this process's followers, unless
    /// the key changed meanwhile: then they join again and read anew.
    pub(crate) async fn finish(&mut self, encoded: Encoded) -> StoreOutcome {
        let outcome = match (self.guard.take(), encoded.1) {
            (Some(guard), _) => guard.release(&self.seen, &encoded).await,
            (None, Some(ttl)) => {
                self.inner
                    .store_if(
                        &self.key,
                        &self.seen,
                        encoded.0.clone(),
                        ttl,
                        self.policy.site,
                    )
                    .await
            }
            (None, None) => StoreOutcome::Failed,
        };
        if self.forced && outcome == StoreOutcome::Failed {
            // Failures are counted inside; the caller has its result.
            let _ = self.inner.tombstone(&self.key).await;
        }
        if let Some(leader) = &self.leader {
            if outcome != StoreOutcome::Refused {
                leader.publish(encoded.0);
            }
        }
        outcome
    }

    /// The body failed (an `Err`, or a value that cannot be serialized):
    /// followers here and lock waiters everywhere compute by themselves.
    pub(crate) fn fail(&mut self) {
        if let Some(leader) = self.leader.take() {
            leader.fail();
        }
        if let Some(guard) = self.guard.take() {
            guard.fail();
        }
    }
}

/// A boxed future of the miss path, which works on bytes alone.
type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The miss path of one call, compiled once: lead or follow the
/// computation of the key, compute, store, share. A [`Fill`] driven by
/// hand, since it hands the work that depends on the result's type to the
/// call's own code (a [`Compute`], given at each poll). The fill moves
/// from one boxed step to the next: only a miss allocates them.
pub(crate) struct Miss<'a> {
    stage: Stage<'a>,
    outcome: Outcome,
    /// How long the body ran, once it has.
    computed: Option<Duration>,
}

enum Stage<'a> {
    /// Waiting for the fill's next step.
    Next(Boxed<'a, (Box<Fill<'a>>, Step)>),
    /// Running the body, marked as computing the key; when `alone`, its
    /// result is neither stored nor shared.
    Body {
        fill: Box<Fill<'a>>,
        computing: Computing,
        alone: bool,
    },
    /// Storing the result, and sharing it.
    Finish(Boxed<'a, ()>),
    Done,
}

impl<'a> Miss<'a> {
    pub(crate) fn new(fill: Fill<'a>) -> Self {
        Miss {
            stage: Stage::next(Box::new(fill)),
            outcome: Outcome::Miss,
            computed: None,
        }
    }

    /// How the call got its result (once it has).
    pub(crate) fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// How long the body ran, if it did.
    pub(crate) fn computed(&self) -> Option<Duration> {
        self.computed
    }

    /// Advances the miss; `Ready` once the call has its result (in
    /// `call::hit`).
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>, call: &mut dyn Compute) -> Poll<()> {
        loop {
            let stage = match &mut self.stage {
                Stage::Next(next) => {
                    let (fill, step) = ready!(next.as_mut().poll(cx));
                    match Stage::after(fill, step, call, &mut self.outcome) {
                        Some(stage) => stage,
                        None => break,
                    }
                }
                Stage::Body {
                    fill,
                    computing,
                    alone,
                } => {
                    ready!(COMPUTING.sync_scope(computing.clone(), || call.poll_body(cx)));
                    self.computed = fill.computed_for();
                    if *alone {
                        break;
                    }
                    let Some(encoded) = call.encode(fill) else {
                        fill.fail();
                        break;
                    };
                    let Stage::Body { mut fill, .. } =
                        std::mem::replace(&mut self.stage, Stage::Done)
                    else {
                        unreachable!()
                    };
                    Stage::Finish(Box::pin(async move {
                        fill.finish(encoded).await;
                    }))
                }
                Stage::Finish(store) => {
                    ready!(store.as_mut().poll(cx));
                    break;
                }
                Stage::Done => panic!("a miss polled after it ended"),
            };
            self.stage = stage;
        }
        // Drops the fill now: its leader's followers, if it ended
        // without sharing, join again.
        self.stage = Stage::Done;
        Poll::Ready(())
    }
}

impl<'a> Stage<'a> {
    fn next(mut fill: Box<Fill<'a>>) -> Self {
        Stage::Next(Box::pin(async move {
            let step = fill.next().await;
            (fill, step)
        }))
    }

    /// The stage after `step`; `None` once the call has its result.
    fn after(
        mut fill: Box<Fill<'a>>,
        step: Step,
        call: &mut dyn Compute,
        outcome: &mut Outcome,
    ) -> Option<Self> {
        let alone = match step {
            Step::Found(bytes) => match call.decode(fill.inner(), bytes, fill.policy.site) {
                Ok(()) => {
                    *outcome = fill.accept();
                    return None;
                }
                // Computes alone, or joins or waits again.
                Err(seen) => {
                    if !fill.reject(seen) {
                        return Some(Stage::next(fill));
                    }
                    true
                }
            },
            Step::Compute => false,
            Step::Alone => true,
        };
        *outcome = fill.computing_outcome();
        fill.computing();
        let computing = Computing::enter(fill.key());
        Some(Stage::Body {
            fill,
            computing,
            alone,
        })
    }
}

/// The result a hit stands for, or (for an absence stored for a type that
/// has none) what the key held.
pub(crate) fn rebuild<S: Shape<R>, R>(hit: Hit<S::Value>) -> Result<R, Seen> {
    match hit.value {
        Some(value) => Ok(S::from_value(value)),
        None => S::absent().ok_or(Seen::Bytes(hit.raw)),
    }
}

/// A result's stored part, kept across an `.await` in place of the result.
pub(crate) type Kept<V, R> = Result<V, fn() -> R>;

/// Takes `result` apart; `Err` gives back a result that is not stored.
pub(crate) fn keep<S: Shape<R>, R>(result: R) -> Result<Kept<S::Value, R>, R> {
    match S::split(result) {
        Split::Value(value) => Ok(Ok(value)),
        Split::Absent(absent) => Ok(Err(absent)),
        Split::Other(result) => Err(result),
    }
}

pub(crate) fn unkeep<S: Shape<R>, R>(kept: Kept<S::Value, R>) -> R {
    match kept {
        Ok(value) => S::from_value(value),
        Err(absent) => absent(),
    }
}

/// What the miss path asks of a call's own code: to decode an entry as
/// its result, to run its body, to encode the result.
pub(crate) trait Compute {
    /// Decodes `bytes` as the call's result; what the key held if they are
    /// no result.
    fn decode(&mut self, inner: &Inner, bytes: Bytes, site: Option<&Site>) -> Result<(), Seen>;
    /// Polls the body; once ready, its result is the call's.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<()>;
    /// The entry to store for the body's result, of which only the stored
    /// part is kept from then on; `None`: the result is returned as it is
    /// (an error, or a value that cannot be serialized).
    fn encode(&mut self, fill: &Fill<'_>) -> Option<Encoded>;
}

impl Inner {
    /// Decodes an entry as a result of shape `S`, or says what it is.
    pub(crate) fn decode_result<S: Shape<R>, R>(
        &self,
        bytes: Bytes,
        site: Option<&Site>,
    ) -> Result<R, Seen> {
        match self.decode::<S::Value>(bytes, site) {
            crate::engine::store::Lookup::Hit(hit) => rebuild::<S, R>(hit),
            crate::engine::store::Lookup::Miss(seen) => Err(seen),
        }
    }
}
