//! Merged lookups: single-key reads that many tasks issue at the same
//! moment go to Redis as one `MGET`.
//!
//! A read that finds no other read on the wire goes out at once as a
//! `GET`: a lone caller pays nothing for merging. A read that finds one
//! joins a queue. A flusher task, started on the runtime of the first read
//! to queue, sends everything queued as one `MGET`, hands each caller its
//! own value (by position), and sends the next `MGET` with what queued
//! meanwhile, until the queue is empty; then it ends. Redis does the work of
//! one command for many keys.
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
//! nothing since it started, or its `MGET` out) for a quarter of the bound:
//! Redis is slow to answer, or the flusher's runtime is busy with blocking
//! work. It goes alone. Reads that queued before then still wait for the
//! `MGET` out ahead of theirs.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use tokio::runtime::RuntimeFlavor;
use tokio::sync::oneshot;

use super::link::Link;
use crate::error::{Error, Result};

/// The most keys one `MGET` carries; more wait for the next.
const MAX_MERGED: usize = 512;

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
    /// Reads on the wire: `GET`s sent directly, and the flusher's `MGET`.
    busy: usize,
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
    /// flusher on its own runtime; outside a multi-thread runtime, a read
    /// goes alone.
    pub(crate) fn route(self: &Arc<Self>, key: &str) -> Route<'_> {
        let mut state = self.state();
        let alone = state.busy == 0 && state.queue.is_empty() && !state.flushing;
        let stalled = state.flushing
            && state
                .progress
                .is_some_and(|since| since.elapsed() >= self.patience);
        let runtime = match tokio::runtime::Handle::try_current() {
            Ok(runtime)
                if !alone && !stalled && runtime.runtime_flavor() == RuntimeFlavor::MultiThread =>
            {
                runtime
            }
            _ => {
                state.busy += 1;
                return Route::Direct(Busy(self));
            }
        };
        let (reply, receiver) = oneshot::channel();
        state.queue.push_back(Waiting {
            key: key.to_owned(),
            reply,
        });
        if !std::mem::replace(&mut state.flushing, true) {
            state.progress = Some(Instant::now());
            drop(state);
            // Dropped unpolled if the runtime is shutting down: its guard
            // then tells this read (and any queued since) to retry.
            runtime.spawn(Flusher::new(self).run());
        }
        Route::Queued(receiver)
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
            {
                let mut state = merger.state();
                while self.batch.len() < MAX_MERGED {
                    let Some(waiting) = state.queue.pop_front() else {
                        break;
                    };
                    // A caller that gave up is not sent.
                    if !waiting.reply.is_closed() {
                        self.batch.push(waiting);
                    }
                }
                if self.batch.is_empty() {
                    state.flushing = false;
                    self.running = false;
                    return;
                }
                state.busy += 1;
                state.progress = Some(Instant::now());
                self.on_wire = true;
            }
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
