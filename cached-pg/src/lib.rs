//! Invalidation from Postgres itself for `redis-cached`.
//!
//! (Guide to come.)

#![warn(missing_docs)]

mod apply;
mod error;
mod listener;
mod mapping;
mod setup;
mod stats;
mod stream;

pub use error::Error;
pub use listener::{Listener, ListenerBuilder};
pub use mapping::{Mapping, Table};
pub use setup::drop_slot;
pub use stats::ListenerStats;

/// Ends the listener's task, and whatever waits inside it.
type Shutdown = pg_walstream::CancellationToken;
