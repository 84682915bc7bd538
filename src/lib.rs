#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub use cached_attr::{cache_evict, cache_put, redis_cached, CacheKey};
pub use cached_runtime::{
    bypass, cached_functions, escape_into, global, invalidate_call, key_of, keys_of, refresh,
    set_global, stats_named, stats_of, tag, BreakerConfig, Cache, CacheBuilder, CacheKey, Change,
    Codec, Error, JournalId, KeyAtom, KeyBuilder, KeyParts, MemoryConfig, Result, Sink, Stats,
    Write, WriteBehind, WriteBehindBuilder, WriteBehindStats, MAX_KEY_LEN, MEMORY_URL,
};

/// What generated code calls; not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use cached_runtime::__private::*;
}
