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

mod backend;
mod builder;
mod cache;
mod call;
mod encoding;
mod engine;
mod error;
mod failpoint;
mod global;
mod near;
mod observe;
mod sync;
mod token;
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
pub use builder::{CacheBuilder, MEMORY_URL};
pub use cache::Cache;
pub use call::directive::{bypass, invalidate_call, key_of, keys_of, refresh, stats_of};
pub use encoding::codec::Codec;
pub use encoding::key::{escape_into, tag, CacheKey, KeyAtom, KeyBuilder, KeyParts, MAX_KEY_LEN};
pub use engine::breaker::BreakerConfig;
pub use error::{Error, Result};
pub use global::{global, set_global};
pub use observe::site::{cached_functions, stats_named};
pub use observe::stats::Stats;
pub use write_behind::{
    Change, JournalId, Sink, Write, WriteBehind, WriteBehindBuilder, WriteBehindStats,
};
