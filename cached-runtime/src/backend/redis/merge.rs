//! Merged lookups: single-key reads that many tasks issue at the same
//! moment go to Redis as one `MGET`.
//!
//! A read that finds no other read in flight goes out at once as a `GET`:
//! a lone caller pays nothing for merging. A read that finds one in flight
//! joins a queue, and one flusher task sends what has queued as one `MGET`
//! while the earlier command is on the wire, then hands each caller its
//! own value, by position. Redis does the work of one command for many
//! keys, which is what lets many concurrent hits cost less than as many
//! `GET`s.
//!
//! Whatever the callers do, the flusher finishes: a caller that gives up
//! (dropped, or past its `op_timeout`) only drops its end of the reply,
//! each `MGET` has its own bound, and if the flusher's runtime ends, its
//! guard hands the queue to the next caller and fails the replies it held.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::sync::oneshot;

use super::link::Link;
use crate::error::{Error, Result};

/// The most keys one `MGET` carries; more wait for the next.
const MAX_MERGED: usize = 512;
/// The most flushers at once, so the most `MGET`s on the wire. One: two
/// (one gathering while the other waits for Redis) sent smaller `MGET`s and
/// gave 12% less throughput than one at 64 tasks on a 2-core machine.
const MAX_FLUSHERS: usize = 1;

/// A value as read: its bytes, if the key held a string.
pub(crate) type Read = Result<Option<Vec<u8>>>;

/// The merged reads of one cache.
#[derive(Debug)]
pub(crate) struct Merger {
    state: Mutex<State>,
    /// Each `MGET`'s bound.
    bound: Duration,
}

#[derive(Debug, Default)]
struct State {
    /// Reads on the wire: `GET`s sent directly, and the flusher's `MGET`.
    busy: usize,
    queue: Vec<Waiting>,
    /// How many flusher tasks run.
    flushers: usize,
}

#[derive(Debug)]
struct Waiting {
    key: String,
    reply: oneshot::Sender<Read>,
}

/// How one read goes out.
pub(crate) enum Route<'m> {
    /// Alone: send a `GET` now, holding this while it is on the wire.
    Direct(Busy<'m>),
    /// Queued: the reply comes from the flusher; `Some` when the caller
    /// must start it.
    Queued(oneshot::Receiver<Read>, Option<Flusher>),
}

/// A direct read on the wire; dropped when it ends, however it ends.
pub(crate) struct Busy<'m>(&'m Merger);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.state().busy -= 1;
    }
}

/// The right to run the flusher, handed to the caller that queued first.
/// Dropped while `armed` (its task dropped mid-run), it hands the queue on.
pub(crate) struct Flusher {
    merger: Arc<Merger>,
    armed: bool,
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
    pub(crate) fn route<'m>(self: &'m Arc<Self>, key: &str) -> Route<'m> {
        let mut state = self.state();
        if state.busy == 0 && state.queue.is_empty() {
            state.busy += 1;
            return Route::Direct(Busy(self));
        }
        let (reply, receiver) = oneshot::channel();
        state.queue.push(Waiting {
            key: key.to_owned(),
            reply,
        });
        let start = state.flushers < MAX_FLUSHERS;
        if start {
            state.flushers += 1;
        }
        Route::Queued(
            receiver,
            start.then(|| Flusher {
                merger: Arc::clone(self),
                armed: true,
            }),
        )
    }
}

impl Flusher {
    /// Sends what has queued, one `MGET` at a time, until nothing has;
    /// each on the connection current at that moment.
    pub(crate) async fn run(mut self, link: Arc<ArcSwapOption<Link>>) {
        let merger = Arc::clone(&self.merger);
        loop {
            let batch = {
                let mut state = merger.state();
                if state.queue.is_empty() {
                    state.flushers -= 1;
                    self.armed = false;
                    return;
                }
                let take = state.queue.len().min(MAX_MERGED);
                let batch: Vec<Waiting> = state.queue.drain(..take).collect();
                state.busy += 1;
                batch
            };
            let busy = Busy(&merger);
            let replies = match link.load_full() {
                Some(link) => mget(&link, &batch, merger.bound).await,
                None => Err(Error::Redis("no connection".into())),
            };
            drop(busy);
            hand_out(batch, replies);
        }
    }
}

impl Drop for Flusher {
    /// The flusher's task was dropped (its runtime ended): if it was the
    /// last, the queued callers get an error rather than wait; the next
    /// one to queue starts a new flusher.
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let queue = {
            let mut state = self.merger.state();
            state.flushers -= 1;
            if state.flushers > 0 {
                return;
            }
            std::mem::take(&mut state.queue)
        };
        drop(queue);
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
                let _ = waiting.reply.send(Ok(value));
            }
        }
        Err(err) => {
            for waiting in batch {
                let _ = waiting.reply.send(Err(err.clone()));
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
        let flushers: Vec<Flusher> = (0..MAX_FLUSHERS)
            .map(|n| match merger.route(&format!("b{n}")) {
                Route::Queued(_, Some(flusher)) => flusher,
                _ => panic!("a queued read starts a flusher while there are few"),
            })
            .collect();
        let Route::Queued(_, None) = merger.route("c") else {
            panic!("later reads join the queue")
        };
        drop(busy);
        assert_eq!(merger.state().queue.len(), MAX_FLUSHERS + 1);
        // The flushers' runtime ended before they ran: their callers are
        // told, and the next read is not stuck behind flushers now gone.
        drop(flushers);
        assert!(merger.state().queue.is_empty());
        assert!(matches!(merger.route("e"), Route::Direct(_)));
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
        assert_eq!(rx_a.try_recv().unwrap().unwrap(), Some(b"A".to_vec()));
        assert_eq!(rx_b.try_recv().unwrap().unwrap(), None);
    }
}
