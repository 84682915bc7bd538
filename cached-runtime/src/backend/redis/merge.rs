//! Merged lookups: single-key reads that many tasks issue at the same
//! moment go to Redis as one `MGET`.
//!
//! A read that finds no other read on the wire goes out at once as a
//! `GET`: a lone caller pays nothing for merging. A read that finds one
//! joins a queue. One of the queued callers at a time holds the turn: it
//! sends everything queued as one `MGET`, hands each caller its own value
//! (by position), then passes the turn to the next queued caller, if any,
//! and returns its own value. Redis does the work of one command for many
//! keys, and no task is spawned: the flush runs on the runtime of a caller
//! that is waiting anyway.
//!
//! Whatever the callers do, every queued read is answered or handed on: a
//! caller that gives up (dropped, or past its `op_timeout`) drops its end
//! of the reply and is skipped; a turn holder dropped mid-`MGET` (or whose
//! runtime ends) puts the reads it carried back at the front of the queue
//! and passes the turn on; each `MGET` has its own bound.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

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
    /// Its turn to send what has queued (its own read included).
    Turn(Turn),
}

/// The merged reads of one cache.
#[derive(Debug)]
pub(crate) struct Merger {
    state: Mutex<State>,
    /// Each `MGET`'s bound.
    bound: Duration,
}

#[derive(Debug, Default)]
struct State {
    /// Reads on the wire: `GET`s sent directly, and the turn's `MGET`.
    busy: usize,
    queue: VecDeque<Waiting>,
    /// Whether a caller holds the turn (or is being handed it).
    turn: bool,
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
    /// Queued: wait for the reply (a value, or the turn).
    Queued(oneshot::Receiver<Reply>),
    /// Queued, and the turn is this caller's: flush now.
    Turn(oneshot::Receiver<Reply>, Turn),
}

/// A read on the wire; dropped when it ends, however it ends.
pub(crate) struct Busy<'m>(&'m Merger);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.state().busy -= 1;
    }
}

impl Merger {
    pub(crate) fn new(bound: Duration) -> Self {
        Merger {
            state: Mutex::default(),
            bound,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How a read of `key` goes out.
    pub(crate) fn route(self: &Arc<Self>, key: &str) -> Route<'_> {
        let mut state = self.state();
        if state.busy == 0 && state.queue.is_empty() && !state.turn {
            state.busy += 1;
            return Route::Direct(Busy(self));
        }
        let receiver = state.enqueue(key, false);
        if std::mem::replace(&mut state.turn, true) {
            Route::Queued(receiver)
        } else {
            Route::Turn(receiver, Turn::new(self))
        }
    }
}

/// The right to send the next `MGET`, held by one queued caller at a time.
/// Dropped however it ends (sent, cut short, or never used: its caller gave
/// up, its runtime ended), it puts back at the front of the queue the reads
/// it carried and did not answer, then passes itself on.
pub(crate) struct Turn {
    merger: Arc<Merger>,
    batch: Vec<Waiting>,
    /// Cleared when this turn was handed to no one (its receiver was gone):
    /// the one who tried passes the turn on instead.
    armed: bool,
}

impl std::fmt::Debug for Turn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Turn").finish_non_exhaustive()
    }
}

impl Turn {
    fn new(merger: &Arc<Merger>) -> Self {
        Turn {
            merger: Arc::clone(merger),
            batch: Vec::new(),
            armed: true,
        }
    }

    /// Puts the read of `key` (a caller just handed the turn) first in the
    /// queue, to go out in this turn's `MGET`.
    pub(crate) fn rejoin(&self, key: &str) -> oneshot::Receiver<Reply> {
        self.merger.state().enqueue(key, true)
    }

    /// Sends what has queued as one `MGET` on `link` and answers each
    /// caller, then passes the turn on.
    pub(crate) async fn flush(mut self, link: Option<Arc<Link>>) {
        let merger = Arc::clone(&self.merger);
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
            state.busy += 1;
        }
        let busy = Busy(&merger);
        let replies = match &link {
            Some(link) if !self.batch.is_empty() => mget(link, &self.batch, merger.bound).await,
            Some(_) => Ok(Vec::new()),
            None => Err(Error::Redis("no connection".into())),
        };
        drop(busy);
        hand_out(std::mem::take(&mut self.batch), replies);
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut state = self.merger.state();
        for waiting in self.batch.drain(..).rev() {
            state.queue.push_front(waiting);
        }
        state.pass_turn(&self.merger);
    }
}

impl State {
    fn enqueue(&mut self, key: &str, first: bool) -> oneshot::Receiver<Reply> {
        let (reply, receiver) = oneshot::channel();
        let waiting = Waiting {
            key: key.to_owned(),
            reply,
        };
        if first {
            self.queue.push_front(waiting);
        } else {
            self.queue.push_back(waiting);
        }
        receiver
    }

    /// Hands the turn to the first queued caller still waiting, or ends it.
    fn pass_turn(&mut self, merger: &Arc<Merger>) {
        while let Some(waiting) = self.queue.pop_front() {
            match waiting.reply.send(Reply::Turn(Turn::new(merger))) {
                Ok(()) => return,
                // Gone: its read is dropped with it, and the turn it was
                // not given must not pass itself on (this is doing so).
                Err(Reply::Turn(mut unsent)) => unsent.armed = false,
                Err(_) => {}
            }
        }
        self.turn = false;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_read_goes_direct_and_others_queue_behind_it() {
        let merger = Arc::new(Merger::new(Duration::from_secs(1)));
        let Route::Direct(busy) = merger.route("a") else {
            panic!("a lone read goes out at once")
        };
        let Route::Turn(_b, turn) = merger.route("b") else {
            panic!("the first queued read takes the turn")
        };
        let Route::Queued(_c) = merger.route("c") else {
            panic!("later reads wait for their reply")
        };
        drop(busy);
        assert_eq!(merger.state().queue.len(), 2);
        drop(turn);
    }

    /// Turns that end without being used, or cut short mid-MGET, pass
    /// themselves on to a caller still waiting, with the reads they held
    /// back in the queue; a turn handed to a caller that is gone is not lost.
    #[test]
    fn no_way_of_ending_loses_the_turn() {
        let merger = Arc::new(Merger::new(Duration::from_secs(1)));
        let Route::Direct(busy) = merger.route("a") else {
            panic!("a lone read goes out at once")
        };
        let Route::Turn(b, turn) = merger.route("b") else {
            panic!("the first queued read takes the turn")
        };
        let Route::Queued(c) = merger.route("c") else {
            panic!("later reads wait")
        };
        let Route::Queued(mut d) = merger.route("d") else {
            panic!("later reads wait")
        };
        drop(busy);
        // Cut short mid-MGET with b, c and d on the wire; c's caller gave up
        // meanwhile, and b's too: the turn goes past them to d.
        let mut turn = turn;
        turn.batch = merger.state().queue.drain(..).collect();
        drop((b, c));
        drop(turn);
        let Ok(Reply::Turn(next)) = d.try_recv() else {
            panic!("the turn reached the caller still waiting")
        };
        assert!(merger.state().turn);
        // d's caller is dropped before it uses the turn: nobody is left.
        drop(next);
        let state = merger.state();
        assert!(!state.turn, "the turn ended with no one to take it");
        assert!(state.queue.is_empty());
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
