//! The guide: everything `redis-cached` does, one chapter per concern.
//!
//! Each chapter is a doc-only module, so its examples run as doctests. The
//! attributes' reference (every argument, its default, the return types)
//! is on [`redis_cached`](crate::redis_cached), [`cache_put`](crate::cache_put),
//! [`cache_evict`](crate::cache_evict) and [`CacheKey`](derive@crate::CacheKey).
//!
//! | Chapter | What it covers |
//! |---|---|
//! | [`getting_started`] | a first cached function, a first cached repository |
//! | [`keys`] | key templates, encoding, namespaces, versions, default keys, `CacheKey` |
//! | [`cache`] | making a `Cache`: Redis or in memory, settings, TLS, connecting, direct use |
//! | [`writes`] | write-through, eviction, tags, no stale sets, one call's entry |
//! | [`batches`] | `<ids[]>` batch functions, `get_many`/`set_many`, merged lookups |
//! | [`stampedes`] | one computation per key, in a process and with `lock = true` in all |
//! | [`freshness`] | `stale` (stale-while-revalidate) and `early` (XFetch) |
//! | [`near`] | the near tier: client-side caching with `CLIENT TRACKING` |
//! | [`failures`] | what happens when Redis fails, case by case |
//! | [`scaling`] | Redis Cluster and Sentinel |
//! | [`write_behind`] | write strategies, and `WriteBehind` |
//! | [`postgres`] | invalidation from Postgres (`redis-cached-pg`) |
//! | [`security`] | threat model, defences and their tests, deployment duties |
//! | [`observability`] | statistics, `tracing` spans, `metrics` export |
//! | [`stored_format`] | what a value looks like in Redis; codecs; bounded reads |
//! | [`demo`] | the demo service and its load generator |
//! | [`benchmarks`] | the `cargo bench` targets and their figures |
//! | [`testing`] | how the crate is tested |

// One markdown file per chapter: a chapter is added by writing its file,
// declaring it below and listing it in the table above.

#[doc = include_str!("getting_started.md")]
pub mod getting_started {}

#[doc = include_str!("keys.md")]
pub mod keys {}

#[doc = include_str!("cache.md")]
pub mod cache {}

#[doc = include_str!("writes.md")]
pub mod writes {}

#[doc = include_str!("batches.md")]
pub mod batches {}

#[doc = include_str!("stampedes.md")]
pub mod stampedes {}

#[doc = include_str!("freshness.md")]
pub mod freshness {}

#[doc = include_str!("near.md")]
pub mod near {}

#[doc = include_str!("failures.md")]
pub mod failures {}

#[doc = include_str!("scaling.md")]
pub mod scaling {}

#[doc = include_str!("write_behind.md")]
pub mod write_behind {}

#[doc = include_str!("postgres.md")]
pub mod postgres {}

#[doc = include_str!("security.md")]
pub mod security {}

#[doc = include_str!("observability.md")]
pub mod observability {}

#[doc = include_str!("stored_format.md")]
pub mod stored_format {}

#[doc = include_str!("demo.md")]
pub mod demo {}

#[doc = include_str!("benchmarks.md")]
pub mod benchmarks {}

#[doc = include_str!("testing.md")]
pub mod testing {}
