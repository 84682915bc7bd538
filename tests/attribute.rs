//! The attributes on the in-memory backend: what is cached, under which key,
//! for each kind of function and return type.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis_cached::{cache_evict, cache_put, redis_cached, Cache};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
}

#[derive(Debug, PartialEq)]
struct DbError(&'static str);

struct Repo {
    cache: Cache,
    calls: AtomicU32,
    tenant: u32,
}

impl Repo {
    fn new() -> Self {
        Repo {
            cache: Cache::in_memory(),
            calls: AtomicU32::new(0),
            tenant: 7,
        }
    }

    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }

    #[redis_cached(key = "user:<id>", ttl = 60, cache = self.cache)]
    async fn get_user(&self, id: u64) -> Result<Option<User>, DbError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match id {
            0 => Err(DbError("connection lost")),
            1..=100 => Ok(Some(User {
                id,
                name: format!("user{id}"),
            })),
            _ => Ok(None),
        }
    }

    #[redis_cached(key = "maybe:<id>", cache = self.cache, cache_none = "1h")]
    async fn maybe_user(&self, id: u64) -> Option<User> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        (id < 100).then(|| User {
            id,
            name: "m".into(),
        })
    }

    #[redis_cached(key = "plain:<self.tenant>:<id>", cache = &self.cache, ttl = "100ms")]
    async fn short_lived(&self, id: u64) -> u64 {
        self.calls.fetch_add(1, Ordering::SeqCst);
        id * 2
    }

    #[redis_cached(key = "pair:<a>:<b>", cache = self.cache)]
    async fn pair(&self, a: &str, b: &str) -> String {
        self.calls.fetch_add(1, Ordering::SeqCst);
        format!("{a}|{b}")
    }

    #[redis_cached(key = "name:<user.name>", cache = self.cache, version = 3)]
    async fn by_name(&self, user: &User) -> String {
        self.calls.fetch_add(1, Ordering::SeqCst);
        user.name.to_uppercase()
    }

    #[redis_cached(cache = self.cache)]
    async fn default_key(&self, a: u32, b: String) -> String {
        self.calls.fetch_add(1, Ordering::SeqCst);
        format!("{a}{b}")
    }

    #[cache_put(key = "user:<user.id>", ttl = 60, cache = self.cache)]
    async fn save_user(&self, user: User) -> Result<Option<User>, DbError> {
        Ok(Some(user))
    }

    #[cache_evict(key = "user:<id>", cache = self.cache)]
    async fn delete_user(&self, id: u64, fail: bool) -> Result<(), DbError> {
        let _ = id;
        if fail {
            Err(DbError("delete failed"))
        } else {
            Ok(())
        }
    }

    #[redis_cached(key = "arc:<id>", cache = self.cache)]
    async fn owned(self: Arc<Self>, id: u64) -> u64 {
        self.calls.fetch_add(1, Ordering::SeqCst);
        id + u64::from(self.tenant)
    }
}

#[tokio::test]
async fn hit_after_miss_and_err_never_cached() {
    let repo = Repo::new();
    let ada = repo.get_user(42).await.unwrap();
    assert_eq!(
        ada,
        Some(User {
            id: 42,
            name: "user42".into()
        })
    );
    assert_eq!(repo.get_user(42).await.unwrap(), ada);
    assert_eq!(repo.calls(), 1, "second call is a hit");

    assert_eq!(repo.get_user(0).await, Err(DbError("connection lost")));
    assert_eq!(repo.get_user(0).await, Err(DbError("connection lost")));
    assert_eq!(repo.calls(), 3, "errors are never cached");

    let stats = repo.cache.stats();
    assert_eq!(stats.hits, 1);
    assert_eq!(stats.misses, 3);
    assert_eq!(stats.computes, 3);
}

#[tokio::test]
async fn none_is_cached_only_with_cache_none() {
    let repo = Repo::new();
    assert_eq!(repo.get_user(500).await, Ok(None));
    assert_eq!(repo.get_user(500).await, Ok(None));
    assert_eq!(repo.calls(), 2, "no cache_none: None is recomputed");

    assert_eq!(repo.maybe_user(500).await, None);
    assert_eq!(repo.maybe_user(500).await, None);
    assert_eq!(repo.calls(), 3, "cache_none: None is cached");
    assert!(repo.maybe_user(5).await.is_some());
    assert!(repo.maybe_user(5).await.is_some());
    assert_eq!(repo.calls(), 4);
}

#[tokio::test]
async fn ttl_expires() {
    let repo = Repo::new();
    assert_eq!(repo.short_lived(4).await, 8);
    assert_eq!(repo.short_lived(4).await, 8);
    assert_eq!(repo.calls(), 1);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(repo.short_lived(4).await, 8);
    assert_eq!(repo.calls(), 2, "expired after 100 ms");
    // The key is the template rendered with `self.tenant` and `id`.
    assert_eq!(repo.cache.get::<u64>("plain:7:4").await, Some(8));
}

#[tokio::test]
async fn values_with_separators_never_share_a_key() {
    let repo = Repo::new();
    assert_eq!(repo.pair("1:2", "3").await, "1:2|3");
    assert_eq!(repo.pair("1", "2:3").await, "1|2:3");
    assert_eq!(repo.pair("1:2", "3").await, "1:2|3");
    assert_eq!(repo.pair("1", "2:3").await, "1|2:3");
    assert_eq!(repo.calls(), 2);
    assert_eq!(
        repo.cache.get::<String>("pair:1%3A2:3").await.as_deref(),
        Some("1:2|3")
    );
}

#[tokio::test]
async fn field_paths_and_versions_render_into_the_key() {
    let repo = Repo::new();
    let user = User {
        id: 1,
        name: "grace".into(),
    };
    assert_eq!(repo.by_name(&user).await, "GRACE");
    assert_eq!(
        repo.cache.get::<String>("name:grace@v3").await.as_deref(),
        Some("GRACE")
    );
}

#[tokio::test]
async fn default_key_names_module_fn_and_arguments() {
    let repo = Repo::new();
    assert_eq!(repo.default_key(1, "x".into()).await, "1x");
    assert_eq!(repo.default_key(1, "x".into()).await, "1x");
    assert_eq!(repo.default_key(1, "y".into()).await, "1y");
    assert_eq!(repo.calls(), 2);
    // `<module path>::<fn>#<digest of the fn's instantiated path>:<args>`.
    // The path is the type name of a closure in the fn's body (an async
    // fn's body is itself one): it names the impl block, so two `get`s of
    // two impls in one module differ (tests/default_keys.rs).
    let path = format!(
        "{}::Repo::default_key::{{{{closure}}}}::{{{{closure}}}}",
        module_path!()
    );
    let mut key = redis_cached::KeyBuilder::with_capacity(64);
    key.literal(module_path!());
    key.literal("::default_key");
    key.digest(&[&path]);
    key.literal(":1:x");
    let key = key.finish(None);
    assert!(key.starts_with("attribute::default_key#"), "{key}");
    assert_eq!(repo.cache.get::<String>(&key).await.as_deref(), Some("1x"));
}

#[tokio::test]
async fn put_writes_through_and_evict_deletes_on_success() {
    let repo = Repo::new();
    let user = User {
        id: 9,
        name: "new".into(),
    };
    repo.save_user(user.clone()).await.unwrap();
    assert_eq!(repo.get_user(9).await, Ok(Some(user)));
    assert_eq!(repo.calls(), 0, "cache_put filled the key");

    assert!(repo.delete_user(9, true).await.is_err());
    assert!(
        repo.cache.get::<User>("user:9").await.is_some(),
        "a failed delete keeps the entry"
    );
    repo.delete_user(9, false).await.unwrap();
    assert!(repo.cache.get::<User>("user:9").await.is_none());
    repo.get_user(9).await.unwrap();
    assert_eq!(repo.calls(), 1);
}

#[tokio::test]
async fn arc_self_receiver() {
    let repo = Arc::new(Repo::new());
    assert_eq!(repo.clone().owned(1).await, 8);
    assert_eq!(repo.clone().owned(1).await, 8);
    assert_eq!(repo.calls(), 1);
}

trait Store {
    async fn load(&self, id: u32) -> Result<String, DbError>;
}

struct MemStore {
    cache: Cache,
    calls: AtomicU32,
}

impl Store for MemStore {
    #[redis_cached(key = "load:<id>", cache = self.cache)]
    async fn load(&self, id: u32) -> Result<String, DbError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(id.to_string())
    }
}

#[tokio::test]
async fn trait_impl_methods() {
    let store = MemStore {
        cache: Cache::in_memory(),
        calls: AtomicU32::new(0),
    };
    assert_eq!(store.load(3).await, Ok("3".into()));
    assert_eq!(store.load(3).await, Ok("3".into()));
    assert_eq!(store.calls.load(Ordering::SeqCst), 1);
}

static GENERIC_CALLS: AtomicU32 = AtomicU32::new(0);

#[redis_cached(key = "generic:<id>:<label>", cache = cache)]
async fn generic<'a, K: redis_cached::CacheKey + std::fmt::Display>(
    cache: &'a Cache,
    id: K,
    label: impl redis_cached::CacheKey + std::fmt::Display,
) -> String {
    GENERIC_CALLS.fetch_add(1, Ordering::SeqCst);
    format!("{id}-{label}")
}

#[tokio::test]
async fn generics_lifetimes_and_impl_trait_arguments() {
    let cache = Cache::in_memory();
    assert_eq!(generic(&cache, 5u8, "a").await, "5-a");
    assert_eq!(generic(&cache, 5u8, "a").await, "5-a");
    assert_eq!(GENERIC_CALLS.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn concurrent_calls_share_one_computation() {
    static CALLS: AtomicU32 = AtomicU32::new(0);

    #[redis_cached(key = "slow:<id>", cache = cache)]
    async fn slow(cache: Cache, id: u32) -> u32 {
        CALLS.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        id
    }

    let cache = Cache::in_memory();
    let tasks: Vec<_> = (0..100)
        .map(|_| tokio::spawn(slow(cache.clone(), 1)))
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), 1);
    }
    assert_eq!(CALLS.load(Ordering::SeqCst), 1);
    let stats = cache.stats();
    assert_eq!(stats.computes, 1);
    assert_eq!(stats.coalesced, 99);
}

/// Serializes as a string but deserializes only from a number: what a
/// careless serde impl can do. Its cached copies never read back.
#[derive(Debug, PartialEq, Deserialize)]
struct OneWay(u32);

impl Serialize for OneWay {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("not a number")
    }
}

#[tokio::test]
async fn values_that_do_not_read_back_are_recomputed_not_looped_on() {
    static CALLS: AtomicU32 = AtomicU32::new(0);

    #[redis_cached(key = "oneway:<id>", cache = cache)]
    async fn one_way(cache: Cache, id: u32) -> OneWay {
        CALLS.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        OneWay(id)
    }

    let cache = Cache::in_memory();
    let tasks: Vec<_> = (0..10)
        .map(|_| tokio::spawn(one_way(cache.clone(), 3)))
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), OneWay(3));
    }
    assert_eq!(one_way(cache.clone(), 3).await, OneWay(3));
    let stats = cache.stats();
    assert!(stats.decode_errors >= 10, "{stats:?}");
    assert_eq!(u64::from(CALLS.load(Ordering::SeqCst)), stats.computes);
}

/// Arguments passed through `macro_rules!` fragments arrive wrapped in
/// invisible groups: `$key:literal`, `$ttl:literal`, `$tag:literal`.
macro_rules! cached_lookup {
    ($name:ident, $key:literal, $ttl:literal, $tag:literal) => {
        #[redis_cached::redis_cached(key = $key, ttl = $ttl, tags = [$tag], cache = cache)]
        async fn $name(cache: &redis_cached::Cache, id: u64) -> u64 {
            id + 1
        }
    };
}

cached_lookup!(through_a_macro, "macro:<id>", 60, "group:<id>");

#[tokio::test]
async fn arguments_pass_through_macro_rules_fragments() {
    let cache = redis_cached::Cache::in_memory();
    assert_eq!(through_a_macro(&cache, 1).await, 2);
    assert_eq!(cache.get::<u64>("macro:1").await, Some(2));
}

static SHARED: std::sync::LazyLock<redis_cached::Cache> =
    std::sync::LazyLock::new(redis_cached::Cache::in_memory);

/// A `static` `LazyLock<Cache>` is a cache as it is: no `&*` needed.
#[redis_cached::redis_cached(key = "lazy:<id>", cache = SHARED)]
async fn through_a_lazy_lock(id: u64) -> u64 {
    id * 3
}

#[tokio::test]
async fn a_lazy_lock_cache_is_used_as_it_is() {
    assert_eq!(through_a_lazy_lock(2).await, 6);
    assert_eq!(SHARED.get::<u64>("lazy:2").await, Some(6));
}
