//! In-process coalescing: concurrent misses for one key share one computation.
//!
//! The first caller for a key becomes the *leader* and computes; the others
//! become *followers* and wait for what the leader shares:
//! - its encoded value: the followers decode it;
//! - a failure (its result was an `Err`, or it panicked): each follower
//!   computes by itself at once, so that followers of a failing database do
//!   not queue behind one another (an error is never handed to a caller
//!   that did not produce it);
//! - nothing (it was cancelled): the followers join again, one of them
//!   becoming the next leader.
//!
//! An invalidation detaches the key's flight: callers that start after it
//! begin a new computation instead of joining one that read the key before.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

/// The encoded entry a leader shares with its followers.
pub(crate) type Shared = Arc<[u8]>;

/// What a leader has shared so far.
#[derive(Debug, Clone)]
pub(crate) enum State {
    Pending,
    Value(Shared),
    Failed,
}

/// A follower's end of a flight.
pub(crate) type Receiver = watch::Receiver<State>;

#[derive(Debug, Default)]
pub(crate) struct Flights {
    in_flight: Mutex<HashMap<String, Receiver>>,
}

pub(crate) enum Role<'a> {
    Leader(Leader<'a>),
    Follower(Receiver),
}

/// The right and duty to compute one key. Dropped without sharing, it lets
/// the followers join again; dropped while its thread panics, it tells them
/// the computation failed.
pub(crate) struct Leader<'a> {
    flights: &'a Flights,
    key: String,
    sender: watch::Sender<State>,
}

/// What a follower got from its leader.
#[derive(Debug)]
pub(crate) enum Followed {
    Value(Shared),
    Failed,
    /// The leader ended without sharing anything: join again.
    Nothing,
    /// The leader took longer than the wait's bound: compute by yourself.
    TimedOut,
}

impl Flights {
    fn map(&self) -> MutexGuard<'_, HashMap<String, Receiver>> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Joins the flight for `key`, or starts one.
    pub(crate) fn join(&self, key: &str) -> Role<'_> {
        let mut map = self.map();
        if let Some(receiver) = map.get(key) {
            return Role::Follower(receiver.clone());
        }
        let (sender, receiver) = watch::channel(State::Pending);
        map.insert(key.to_owned(), receiver);
        Role::Leader(Leader {
            flights: self,
            key: key.to_owned(),
            sender,
        })
    }

    /// The flight for `key`, if one runs: to follow it, without starting
    /// one.
    pub(crate) fn running(&self, key: &str) -> Option<Receiver> {
        self.map().get(key).cloned()
    }

    /// Makes callers that start from now on begin a new flight for `key`
    /// rather than join the current one (after an invalidation of `key`).
    pub(crate) fn detach(&self, key: &str) {
        self.map().remove(key);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map().len()
    }
}

/// Waits for the leader, at most `bound`.
pub(crate) async fn follow_within(bound: std::time::Duration, receiver: Receiver) -> Followed {
    tokio::time::timeout(bound, follow(receiver))
        .await
        .unwrap_or(Followed::TimedOut)
}

/// Waits for the leader.
pub(crate) async fn follow(mut receiver: Receiver) -> Followed {
    match receiver
        .wait_for(|state| !matches!(state, State::Pending))
        .await
    {
        Ok(state) => match &*state {
            State::Value(entry) => Followed::Value(entry.clone()),
            State::Failed => Followed::Failed,
            State::Pending => Followed::Nothing,
        },
        Err(_) => Followed::Nothing,
    }
}

impl Leader<'_> {
    /// Hands `entry` to every follower, and to callers that join before
    /// this leader is dropped.
    pub(crate) fn publish(&self, entry: Shared) {
        // A send error only means no follower is left.
        let _ = self.sender.send(State::Value(entry));
    }

    /// Tells the followers the computation failed: each computes by itself.
    /// Later callers start a new flight.
    pub(crate) fn fail(&self) {
        self.leave();
        let _ = self.sender.send(State::Failed);
    }

    /// Removes this flight from the map, if it is still there.
    fn leave(&self) {
        let mut map = self.flights.map();
        if map
            .get(&self.key)
            .is_some_and(|receiver| receiver.same_channel(&self.sender.subscribe()))
        {
            map.remove(&self.key);
        }
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        // Leave before the sender drops, so a follower that joins again
        // starts a new flight instead of finding this finished one.
        self.leave();
        if std::thread::panicking() {
            let _ = self.sender.send(State::Failed);
        }
    }
}

/// How a `Cache::try_get_or_compute` leader ended, for the callers that
/// waited on it: it stored its value (they read it), or its error, which
/// they share (as moka's `try_get_with` shares it).
#[derive(Clone)]
pub(crate) enum TryEnd {
    Pending,
    Stored,
    Failed(Arc<dyn Any + Send + Sync>),
}

/// The fallible computations of this process in flight, by key: the layer
/// `try_get_or_compute` puts over [`Flights`] so that an error reaches the
/// callers that waited for it.
#[derive(Default)]
pub(crate) struct TryFlights {
    in_flight: Mutex<HashMap<String, watch::Receiver<TryEnd>>>,
}

/// The right and duty to run one key's fallible computation; dropped
/// unfinished (its caller gave up), the callers that waited try again.
pub(crate) struct TryLeader<'a> {
    flights: &'a TryFlights,
    key: String,
    sender: watch::Sender<TryEnd>,
}

impl TryFlights {
    fn map(&self) -> MutexGuard<'_, HashMap<String, watch::Receiver<TryEnd>>> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Leads `key`'s fallible computation, or follows the one in flight.
    pub(crate) fn join(&self, key: &str) -> Result<TryLeader<'_>, watch::Receiver<TryEnd>> {
        let mut map = self.map();
        if let Some(receiver) = map.get(key) {
            return Err(receiver.clone());
        }
        let (sender, receiver) = watch::channel(TryEnd::Pending);
        map.insert(key.to_owned(), receiver);
        Ok(TryLeader {
            flights: self,
            key: key.to_owned(),
            sender,
        })
    }
}

/// Waits for a fallible computation's end; `None` if its leader gave up.
pub(crate) async fn follow_try(mut receiver: watch::Receiver<TryEnd>) -> Option<TryEnd> {
    let end = receiver
        .wait_for(|end| !matches!(end, TryEnd::Pending))
        .await
        .ok()?;
    Some(end.clone())
}

impl TryLeader<'_> {
    /// Tells the callers that waited how the computation ended.
    pub(crate) fn end(self, end: TryEnd) {
        self.leave();
        let _ = self.sender.send(end);
    }

    fn leave(&self) {
        let mut map = self.flights.map();
        if map
            .get(&self.key)
            .is_some_and(|receiver| receiver.same_channel(&self.sender.subscribe()))
        {
            map.remove(&self.key);
        }
    }
}

impl Drop for TryLeader<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_get_the_published_entry() {
        let flights = Flights::default();
        let Role::Leader(leader) = flights.join("k") else {
            panic!("first caller must lead")
        };
        let Role::Follower(rx) = flights.join("k") else {
            panic!("second caller must follow")
        };
        let waiter = tokio::spawn(follow(rx));
        leader.publish(Arc::from(&b"v"[..]));
        drop(leader);
        assert!(matches!(waiter.await.unwrap(), Followed::Value(v) if &*v == b"v"));
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn a_dropped_leader_releases_followers_empty_handed() {
        let flights = Flights::default();
        let leader = flights.join("k");
        let Role::Follower(rx) = flights.join("k") else {
            panic!("second caller must follow")
        };
        drop(leader);
        assert!(matches!(follow(rx).await, Followed::Nothing));
        assert!(matches!(flights.join("k"), Role::Leader(_)));
    }

    #[tokio::test]
    async fn a_failure_is_shared_and_detaches() {
        let flights = Flights::default();
        let Role::Leader(leader) = flights.join("k") else {
            panic!("first caller must lead")
        };
        let Role::Follower(rx) = flights.join("k") else {
            panic!("second caller must follow")
        };
        leader.fail();
        assert!(matches!(follow(rx).await, Followed::Failed));
        assert!(matches!(flights.join("k"), Role::Leader(_)), "a new flight");
    }

    #[tokio::test]
    async fn a_detached_flight_is_not_joined_and_its_end_keeps_the_new_one() {
        let flights = Flights::default();
        let Role::Leader(old) = flights.join("k") else {
            panic!("first caller must lead")
        };
        flights.detach("k");
        let Role::Leader(new) = flights.join("k") else {
            panic!("after a detach, a new flight starts")
        };
        drop(old);
        assert!(
            matches!(flights.join("k"), Role::Follower(_)),
            "{}",
            flights.len()
        );
        drop(new);
        assert_eq!(flights.len(), 0);
    }
}
