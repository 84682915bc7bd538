//! The runtime of `redis-cached`: the [`Cache`] handle, its Redis and
//! in-memory backends, the value codec, key encoding, in-process
//! coalescing, the circuit breaker and statistics.
//!
//! Users depend on the `redis-cached` facade, which re-exports this crate;
//! the attributes' generated code calls [`__private`].
//!
//! Imports run one way: `cache` and `builder` (the public handle) over the
//! algorithms (`call` → `fresh` → `aside` → `lock`), over `core` (read,
//! decode, store), over the backends, codec, keys, breaker and counters.

#![warn(missing_docs)]

mod aside;
mod backend;
mod batch;
mod breaker;
mod builder;
mod cache;
mod call;
mod claims;
mod codec;
mod core;
mod directive;
mod error;
mod failpoint;
mod flight;
mod fresh;
mod global;
mod key;
mod lock;
mod meters;
mod near;
mod policy;
mod recent;
mod shape;
mod site;
mod spent;
mod stats;
mod sync;
mod token;
mod weigh;
mod write_behind;

#[doc(hidden)]
pub mod __private {
    //! Generated code's entry points; not a stable API.
    pub use crate::private::*;

    /// The crate's own crash and fault tests' failpoints (feature
    /// `failpoints`); not for applications.
    #[cfg(feature = "failpoints")]
    pub mod failpoint {
        pub use crate::failpoint::{arm, disarm, Action};
    }
}
mod private;

pub use backend::MemoryConfig;
pub use breaker::BreakerConfig;
pub use builder::{CacheBuilder, MEMORY_URL};
pub use cache::Cache;
pub use codec::Codec;
pub use directive::{bypass, invalidate_call, key_of, keys_of, refresh, stats_of};
pub use error::{Error, Result};
pub use global::{global, set_global};
pub use key::{escape_into, tag, CacheKey, KeyAtom, KeyBuilder, KeyParts, MAX_KEY_LEN};
pub use site::{cached_functions, stats_named};
pub use stats::Stats;
pub use write_behind::{
    Change, JournalId, Sink, Write, WriteBehind, WriteBehindBuilder, WriteBehindStats,
};
