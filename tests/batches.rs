//! Many keys at once: `get_many`/`set_many` on every backend, what they
//! cost in round trips on one server, and merged lookups (the single-key
//! reads of many tasks sent as one `MGET`), under load and faults.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis_cached::{cache_put, redis_cached, Cache};
use serde::{Deserialize, Serialize};
use support::backends::Env;
use support::RedisServer;

per_backend!(
    get_many_answers_in_order,
    get_many_counts_hits_and_misses,
    set_many_refuses_a_reserved_key_and_stores_nothing,
    a_batch_computes_only_the_missing_elements_once,
    duplicates_are_looked_up_and_computed_once,
    absent_elements_are_cached_only_with_cache_none,
    an_err_is_returned_and_nothing_is_stored,
    an_element_invalidated_during_the_batch_keeps_its_tombstone,
    an_element_being_computed_here_is_awaited_not_computed_again,
    single_key_writes_reach_the_batch,
    a_body_that_asks_for_its_own_elements_does_not_wait_for_itself,
    slices_sets_and_btree_maps_work_alike,
    a_dropped_or_panicking_batch_lets_its_waiters_compute,
    a_tagged_batch_is_reached_by_its_tags,
);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
}

fn user(id: u64) -> User {
    User {
        id,
        name: format!("user {id}"),
    }
}

const TTL: Duration = Duration::from_secs(60);

/// A repository whose "database" holds users 0..1000 and records every
/// query: the ids each batch body was given, and single-row queries.
struct Repo {
    cache: Cache,
    batches: Mutex<Vec<Vec<u64>>>,
    singles: AtomicU32,
    /// How long a query takes.
    delay: Duration,
    /// When set, every query fails.
    down: std::sync::atomic::AtomicBool,
}

impl Repo {
    fn new(cache: Cache) -> Arc<Self> {
        Repo::slow(cache, Duration::ZERO)
    }

    fn slow(cache: Cache, delay: Duration) -> Arc<Self> {
        Arc::new(Repo {
            cache,
            batches: Mutex::default(),
            singles: AtomicU32::new(0),
            delay,
            down: Default::default(),
        })
    }

    fn batches(&self) -> Vec<Vec<u64>> {
        self.batches.lock().unwrap().clone()
    }

    async fn query(&self, ids: &[u64]) -> Result<HashMap<u64, User>, String> {
        let mut sorted = ids.to_vec();
        sorted.sort_unstable();
        self.batches.lock().unwrap().push(sorted);
        tokio::time::sleep(self.delay).await;
        if self.down.load(Ordering::SeqCst) {
            return Err("database down".into());
        }
        Ok(ids
            .iter()
            .filter(|id| **id < 1000)
            .map(|id| (*id, user(*id)))
            .collect())
    }

    #[redis_cached(key = "user:<ids[]>", ttl = 60, cache = self.cache)]
    async fn users(&self, ids: Vec<u64>) -> Result<HashMap<u64, User>, String> {
        self.query(&ids).await
    }

    #[redis_cached(key = "member:<ids[]>", ttl = 60, tags = ["members"], cache = self.cache)]
    async fn tagged_users(&self, ids: Vec<u64>) -> Result<HashMap<u64, User>, String> {
        self.query(&ids).await
    }

    #[redis_cached(key = "user:<ids[]>", ttl = 60, cache_none = "60s", cache = self.cache)]
    async fn users_or_none(&self, ids: Vec<u64>) -> Result<HashMap<u64, User>, String> {
        self.query(&ids).await
    }

    #[redis_cached(key = "user:<id>", ttl = 60, cache = self.cache)]
    async fn user(&self, id: u64) -> Result<Option<User>, String> {
        self.singles.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        Ok((id < 1000).then(|| user(id)))
    }

    #[cache_put(key = "user:<u.id>", ttl = 60, cache = self.cache)]
    async fn save(&self, u: User) -> Result<User, String> {
        Ok(u)
    }

    /// A DTO built from the entities, asking for the same keys again.
    #[redis_cached(key = "user:<ids[]>", ttl = 60, cache = self.cache)]
    async fn users_via_singles(&self, ids: Vec<u64>) -> Result<HashMap<u64, User>, String> {
        let mut found = HashMap::new();
        for id in &ids {
            if let Some(u) = self.user(*id).await? {
                found.insert(*id, u);
            }
        }
        Ok(found)
    }

    /// A batch whose database call panics.
    #[redis_cached(key = "user:<ids[]>", ttl = 60, cache = self.cache)]
    async fn users_panicking(&self, ids: Vec<u64>) -> Result<HashMap<u64, User>, String> {
        self.batches.lock().unwrap().push(ids.clone());
        tokio::time::sleep(self.delay).await;
        if !ids.is_empty() {
            panic!("the driver panicked while loading {ids:?}");
        }
        Ok(HashMap::new())
    }

    #[redis_cached(key = "user:<ids[]>", ttl = 60, cache = self.cache)]
    async fn users_in(&self, ids: &[u64]) -> BTreeMap<u64, User> {
        self.query(ids)
            .await
            .unwrap_or_default()
            .into_iter()
            .collect()
    }

    #[redis_cached(key = "user:<ids[]>", ttl = 60, cache = self.cache)]
    async fn users_of(&self, ids: HashSet<u64>) -> HashMap<u64, User> {
        let ids: Vec<u64> = ids.into_iter().collect();
        self.query(&ids).await.unwrap_or_default()
    }
}

async fn a_batch_computes_only_the_missing_elements_once(env: &Env) {
    let repo = Repo::new(env.cache());
    for id in (0..100)
        .step_by(10)
        .chain((1..100).step_by(10))
        .chain((2..100).step_by(10))
    {
        repo.user(id).await.unwrap();
    }
    let cached: HashSet<u64> = (0..100).filter(|id| id % 10 < 3).collect();
    assert_eq!(cached.len(), 30);
    let before = repo.cache.stats();
    let ids: Vec<u64> = (0..100).collect();
    let found = repo.users(ids.clone()).await.unwrap();
    assert_eq!(found.len(), 100);
    assert!(ids.iter().all(|id| found[id] == user(*id)));
    let expected: Vec<u64> = ids
        .iter()
        .copied()
        .filter(|id| !cached.contains(id))
        .collect();
    assert_eq!(
        repo.batches(),
        [expected],
        "one body call, with the 70 missing"
    );
    let after = repo.cache.stats();
    assert_eq!(after.hits - before.hits, 30);
    assert_eq!(after.misses - before.misses, 70);
    // Stored: a second call, and single-key calls, are hits.
    assert_eq!(repo.users(ids).await.unwrap().len(), 100);
    assert_eq!(repo.batches().len(), 1);
    assert_eq!(repo.user(55).await.unwrap(), Some(user(55)));
    assert_eq!(repo.singles.load(Ordering::SeqCst), 30);
}

async fn duplicates_are_looked_up_and_computed_once(env: &Env) {
    let repo = Repo::new(env.cache());
    let found = repo.users(vec![3, 1, 3, 1, 2]).await.unwrap();
    assert_eq!(found.len(), 3);
    assert_eq!(repo.batches(), [vec![1, 2, 3]]);
}

async fn absent_elements_are_cached_only_with_cache_none(env: &Env) {
    let repo = Repo::new(env.cache());
    let found = repo.users(vec![1, 5000]).await.unwrap();
    assert_eq!(
        found.keys().copied().collect::<Vec<_>>(),
        [1],
        "not found: not in the map"
    );
    repo.users(vec![1, 5000]).await.unwrap();
    assert_eq!(
        repo.batches(),
        [vec![1, 5000], vec![5000]],
        "absence not cached"
    );
    let repo = Repo::new(env.cache());
    repo.users_or_none(vec![7, 6000]).await.unwrap();
    let found = repo.users_or_none(vec![7, 6000]).await.unwrap();
    assert_eq!(found.keys().copied().collect::<Vec<_>>(), [7]);
    assert_eq!(
        repo.batches(),
        [vec![7, 6000]],
        "absence cached with cache_none"
    );
}

async fn an_err_is_returned_and_nothing_is_stored(env: &Env) {
    let repo = Repo::new(env.cache());
    repo.users(vec![1]).await.unwrap();
    repo.down.store(true, Ordering::SeqCst);
    assert_eq!(repo.users(vec![1, 2]).await, Err("database down".into()));
    repo.down.store(false, Ordering::SeqCst);
    assert_eq!(repo.users(vec![1, 2]).await.unwrap().len(), 2);
    assert_eq!(
        repo.batches(),
        [vec![1], vec![2], vec![2]],
        "the Err stored nothing"
    );
}

async fn an_element_invalidated_during_the_batch_keeps_its_tombstone(env: &Env) {
    let repo = Repo::slow(env.cache(), Duration::from_millis(300));
    let batch = tokio::spawn({
        let repo = Arc::clone(&repo);
        async move { repo.users(vec![1, 2]).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    repo.cache.invalidate("user:2").await.unwrap();
    assert_eq!(
        batch.await.unwrap().unwrap().len(),
        2,
        "the caller gets its values"
    );
    assert_eq!(repo.cache.get::<User>("user:1").await, Some(user(1)));
    assert_eq!(
        repo.cache.get::<User>("user:2").await,
        None,
        "a value read before the invalidation was not stored over it"
    );
    assert_eq!(repo.cache.stats().stale_sets_refused, 1);
}

async fn an_element_being_computed_here_is_awaited_not_computed_again(env: &Env) {
    let repo = Repo::slow(env.cache(), Duration::from_millis(300));
    let single = tokio::spawn({
        let repo = Arc::clone(&repo);
        async move { repo.user(5).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let found = repo.users(vec![5, 6]).await.unwrap();
    assert_eq!(found.len(), 2);
    assert_eq!(found[&5], user(5));
    assert_eq!(single.await.unwrap().unwrap(), Some(user(5)));
    assert_eq!(repo.singles.load(Ordering::SeqCst), 1);
    assert_eq!(
        repo.batches(),
        [vec![6]],
        "5 was awaited, not computed again"
    );
    assert_eq!(repo.cache.stats().coalesced, 1);
}

async fn single_key_writes_reach_the_batch(env: &Env) {
    let repo = Repo::new(env.cache());
    repo.users(vec![1, 2]).await.unwrap();
    let renamed = User {
        id: 2,
        name: "renamed".into(),
    };
    repo.save(renamed.clone()).await.unwrap();
    let found = repo.users(vec![1, 2]).await.unwrap();
    assert_eq!(
        found[&2], renamed,
        "the write-through is what the batch reads"
    );
    repo.cache.invalidate("user:1").await.unwrap();
    repo.users(vec![1, 2]).await.unwrap();
    assert_eq!(repo.batches(), [vec![1, 2], vec![1]]);
}

async fn a_body_that_asks_for_its_own_elements_does_not_wait_for_itself(env: &Env) {
    let repo = Repo::new(env.cache());
    let found = tokio::time::timeout(
        Duration::from_secs(5),
        repo.users_via_singles(vec![1, 2, 3]),
    )
    .await
    .expect("no wait for itself")
    .unwrap();
    assert_eq!(found.len(), 3);
    assert_eq!(repo.singles.load(Ordering::SeqCst), 3);
}

/// A single-key call waiting for an element a batch computes: when the
/// batch's future is dropped mid-body, or its body panics, the waiter is
/// released at once and computes the element itself; nothing is left
/// marked as being computed.
async fn a_dropped_or_panicking_batch_lets_its_waiters_compute(env: &Env) {
    let repo = Repo::slow(env.cache(), Duration::from_millis(300));
    for (n, (id, panics)) in [(5u64, false), (6, true)].into_iter().enumerate() {
        let batch = {
            let repo = Arc::clone(&repo);
            tokio::spawn(async move {
                if panics {
                    repo.users_panicking(vec![id]).await
                } else {
                    repo.users(vec![id]).await
                }
            })
        };
        // The batch's body runs: its computation is registered.
        eventually(|| repo.batches().len() > n).await;
        let single = {
            let repo = Arc::clone(&repo);
            tokio::spawn(async move { repo.user(id).await })
        };
        // The single lookup waits for the batch's computation…
        eventually(|| repo.cache.stats().coalesced > n as u64).await;
        if !panics {
            // …which is then dropped midway.
            batch.abort();
        }
        let outcome = batch.await;
        assert!(outcome.is_err(), "the batch ended early");
        let found = tokio::time::timeout(Duration::from_secs(5), single)
            .await
            .expect("the waiter was released")
            .unwrap();
        assert_eq!(found, Ok(Some(user(id))));
    }
    assert_eq!(
        repo.singles.load(Ordering::SeqCst),
        2,
        "each waiter computed"
    );
    assert_eq!(
        repo.cache.stats().coalesced,
        2,
        "each waited for the batch first"
    );
}

/// Waits (up to 10 s) until `done` holds.
async fn eventually(done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn a_tagged_batch_is_reached_by_its_tags(env: &Env) {
    let repo = Repo::new(env.cache());
    assert_eq!(repo.tagged_users(vec![1, 2, 3]).await.unwrap().len(), 3);
    assert_eq!(repo.tagged_users(vec![1, 2, 3]).await.unwrap().len(), 3);
    assert_eq!(repo.batches(), [vec![1, 2, 3]], "stored");
    // A later batch adds its own elements to the tag.
    repo.tagged_users(vec![3, 4]).await.unwrap();
    assert_eq!(repo.batches(), [vec![1, 2, 3], vec![4]]);
    assert_eq!(repo.cache.invalidate_tag("members").await.unwrap(), 4);
    repo.tagged_users(vec![1, 2, 3, 4, 5]).await.unwrap();
    assert_eq!(
        repo.batches(),
        [vec![1, 2, 3], vec![4], vec![1, 2, 3, 4, 5]]
    );
}

async fn slices_sets_and_btree_maps_work_alike(env: &Env) {
    let repo = Repo::new(env.cache());
    let found = repo.users_in(&[4, 3, 4]).await;
    assert_eq!(found.keys().copied().collect::<Vec<_>>(), [3, 4]);
    let found = repo.users_of([3, 4, 9].into_iter().collect()).await;
    assert_eq!(found.len(), 3);
    assert_eq!(repo.batches(), [vec![3, 4], vec![9]], "3 and 4 were cached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_a_batch_is_one_read_one_body_call_and_one_store_pipeline() {
    let server = RedisServer::start();
    let repo = Repo::new(Cache::redis(&server.url()).unwrap());
    repo.cache.connect().await.unwrap();
    for id in (0..100).filter(|id| id % 10 < 3) {
        repo.user(id).await.unwrap();
    }
    server
        .cmd::<()>(::redis::cmd("CONFIG").arg("RESETSTAT"))
        .await;
    let monitor = server.monitor();
    monitor.take_client_commands().await;
    let found = repo.users((0..100).collect()).await.unwrap();
    assert_eq!(found.len(), 100);
    assert_eq!(repo.batches().len(), 1);
    // What the client sent (commands inside scripts left out): one MGET,
    // then the 70 compare-and-sets, written as one pipeline.
    let commands = monitor.take_client_commands().await;
    let count = |name: &str| {
        let quoted = format!("\"{name}\"");
        commands
            .iter()
            .filter(|c| c.to_ascii_uppercase().starts_with(&quoted))
            .count()
    };
    assert_eq!(count("MGET"), 1, "one lookup for 100 ids: {commands:?}");
    assert_eq!(count("GET"), 0);
    assert_eq!(count("EVALSHA"), 70, "70 compare-and-sets");
    assert_eq!(commands.len(), 71, "{commands:?}");
    assert_eq!(server.calls("mget").await, 1);

    // Tagged: the 70 keys' tag records are one more command.
    monitor.take_client_commands().await;
    let found = repo.tagged_users((0..70).collect()).await.unwrap();
    assert_eq!(found.len(), 70);
    let commands = monitor.take_client_commands().await;
    let scripts = commands
        .iter()
        .filter(|c| c.to_ascii_uppercase().starts_with("\"EVALSHA\""))
        .count();
    assert_eq!(
        scripts, 71,
        "70 compare-and-sets, one tag record: {commands:?}"
    );
    assert_eq!(commands.len(), 72, "{commands:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_down_a_batch_runs_the_body_once_for_every_element() {
    let mut server = RedisServer::start();
    let cache = Cache::builder(&server.url())
        .op_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let repo = Repo::new(cache);
    server.kill();
    let found = repo
        .users(vec![1, 2, 3])
        .await
        .expect("no Redis error reaches the caller");
    assert_eq!(found.len(), 3);
    assert_eq!(repo.batches(), [vec![1, 2, 3]]);
}

async fn get_many_answers_in_order(env: &Env) {
    let cache = env.cache();
    let (a, b) = (user(1), user(2));
    cache
        .set_many(&[("user:1", &a), ("user:2", &b)], TTL)
        .await
        .expect("stored");
    cache.set("user:garbage", &"not a user", TTL).await.unwrap();
    let keys = [
        "user:2",
        "user:3",
        "user:1",
        "user:2",
        "user:garbage",
        "~reserved",
    ];
    let found = cache.get_many::<User>(&keys).await;
    assert_eq!(
        found,
        [Some(b.clone()), None, Some(a), Some(b), None, None],
        "one answer per key, in order, duplicates included"
    );
    assert!(cache.get_many::<User>(&[] as &[&str]).await.is_empty());
}

async fn get_many_counts_hits_and_misses(env: &Env) {
    let cache = env.cache();
    let entries: Vec<(String, User)> = (0..10).map(|id| (format!("u:{id}"), user(id))).collect();
    let refs: Vec<(&str, &User)> = entries.iter().map(|(k, u)| (k.as_str(), u)).collect();
    cache.set_many(&refs, TTL).await.unwrap();
    let before = cache.stats();
    let keys: Vec<String> = (5..15).map(|id| format!("u:{id}")).collect();
    let found = cache.get_many::<User>(&keys).await;
    for (id, value) in (5..15).zip(&found) {
        assert_eq!(
            value.as_ref(),
            (id < 10).then(|| user(id)).as_ref(),
            "u:{id}"
        );
    }
    let after = cache.stats();
    assert_eq!(after.hits - before.hits, 5);
    assert_eq!(after.misses - before.misses, 5);
    assert_eq!(after.writes, 10, "set_many counts each write");
}

async fn set_many_refuses_a_reserved_key_and_stores_nothing(env: &Env) {
    let cache = env.cache();
    let (a, b) = (user(1), user(2));
    let refused = cache.set_many(&[("ok:1", &a), ("bad~key", &b)], TTL).await;
    assert!(
        matches!(refused, Err(redis_cached::Error::InvalidKey(_))),
        "{refused:?}"
    );
    assert_eq!(cache.get::<User>("ok:1").await, None, "nothing stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_a_hundred_keys_are_one_round_trip_each_way() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).unwrap();
    cache.connect().await.unwrap();
    let entries: Vec<(String, User)> = (0..100).map(|id| (format!("u:{id}"), user(id))).collect();
    let refs: Vec<(&str, &User)> = entries.iter().map(|(k, u)| (k.as_str(), u)).collect();
    server
        .cmd::<()>(::redis::cmd("CONFIG").arg("RESETSTAT"))
        .await;
    cache.set_many(&refs, TTL).await.unwrap();
    let keys: Vec<&str> = refs.iter().map(|(k, _)| *k).collect();
    let found = cache.get_many::<User>(&keys).await;
    assert!(found
        .iter()
        .zip(0..)
        .all(|(u, id)| u.as_ref() == Some(&user(id))));
    assert_eq!(server.calls("mget").await, 1, "one MGET for 100 keys");
    assert_eq!(server.calls("get").await, 0);
    // The SETs went out as one pipeline: 100 commands, one round trip
    // (what MONITOR cannot tell apart, the clock can: see the bench).
    assert_eq!(server.calls("set").await, 100);
    let ttl: i64 = server.cmd(::redis::cmd("PTTL").arg("u:7")).await;
    assert!(ttl > 50_000 && ttl <= 60_000, "{ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_down_get_many_misses_and_set_many_errs_without_waiting_long() {
    let mut server = RedisServer::start();
    let cache = Cache::builder(&server.url())
        .op_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    cache.set("k", &1u32, TTL).await.unwrap();
    server.kill();
    let started = Instant::now();
    assert_eq!(cache.get_many::<u32>(&["k", "j"]).await, [None, None]);
    assert!(cache.set_many(&[("k", &2u32)], TTL).await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(cache.stats().errors + cache.stats().timeouts >= 1);
}

/// Many tasks, each looking up its own keys at the same moment: every
/// caller gets its own value (never a neighbour's), and Redis runs fewer
/// commands than there were lookups, some of them `MGET`s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_lookups_give_each_caller_its_own_value() {
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).unwrap();
    let entries: Vec<(String, User)> = (0..500).map(|id| (format!("u:{id}"), user(id))).collect();
    let refs: Vec<(&str, &User)> = entries.iter().map(|(k, u)| (k.as_str(), u)).collect();
    cache.set_many(&refs, TTL).await.unwrap();
    server
        .cmd::<()>(::redis::cmd("CONFIG").arg("RESETSTAT"))
        .await;
    let tasks: Vec<_> = (0..64u64)
        .map(|task| {
            let cache = cache.clone();
            tokio::spawn(async move {
                for round in 0..50u64 {
                    let id = (task * 7 + round * 13) % 600;
                    let found = cache.get::<User>(&format!("u:{id}")).await;
                    assert_eq!(found, (id < 500).then(|| user(id)), "u:{id}");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("no caller got a wrong value");
    }
    let (gets, mgets) = (server.calls("get").await, server.calls("mget").await);
    assert!(mgets > 0, "concurrent lookups were merged");
    assert!(
        gets + mgets < 64 * 50,
        "{gets} GETs + {mgets} MGETs for 3200 lookups"
    );
    let stats = cache.stats();
    assert_eq!(stats.hits + stats.misses, 64 * 50);
    assert_eq!(stats.errors + stats.timeouts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_merging_off_each_lookup_is_a_get() {
    let server = RedisServer::start();
    let cache = Cache::builder(&server.url())
        .merge_lookups(false)
        .build()
        .unwrap();
    cache.set("k", &1u32, TTL).await.unwrap();
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    assert_eq!(cache.get::<u32>("k").await, Some(1));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(server.calls("mget").await, 0);
    assert_eq!(server.calls("get").await, 640);
}

/// Callers dropped while their merged read is on the wire, and a server
/// that stops answering for a while: the callers give up after
/// `op_timeout`, and once the server answers again lookups work (nothing
/// stays stuck behind a read that was abandoned).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_lookups_survive_dropped_callers_and_a_paused_server() {
    let server = RedisServer::start();
    let cache = patient_cache(&server, Duration::from_millis(300));
    cache.set("k", &7u32, TTL).await.unwrap();
    // Dropped callers: each lookup is cancelled after a few microseconds,
    // at whatever point it reached.
    let dropped: Vec<_> = (0..200u64)
        .map(|n| {
            let cache = cache.clone();
            tokio::spawn(async move {
                let wait = Duration::from_micros(n % 50);
                let _ = tokio::time::timeout(wait, cache.get::<u32>("k")).await;
            })
        })
        .collect();
    for task in dropped {
        task.await.unwrap();
    }
    assert_eq!(cache.get::<u32>("k").await, Some(7));
    server.pause();
    let stalled: Vec<_> = (0..32)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let found = cache.get::<u32>("k").await;
                (found, started.elapsed())
            })
        })
        .collect();
    for task in stalled {
        let (found, took) = task.await.unwrap();
        assert_eq!(found, None, "a paused server is a miss");
        assert!(
            took < Duration::from_secs(2),
            "bounded by op_timeout: {took:?}"
        );
    }
    server.resume();
    until_all_answer(&cache, "lookups did not recover").await;
}

/// A cache on `server` whose operations are bounded by `op_timeout` and
/// whose breaker does not open, so that every lookup goes to Redis.
fn patient_cache(server: &RedisServer, op_timeout: Duration) -> Cache {
    Cache::builder(&server.url())
        .op_timeout(op_timeout)
        .breaker(redis_cached::BreakerConfig {
            failure_threshold: 1_000_000,
            ..Default::default()
        })
        .build()
        .unwrap()
}

/// Waits until 16 concurrent lookups of `k` all find 7, for up to 5 s.
async fn until_all_answer(cache: &Cache, failure: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get::<u32>("k").await })
            })
            .collect();
        let mut all = true;
        for task in tasks {
            all &= task.await.unwrap() == Some(7);
        }
        if all {
            return;
        }
        assert!(Instant::now() < deadline, "{failure}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The runtime that ran the flusher ends while reads wait on it: a cache
/// used from the next runtime still merges and answers.
#[test]
fn merged_lookups_outlive_the_runtime_that_started_them() {
    let server = RedisServer::start();
    let cache = Cache::builder(&server.url())
        .op_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let first = tokio::runtime::Runtime::new().unwrap();
    first.block_on(async {
        cache.set("k", &7u32, TTL).await.unwrap();
        server.pause();
        for _ in 0..32 {
            let cache = cache.clone();
            tokio::spawn(async move { cache.get::<u32>("k").await });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    });
    drop(first);
    server.resume();
    let second = tokio::runtime::Runtime::new().unwrap();
    second.block_on(until_all_answer(
        &cache,
        "lookups stuck after the runtime ended",
    ));
}

/// A current-thread runtime runs its tasks only while someone waits in its
/// `block_on`: lookups made from one, then left there unfinished while the
/// runtime idles, hold up no lookup made elsewhere.
#[test]
fn a_current_thread_runtime_left_idle_holds_up_no_lookup() {
    let server = RedisServer::start();
    let cache = patient_cache(&server, Duration::from_millis(300));
    // The connection is made on a multi-thread runtime, so that its
    // driver runs all along.
    let other = tokio::runtime::Runtime::new().unwrap();
    other.block_on(cache.set("k", &7u32, TTL)).unwrap();
    let idle = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    idle.block_on(async {
        server.pause();
        // Concurrent lookups on this runtime, each polled once while the
        // server does not answer, then left to the runtime, which is kept
        // but no longer run.
        for _ in 0..8 {
            let mut lookup = Box::pin({
                let cache = cache.clone();
                async move { cache.get::<u32>("k").await }
            });
            assert!(poll_once(&mut lookup).await, "the server is paused");
            tokio::spawn(lookup);
        }
    });
    server.resume();
    other.block_on(until_all_answer(
        &cache,
        "lookups stuck behind a runtime left idle",
    ));
    drop(idle);
}

/// The connection was made from a current-thread runtime that is then kept
/// but no longer run, so the connection's task does not run: calls from
/// another runtime fail until the breaker opens, and a later call connects
/// again from its own runtime.
#[test]
fn a_connection_held_by_an_idle_runtime_is_replaced_once_the_breaker_opens() {
    let server = RedisServer::start();
    let cache = Cache::builder(&server.url())
        .op_timeout(Duration::from_millis(100))
        .breaker(redis_cached::BreakerConfig {
            failure_threshold: 3,
            cooldown: Duration::from_millis(200),
        })
        .build()
        .unwrap();
    let idle = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    idle.block_on(cache.set("k", &7u32, TTL)).unwrap();
    let other = tokio::runtime::Runtime::new().unwrap();
    other.block_on(until_all_answer(
        &cache,
        "no new connection after the breaker opened",
    ));
    assert!(cache.stats().breaker_opens > 0, "the old connection failed");
    drop(idle);
}

/// Another program's list at one element's key: that element is computed
/// every time, and the others are stored as usual; with bounded reads
/// (a pipeline of `GETRANGE`s) as with the default `MGET`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_a_wrong_type_at_one_key_spoils_only_that_element() {
    let server = RedisServer::start();
    for bounded in [false, true] {
        server.cmd::<()>(&::redis::cmd("FLUSHALL")).await;
        let cache = Cache::builder(&server.url())
            .bounded_reads(bounded)
            .build()
            .unwrap();
        let repo = Repo::new(cache);
        server
            .cmd::<()>(::redis::cmd("RPUSH").arg("user:5").arg("someone else's"))
            .await;
        for _ in 0..2 {
            let found = repo.users(vec![4, 5, 6]).await.unwrap();
            assert_eq!(found.len(), 3, "the caller gets every value");
        }
        assert_eq!(
            repo.batches(),
            [vec![4, 5, 6], vec![5]],
            "bounded reads: {bounded}"
        );
        assert_eq!(repo.cache.stats().errors, 0, "a rejected key is no failure");
        let kind: String = server.cmd(::redis::cmd("TYPE").arg("user:5")).await;
        assert_eq!(kind, "list", "the other program's data is left alone");
    }
}

/// A server that stalls for longer than `op_timeout` while many tasks look
/// up, each call its own key: every key reaches Redis at most once (as
/// MONITOR shows), so that callers giving up do not make the merged reads
/// of others go out again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_a_stall_each_merged_read_reaches_redis_at_most_once() {
    let server = RedisServer::start();
    let cache = patient_cache(&server, Duration::from_millis(100));
    cache.set("connected", &1u32, TTL).await.unwrap();
    let monitor = server.monitor();
    server.pause();
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let until = Instant::now() + Duration::from_millis(600);
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (cache, calls) = (cache.clone(), calls.clone());
            tokio::spawn(async move {
                while Instant::now() < until {
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    let _ = cache.get::<u32>(&format!("k{n}")).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(350)).await;
    server.resume();
    for task in tasks {
        task.await.unwrap();
    }
    // Reads abandoned by their callers still run once the server is back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut reads: HashMap<String, u32> = HashMap::new();
    let mut mgets = 0;
    for command in monitor.take_client_commands().await {
        let mut words = command.split(' ').map(|word| word.trim_matches('"'));
        match words.next() {
            Some("MGET") => mgets += 1,
            Some("GET") => {}
            _ => continue,
        }
        for key in words {
            *reads.entry(key.to_owned()).or_default() += 1;
        }
    }
    let twice: Vec<_> = reads.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(twice.is_empty(), "keys read more than once: {twice:?}");
    assert!(mgets > 0, "lookups were merged");
    assert!(reads.len() as u64 <= calls.load(Ordering::SeqCst));
}

/// A lookup polled once and then kept without being polled again (as a
/// future left in a `select!` loop is): the lookups of others go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_kept_unpolled_holds_up_no_other() {
    let server = RedisServer::start();
    let cache = patient_cache(&server, Duration::from_millis(300));
    cache.set("k", &7u32, TTL).await.unwrap();
    server
        .cmd::<()>(::redis::cmd("CONFIG").arg("RESETSTAT"))
        .await;
    server.pause();
    // One read on the wire, so that the next one is merged.
    let mut alone = Box::pin({
        let cache = cache.clone();
        async move { cache.get::<u32>("k").await }
    });
    let mut kept = Box::pin(cache.get::<u32>("k"));
    assert!(poll_once(&mut alone).await, "the server is paused");
    assert!(poll_once(&mut kept).await, "the server is paused");
    let alone = tokio::spawn(alone);
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.resume();
    alone.await.unwrap();
    until_all_answer(&cache, "a lookup kept unpolled held the others up").await;
    assert!(server.calls("mget").await > 0, "the kept lookup was merged");
    drop(kept);
}

/// Polls `future` once; whether it is still pending.
async fn poll_once<F: std::future::Future + Unpin>(future: &mut F) -> bool {
    std::future::poll_fn(|cx| {
        let polled = std::pin::Pin::new(&mut *future).poll(cx);
        std::task::Poll::Ready(polled.is_pending())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_a_huge_batch_is_read_and_stored_in_bounded_chunks() {
    let server = RedisServer::start();
    let repo = Repo::new(Cache::redis(&server.url()).unwrap());
    repo.cache.connect().await.unwrap();
    let monitor = server.monitor();
    monitor.take_client_commands().await;
    // 2,000 ids from one request: no single command of 2,000 keys.
    let found = repo.users_or_none((0..2000).collect()).await.unwrap();
    assert_eq!(found.len(), 1000);
    assert_eq!(repo.batches().len(), 1, "one body call all the same");
    let commands = monitor.take_client_commands().await;
    let mgets: Vec<usize> = commands
        .iter()
        .filter(|c| c.to_ascii_uppercase().starts_with("\"MGET\""))
        .map(|c| c.matches("\" \"").count())
        .collect();
    assert_eq!(mgets.len(), 4, "2,000 keys in chunks of at most 512");
    assert!(mgets.iter().all(|keys| *keys <= 512), "{mgets:?}");
    assert_eq!(mgets.iter().sum::<usize>(), 2000);
    let stores = commands
        .iter()
        .filter(|c| c.to_ascii_uppercase().starts_with("\"EVALSHA\""))
        .count();
    assert_eq!(stores, 2000, "every element stored");
    // Read back whole, in chunks too.
    let again = repo.users_or_none((0..2000).collect()).await.unwrap();
    assert_eq!(again.len(), 1000);
    assert_eq!(repo.batches().len(), 1, "all from the cache");
}

/// Bursts far larger than one `MGET` on a long link (replies delayed by
/// 200 ms, not throttled): with merging on, lookups keep up with merging
/// off (pipelined `GET`s, one round trip each): no breaker opens, no more
/// timeouts, at least as many hits. Several `MGET`s go out at once; one
/// after the other, 2,500 reads would take 5 round trips, past the 800 ms
/// `op_timeout`. (Scaled from 6,000 tasks looping on a 20 ms link: the
/// same queue of round trips, with each task reading once per round trip,
/// so that both settings make the same reads and the test's CPU time, in a
/// debug build on 2 cores shared with other tests, stays small beside the
/// bound.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_lookups_keep_up_with_bursts_on_a_long_link() {
    const TASKS: u64 = 2_500;
    const KEYS: u64 = 1_000;
    const ROUNDS: u32 = 15;
    let round_trip = Duration::from_millis(200);
    let server = RedisServer::start();
    let proxy = support::proxy::Proxy::start(server.port());
    proxy.set_delay_line(round_trip);
    let seeding = Cache::redis(&server.url()).unwrap();
    let entries: Vec<(String, u64)> = (0..KEYS).map(|id| (format!("b:{id}"), id)).collect();
    let refs: Vec<(&str, &u64)> = entries.iter().map(|(k, v)| (k.as_str(), v)).collect();
    seeding.set_many(&refs, TTL).await.unwrap();

    let mut runs = Vec::new();
    for merge in [false, true] {
        let cache = Cache::builder(&proxy.url())
            .op_timeout(round_trip * 4)
            .merge_lookups(merge)
            .build()
            .unwrap();
        // Connected before the bursts, as a running service is.
        assert_eq!(cache.get::<u64>("b:0").await, Some(0));
        let start = tokio::time::Instant::now();
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| {
                let cache = cache.clone();
                tokio::spawn(async move {
                    for round in 0..ROUNDS {
                        tokio::time::sleep_until(start + round_trip * round).await;
                        let id = (task + u64::from(round) * 7) % KEYS;
                        if let Some(found) = cache.get::<u64>(&format!("b:{id}")).await {
                            assert_eq!(found, id, "b:{id}");
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("no caller got a wrong value");
        }
        let stats = cache.stats();
        eprintln!(
            "merging {}: {} hits, {} timeouts, {} breaker opens, {} errors",
            if merge { "on" } else { "off" },
            stats.hits,
            stats.timeouts,
            stats.breaker_opens,
            stats.errors
        );
        runs.push(stats);
    }
    let (off, on) = (&runs[0], &runs[1]);
    assert_eq!(on.breaker_opens, 0, "{on:?}");
    assert!(on.timeouts <= off.timeouts, "on {on:?}, off {off:?}");
    assert!(on.hits >= off.hits, "on {on:?}, off {off:?}");
}
