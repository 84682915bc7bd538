//! In-process coalescing: concurrent misses for one key share one computation.
//!
//! The first caller for a key becomes the *leader* and computes; the others
//! become *followers* and wait for the leader's encoded value. A leader that
//! fails (an `Err`), panics or is cancelled publishes nothing: its followers
//! then try again, one of them becoming the next leader, so an error is never
//! handed to a caller that did not produce it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

/// The encoded entry a leader shares with its followers.
pub(crate) type Shared = Arc<[u8]>;
/// A follower's end of a flight.
pub(crate) type Receiver = watch::Receiver<Option<Shared>>;

#[derive(Debug, Default)]
pub(crate) struct Flights {
    in_flight: Mutex<HashMap<String, Receiver>>,
}

pub(crate) enum Role<'a> {
    Leader(Leader<'a>),
    Follower(Receiver),
}

/// The right and duty to compute one key; dropping it without
/// [`Leader::publish`] lets the followers retry.
pub(crate) struct Leader<'a> {
    flights: &'a Flights,
    key: String,
    sender: watch::Sender<Option<Shared>>,
}

impl Flights {
    /// Joins the flight for `key`, or starts one.
    pub(crate) fn join(&self, key: &str) -> Role<'_> {
        let mut map = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(receiver) = map.get(key) {
            return Role::Follower(receiver.clone());
        }
        let (sender, receiver) = watch::channel(None);
        map.insert(key.to_owned(), receiver);
        Role::Leader(Leader {
            flights: self,
            key: key.to_owned(),
            sender,
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Waits for the leader: `Some(entry)` when it published one, `None` when it
/// ended without (the caller should try again).
pub(crate) async fn follow(mut receiver: Receiver) -> Option<Shared> {
    match receiver.wait_for(Option::is_some).await {
        Ok(entry) => entry.clone(),
        Err(_) => None,
    }
}

impl Leader<'_> {
    /// Hands `entry` to every follower, and to callers that join before
    /// this leader is dropped.
    pub(crate) fn publish(&self, entry: Shared) {
        // A send error only means no follower is left.
        let _ = self.sender.send(Some(entry));
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        // Remove the flight before the sender drops, so a retrying follower
        // starts a new flight instead of finding this finished one.
        let mut map = self
            .flights
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.remove(&self.key);
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
        assert_eq!(waiter.await.unwrap().as_deref(), Some(&b"v"[..]));
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
        assert_eq!(follow(rx).await, None);
        assert!(matches!(flights.join("k"), Role::Leader(_)));
    }
}
