//! Merged lookups: single-key reads that many tasks issue at the same
//! moment go to Redis as one `MGET`.
//!
//! A read that finds no other read on the wire goes out at once as a
//! `GET`: a lone caller pays nothing for merging. A read that finds one
//! joins a queue. A flusher task, started on the runtime of the first read
//! to queue, sends what queued as one `MGET` and hands each caller its own
//! value (by position). While an `MGET` is out, what queues meanwhile waits
//! for it to come back (that is what makes batches), unless a whole batch
//! ([`MAX_MERGED`] keys) has queued: that goes out at once, so a burst
//! takes one round trip however large it is, as pipelined `GET`s would.
//! At most [`MAX_OUT`] `MGET`s are out at once; past them, with a whole
//! batch queued, reads go alone. When nothing is out or queued, the
//! flusher ends. Redis does the work of one command for many keys.
//!
//! Only a multi-thread runtime gets a flusher: its workers run spawned
//! tasks all along. A current-thread runtime runs them only while some
//! caller is inside its `block_on`, so a flusher left there could stall the
//! reads of every runtime; reads from one go alone.
//!
//! The flusher belongs to no caller, so no caller's fate stalls or repeats
//! the reads of others: a caller that gives up (dropped, or past its
//! `op_timeout`) only drops its end of the reply, and is not sent if it was
//! still queued; each `MGET` has its own bound. A flusher that cannot send
//! (no connection open) tells the reads it holds to retry, and the caller
//! then reads alone, with a `GET` of its own; so does a flusher whose
//! runtime ended, for every read it holds or that is queued (one it had
//! sent may then be read twice: a `GET` is harmless, a failure would count
//! against the breaker).
//!
//! A read does not queue behind a flusher that has shown no progress (sent
//! nothing since it started, or since its last `MGET` went out) for a
//! quarter of the bound: Redis is slow to answer, or the flusher's runtime
//! is busy with blocking work. It goes alone. Reads that queued before
//! then still wait for the `MGET`s out ahead of theirs.

use std::collections::VecDeque;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::runtime::RuntimeFlavor;
use tokio::sync::{oneshot, Notify};

use super::link::Link;
use crate::error::{Error, Result};
use crate::sync::{Mutex, MutexGuard};

/// The most keys one `MGET` carries; more wait for the next.
const MAX_MERGED: usize = 512;

/// The most `MGET`s out at once.
const MAX_OUT: usize = 16;

/// What a queued caller is told.
#[derive(Debug)]
pub(crate) enum Reply {
    /// Its value: the bytes, if the key held a string.
    Value(Option<Vec<u8>>),
    /// The `MGET` that carried its read failed.
    Failed(Error),
    /// Its read was not sent (no connection was open, or the flusher's
    /// runtime ended): it reads alone.
    Retry,
}

/// The merged reads of one cache.
pub(crate) struct Merger {
    state: Mutex<State>,
    /// Each `MGET`'s bound.
    bound: Duration,
    /// How long a flusher may show no progress before reads stop queueing
    /// behind it.
    patience: Duration,
    /// The cache's connection, as the flusher finds it for each `MGET`.
    link: Arc<ArcSwapOption<Link>>,
    /// Wakes the flusher when a whole batch has queued.
    batch_ready: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// Reads on the wire: `GET`s sent directly, and the flusher's `MGET`s.
    busy: usize,
    /// The flusher's `MGET`s on the wire.
    out: usize,
    queue: VecDeque<Waiting>,
    /// Whether a flusher runs (or has been started).
    flushing: bool,
    /// When the flusher last showed progress: started, or sent an `MGET`.
    progress: Option<Instant>,
}

#[derive(Debug)]
struct Waiting {
    key: String,
    reply: oneshot::Sender<Reply>,
}

/// How one read goes out.
pub(crate) enum Route<'m> {
    /// Alone: send a `GET` now, holding this while it is on the wire.
    Direct(Busy<'m>),
    /// Queued: wait for the reply.
    Queued(oneshot::Receiver<Reply>),
}

/// A read on the wire; dropped when it ends, however it ends.
pub(crate) struct Busy<'m>(&'m Merger);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.state().busy -= 1;
    }
}

impl std::fmt::Debug for Merger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Merger")
            .field("bound", &self.bound)
            .finish_non_exhaustive()
    }
}

impl Merger {
    pub(crate) fn new(bound: Duration, link: Arc<ArcSwapOption<Link>>) -> Self {
        Merger {
            state: Mutex::default(),
            bound,
            patience: bound / 4,
            link,
            batch_ready: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How a read of `key` goes out. The first read to queue starts the
    /// flusher on its own runtime; outside a multi-thread runtime, a read
    /// goes alone.
    pub(crate) fn route(self: &Arc<Self>, key: &str) -> Route<'_> {
        let runtime = tokio::runtime::Handle::try_current()
            .ok()
            .filter(|runtime| runtime.runtime_flavor() == RuntimeFlavor::MultiThread);
        let Some(runtime) = runtime else {
            self.state().busy += 1;
            return Route::Direct(Busy(self));
        };
        // The lock is released before a flusher is spawned: one dropped
        // at once (its runtime ended) takes it again.
        let routed = self.state().route(key, self.patience);
        match routed {
            Routed::Direct => Route::Direct(Busy(self)),
            Routed::Queued(reply, wake) => {
                match wake {
                    // Dropped unpolled if the runtime is shutting down: its
                    // guard then tells this read (and any queued since) to
                    // retry.
                    Wake::Start => drop(runtime.spawn(Flusher::new(self).run())),
                    Wake::BatchReady => self.batch_ready.notify_one(),
                    Wake::None => {}
                }
                Route::Queued(reply)
            }
        }
    }
}

/// How [`State::route`] sent a read.
enum Routed {
    /// Alone, counted as on the wire.
    Direct,
    /// Queued, its reply to come here; and whom that wakes.
    Queued(oneshot::Receiver<Reply>, Wake),
}

/// Whom a queued read wakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// No flusher runs: start one.
    Start,
    /// A whole batch is queued: the flusher may send it.
    BatchReady,
    None,
}

/// What the flusher does next.
enum Step {
    /// Sends this batch (counted as out; whether it was whole).
    Send(Vec<Waiting>, bool),
    /// Waits for an `MGET` to come back or a whole batch to queue.
    Wait,
    /// Nothing is out or queued: it has ended.
    End,
}

impl State {
    /// Queues a read of `key`, or counts it as going alone (nothing on the
    /// wire, the flusher stalled for `patience`, or no room).
    fn route(&mut self, key: &str, patience: Duration) -> Routed {
        if !self.may_queue(patience) {
            self.busy += 1;
            return Routed::Direct;
        }
        let (reply, receiver) = oneshot::channel();
        self.queue.push_back(Waiting {
            key: key.to_owned(),
            reply,
        });
        let wake = if !std::mem::replace(&mut self.flushing, true) {
            self.progress = Some(Instant::now());
            Wake::Start
        } else if self.queue.len() >= MAX_MERGED {
            Wake::BatchReady
        } else {
            Wake::None
        };
        Routed::Queued(receiver, wake)
    }

    /// The flusher's next step: a batch to send if one may go (see
    /// [`State::next_batch`]; a partial one always when none of its
    /// `MGET`s is out), else waiting while some are out, else the end.
    fn step(&mut self, partial: bool) -> Step {
        if let Some((batch, whole)) = self.next_batch(partial || self.out == 0) {
            return Step::Send(batch, whole);
        }
        if self.out > 0 {
            return Step::Wait;
        }
        // Nothing out, and nothing left that may go: nothing queued.
        self.flushing = false;
        Step::End
    }

    /// Whether a read may queue: something is on the wire or queued, the
    /// flusher has shown progress within `patience`, and it has room for
    /// the read (fewer than [`MAX_OUT`] `MGET`s out, or less than a whole
    /// batch queued).
    fn may_queue(&self, patience: Duration) -> bool {
        let alone = self.busy == 0 && self.queue.is_empty() && !self.flushing;
        let stalled = self.flushing
            && self
                .progress
                .is_some_and(|since| since.elapsed() >= patience);
        let full = self.out >= MAX_OUT && self.queue.len() >= MAX_MERGED;
        !alone && !stalled && !full
    }

    /// The next batch to send, counted as out: a whole one while fewer
    /// than [`MAX_OUT`] are out, or what queued if `partial` (none of the
    /// flusher's `MGET`s is out, or one just came back). With it, whether
    /// it was whole. Callers that gave up are not sent.
    fn next_batch(&mut self, partial: bool) -> Option<(Vec<Waiting>, bool)> {
        loop {
            let whole = self.queue.len() >= MAX_MERGED;
            if self.out >= MAX_OUT || !(whole || partial) || self.queue.is_empty() {
                return None;
            }
            let taken = self.queue.len().min(MAX_MERGED);
            let batch: Vec<Waiting> = self
                .queue
                .drain(..taken)
                .filter(|waiting| !waiting.reply.is_closed())
                .collect();
            if batch.is_empty() {
                continue;
            }
            self.out += 1;
            self.busy += 1;
            self.progress = Some(Instant::now());
            return Some((batch, whole));
        }
    }

    /// An `MGET` came back (or was dropped).
    fn came_back(&mut self) {
        self.out -= 1;
        self.busy -= 1;
    }
}

/// Sends what queues, as [`Merger`] says, until nothing is out or queued.
/// Dropped before that (its runtime ended), it tells every read it holds or
/// that is queued to retry, so that none waits on a flusher that is gone.
struct Flusher {
    merger: Arc<Merger>,
    /// Cleared once it ended by itself.
    running: bool,
}

impl Flusher {
    fn new(merger: &Arc<Merger>) -> Self {
        Flusher {
            merger: Arc::clone(merger),
            running: true,
        }
    }

    async fn run(mut self) {
        let merger = Arc::clone(&self.merger);
        // Dropped with the flusher: each `MGET` then drops its callers'
        // ends of the reply, which they take as "retry".
        let mut out = FuturesUnordered::new();
        let mut partial = true;
        loop {
            let step = merger.state().step(partial);
            match step {
                Step::Send(batch, whole) => {
                    partial &= whole;
                    out.push(send(&merger, batch));
                }
                Step::Wait => tokio::select! {
                    Some(()) = out.next() => partial = true,
                    () = merger.batch_ready.notified() => {}
                },
                Step::End => {
                    self.running = false;
                    return;
                }
            }
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        let mut state = self.merger.state();
        let queued: Vec<Waiting> = state.queue.drain(..).collect();
        state.flushing = false;
        drop(state);
        retry(queued);
    }
}

/// An `MGET` of the flusher's on the wire; dropped when it ends, however
/// it ends.
struct Out<'m>(&'m Merger);

impl Drop for Out<'_> {
    fn drop(&mut self) {
        self.0.state().came_back();
    }
}

/// Sends `batch` as one `MGET` and hands each caller its value; with no
/// connection open, tells them to read alone.
async fn send(merger: &Merger, batch: Vec<Waiting>) {
    let out = Out(merger);
    let replies = match merger.link.load_full() {
        Some(link) => Some(mget(&link, &batch, merger.bound).await),
        None => None,
    };
    drop(out);
    match replies {
        Some(replies) => hand_out(batch, replies),
        None => retry(batch),
    }
}

/// One `MGET` of every key of `batch`, bounded.
async fn mget(link: &Link, batch: &[Waiting], bound: Duration) -> Result<Vec<Option<Vec<u8>>>> {
    let mut cmd = redis::cmd("MGET");
    for waiting in batch {
        cmd.arg(&waiting.key);
    }
    let mut conn = Link::clone(link);
    match tokio::time::timeout(bound, cmd.query_async::<Vec<Option<Vec<u8>>>>(&mut conn)).await {
        Ok(Ok(values)) if values.len() == batch.len() => Ok(values),
        Ok(Ok(_)) => Err(Error::Redis("MGET answered with the wrong count".into())),
        Ok(Err(err)) => Err(Error::from_redis(&err)),
        Err(_) => Err(Error::Timeout(bound)),
    }
}

/// Gives each caller of `batch` its own value (or the error).
fn hand_out(batch: Vec<Waiting>, replies: Result<Vec<Option<Vec<u8>>>>) {
    match replies {
        Ok(values) => {
            for (waiting, value) in batch.into_iter().zip(values) {
                // A caller that gave up dropped its receiver: nothing to do.
                let _ = waiting.reply.send(Reply::Value(value));
            }
        }
        Err(err) => {
            for waiting in batch {
                let _ = waiting.reply.send(Reply::Failed(err.clone()));
            }
        }
    }
}

/// Tells each caller of `reads` to read alone.
fn retry(reads: impl IntoIterator<Item = Waiting>) {
    for waiting in reads {
        let _ = waiting.reply.send(Reply::Retry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merger() -> Arc<Merger> {
        Arc::new(Merger::new(
            Duration::from_secs(1),
            Arc::new(ArcSwapOption::empty()),
        ))
    }

    fn multi_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap()
    }

    /// Reads beside one on the wire queue; with no connection open, the
    /// flusher sends nothing and tells them to read alone, then ends.
    #[test]
    fn a_lone_read_goes_direct_and_others_queue_behind_it() {
        let merger = merger();
        let runtime = multi_thread();
        let _inside = runtime.enter();
        let Route::Direct(busy) = merger.route("a") else {
            panic!("a lone read goes out at once")
        };
        let Route::Queued(b) = merger.route("b") else {
            panic!("a read beside another queues")
        };
        let Route::Queued(c) = merger.route("c") else {
            panic!("so does the next")
        };
        assert!(matches!(runtime.block_on(b), Ok(Reply::Retry)));
        assert!(matches!(runtime.block_on(c), Ok(Reply::Retry)));
        let state = merger.state();
        assert!(state.queue.is_empty());
        assert_eq!(state.busy, 1, "only the direct read is on the wire");
        drop(state);
        drop(busy);
        assert_eq!(merger.state().busy, 0);
    }

    #[test]
    fn outside_a_multi_thread_runtime_a_read_goes_alone() {
        let merger = merger();
        let Route::Direct(_a) = merger.route("a") else {
            panic!("a lone read goes out at once")
        };
        let Route::Direct(_b) = merger.route("b") else {
            panic!("no runtime to run a flusher on: alone")
        };
        let current = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _inside = current.enter();
        let Route::Direct(_c) = merger.route("c") else {
            panic!("a current-thread runtime gets no flusher: alone")
        };
        let state = merger.state();
        assert!(state.queue.is_empty() && !state.flushing);
        assert_eq!(state.busy, 3);
    }

    /// A flusher that has shown no progress for a quarter of the bound
    /// (Redis slow, or its runtime busy): later reads do not queue behind it.
    #[test]
    fn a_read_does_not_queue_behind_a_stalled_flusher() {
        let merger = Arc::new(Merger::new(
            Duration::from_secs(40),
            Arc::new(ArcSwapOption::empty()),
        ));
        let runtime = multi_thread();
        let _inside = runtime.enter();
        {
            let mut state = merger.state();
            state.flushing = true;
            state.progress = Some(Instant::now() - Duration::from_secs(1));
        }
        let Route::Queued(_a) = merger.route("a") else {
            panic!("a flusher 1 s quiet is within a 40 s bound's patience")
        };
        merger.state().progress = Some(Instant::now() - Duration::from_secs(20));
        let Route::Direct(_b) = merger.route("b") else {
            panic!("past the patience: alone")
        };
        assert_eq!(merger.state().queue.len(), 1);
    }

    /// The flusher's runtime has ended: the task is dropped unpolled, the
    /// read it would have sent is told to retry, and the next read starts
    /// a new flusher.
    #[test]
    fn a_flusher_whose_runtime_ended_lets_no_read_wait() {
        let merger = merger();
        let runtime = multi_thread();
        let handle = runtime.handle().clone();
        drop(runtime);
        let _inside = handle.enter();
        let Route::Direct(busy) = merger.route("a") else {
            panic!("a lone read goes out at once")
        };
        let Route::Queued(mut b) = merger.route("b") else {
            panic!("a read beside another queues")
        };
        assert!(matches!(b.try_recv(), Ok(Reply::Retry)));
        let state = merger.state();
        assert!(!state.flushing && state.queue.is_empty());
        drop(state);
        drop(busy);
        assert_eq!(merger.state().busy, 0);
    }

    fn queued(state: &mut State, reads: usize) -> Vec<oneshot::Receiver<Reply>> {
        (0..reads)
            .map(|n| {
                let (reply, receiver) = oneshot::channel();
                let key = format!("k{n}");
                state.queue.push_back(Waiting { key, reply });
                receiver
            })
            .collect()
    }

    /// What queues while an `MGET` is out waits for it to come back, unless
    /// a whole batch queued: that goes at once, up to `MAX_OUT` out; past
    /// them, with a whole batch queued, reads go alone.
    #[test]
    fn a_whole_batch_goes_out_beside_the_others_up_to_a_bound() {
        let mut state = State {
            flushing: true,
            ..State::default()
        };
        let _first = queued(&mut state, 3);
        let (batch, whole) = state.next_batch(true).expect("nothing out: it goes");
        assert_eq!((batch.len(), whole), (3, false));
        let _partial = queued(&mut state, 100);
        assert!(state.next_batch(false).is_none(), "waits for the one out");
        let _more = queued(&mut state, MAX_MERGED);
        let (batch, whole) = state.next_batch(false).expect("a whole batch goes");
        assert_eq!((batch.len(), whole), (MAX_MERGED, true));
        assert_eq!((state.out, state.busy), (2, 2));
        assert_eq!(state.queue.len(), 100);
        let patience = Duration::from_secs(60);
        let mut receivers = Vec::new();
        while state.out < MAX_OUT {
            receivers.extend(queued(&mut state, MAX_MERGED));
            assert!(state.may_queue(patience));
            assert!(state.next_batch(false).is_some());
        }
        assert!(state.may_queue(patience), "less than a whole batch queued");
        receivers.extend(queued(&mut state, MAX_MERGED));
        assert!(!state.may_queue(patience), "all out and a batch queued");
        assert!(state.next_batch(true).is_none());
        state.came_back();
        assert!(state.may_queue(patience));
        assert!(
            matches!(state.step(false), Step::Send(_, true)),
            "one came back: a whole batch goes"
        );
        assert!(matches!(state.step(false), Step::Wait), "the rest waits");
    }

    /// Callers that gave up are not sent; a batch of only those is none.
    #[test]
    fn callers_that_gave_up_are_not_sent() {
        let mut state = State::default();
        drop(queued(&mut state, 5));
        assert!(state.next_batch(true).is_none());
        assert!(state.queue.is_empty() && state.out == 0);
        state.flushing = true;
        assert!(matches!(state.step(true), Step::End));
        assert!(!state.flushing);
    }

    #[test]
    fn replies_go_to_their_own_callers_in_order() {
        let (tx_a, mut rx_a) = oneshot::channel();
        let (tx_b, mut rx_b) = oneshot::channel();
        let batch = vec![
            Waiting {
                key: "a".into(),
                reply: tx_a,
            },
            Waiting {
                key: "b".into(),
                reply: tx_b,
            },
        ];
        hand_out(batch, Ok(vec![Some(b"A".to_vec()), None]));
        assert!(matches!(rx_a.try_recv(), Ok(Reply::Value(Some(v))) if v == b"A"));
        assert!(matches!(rx_b.try_recv(), Ok(Reply::Value(None))));
    }
}

/// A model of the merge queue's protocol, which loom runs over every
/// interleaving (up to 3 preemptions each run) of readers routing their
/// reads and the flusher they start, with the queue's own lock (see
/// `sync.rs`): the flusher steps as [`Flusher::run`] does, its `MGET`s
/// answered in turn. Run by `scripts/test.sh`.
#[cfg(all(test, redis_cached_loom))]
mod model {
    use super::*;
    use crate::sync::model;
    use loom::thread;

    /// The flusher's loop, in this thread: each `MGET` answers every key
    /// with the key itself.
    fn flusher(merger: &Merger) {
        let mut out: VecDeque<Vec<Waiting>> = VecDeque::new();
        let mut partial = true;
        loop {
            let step = merger.state().step(partial);
            match step {
                Step::Send(batch, whole) => {
                    assert!(!batch.is_empty() && batch.len() <= MAX_MERGED);
                    assert!(merger.state().out <= MAX_OUT);
                    partial &= whole;
                    out.push_back(batch);
                }
                Step::Wait => {
                    let batch = out.pop_front().expect("an MGET out to wait for");
                    merger.state().came_back();
                    let values = batch.iter().map(|w| Some(w.key.clone().into_bytes()));
                    let values = values.collect();
                    hand_out(batch, Ok(values));
                    partial = true;
                }
                Step::End => {
                    assert!(out.is_empty(), "ended with MGETs out");
                    return;
                }
            }
        }
    }

    /// A read of `key`: alone (done at once), or queued, starting a
    /// flusher thread if none runs; its reply, and the flusher it started.
    fn read(
        merger: &Arc<Merger>,
        key: &str,
    ) -> (
        Option<oneshot::Receiver<Reply>>,
        Option<thread::JoinHandle<()>>,
    ) {
        let routed = merger.state().route(key, merger.patience);
        match routed {
            Routed::Direct => {
                merger.state().busy -= 1;
                (None, None)
            }
            Routed::Queued(reply, wake) => {
                let started = (wake == Wake::Start).then(|| {
                    let merger = Arc::clone(merger);
                    thread::spawn(move || flusher(&merger))
                });
                (Some(reply), started)
            }
        }
    }

    /// Two readers queue beside a read on the wire, while the flusher
    /// they start sends, answers and ends: every queued read gets its own
    /// value exactly once (none is stranded behind a flusher that ended),
    /// and the queue ends empty, with nothing counted on the wire.
    #[test]
    fn every_queued_read_gets_its_own_value() {
        model("every_queued_read_gets_its_own_value", || {
            let merger = Arc::new(Merger::new(
                Duration::from_secs(60),
                Arc::new(ArcSwapOption::empty()),
            ));
            // A read on the wire, so that the others queue.
            let Routed::Direct = merger.state().route("a", merger.patience) else {
                panic!("a lone read goes alone");
            };
            let readers: Vec<_> = ["b", "c"]
                .into_iter()
                .map(|key| {
                    let merger = Arc::clone(&merger);
                    thread::spawn(move || {
                        let (reply, flusher) = read(&merger, key);
                        (key, reply, flusher)
                    })
                })
                .collect();
            // The read on the wire comes back meanwhile.
            merger.state().busy -= 1;
            let mut replies = Vec::new();
            for reader in readers {
                let (key, reply, flusher) = reader.join().unwrap();
                if let Some(flusher) = flusher {
                    flusher.join().unwrap();
                }
                replies.push((key, reply));
            }
            for (key, reply) in replies {
                if let Some(mut reply) = reply {
                    match reply.try_recv() {
                        Ok(Reply::Value(Some(value))) => assert_eq!(value, key.as_bytes()),
                        other => panic!("{key}: {other:?}"),
                    }
                }
            }
            let state = merger.state();
            assert!(state.queue.is_empty() && !state.flushing);
            assert_eq!((state.busy, state.out), (0, 0));
        });
    }
}
