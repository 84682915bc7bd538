//! The per-call helpers on every backend: `key_of` names the exact entry a
//! call reads, `invalidate_call` invalidates it, `bypass` runs a call
//! without the cache and `refresh` recomputes and stores it; each applies
//! to the call it wraps, not to the cached calls its body makes.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use redis_cached::{
    bypass, cache_put, invalidate_call, key_of, redis_cached, refresh, stats_of, Cache,
};
use support::backends::Env;

per_backend!(
    key_of_names_the_exact_entry,
    invalidate_call_invalidates_that_entry_only,
    bypass_runs_the_body_and_touches_nothing,
    refresh_recomputes_and_stores,
    a_helper_applies_to_the_call_it_wraps_only,
    a_refresh_that_finds_the_row_gone_invalidates,
    batches_bypass_and_refresh_but_have_no_one_key,
    try_get_or_compute_stores_ok_only_and_shares_an_error_with_its_waiters,
);

struct Repo {
    cache: Cache,
    db: AtomicU64,
    queries: AtomicU64,
}

impl Repo {
    fn new(cache: Cache) -> Arc<Repo> {
        Arc::new(Repo {
            cache,
            db: AtomicU64::new(1),
            queries: AtomicU64::new(0),
        })
    }

    fn query(&self) -> u64 {
        self.queries.fetch_add(1, Ordering::SeqCst);
        self.db.load(Ordering::SeqCst)
    }

    #[redis_cached(key = "team:<name>:<id>", version = 3, cache = self.cache)]
    async fn member(&self, name: &str, id: u64) -> u64 {
        self.query() * 1000 + id
    }

    /// A cached function whose body calls another one.
    #[redis_cached(key = "summary:<id>", cache = self.cache)]
    async fn summary(&self, id: u64) -> String {
        format!("member {}", self.member("red team", id).await)
    }

    #[cache_put(key = "team:<name>:<id>", version = 3, cache = self.cache)]
    async fn save(&self, name: &str, id: u64, value: u64) -> u64 {
        let _ = (name, id);
        value
    }

    /// `None` once the row is gone (the database value is 0).
    #[redis_cached(key = "maybe:<id>", cache = self.cache)]
    async fn maybe(&self, id: u64) -> Option<u64> {
        Some(self.query()).filter(|v| *v != 0).map(|v| v + id)
    }

    #[redis_cached(key = "row:<ids[]>", cache = self.cache)]
    async fn rows(&self, ids: Vec<u64>) -> HashMap<u64, u64> {
        let value = self.query();
        ids.into_iter().map(|id| (id, value)).collect()
    }
}

async fn key_of_names_the_exact_entry(env: &Env) {
    let repo = Repo::new(env.cache());
    let key = key_of(repo.member("red team", 7)).expect("a cached call has a key");
    assert_eq!(key, env.key("team:red%20team:7@v3"));
    assert_eq!(repo.queries.load(Ordering::SeqCst), 0, "nothing ran");
    assert_eq!(repo.cache.stats().hits + repo.cache.stats().misses, 0);
    assert_eq!(
        key_of(repo.save("red team", 7, 1)),
        Some(key),
        "the writer's key"
    );
    if !matches!(env, Env::Memory) {
        repo.member("red team", 7).await;
        let stored: Option<Vec<u8>> = env
            .raw(::redis::cmd("GET").arg(env.key("team:red%20team:7@v3")))
            .await;
        assert!(stored.is_some(), "the call stored under that key");
    }
}

async fn invalidate_call_invalidates_that_entry_only(env: &Env) {
    let repo = Repo::new(env.cache());
    assert_eq!(repo.member("red team", 1).await, 1001);
    assert_eq!(repo.member("red team", 2).await, 1002);
    repo.db.store(2, Ordering::SeqCst);
    assert!(invalidate_call(repo.member("red team", 1)).await.unwrap());
    assert_eq!(repo.member("red team", 1).await, 2001, "recomputed");
    assert_eq!(
        repo.member("red team", 2).await,
        1002,
        "the other entry stays"
    );
    assert_eq!(repo.queries.load(Ordering::SeqCst), 3);
}

async fn bypass_runs_the_body_and_touches_nothing(env: &Env) {
    let repo = Repo::new(env.cache());
    assert_eq!(repo.member("a", 1).await, 1001);
    repo.db.store(2, Ordering::SeqCst);
    let before = repo.cache.stats();
    assert_eq!(bypass(repo.member("a", 1)).await, 2001, "the body ran");
    assert_eq!(bypass(repo.member("a", 1)).await, 2001);
    let delta = repo.cache.stats() - before;
    assert_eq!((delta.hits, delta.misses, delta.writes), (0, 0, 0));
    assert_eq!(
        repo.member("a", 1).await,
        1001,
        "the cached entry is untouched"
    );
}

async fn refresh_recomputes_and_stores(env: &Env) {
    let repo = Repo::new(env.cache());
    assert_eq!(repo.member("a", 1).await, 1001);
    repo.db.store(2, Ordering::SeqCst);
    assert_eq!(repo.member("a", 1).await, 1001, "cached");
    assert_eq!(refresh(repo.member("a", 1)).await, 2001, "recomputed");
    assert_eq!(repo.member("a", 1).await, 2001, "and stored");
    assert_eq!(repo.queries.load(Ordering::SeqCst), 2);
}

async fn a_helper_applies_to_the_call_it_wraps_only(env: &Env) {
    let repo = Repo::new(env.cache());
    assert_eq!(repo.member("red team", 5).await, 1005);
    repo.db.store(2, Ordering::SeqCst);
    // The summary is recomputed; the member call inside it is a hit.
    assert_eq!(refresh(repo.summary(5)).await, "member 1005");
    assert_eq!(bypass(repo.summary(5)).await, "member 1005");
    assert_eq!(repo.queries.load(Ordering::SeqCst), 1);
    // Helpers outside any call leave later calls alone.
    assert_eq!(repo.member("red team", 5).await, 1005);
}

async fn a_refresh_that_finds_the_row_gone_invalidates(env: &Env) {
    let repo = Repo::new(env.cache());
    assert_eq!(repo.maybe(1).await, Some(2));
    repo.db.store(0, Ordering::SeqCst);
    // None is not cached here: the refresh cannot store it, so the entry
    // it replaces (the deleted row) must go.
    assert_eq!(refresh(repo.maybe(1)).await, None);
    assert_eq!(repo.maybe(1).await, None, "the deleted row is not served");
    let rows = repo.rows(vec![5]).await;
    assert_eq!(rows[&5], 0);
}

async fn batches_bypass_and_refresh_but_have_no_one_key(env: &Env) {
    let repo = Repo::new(env.cache());
    assert_eq!(repo.rows(vec![1, 2]).await[&1], 1);
    repo.db.store(2, Ordering::SeqCst);
    assert_eq!(repo.rows(vec![1, 2]).await[&1], 1, "cached");
    assert_eq!(bypass(repo.rows(vec![1, 2])).await[&1], 2);
    assert_eq!(repo.rows(vec![1, 2]).await[&2], 1, "bypass stored nothing");
    assert_eq!(refresh(repo.rows(vec![1, 2])).await[&1], 2);
    assert_eq!(repo.rows(vec![1, 2]).await[&2], 2, "refresh stored");
    assert_eq!(key_of(repo.rows(vec![1])), None);
    assert!(!invalidate_call(repo.rows(vec![1])).await.unwrap());
    // Its keys, one per element, in order: the keys single calls use.
    let keys = redis_cached::keys_of(repo.rows(vec![2, 1]));
    assert_eq!(keys.len(), 2);
    assert!(
        keys[0].ends_with("row:2") && keys[1].ends_with("row:1"),
        "{keys:?}"
    );
    let single = redis_cached::keys_of(repo.summary(1));
    assert_eq!(single, [key_of(repo.summary(1)).expect("a key")]);
}

#[tokio::test]
async fn with_no_cache_there_is_no_key() {
    #[redis_cached(key = "n:<id>")]
    async fn uncached(id: u64) -> u64 {
        id
    }
    assert_eq!(key_of(uncached(1)), None);
    assert!(!invalidate_call(uncached(1)).await.unwrap());
    assert_eq!(bypass(uncached(3)).await, 3);
}

/// `stats_of` counts each function apart, on whichever cache it runs.
/// The functions are local to each test, so that tests running at once do
/// not share their counters.
macro_rules! stats_of_scenario {
    ($cache:expr) => {{
        #[redis_cached(key = "a:<id>", cache = cache)]
        async fn a(cache: &Cache, id: u64) -> u64 {
            id
        }
        #[redis_cached(key = "b:<id>", cache = cache)]
        async fn b(cache: &Cache, id: u64) -> Option<u64> {
            (id > 0).then_some(id)
        }
        #[redis_cached(key = "c:<ids[]>", cache = cache)]
        async fn c(cache: &Cache, ids: Vec<u64>) -> HashMap<u64, u64> {
            ids.into_iter().map(|id| (id, id)).collect()
        }
        let cache: Cache = $cache;
        for _ in 0..3 {
            a(&cache, 1).await;
        }
        b(&cache, 0).await;
        b(&cache, 0).await;
        c(&cache, vec![1, 2]).await;
        c(&cache, vec![1, 2, 3]).await;
        let sa = stats_of(a(&cache, 0)).expect("a cached function");
        let sb = stats_of(b(&cache, 0)).expect("a cached function");
        let sc = stats_of(c(&cache, vec![])).expect("a cached function");
        assert_eq!(
            (sa.hits, sa.misses, sa.computes, sa.writes),
            (2, 1, 1, 1),
            "{sa}"
        );
        // `None` is not cached without `cache_none`: two misses, two runs.
        assert_eq!(
            (sb.hits, sb.misses, sb.computes, sb.writes),
            (0, 2, 2, 0),
            "{sb}"
        );
        assert_eq!(
            (sc.hits, sc.misses, sc.computes, sc.writes),
            (2, 3, 2, 3),
            "{sc}"
        );
        // The cache's own counters add them up.
        let all = cache.stats();
        assert_eq!(all.hits, sa.hits + sb.hits + sc.hits, "{all}");
        assert_eq!(all.misses, sa.misses + sb.misses + sc.misses, "{all}");
        // Capturing the stats ran nothing.
        assert_eq!(stats_of(a(&cache, 0)).expect("cached").computes, 1);
        // A write-through's writes are its own.
        #[cache_put(key = "a:<id>", cache = cache)]
        async fn put_a(cache: &Cache, id: u64, value: u64) -> u64 {
            let _ = id;
            value
        }
        for n in 0..3 {
            put_a(&cache, 1, n).await;
        }
        let sp = stats_of(put_a(&cache, 0, 0)).expect("a cached function");
        assert_eq!(sp.writes, 3, "{sp}");
        // A value that no longer decodes is the reading function's error.
        cache
            .set("a:7", &"not a number", std::time::Duration::from_secs(60))
            .await
            .expect("set");
        assert_eq!(a(&cache, 7).await, 7);
        let sa = stats_of(a(&cache, 0)).expect("a cached function");
        assert_eq!(sa.decode_errors, 1, "{sa}");
    }};
}

#[tokio::test]
async fn stats_of_counts_each_function_in_memory() {
    stats_of_scenario!(Cache::in_memory());
}

#[tokio::test]
async fn stats_of_counts_each_function_on_redis() {
    let server = support::RedisServer::start();
    stats_of_scenario!(Cache::redis(&server.url()).expect("valid URL"));
}

#[tokio::test]
async fn stats_of_needs_no_cache_and_not_an_eviction() {
    #[redis_cached(key = "n:<id>")]
    async fn uncached(id: u64) -> u64 {
        id
    }
    // Calls without a cache run uncached, and are not counted.
    assert_eq!(uncached(1).await, 1);
    let stats = stats_of(uncached(1)).expect("a cached function, though uncached");
    assert_eq!(stats.hits + stats.misses + stats.computes, 0, "{stats}");
    assert_eq!(stats_of(async { 1 }), None);

    #[redis_cached::cache_evict(key = "n:<id>")]
    async fn evict(id: u64) {
        let _ = id;
    }
    assert_eq!(stats_of(evict(1)), None, "an eviction has no counters");
}

async fn try_get_or_compute_stores_ok_only_and_shares_an_error_with_its_waiters(env: &Env) {
    let cache = env.cache();
    let ttl = std::time::Duration::from_secs(60);
    let runs = Arc::new(AtomicU64::new(0));
    let failing = |runs: Arc<AtomicU64>| {
        move || async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            Err::<String, String>("database down".into())
        }
    };
    // Five callers at once: one computation, its error shared by all.
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let (cache, runs) = (cache.clone(), Arc::clone(&runs));
            tokio::spawn(
                async move { cache.try_get_or_compute("user:7", ttl, failing(runs)).await },
            )
        })
        .collect();
    let mut errors = Vec::new();
    for call in calls {
        errors.push(call.await.expect("no panic").expect_err("the error"));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "one computation");
    assert!(
        errors.iter().all(|e| Arc::ptr_eq(e, &errors[0])),
        "one error, shared"
    );
    assert_eq!(*errors[0], "database down");
    // Not stored: the next call computes, and stores its Ok value.
    assert_eq!(cache.get::<String>("user:7").await, None);
    let ok = cache
        .try_get_or_compute("user:7", ttl, || async {
            Ok::<_, String>("Ada".to_owned())
        })
        .await;
    assert_eq!(ok.as_deref(), Ok("Ada"));
    let hit = cache
        .try_get_or_compute("user:7", ttl, || async {
            Err::<String, String>("not called".into())
        })
        .await;
    assert_eq!(hit.as_deref(), Ok("Ada"));
    assert_eq!(cache.get::<String>("user:7").await.as_deref(), Some("Ada"));
}

#[redis_cached(key = "named:<id>", cache = cache)]
async fn named_function(cache: &Cache, id: u64) -> u64 {
    id
}

#[tokio::test]
async fn a_functions_counters_are_found_by_its_name_without_a_call() {
    let cache = Cache::in_memory();
    assert_eq!(
        redis_cached::stats_named("named_function"),
        None,
        "not called yet"
    );
    named_function(&cache, 1).await;
    named_function(&cache, 1).await;
    let stats = redis_cached::stats_named("named_function").expect("called");
    assert_eq!((stats.hits, stats.misses), (1, 1));
    let full = redis_cached::cached_functions()
        .into_iter()
        .find(|(name, _)| name.ends_with("::named_function"))
        .expect("listed");
    assert!(full.0.starts_with("call_helpers"), "{}", full.0);
    assert_eq!(redis_cached::stats_named(full.0), Some(stats));
    assert_eq!(redis_cached::stats_named("no_such_function"), None);
}
