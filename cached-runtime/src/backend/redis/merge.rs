//! Merged lookups: single-key reads that many tasks issue at the same
//! moment go to Redis as one `MGET`.
//!
//! A read that finds no other read on the wire goes out at once as a
//! `GET`: a lone caller pays nothing for merging. A read that finds one
//! joins a queue. A flusher task, started on the runtime of the first read
//! to queue, sends what queued as one `MGET`, hands each caller its own
//! value (by position), and sends the next `MGET` with what queued
//! meanwhile, until the queue is empty; then it ends. Waiting for the
//! `MGET` out is what makes batches, and costs a queued read up to one
//! round trip. A burst larger than one batch does not wait for the
//! flusher's turns: the read that makes the queue hold a whole batch
//! ([`MAX_MERGED`] keys) sends it at once, as one `MGET` in a task of its
//! own, so a burst takes about one round trip however large it is, as
//! pipelined `GET`s would. At most [`MAX_OUT`] `MGET`s are out beside the
//! flusher's; past them, with a whole batch queued, reads go alone. Redis
//! does the work of one command for many keys.
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
use tokio::runtime::RuntimeFlavor;
use tokio::sync::oneshot;

use super::link::Link;
use crate::error::{Error, Result};
use crate::sync::{Mutex, MutexGuard};

/// The most keys one `MGET` carries; more wait for the next. (Two in the
/// model, so that it reaches whole batches.)
const MAX_MERGED: usize = if cfg!(all(test, redis_cached_loom)) {
    2
} else {
    512
};

/// The most whole batches out beside the flusher's `MGET`. (One in the
/// model, so that it reaches the bound.)
const MAX_OUT: usize = if cfg!(all(test, redis_cached_loom)) {
    1
} else {
    16
};

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
}

#[derive(Debug, Default)]
struct State {
    /// Reads on the wire: `GET`s sent directly, and `MGET`s.
    busy: usize,
    /// Whole batches on the wire, beside the flusher's `MGET`.
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
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How a read of `key` goes out. The first read to queue starts the
    /// flusher on its own runtime, the one that makes a whole batch sends
    /// it there; outside a multi-thread runtime, a read goes alone.
    pub(crate) fn route(self: &Arc<Self>, key: &str) -> Route<'_> {
        let runtime = tokio::runtime::Handle::try_current()
            .ok()
            .filter(|runtime| runtime.runtime_flavor() == RuntimeFlavor::MultiThread);
        let Some(runtime) = runtime else {
            self.state().busy += 1;
            return Route::Direct(Busy(self));
        };
        // The lock is released before a task is spawned: one dropped at
        // once (its runtime ended) takes it again.
        let routed = self.state().route(key, self.patience);
        match routed {
            Routed::Direct => Route::Direct(Busy(self)),
            Routed::Queued(reply, then) => {
                // Dropped unpolled if the runtime is shutting down: the
                // flusher's guard then tells this read (and any queued
                // since) to retry; a whole batch's callers see their reply
                // dropped, which says the same.
                match then {
                    Then::Start => drop(runtime.spawn(Flusher::new(self).run())),
                    Then::Send(batch) => {
                        let out = Out(Arc::clone(self));
                        drop(runtime.spawn(async move {
                            let merger = Arc::clone(&out.0);
                            send(&merger, batch, out).await;
                        }));
                    }
                    Then::Nothing => {}
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
    /// Queued, its reply to come here; and what the caller does next.
    Queued(oneshot::Receiver<Reply>, Then),
}

/// What the caller of a queued read does next.
enum Then {
    /// No flusher runs: it starts one.
    Start,
    /// It sends this whole batch (counted as out) beside the flusher's.
    Send(Vec<Waiting>),
    Nothing,
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
        let then = if !std::mem::replace(&mut self.flushing, true) {
            self.progress = Some(Instant::now());
            Then::Start
        } else {
            self.whole_batch().map_or(Then::Nothing, Then::Send)
        };
        Routed::Queued(receiver, then)
    }

    /// Whether a read may queue: something is on the wire or queued, the
    /// flusher has shown progress within `patience`, and it has room for
    /// the read (fewer than [`MAX_OUT`] whole batches out, or less than a
    /// whole batch queued).
    fn may_queue(&self, patience: Duration) -> bool {
        let alone = self.busy == 0 && self.queue.is_empty() && !self.flushing;
        let stalled = self.flushing
            && self
                .progress
                .is_some_and(|since| since.elapsed() >= patience);
        let full = self.out >= MAX_OUT && self.queue.len() >= MAX_MERGED;
        !alone && !stalled && !full
    }

    /// A whole batch to send beside the flusher's `MGET`, counted as out,
    /// if one has queued and fewer than [`MAX_OUT`] are out.
    fn whole_batch(&mut self) -> Option<Vec<Waiting>> {
        if self.queue.len() < MAX_MERGED || self.out >= MAX_OUT {
            return None;
        }
        let batch = self.take()?;
        self.out += 1;
        Some(batch)
    }

    /// The flusher's next batch, counted as on the wire: what queued, up to
    /// [`MAX_MERGED`] keys. `None` when nothing is queued: the flusher ends.
    fn next_batch(&mut self) -> Option<Vec<Waiting>> {
        let batch = self.take();
        if batch.is_none() {
            self.flushing = false;
        }
        batch
    }

    /// Takes up to [`MAX_MERGED`] reads off the queue, counted as on the
    /// wire; callers that gave up are not sent. `None` if none is left.
    fn take(&mut self) -> Option<Vec<Waiting>> {
        while !self.queue.is_empty() {
            let taken = self.queue.len().min(MAX_MERGED);
            let batch: Vec<Waiting> = self
                .queue
                .drain(..taken)
                .filter(|waiting| !waiting.reply.is_closed())
                .collect();
            if !batch.is_empty() {
                self.busy += 1;
                self.progress = Some(Instant::now());
                return Some(batch);
            }
        }
        None
    }
}

/// Sends what queues, one `MGET` at a time, until the queue is empty.
/// Dropped before that (its runtime ended), it tells every read it holds or
/// that is queued to retry, so that none waits on a flusher that is gone.
struct Flusher {
    merger: Arc<Merger>,
    batch: Vec<Waiting>,
    /// Whether its `MGET` counts in `busy`.
    on_wire: bool,
    /// Cleared once it ended by itself (the queue was empty).
    running: bool,
}

impl Flusher {
    fn new(merger: &Arc<Merger>) -> Self {
        Flusher {
            merger: Arc::clone(merger),
            batch: Vec::new(),
            on_wire: false,
            running: true,
        }
    }

    async fn run(mut self) {
        let merger = Arc::clone(&self.merger);
        loop {
            let next = merger.state().next_batch();
            let Some(batch) = next else {
                self.running = false;
                return;
            };
            self.batch = batch;
            self.on_wire = true;
            let replies = match merger.link.load_full() {
                Some(link) => Some(mget(&link, &self.batch, merger.bound).await),
                None => None,
            };
            merger.state().busy -= 1;
            self.on_wire = false;
            let batch = std::mem::take(&mut self.batch);
            match replies {
                Some(replies) => hand_out(batch, replies),
                None => retry(batch),
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
        if self.on_wire {
            state.busy -= 1;
        }
        let queued: Vec<Waiting> = state.queue.drain(..).collect();
        state.flushing = false;
        drop(state);
        retry(self.batch.drain(..).chain(queued));
    }
}

/// A whole batch on the wire; dropped when it ends, however it ends (its
/// task dropped unpolled included).
struct Out(Arc<Merger>);

impl Drop for Out {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.out -= 1;
        state.busy -= 1;
    }
}

/// Sends a whole `batch` as one `MGET` and hands each caller its value;
/// with no connection open, tells them to read alone. `out` counts it on
/// the wire until the reply came.
async fn send(merger: &Merger, batch: Vec<Waiting>, out: Out) {
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

// Not in the model build: its bounds are the model's.
#[cfg(all(test, not(redis_cached_loom)))]
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

    /// `reads` reads routed, after one on the wire; their replies, and
    /// the whole batches they sent.
    fn routed(state: &mut State, reads: usize) -> (Vec<oneshot::Receiver<Reply>>, usize) {
        let patience = Duration::from_secs(60);
        let (mut replies, mut sent) = (Vec::new(), 0);
        for n in 0..reads {
            match state.route(&format!("k{n}"), patience) {
                Routed::Queued(reply, then) => {
                    replies.push(reply);
                    sent += usize::from(matches!(then, Then::Send(ref b) if b.len() == MAX_MERGED));
                }
                Routed::Direct => panic!("read {n} went alone"),
            }
        }
        (replies, sent)
    }

    /// What queues while the flusher's `MGET` is out waits for it, unless
    /// a whole batch queued: the read that made it sends it at once, up to
    /// `MAX_OUT` beside the flusher's; past them, with a whole batch
    /// queued, reads go alone.
    #[test]
    fn a_whole_batch_goes_out_at_once_up_to_a_bound() {
        let patience = Duration::from_secs(60);
        let mut state = State {
            busy: 1, // a read on the wire
            ..State::default()
        };
        let (_first, sent) = routed(&mut state, 3);
        assert_eq!(sent, 0);
        assert!(state.flushing, "the first to queue started the flusher");
        let batch = state.next_batch().expect("the flusher's batch");
        assert_eq!(batch.len(), 3);
        let (_more, sent) = routed(&mut state, 100);
        assert_eq!(sent, 0, "waits for the flusher's MGET");
        let (_burst, sent) = routed(&mut state, MAX_MERGED * MAX_OUT - 100);
        assert_eq!(sent, MAX_OUT, "each whole batch went at once");
        assert_eq!((state.out, state.queue.len()), (MAX_OUT, 0));
        let (_rest, sent) = routed(&mut state, MAX_MERGED);
        assert_eq!(sent, 0, "all out: it waits");
        assert!(
            !state.may_queue(patience),
            "all out and a whole batch queued"
        );
        assert!(matches!(state.route("alone", patience), Routed::Direct));
        let batch = state.next_batch().expect("the flusher's next batch");
        assert_eq!(batch.len(), MAX_MERGED);
        assert!(state.may_queue(patience));
    }

    /// Callers that gave up are not sent; with none left, the flusher ends.
    #[test]
    fn callers_that_gave_up_are_not_sent() {
        let mut state = State {
            busy: 1,
            ..State::default()
        };
        drop(routed(&mut state, 5));
        assert!(state.flushing);
        assert!(state.next_batch().is_none());
        assert!(state.queue.is_empty() && !state.flushing);
        assert_eq!((state.busy, state.out), (1, 0));
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

    /// Answers `batch` as an `MGET` would: every key with the key itself.
    fn answer(batch: Vec<Waiting>) {
        let values = batch.iter().map(|w| Some(w.key.clone().into_bytes()));
        let values = values.collect();
        hand_out(batch, Ok(values));
    }

    /// The flusher's loop, in this thread.
    fn flusher(merger: &Merger) {
        loop {
            let next = merger.state().next_batch();
            let Some(batch) = next else {
                return;
            };
            assert!(batch.len() <= MAX_MERGED);
            merger.state().busy -= 1;
            answer(batch);
        }
    }

    /// A read of `key`: alone (done at once), or queued, starting a
    /// flusher if none runs (in a thread of its own if `spawn`, else here
    /// and now), or sending the whole batch it made; its reply, and the
    /// thread it started.
    fn read(
        merger: &Arc<Merger>,
        key: &str,
        spawn: bool,
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
            Routed::Queued(reply, Then::Start) if spawn => {
                let merger = Arc::clone(merger);
                (Some(reply), Some(thread::spawn(move || flusher(&merger))))
            }
            Routed::Queued(reply, Then::Start) => {
                flusher(merger);
                (Some(reply), None)
            }
            Routed::Queued(reply, Then::Send(batch)) => {
                assert!(merger.state().out <= MAX_OUT);
                drop(Out(Arc::clone(merger)));
                answer(batch);
                (Some(reply), None)
            }
            Routed::Queued(reply, Then::Nothing) => (Some(reply), None),
        }
    }

    /// Two readers make two reads each beside a read on the wire, while
    /// the flusher they start sends, answers and ends, and whole batches
    /// (of 2 in the model, at most 1 out) go out beside it: every queued
    /// read gets its own value exactly once (none is stranded behind a
    /// flusher that ended), and the queue ends empty, with nothing counted
    /// on the wire.
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
            let readers: Vec<_> = [["b1", "b2"], ["c1", "c2"]]
                .into_iter()
                .map(|keys| {
                    let merger = Arc::clone(&merger);
                    thread::spawn(move || {
                        let (first, flusher) = read(&merger, keys[0], true);
                        // A second flusher this reader starts runs in its
                        // thread (loom runs at most 5 threads).
                        let (second, later) = read(&merger, keys[1], flusher.is_none());
                        ([(keys[0], first), (keys[1], second)], flusher.or(later))
                    })
                })
                .collect();
            // The read on the wire comes back meanwhile.
            merger.state().busy -= 1;
            let mut replies = Vec::new();
            for reader in readers {
                let (reads, flusher) = reader.join().unwrap();
                if let Some(flusher) = flusher {
                    flusher.join().unwrap();
                }
                replies.extend(reads);
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
