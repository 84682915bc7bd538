//! What generated code calls. Not a stable API: reached only through
//! `redis_cached::__private`, by code the attributes write.
//!
//! Each entry point only registers the function's site and hands the call
//! to its algorithm in `call` (which never names the [`Cache`] handle):
//! the algorithms live there, the macro's vocabulary (the traits that turn
//! a user's mistake into one readable error) lives here.

use std::future::Future;
use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

pub use crate::call::batch::{BatchMap, BatchShape, MapOf, ResultMapOf};
pub use crate::call::evict::{always, is_ok, Always, IsOk, Success};
pub use crate::encoding::key::KeyBuilder;
pub use crate::encoding::shape::{OptionOf, Plain, ResultOf, ResultOptionOf, Shape, Storable};
use crate::engine::policy::Role;
pub use crate::engine::policy::{LockPolicy, Policy};
use crate::engine::store::Inner;
pub use crate::observe::site::Site;
use crate::{global, Cache};

/// The cache one call uses, held for the call: borrowed where the
/// attribute can prove the borrow outlives the call, owned otherwise.
/// Borrowing spares each call an atomic reference-count update that all
/// threads would contend for.
#[derive(Debug)]
pub enum CacheHold<'a> {
    /// `cache = self.field` with a `&self` receiver, or a `&Cache` parameter.
    Borrowed(&'a Cache),
    /// Any other `cache = …` expression, evaluated and cloned.
    Owned(Cache),
    /// The global cache, if set.
    Global(Option<Arc<Cache>>),
}

impl CacheHold<'_> {
    /// The cache, if there is one.
    pub fn get(&self) -> Option<&Cache> {
        match self {
            CacheHold::Borrowed(cache) => Some(cache),
            CacheHold::Owned(cache) => Some(cache),
            CacheHold::Global(cache) => cache.as_deref(),
        }
    }
}

/// What a `cache = …` argument may be: a `Cache`, or anything that
/// dereferences to one (`&Cache`, `Arc<Cache>`, a `static`
/// `LazyLock<Cache>`).
#[diagnostic::on_unimplemented(
    message = "`cache = …` takes a `Cache`, not `{Self}`",
    label = "this is a `{Self}`",
    note = "give a `Cache`, a `&Cache`, an `Arc<Cache>` or a `LazyLock<Cache>`; for a field holding an `Option<Cache>` or a `OnceLock<Cache>`, pass the cache itself"
)]
pub trait AsCache {
    /// The cache.
    fn as_cache(&self) -> &Cache;
}

impl AsCache for Cache {
    fn as_cache(&self) -> &Cache {
        self
    }
}

impl<T: Deref<Target = Cache> + ?Sized> AsCache for T {
    fn as_cache(&self) -> &Cache {
        self
    }
}

/// Borrows the cache of a `cache = …` argument.
pub fn cache_ref<C: AsCache + ?Sized>(cache: &C) -> CacheHold<'_> {
    CacheHold::Borrowed(cache.as_cache())
}

/// Clones the cache of a `cache = …` argument.
pub fn cache_of<C: AsCache + ?Sized>(cache: &C) -> CacheHold<'static> {
    CacheHold::Owned(cache.as_cache().clone())
}

/// The global cache, for attributes without `cache = …`.
pub fn global_cache() -> CacheHold<'static> {
    CacheHold::Global(global::global_shared())
}

/// A TTL given as an expression (`ttl = USER_TTL`, `ttl = self.ttl`).
pub fn ttl(ttl: impl Ttl) -> Duration {
    ttl.duration()
}

/// What `ttl = <expression>` accepts: a `Duration`, or whole seconds.
#[diagnostic::on_unimplemented(
    message = "`ttl = …` takes a `std::time::Duration` or whole seconds as a `u64`, not `{Self}`",
    label = "a TTL of type `{Self}`",
    note = "or write a literal: `ttl = 3600` or `ttl = \"1h\"`"
)]
pub trait Ttl {
    /// The TTL.
    fn duration(self) -> Duration;
}

impl Ttl for Duration {
    fn duration(self) -> Duration {
        self
    }
}

impl Ttl for &Duration {
    fn duration(self) -> Duration {
        *self
    }
}

impl Ttl for u64 {
    fn duration(self) -> Duration {
        Duration::from_secs(self)
    }
}

impl Ttl for &u64 {
    fn duration(self) -> Duration {
        Duration::from_secs(*self)
    }
}

/// A hit served from a decoded copy: the result, if there is one for the
/// key (as rendered) on the cache.
type ClonedHit<R> = fn(&Cache, &str, &Policy) -> Option<R>;

/// How a hit of a function in this process is served: cloned from the
/// decoded copy the in-memory backend keeps of an entry, for a value type
/// that is `Clone` (and `Sync`), or decoded from the entry's bytes. The
/// attribute picks it with [`Probe`], so that no bound is added to the
/// value types it accepts.
pub struct HitPath<S, R> {
    cloned: Option<ClonedHit<R>>,
    shape: PhantomData<fn() -> S>,
}

impl<S, R> HitPath<S, R> {
    /// Hits decode the entry's bytes.
    pub const fn decoding() -> Self {
        HitPath {
            cloned: None,
            shape: PhantomData,
        }
    }
}

impl<S: Shape<R>, R> HitPath<S, R> {
    /// Hits clone the decoded copy of the entry.
    pub fn cloning() -> Self
    where
        S::Value: Clone + Sync,
    {
        fn hit<S: Shape<R>, R>(cache: &Cache, key: &str, policy: &Policy) -> Option<R>
        where
            S::Value: Clone + Sync,
        {
            crate::call::hit::memory_hit::<S, R>(Some(&cache.inner), key, policy)
        }
        HitPath {
            cloned: Some(hit::<S, R>),
            shape: PhantomData,
        }
    }
}

/// Picks a function's [`HitPath`] from what its value type implements, by
/// method resolution (autoref specialization):
/// `(&&Probe::<S, R>::new()).hit_path()` with [`CloneHit`] and
/// [`DecodeHit`] in scope is [`HitPath::cloning`] when the value is `Clone
/// + Sync` (as far as the calling code knows: in a generic function, as its
/// bounds say), [`HitPath::decoding`] otherwise.
pub struct Probe<S, R>(PhantomData<fn() -> (S, R)>);

impl<S, R> Probe<S, R> {
    /// The probe of shape `S` of result `R`.
    pub const fn new() -> Self {
        Probe(PhantomData)
    }
}

impl<S, R> Default for Probe<S, R> {
    fn default() -> Self {
        Probe::new()
    }
}

/// See [`Probe`]: chosen when the value is `Clone + Sync`.
pub trait CloneHit<S, R> {
    /// Hits clone the decoded copy.
    fn hit_path(&self) -> HitPath<S, R>;
}

impl<S: Shape<R>, R> CloneHit<S, R> for &Probe<S, R>
where
    S::Value: Clone + Sync,
{
    fn hit_path(&self) -> HitPath<S, R> {
        HitPath::cloning()
    }
}

/// See [`Probe`]: chosen otherwise.
pub trait DecodeHit<S, R> {
    /// Hits decode the bytes.
    fn hit_path(&self) -> HitPath<S, R>;
}

// Whatever `S` and `R`: a value that cannot be stored is reported once,
// at the call, not here too.
impl<S, R> DecodeHit<S, R> for Probe<S, R> {
    fn hit_path(&self) -> HitPath<S, R> {
        HitPath::decoding()
    }
}

/// The body of a `#[redis_cached]` function. A hit in this process (the
/// in-memory backend, a value type that is `Clone`) is answered before any
/// future of the call is made.
pub async fn cached<'a, S, R, Fut>(
    cache: Option<&'a Cache>,
    key: String,
    tags: &'a [String],
    policy: Policy,
    body: Fut,
    hit_path: HitPath<S, R>,
) -> R
where
    S: Shape<R> + 'a,
    R: 'a,
    Fut: Future<Output = R> + 'a,
{
    policy.register(Role::Cached);
    // The result is made only to be returned, never held across an
    // `.await`: the call is `Send` whatever the error type.
    if let (Some(hit), Some(cache)) = (hit_path.cloned, cache) {
        if let Some(result) = hit(cache, &key, &policy) {
            crate::encoding::key::recycle(key);
            return result;
        }
    }
    let inner = inner_of(cache);
    crate::call::hit::cached::<S, R, Fut>(inner, global::warn_unset, key, tags, policy, body).await
}

/// The body of a `#[redis_cached]` function with `stale` or `early`: its
/// body may run as a background refresh, so `make` makes it `Send +
/// 'static` (cloning a borrowed `self` and borrowed arguments), only when
/// it runs: a hit that needs no refresh calls nothing.
pub fn cached_refreshing<'a, S, R, F, Fut>(
    cache: Option<&'a Cache>,
    key: String,
    tags: &'a [String],
    policy: Policy,
    make: F,
) -> impl Future<Output = R> + 'a
where
    S: Shape<R> + 'static,
    R: 'static,
    F: FnOnce() -> Fut + 'a,
    Fut: Future<Output = R> + Send + 'static,
{
    policy.register(Role::Cached);
    let inner = inner_of(cache);
    crate::call::hit::cached_refreshing::<S, R, F, Fut>(
        inner,
        global::warn_unset,
        key,
        tags,
        policy,
        make,
    )
}

/// A value the near tier may hold: it is cloned out of the tier on every
/// near hit, and shared between threads. Named so that a value type that
/// is not gets one error naming `near`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be kept in the near tier (`near = …`): it must implement `Clone` (and `Sync`)",
    label = "`near` keeps this function's value in the process and clones it on each near hit",
    note = "derive `Clone` for `{Self}`, or remove `near`"
)]
pub trait NearValue: Clone + Sync + Send + 'static {}

#[diagnostic::do_not_recommend]
impl<T: Clone + Sync + Send + 'static> NearValue for T {}

/// What a background refresh (`stale`, `early`) clones of `&self` to run
/// the body after the call returned. Named so that a receiver that cannot
/// be cloned gets one error naming `stale` and `early`.
#[diagnostic::on_unimplemented(
    message = "`stale` and `early` refresh in the background on a clone of `self`, but `{Self}` does not implement `Clone`",
    label = "the refresh runs the body after the call returned, on a clone of this `self`",
    note = "derive or implement `Clone` for `{Self}` (cheap when its fields are `Arc`s or pools), or take `self: Arc<Self>`"
)]
pub trait RefreshSelf: Clone {}

#[diagnostic::do_not_recommend]
impl<T: Clone> RefreshSelf for T {}

/// The clone of `&self` that a background refresh works on.
pub fn refresh_self<T: RefreshSelf>(this: &T) -> T {
    this.clone()
}

/// The body of a `#[redis_cached]` function with `near`: a value the near
/// tier holds is returned at once, without a round trip; otherwise as
/// [`cached`].
pub async fn cached_near<'a, S, R, Fut>(
    cache: Option<&'a Cache>,
    key: String,
    tags: &'a [String],
    policy: Policy,
    body: Fut,
) -> R
where
    S: Shape<R> + 'a,
    S::Value: NearValue,
    R: 'a,
    Fut: Future<Output = R> + 'a,
{
    // Before a near hit counts anything.
    policy.register(Role::Cached);
    // The result is made only to be returned, never held across an
    // `.await`: the call is `Send` whatever the error type.
    if let Some(result) = crate::call::hit::near_hit::<S, R>(inner_of(cache), &key, &policy) {
        crate::encoding::key::recycle(key);
        return result;
    }
    cached::<S, R, Fut>(cache, key, tags, policy, body, HitPath::cloning()).await
}

/// [`cached_near`] for a function with `stale` or `early` (see
/// [`cached_refreshing`]).
pub async fn cached_refreshing_near<'a, S, R, F, Fut>(
    cache: Option<&'a Cache>,
    key: String,
    tags: &'a [String],
    policy: Policy,
    make: F,
) -> R
where
    S: Shape<R> + 'static,
    S::Value: NearValue,
    R: 'static,
    F: FnOnce() -> Fut + 'a,
    Fut: Future<Output = R> + Send + 'static,
{
    policy.register(Role::Cached);
    if let Some(result) = crate::call::hit::near_hit::<S, R>(inner_of(cache), &key, &policy) {
        crate::encoding::key::recycle(key);
        return result;
    }
    cached_refreshing::<S, R, F, Fut>(cache, key, tags, policy, make).await
}

/// The cache's core, as the algorithms take it.
fn inner_of(cache: Option<&Cache>) -> Option<&Arc<Inner>> {
    cache.map(|cache| &cache.inner)
}

/// The body of a batch function (`<ids[]>` in its key): `elements` are the
/// requested elements with their rendered keys; `body` computes those it
/// is given.
pub async fn cached_batch<S, R, K, V, F, Fut>(
    cache: Option<&Cache>,
    elements: Vec<(K, String)>,
    tags: &[String],
    policy: Policy,
    body: F,
) -> R
where
    S: BatchShape<R>,
    S::Map: BatchMap<K, V>,
    K: Clone,
    V: serde::Serialize + serde::de::DeserializeOwned,
    F: FnOnce(Vec<K>) -> Fut,
    Fut: Future<Output = R>,
{
    policy.register(Role::Batch);
    let inner = inner_of(cache);
    crate::call::batch::cached_batch::<S, R, K, V, F, Fut>(
        inner,
        global::warn_unset,
        elements,
        tags,
        policy,
        body,
    )
    .await
}

/// The body of a `#[cache_put]` function: run it, then write its value.
///
/// A write-through is the newest state: it overwrites whatever is there.
/// When it cannot (a `None` that may not be cached, a value that cannot be
/// encoded or is over `max_value_bytes`, Redis failing), the old value
/// would be wrong: the key is invalidated instead.
pub async fn put<S, R, Fut>(
    cache: Option<&Cache>,
    key: String,
    tags: &[String],
    policy: Policy,
    body: Fut,
) -> R
where
    S: Shape<R>,
    Fut: Future<Output = R>,
{
    policy.register(Role::Put);
    crate::call::put::put::<S, R, Fut>(inner_of(cache), global::warn_unset, key, tags, policy, body)
        .await
}

/// The body of a `#[cache_evict]` function: run it, then, if it succeeded,
/// invalidate the key (if it names one) and every key of the tags. Only the
/// successful part of the result is held across the invalidations, so an
/// error type need not be `Send`.
pub async fn evict<R, Fut>(
    cache: Option<&Cache>,
    site: &'static Site,
    key: Option<String>,
    tags: &[String],
    succeeded: impl Success<R>,
    body: Fut,
) -> R
where
    Fut: Future<Output = R>,
{
    site.register(|| crate::observe::meters::Series::NONE);
    crate::call::evict::evict(
        inner_of(cache),
        global::warn_unset,
        site,
        key,
        tags,
        succeeded,
        body,
    )
    .await
}

/// Decodes `bytes` as stored entries of a few types, for the fuzz targets;
/// returns how many decoded.
pub fn fuzz_decode(bytes: &[u8]) -> usize {
    use crate::encoding::codec::Codec;
    let ok = [
        Codec::Json.decode::<u64>(bytes).is_ok(),
        Codec::Json.decode::<String>(bytes).is_ok(),
        Codec::Json.decode::<Vec<Option<i32>>>(bytes).is_ok(),
        Codec::Json
            .decode::<std::collections::BTreeMap<String, (bool, f64)>>(bytes)
            .is_ok(),
    ];
    ok.iter().filter(|ok| **ok).count()
}
