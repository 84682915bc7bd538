//! The runtime of `redis-cached`: the [`Cache`] handle, its Redis and
//! in-memory backends, the value codec, key encoding, in-process
//! coalescing, the circuit breaker and statistics.
//!
//! Users depend on the `redis-cached` facade, which re-exports this crate;
//! the attributes' generated code calls [`__private`].
//!
//! Imports run one way. Each folder may import only the folders below it,
//! in this order (each `mod.rs` says what its folder owns):
//!
//! 1. `write_behind`: journaled writes, a client of the [`Cache`] handle;
//! 2. the handle, at the top of `src/`: `cache`, `builder`, `global`, and
//!    `private` (the entry points the attributes' generated code calls);
//! 3. `call`: one call's algorithms (hit, miss, refresh, lock, batch);
//! 4. `engine`: settings, the store layer, coalescing, the breaker;
//! 5. `backend`: Redis (single, cluster, sentinel) and in memory;
//! 6. `near`: the in-process tier the Redis backend fills;
//! 7. `encoding`: codec, keys, return shapes;
//! 8. `observe`: counters, function sites, metrics, Redis time;
//! 9. the leaves, which import nothing of the crate: `error`, `failpoint`,
//!    `sync` (loom's or std's locks), `token` (randomness and the clock).
//!
//! `tests/layers.rs` reads the sources and fails on an import against
//! this order.

#![cfg_attr(docsrs, feature(doc_cfg))]
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
pub use observe::meters::HISTOGRAM_BUCKETS;
pub use observe::site::{cached_functions, stats_named};
pub use observe::stats::Stats;
pub use write_behind::{
    Change, JournalId, Sink, Write, WriteBehind, WriteBehindBuilder, WriteBehindStats,
};
