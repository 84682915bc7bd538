//! Batches: a `#[redis_cached]` function over a collection (`<ids[]>` in
//! its key) whose elements each have their own entry. One call reads every
//! element's key in one round trip, waits for the elements this process
//! is computing already, runs the body once with the rest, stores what it
//! returned in one round trip (each by compare-and-set, so that an element
//! invalidated meanwhile keeps its tombstone), and hands the computed
//! entries to this process's callers waiting for them.
//!
//! A batch never holds the right to compute an element while it waits for
//! another caller's computation: it follows first, then leads. Two batches
//! that overlap can therefore never wait for each other.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::join_all;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::Span;

use crate::backend::{Bytes, Seen, StoreIf};
use crate::call::directive::{self, Directive};
use crate::call::miss::{marked_all, reentrant, Outcome};
use crate::engine::flight::{self, Followed, Leader, Role};
use crate::engine::policy::Policy;
use crate::engine::store::{Encoded, Inner, Lookup, StoreOutcome};
use crate::observe::redis_time::InSpan;
use crate::observe::site::Site;
use crate::observe::stats::Event;

/// The map a batch function returns: element to value.
pub trait BatchMap<K, V>: Default {
    /// The value of `element`, if the map has one.
    fn value_of(&self, element: &K) -> Option<&V>;
    /// Adds `element`'s value.
    fn put(&mut self, element: K, value: V);
    /// Adds every entry of `other`.
    fn merge(&mut self, other: Self);
}

impl<K: Eq + Hash, V, H: BuildHasher + Default> BatchMap<K, V> for HashMap<K, V, H> {
    fn value_of(&self, element: &K) -> Option<&V> {
        self.get(element)
    }
    fn put(&mut self, element: K, value: V) {
        self.insert(element, value);
    }
    fn merge(&mut self, other: Self) {
        self.extend(other);
    }
}

impl<K: Ord, V> BatchMap<K, V> for BTreeMap<K, V> {
    fn value_of(&self, element: &K) -> Option<&V> {
        self.get(element)
    }
    fn put(&mut self, element: K, value: V) {
        self.insert(element, value);
    }
    fn merge(&mut self, other: Self) {
        self.extend(other);
    }
}

/// How a batch function's result holds its map.
pub trait BatchShape<R> {
    /// The map.
    type Map;
    /// The map, or the result back (an error: never stored or shared).
    fn split(result: R) -> Result<Self::Map, R>;
    /// The result for `map`.
    fn wrap(map: Self::Map) -> R;
}

/// A batch function that returns its map.
#[derive(Debug)]
pub enum MapOf {}

/// A batch function that returns `Result<map, E>`.
#[derive(Debug)]
pub enum ResultMapOf {}

impl<M> BatchShape<M> for MapOf {
    type Map = M;
    fn split(result: M) -> Result<M, M> {
        Ok(result)
    }
    fn wrap(map: M) -> M {
        map
    }
}

impl<M, E> BatchShape<Result<M, E>> for ResultMapOf {
    type Map = M;
    fn split(result: Result<M, E>) -> Result<M, Result<M, E>> {
        result.map_err(Err)
    }
    fn wrap(map: M) -> Result<M, E> {
        Ok(map)
    }
}

/// An element not found in the cache: its key and what the key held.
struct Missing<K> {
    element: K,
    key: String,
    seen: Seen,
}

/// One call of a batch function. `elements` are the requested elements
/// with their rendered keys; `body` computes the ones it is given. With no
/// cache (`None`), `unset` is called and the body runs for every element.
pub(crate) async fn cached_batch<S, R, K, V, F, Fut>(
    inner: Option<&Arc<Inner>>,
    unset: fn(),
    elements: Vec<(K, String)>,
    tags: &[String],
    policy: Policy,
    body: F,
) -> R
where
    S: BatchShape<R>,
    S::Map: BatchMap<K, V>,
    K: Clone,
    V: Serialize + DeserializeOwned,
    F: FnOnce(Vec<K>) -> Fut,
    Fut: Future<Output = R>,
{
    let directive = directive::take();
    if directive == Some(Directive::Capture) {
        // One key per element (with the cache's namespace), no one key.
        let keys = inner.map_or_else(Vec::new, |inner| {
            elements
                .iter()
                .map(|(_, key)| inner.full_key(key.clone()))
                .collect()
        });
        directive::capture_batch(keys, policy.site);
        return std::future::pending().await;
    }
    let inner = match (inner, directive) {
        (Some(inner), None | Some(Directive::Refresh)) => Some(inner),
        (None, None | Some(Directive::Refresh)) => {
            unset();
            None
        }
        _ => None,
    };
    let span = tracing::debug_span!(
        target: "redis_cached",
        "cached_batch",
        function = policy.site.map_or("", Site::name),
        elements = elements.len(),
        computed = tracing::field::Empty,
        outcome = tracing::field::Empty,
        compute_ms = tracing::field::Empty,
        redis_ms = tracing::field::Empty,
    );
    let forced = directive == Some(Directive::Refresh);
    let call = Call {
        inner,
        tags,
        policy,
        forced,
        span: span.clone(),
    };
    InSpan::new(span, call.run::<S, R, K, V, F, Fut>(elements, body)).await
}

/// One call of a batch function with its cache (`None`: uncached) and its
/// span, which records how the call went.
struct Call<'a> {
    inner: Option<&'a Arc<Inner>>,
    tags: &'a [String],
    policy: Policy,
    /// `refresh(…)`: every element is recomputed.
    forced: bool,
    span: Span,
}

impl Call<'_> {
    async fn run<S, R, K, V, F, Fut>(self, elements: Vec<(K, String)>, body: F) -> R
    where
        S: BatchShape<R>,
        S::Map: BatchMap<K, V>,
        K: Clone,
        V: Serialize + DeserializeOwned,
        F: FnOnce(Vec<K>) -> Fut,
        Fut: Future<Output = R>,
    {
        let Call {
            inner,
            tags,
            policy,
            forced,
            span,
        } = self;
        let Some(inner) = inner else {
            let mut keys = HashSet::new();
            let unique: Vec<K> = elements
                .into_iter()
                .filter(|(_, key)| keys.insert(key.clone()))
                .map(|(element, _)| element)
                .collect();
            span.record("computed", unique.len());
            span.record("outcome", Outcome::Uncached.as_str());
            return timed(&span, body(unique)).await;
        };
        let mut found = S::Map::default();
        let site = policy.site;
        let missing = look_up::<K, V, S::Map>(inner, elements, forced, site, &mut found).await;
        // Redis could not be read: what is computed is a fallback.
        // (A refresh computes whatever was read: a miss, as a single call's.)
        let unread = !forced && missing.iter().any(|m| matches!(m.seen, Seen::Unknown));
        let unfound = missing.len();
        // A refresh recomputes: it takes no computation that began before it.
        let missing = if forced {
            missing
        } else {
            follow::<K, V, S::Map>(inner, missing, site, &mut found).await
        };
        if missing.is_empty() {
            let outcome = if unfound == 0 {
                Outcome::Hit
            } else {
                Outcome::Coalesced
            };
            span.record("computed", 0);
            span.record("outcome", outcome.as_str());
            return S::wrap(found);
        }
        span.record("computed", missing.len());
        let outcome = if unread {
            Outcome::Fallback
        } else {
            Outcome::Miss
        };
        span.record("outcome", outcome.as_str());
        let mut batch = Fill::lead(inner, missing, tags, policy).await;
        batch.forced = forced;
        let computing = batch.keys();
        inner.count(site, Event::computes);
        let result = timed(&span, marked_all(computing, body(batch.elements()))).await;
        // Only the map is held across the store: an error type need not
        // be `Send`.
        let computed = match S::split(result) {
            Ok(map) => map,
            Err(result) => {
                batch.fail();
                return result;
            }
        };
        let entries = batch.encode::<V, S::Map>(&computed);
        batch.finish(entries).await;
        found.merge(computed);
        S::wrap(found)
    }
}

/// Runs a batch's body, recording its time in `span` when it is listened to.
async fn timed<R>(span: &Span, body: impl Future<Output = R>) -> R {
    if span.is_disabled() {
        return body.await;
    }
    let started = Instant::now();
    let result = body.await;
    span.record(
        "compute_ms",
        crate::observe::redis_time::millis(started.elapsed()),
    );
    result
}

/// Reads every element's key in one round trip: hits go into `found`
/// (a cached absence adds nothing), the rest come back; all of them when
/// `forced` (`refresh(…)`). Elements with one key (duplicates) are looked
/// up once.
async fn look_up<K, V, M>(
    inner: &Inner,
    elements: Vec<(K, String)>,
    forced: bool,
    site: Option<&Site>,
    found: &mut M,
) -> Vec<Missing<K>>
where
    V: DeserializeOwned,
    M: BatchMap<K, V>,
{
    let (elements, keys): (Vec<K>, Vec<String>) = elements
        .into_iter()
        .map(|(element, key)| (element, inner.full_key(key)))
        .unzip();
    let unique: Vec<bool> = {
        let mut seen = HashSet::with_capacity(keys.len());
        keys.iter().map(|key| seen.insert(key.as_str())).collect()
    };
    let (elements, keys): (Vec<K>, Vec<String>) = if unique.contains(&false) {
        elements
            .into_iter()
            .zip(keys)
            .zip(&unique)
            .filter(|(_, unique)| **unique)
            .map(|(pair, _)| pair)
            .unzip()
    } else {
        (elements, keys)
    };
    let reads = inner.read_many(&keys).await;
    let mut missing = Vec::new();
    for ((element, key), read) in elements.into_iter().zip(keys).zip(reads) {
        if forced {
            let seen = inner.seen(read);
            missing.push(Missing { element, key, seen });
            continue;
        }
        let lookup = match read {
            Ok(bytes) => inner.decode::<V>(bytes, site),
            Err(seen) => Lookup::Miss(seen),
        };
        match inner.count_lookup(lookup, site) {
            Lookup::Hit(hit) => {
                if let Some(value) = hit.value {
                    found.put(element, value);
                }
            }
            Lookup::Miss(seen) => missing.push(Missing { element, key, seen }),
        }
    }
    missing
}

/// Waits for the missing elements this process is computing already
/// (holding no computation of its own meanwhile); returns those still
/// missing: not being computed, or whose computation failed.
async fn follow<K, V, M>(
    inner: &Inner,
    missing: Vec<Missing<K>>,
    site: Option<&Site>,
    found: &mut M,
) -> Vec<Missing<K>>
where
    V: DeserializeOwned,
    M: BatchMap<K, V>,
{
    let mut still = Vec::new();
    let mut followed = Vec::new();
    for element in missing {
        // A body that asks for a key its task computes computes it.
        match inner
            .flights
            .running(&element.key)
            .filter(|_| !reentrant(&element.key))
        {
            Some(receiver) => followed.push((element, receiver)),
            None => still.push(element),
        }
    }
    if followed.is_empty() {
        return still;
    }
    let got = join_all(followed.iter().map(|(_, receiver)| {
        inner.count(site, Event::coalesced);
        flight::follow_within(inner.settings.coalesce_wait, receiver.clone())
    }))
    .await;
    for ((element, _), got) in followed.into_iter().zip(got) {
        if let Followed::TimedOut = got {
            inner.count(site, Event::coalesce_timeouts);
        }
        let Followed::Value(entry) = got else {
            still.push(element);
            continue;
        };
        match inner.decode::<V>(Bytes::Shared(entry), site) {
            Lookup::Hit(hit) => {
                if let Some(value) = hit.value {
                    found.put(element.element, value);
                }
            }
            // Not a value of this type: compute it.
            Lookup::Miss(_) => still.push(element),
        }
    }
    still
}

/// The computation of a batch's missing elements, on bytes.
struct Fill<'a, K> {
    inner: &'a Inner,
    missing: Vec<Missing<K>>,
    /// This process's callers wait for these (`None`: another caller
    /// started computing the element meanwhile; this one computes it too,
    /// and shares nothing).
    leaders: Vec<Option<Leader<'a>>>,
    policy: Policy,
    /// `refresh(…)`: an element that cannot be stored is invalidated.
    forced: bool,
}

impl<'a, K: Clone> Fill<'a, K> {
    /// Leads the computation of `missing` in this process, and records
    /// their keys under `tags` (a key that could not be recorded is not
    /// stored: no tag would reach it).
    async fn lead(
        inner: &'a Inner,
        mut missing: Vec<Missing<K>>,
        tags: &[String],
        policy: Policy,
    ) -> Self {
        let leaders = missing
            .iter()
            .map(|m| match inner.flights.join(&m.key) {
                Role::Leader(leader) => Some(leader),
                Role::Follower(_) => None,
            })
            .collect();
        if !tags.is_empty() {
            let ttl = policy.ttl.unwrap_or(inner.settings.default_ttl);
            let keys: Vec<String> = missing.iter().map(|m| m.key.clone()).collect();
            if inner.tag_many(&keys, tags, ttl).await.is_err() {
                for m in &mut missing {
                    m.seen = Seen::Unknown;
                }
            }
        }
        Fill {
            inner,
            missing,
            leaders,
            policy,
            forced: false,
        }
    }

    fn keys(&self) -> Vec<String> {
        self.missing.iter().map(|m| m.key.clone()).collect()
    }

    fn elements(&self) -> Vec<K> {
        self.missing.iter().map(|m| m.element.clone()).collect()
    }

    /// The body failed: this process's callers waiting for these elements
    /// compute them by themselves.
    fn fail(&mut self) {
        for leader in self.leaders.drain(..).flatten() {
            leader.fail();
        }
    }

    /// Each missing element's entry and how long to store it: its value,
    /// or (not in the map) an absence, stored only with `cache_none`.
    fn encode<V, M>(&self, computed: &M) -> Vec<Option<Encoded>>
    where
        V: Serialize,
        M: BatchMap<K, V>,
    {
        let inner = self.inner;
        let codec = inner.settings.codec;
        let ttl = self.policy.ttl.unwrap_or(inner.settings.default_ttl);
        self.missing
            .iter()
            .map(|m| match computed.value_of(&m.element) {
                Some(value) => match codec.encode(value, None) {
                    Ok(entry) => Some((entry.into(), Some(ttl))),
                    Err(err) => {
                        inner.count(self.policy.site, Event::encode_errors);
                        tracing::warn!(target: "redis_cached", error = %err, "value not cached: it cannot be serialized");
                        None
                    }
                },
                None => Some((codec.encode_absent(None).into(), self.policy.cache_none)),
            })
            .collect()
    }

    /// Stores the entries in one round trip, each only if its key still
    /// holds what was read, and hands each to this process's callers
    /// waiting for it unless its key changed meanwhile.
    async fn finish(mut self, entries: Vec<Option<Encoded>>) {
        let mut stores = Vec::new();
        let mut stored_at = Vec::new();
        for (n, (m, entry)) in self.missing.iter_mut().zip(&entries).enumerate() {
            if let Some((value, Some(ttl))) = entry {
                stores.push(StoreIf {
                    key: m.key.clone(),
                    seen: std::mem::replace(&mut m.seen, Seen::Unknown),
                    value: value.clone(),
                    ttl: *ttl,
                });
                stored_at.push(n);
            }
        }
        let mut outcomes = vec![StoreOutcome::Failed; entries.len()];
        let stored = self.inner.store_many_if(stores, self.policy.site).await;
        for (n, outcome) in stored_at.into_iter().zip(stored) {
            outcomes[n] = outcome;
        }
        if self.forced {
            // The entries there are older than what the caller gets.
            let unstored = self
                .missing
                .iter()
                .zip(&outcomes)
                .filter(|(_, outcome)| **outcome == StoreOutcome::Failed)
                .map(|(m, _)| self.inner.tombstone(&m.key));
            join_all(unstored).await;
        }
        for ((leader, entry), outcome) in self.leaders.drain(..).zip(entries).zip(outcomes) {
            match (leader, entry) {
                (Some(leader), Some((value, _))) if outcome != StoreOutcome::Refused => {
                    leader.publish(value);
                }
                // Refused: they join again and read what replaced it.
                _ => {}
            }
        }
    }
}
