//! `tags = [...]` and `Cache::invalidate_tag`: invalidating a tag reaches
//! every key cached under it and no other, on both backends, including a
//! computation still in flight when the tag is invalidated, a key kept
//! alive by refreshes or written by `#[cache_put]`; tag bookkeeping stays
//! proportional to the live keys, and a large tag never blocks Redis.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis_cached::{cache_put, redis_cached, Cache};
use support::backends::Env;
use support::RedisServer;
use tokio::sync::{oneshot, Notify};

per_backend!(
    tags_invalidate_their_keys_only,
    a_tag_invalidated_mid_fill_refuses_the_old_value,
    a_key_kept_alive_by_refreshes_stays_tagged,
    a_key_written_through_stays_tagged,
    a_tag_is_named_as_the_attribute_rendered_it,
    an_invalidation_dropped_part_way_is_finished_by_the_next,
);

struct Repo {
    cache: Cache,
    computes: AtomicU32,
    gate: Notify,
}

impl Repo {
    fn new(cache: Cache) -> Arc<Repo> {
        Arc::new(Repo {
            cache,
            computes: AtomicU32::new(0),
            gate: Notify::new(),
        })
    }

    fn computes(&self) -> u32 {
        self.computes.load(Ordering::SeqCst)
    }

    #[redis_cached(key = "user:<tenant>:<id>", tags = ["tenant:<tenant>", "all-users"], cache = self.cache)]
    async fn user(&self, tenant: u32, id: u32, hold: Option<oneshot::Sender<()>>) -> String {
        self.computes.fetch_add(1, Ordering::SeqCst);
        if let Some(started) = hold {
            let _ = started.send(());
            self.gate.notified().await;
        }
        format!("{tenant}/{id}")
    }

    #[redis_cached(key = "fresh:<id>", ttl = "100ms", stale = "300ms", tags = ["fresh"], cache = self.cache)]
    async fn fresh(self: Arc<Self>, id: u32) -> u32 {
        self.computes.fetch_add(1, Ordering::SeqCst) + id
    }

    #[redis_cached(key = "item:<id>", ttl = "200ms", tags = ["items"], cache = self.cache)]
    async fn item(&self, id: u32) -> u32 {
        self.computes.fetch_add(1, Ordering::SeqCst) + id
    }

    #[cache_put(key = "item:<id>", ttl = "1h", tags = ["items"], cache = self.cache)]
    async fn save_item(&self, id: u32, value: u32) -> u32 {
        let _ = id;
        value
    }

    #[redis_cached(key = "cold", ttl = 86400, tags = ["hot"], cache = self.cache)]
    async fn cold(&self) -> u32 {
        self.computes.fetch_add(1, Ordering::SeqCst)
    }

    #[redis_cached(key = "tenant:<tenant>", tags = ["tenant:<tenant>"], cache = self.cache)]
    async fn by_name(&self, tenant: &str) -> String {
        self.computes.fetch_add(1, Ordering::SeqCst);
        tenant.to_uppercase()
    }
}

async fn tags_invalidate_their_keys_only(env: &Env) {
    let repo = Repo::new(env.cache());
    for (tenant, id) in [(1, 1), (1, 2), (2, 1)] {
        repo.user(tenant, id, None).await;
    }
    assert_eq!(repo.computes(), 3);
    repo.cache
        .invalidate_tag("tenant:1")
        .await
        .expect("invalidate_tag");
    assert_eq!(repo.cache.stats().invalidations, 2);
    for (tenant, id) in [(1, 1), (1, 2), (2, 1)] {
        assert_eq!(repo.user(tenant, id, None).await, format!("{tenant}/{id}"));
    }
    assert_eq!(
        repo.computes(),
        5,
        "tenant 1's two users recomputed, tenant 2's hit"
    );
    repo.cache
        .invalidate_tag("all-users")
        .await
        .expect("invalidate_tag");
    repo.user(2, 1, None).await;
    assert_eq!(repo.computes(), 6, "a second tag reaches the same keys");
    repo.cache
        .invalidate_tag("no-such-tag")
        .await
        .expect("an unknown tag is a no-op");
}

async fn a_tag_invalidated_mid_fill_refuses_the_old_value(env: &Env) {
    let repo = Repo::new(env.cache());
    let (started, is_started) = oneshot::channel();
    let slow = {
        let repo = repo.clone();
        tokio::spawn(async move { repo.user(7, 1, Some(started)).await })
    };
    is_started.await.expect("the fill started");
    repo.cache
        .invalidate_tag("tenant:7")
        .await
        .expect("invalidate_tag");
    repo.gate.notify_one();
    assert_eq!(slow.await.unwrap(), "7/1");
    assert_eq!(
        repo.cache.get::<String>("user:7:1").await,
        None,
        "the in-flight result was not stored"
    );
    assert_eq!(repo.cache.stats().stale_sets_refused, 1);
}

/// A `stale` key refreshed in the background outlives the TTL its tag set
/// was first given: each refresh records it again.
async fn a_key_kept_alive_by_refreshes_stays_tagged(env: &Env) {
    let repo = Repo::new(env.cache());
    let first = repo.clone().fresh(1).await;
    // Past the first tag set's life (ttl + stale = 400 ms), kept alive by refreshes.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(80)).await;
        repo.clone().fresh(1).await;
    }
    assert!(
        repo.cache.stats().refreshes >= 2,
        "{:?}",
        repo.cache.stats()
    );
    // A refresh the last call started may still be running; counting from
    // here must not include it.
    settle_refreshes(&repo).await;
    let invalidated = repo
        .cache
        .invalidate_tag("fresh")
        .await
        .expect("invalidated");
    assert_eq!(invalidated, 1, "the refreshed key fell out of its tag");
    let before = repo.computes();
    let after = repo.clone().fresh(1).await;
    assert_eq!(
        repo.computes(),
        before + 1,
        "served {after} (first {first}) after the tag was invalidated"
    );
}

/// Waits until every background refresh of `fresh` that started has
/// computed: the first call plus one compute per refresh, seen unchanged
/// over several polls (a refresh counts itself just before its body runs).
async fn settle_refreshes(repo: &Repo) {
    let mut steady = 0;
    for _ in 0..500 {
        let settled = repo.computes() as u64 == 1 + repo.cache.stats().refreshes;
        steady = if settled { steady + 1 } else { 0 };
        if steady == 5 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "background refreshes never settled: {:?}",
        repo.cache.stats()
    );
}

/// A write-through records its key under its tags for its own TTL.
async fn a_key_written_through_stays_tagged(env: &Env) {
    let repo = Repo::new(env.cache());
    repo.item(1).await;
    assert_eq!(repo.save_item(1, 500).await, 500);
    // The fill's tag record (200 ms) is gone; the written value (1 h) is not.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(repo.cache.get::<u32>("item:1").await, Some(500));
    let invalidated = repo
        .cache
        .invalidate_tag("items")
        .await
        .expect("invalidated");
    assert_eq!(invalidated, 1, "the written key fell out of its tag");
    assert_eq!(repo.cache.get::<u32>("item:1").await, None);
}

/// `tenant:<tenant>` with `"acme corp"` is stored as `tenant:acme%20corp`;
/// `redis_cached::tag` renders it the same way.
async fn a_tag_is_named_as_the_attribute_rendered_it(env: &Env) {
    let repo = Repo::new(env.cache());
    assert_eq!(repo.by_name("acme corp").await, "ACME CORP");
    let as_written = repo
        .cache
        .invalidate_tag("tenant:acme corp")
        .await
        .expect("no error");
    assert_eq!(
        as_written, 0,
        "the raw text is not the rendered tag, and says so"
    );
    let tag = redis_cached::tag("tenant:<tenant>", &[&"acme corp"]).expect("valid");
    assert_eq!(
        repo.cache.invalidate_tag(&tag).await.expect("invalidated"),
        1
    );
    repo.by_name("acme corp").await;
    assert_eq!(repo.computes(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_a_sweep_during_a_fill_keeps_the_key_tagged() {
    let repo = Repo::new(Cache::in_memory());
    let (started, is_started) = oneshot::channel();
    let slow = {
        let repo = repo.clone();
        tokio::spawn(async move { repo.user(7, 1, Some(started)).await })
    };
    is_started.await.expect("the fill started");
    // Sweeps expired entries and tag members; the in-flight key has no
    // entry yet but must stay tagged.
    repo.cache.memory_entry_count();
    repo.gate.notify_one();
    slow.await.expect("no panic");
    assert_eq!(
        repo.cache.get::<String>("user:7:1").await.as_deref(),
        Some("7/1")
    );
    let invalidated = repo
        .cache
        .invalidate_tag("tenant:7")
        .await
        .expect("invalidated");
    assert_eq!(
        invalidated, 1,
        "the sweep dropped the in-flight key from its tag"
    );
    assert_eq!(repo.cache.get::<String>("user:7:1").await, None);
}

/// Sum of `MEMORY USAGE` of the keys matching `pattern`.
async fn memory_of(server: &RedisServer, pattern: &str) -> i64 {
    let keys: Vec<String> = server.cmd(::redis::cmd("KEYS").arg(pattern)).await;
    let mut total = 0;
    for key in keys {
        let bytes: Option<i64> = server
            .cmd(::redis::cmd("MEMORY").arg("USAGE").arg(&key))
            .await;
        total += bytes.unwrap_or(0);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_tag_bookkeeping_follows_the_live_keys() {
    let server = RedisServer::start();
    // Tag records outlive their values by the invalidation window.
    let repo = Repo::new(
        Cache::builder(&server.url())
            .namespace("shop")
            .invalidation_window(Duration::from_millis(100))
            .build()
            .unwrap(),
    );
    for id in 0..2_000 {
        repo.item(id).await;
    }
    let full = memory_of(&server, "shop:*tag*").await;
    // Every value (200 ms) and record (+100 ms) expired; the keys alive
    // now are a few.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in 10_000..10_020 {
        repo.item(id).await;
    }
    let after = memory_of(&server, "shop:*tag*").await;
    assert!(
        after * 10 < full,
        "tag bookkeeping of 2 000 expired keys left: {after} bytes (was {full})"
    );
    let ttl: i64 = server
        .cmd(::redis::cmd("PTTL").arg("shop:~tag:items"))
        .await;
    assert!(ttl > 0, "a tag set expires with its keys: {ttl}");
}

/// A large tag is invalidated in batches of bounded size, so no single
/// Redis command (a script included) works through the whole tag: Redis
/// keeps serving everyone else meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_a_large_tag_is_invalidated_in_bounded_batches() {
    let server = RedisServer::start();
    let repo = Repo::new(Cache::redis(&server.url()).unwrap());
    let fills: Vec<_> = (0..8)
        .map(|part| {
            let repo = repo.clone();
            tokio::spawn(async move {
                for id in (part..20_000).step_by(8) {
                    repo.user(1, id, None).await;
                }
            })
        })
        .collect();
    for fill in fills {
        fill.await.expect("no panic");
    }
    let _: () = server.cmd(::redis::cmd("CONFIG").arg("RESETSTAT")).await;
    let invalidated = repo
        .cache
        .invalidate_tag("tenant:1")
        .await
        .expect("invalidated");
    assert_eq!(invalidated, 20_000);
    // 20 000 keys in batches of at most 500: at least 40 reads of the tag,
    // and each tombstone its own command, none inside a script.
    assert!(server.calls("zrange").await >= 40);
    assert_eq!(server.calls("set").await, 20_000);
    // 40 removals from the drained set, one move of the set; the first
    // call of each script is refused (`NOSCRIPT`: this cache never ran
    // `connect`, which loads them) and sent again.
    let scripts = server.calls("evalsha").await;
    assert!(scripts <= 43, "{scripts}");
    assert_eq!(repo.cache.get::<String>("user:1:19999").await, None);
    let left: u64 = server
        .cmd(::redis::cmd("EXISTS").arg("~tag:tenant:1"))
        .await;
    assert_eq!(left, 0, "the emptied tag set is gone");
    let drain: u64 = server
        .cmd(::redis::cmd("EXISTS").arg("~drain{~tag:tenant:1}"))
        .await;
    assert_eq!(drain, 0, "the drained set is gone");
}

/// An invalidation dropped at some `.await` (a client gone, a `timeout`)
/// leaves part of its tag's keys untouched, set aside; the next
/// invalidation of the tag reaches them all, wherever the first one was
/// cut.
async fn an_invalidation_dropped_part_way_is_finished_by_the_next(env: &Env) {
    let repo = Repo::new(env.cache());
    const USERS: u32 = 1_200;
    for cut_us in [0u64, 300, 1_000, 3_000, 10_000] {
        for id in 0..USERS {
            repo.user(7, id, None).await;
        }
        let cut = tokio::time::timeout(
            Duration::from_micros(cut_us),
            repo.cache.invalidate_tag("tenant:7"),
        )
        .await;
        if let Ok(done) = cut {
            done.expect("invalidated");
        }
        repo.cache
            .invalidate_tag("tenant:7")
            .await
            .expect("invalidated");
        let before = repo.computes();
        for id in 0..USERS {
            repo.user(7, id, None).await;
        }
        assert_eq!(
            repo.computes() - before,
            USERS,
            "every key recomputed after a first invalidation cut after {cut_us} µs"
        );
    }
}

/// What a failed invalidation leaves on Redis (the tag's set moved aside,
/// partly drained) is drained by the next invalidation of the tag before
/// it moves the set recorded since, so both are reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_a_set_left_aside_is_drained_by_the_next_invalidation() {
    let server = RedisServer::start();
    let repo = Repo::new(Cache::redis(&server.url()).unwrap());
    for id in 0..3 {
        repo.user(5, id, None).await;
    }
    let _: () = server
        .cmd(
            ::redis::cmd("RENAME")
                .arg("~tag:tenant:5")
                .arg("~drain{~tag:tenant:5}"),
        )
        .await;
    for id in 3..5 {
        repo.user(5, id, None).await;
    }
    let invalidated = repo.cache.invalidate_tag("tenant:5").await.unwrap();
    assert_eq!(invalidated, 5, "the set left aside and the one since");
    for key in ["~tag:tenant:5", "~drain{~tag:tenant:5}"] {
        let left: u64 = server.cmd(::redis::cmd("EXISTS").arg(key)).await;
        assert_eq!(left, 0, "{key} is gone");
    }
    let before = repo.computes();
    for id in 0..5 {
        repo.user(5, id, None).await;
    }
    assert_eq!(repo.computes() - before, 5);
}

/// A hot tag: its keys are recorded again, with short TTLs, all the time
/// an invalidation runs (here by a raw client, standing for many callers).
/// The invalidation ends after the keys recorded before it began, and
/// reaches the key of a long TTL that sorts after all the hot ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_a_hot_tag_is_invalidated_whole_and_in_bounded_work() {
    let server = RedisServer::start();
    let repo = Repo::new(Cache::redis(&server.url()).unwrap());
    assert_eq!(repo.cold().await, 0);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let recorder = {
        let stop = stop.clone();
        let client = server.client();
        tokio::spawn(async move {
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            while !stop.load(Ordering::SeqCst) {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as u64;
                let mut zadd = ::redis::cmd("ZADD");
                zadd.arg("~tag:hot");
                for n in 0..600 {
                    zadd.arg(now + 120_000).arg(format!("hot:{n}"));
                }
                let _: () = zadd.query_async(&mut conn).await.unwrap();
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let invalidated =
        tokio::time::timeout(Duration::from_secs(60), repo.cache.invalidate_tag("hot"))
            .await
            .expect("the invalidation ends although its tag is re-recorded all along")
            .expect("invalidated");
    stop.store(true, Ordering::SeqCst);
    recorder.await.unwrap();
    assert!(invalidated > 1, "{invalidated}");
    assert_eq!(repo.cold().await, 1, "the long-lived key was invalidated");
}

mod evict_tags {
    use redis_cached::{cache_evict, redis_cached, Cache};

    use super::per_backend;
    use crate::support::backends::Env;

    per_backend!(an_eviction_invalidates_whole_tags_after_success);

    struct Teams {
        cache: Cache,
    }

    impl Teams {
        #[redis_cached(key = "member:<id>", tags = ["team:<team>"], cache = self.cache)]
        async fn member(&self, team: &str, id: u64) -> String {
            format!("{team}/{id}")
        }

        /// Renames a team: every member entry of the team goes.
        #[cache_evict(tags = ["team:<team>"], cache = self.cache)]
        async fn rename(&self, team: &str, fail: bool) -> Result<(), String> {
            let _ = team;
            if fail {
                Err("database down".into())
            } else {
                Ok(())
            }
        }
    }

    async fn an_eviction_invalidates_whole_tags_after_success(env: &Env) {
        let teams = Teams { cache: env.cache() };
        for id in 0..3 {
            teams.member("red team", id).await;
        }
        teams.member("blue", 9).await;
        let writes = teams.cache.stats().writes;
        assert!(teams.rename("red team", true).await.is_err());
        assert_eq!(
            teams.cache.stats().invalidations,
            0,
            "an Err evicts nothing"
        );
        teams.rename("red team", false).await.unwrap();
        assert_eq!(
            teams.cache.stats().invalidations,
            3,
            "the team's three entries"
        );
        for id in 0..3 {
            assert_eq!(
                teams.cache.get::<String>(&format!("member:{id}")).await,
                None
            );
        }
        assert_eq!(
            teams.cache.get::<String>("member:9").await.as_deref(),
            Some("blue/9")
        );
        assert_eq!(teams.cache.stats().writes, writes);
    }
}

#[redis_cached(key = "search:<query>", tags = ["q:<query>"], cache = cache)]
async fn search(cache: &Cache, query: String) -> usize {
    query.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_a_huge_tag_is_a_short_key_inside_the_namespace() {
    let server = RedisServer::start();
    let namespace = "n".repeat(64);
    let cache = Cache::builder(&server.url())
        .namespace(&namespace)
        .build()
        .expect("valid");
    let query = "q".repeat(1 << 20);
    assert_eq!(search(&cache, query.clone()).await, 1 << 20);
    let keys: Vec<String> = server.cmd(::redis::cmd("KEYS").arg("*")).await;
    assert!(!keys.is_empty());
    for key in &keys {
        assert!(key.len() <= 300, "a key of {} bytes", key.len());
        assert!(
            key.starts_with(&format!("{namespace}:")),
            "outside the namespace: {key:.80}"
        );
    }
    // The tag still reaches its key, by the text the template renders.
    let tag = redis_cached::tag("q:<query>", &[&query]).expect("valid");
    assert_eq!(cache.invalidate_tag(&tag).await, Ok(1));
    // A namespace longer than 64 bytes is refused.
    let long = Cache::builder(&server.url())
        .namespace(&"n".repeat(65))
        .build();
    assert!(matches!(long, Err(redis_cached::Error::Config(_))));
    assert!(matches!(
        cache.invalidate_tag("a~b").await,
        Err(redis_cached::Error::InvalidKey(_))
    ));
}
