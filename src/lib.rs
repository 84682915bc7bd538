//! Database caching on Redis that is correct by default: put
//! [`#[redis_cached]`](redis_cached) on an `async fn` and it becomes
//! cache-aside code. A hit is one `GET`; a miss runs the body, stores its
//! result with a TTL and returns it. Redis down, slow or refusing you: the
//! function still returns its value, since no Redis error ever reaches the
//! caller.
//!
//! ```
//! use redis_cached::{redis_cached, Cache};
//! # #[derive(serde::Serialize, serde::Deserialize)] struct User { id: u64 }
//! # #[derive(Debug)] struct DbError;
//!
//! struct Users { cache: Cache }
//!
//! impl Users {
//!     #[redis_cached(key = "user:<id>", ttl = "1h", lock = true, cache = self.cache)]
//!     async fn user(&self, id: u64) -> Result<Option<User>, DbError> {
//!         Ok(Some(User { id })) // the query; runs only on a miss
//!     }
//! }
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let users = Users { cache: Cache::in_memory() }; // or Cache::redis("redis://…")?
//! assert!(users.user(7).await.unwrap().is_some());
//! # }
//! ```
//!
//! Where to read on:
//!
//! - the attributes' reference: [`redis_cached`], [`cache_put`],
//!   [`cache_evict`], and [`CacheKey`](derive@CacheKey) for your own key types;
//! - the runtime: [`Cache`] and its [`CacheBuilder`], [`WriteBehind`];
//! - the [`guide`], one chapter per concern: keys, the cache, writes and
//!   invalidation, batches, stampedes, freshness, the near tier, failures,
//!   Redis Cluster and Sentinel, write-behind, invalidation from Postgres,
//!   security, observability.
//!
//! Features: `tls` (default: `rediss://` with rustls), `postcard`
//! (`Codec::Postcard`, see [`Codec`]), `metrics` (the [`metrics`](https://docs.rs/metrics)
//! export, see [`guide::observability`]).

#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs)]

pub use cached_attr::{cache_evict, cache_put, redis_cached, CacheKey};
pub use cached_runtime::{
    bypass, cached_functions, escape_into, global, invalidate_call, key_of, keys_of, refresh,
    set_global, stats_named, stats_of, tag, BreakerConfig, Cache, CacheBuilder, CacheKey, Change,
    Codec, Error, JournalId, KeyAtom, KeyBuilder, KeyParts, MemoryConfig, Result, Sink, Stats,
    Write, WriteBehind, WriteBehindBuilder, WriteBehindStats, HISTOGRAM_BUCKETS, MAX_KEY_LEN,
    MEMORY_URL,
};

pub mod guide;

/// What generated code calls; not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use cached_runtime::__private::*;
}

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
