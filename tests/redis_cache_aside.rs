//! Cache-aside on every backend, and on every Redis deployment what lands
//! in Redis, under which key, for how long; on one server, how many
//! commands each operation costs.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use redis_cached::{redis_cached, Cache};
use serde::{Deserialize, Serialize};
use support::backends::Env;
use support::RedisServer;

per_backend!(
    entries_expire_after_their_ttl,
    concurrent_calls_for_one_key_run_the_body_once,
    hits_misses_and_what_is_not_cached,
);

per_shared_backend!(
    hit_miss_and_the_stored_entry,
    err_is_never_cached_and_none_only_with_cache_none,
    garbage_at_a_key_is_recomputed_and_overwritten,
    runtime_api_set_get_invalidate_and_namespace,
);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
}

struct Repo {
    cache: Cache,
    calls: AtomicU32,
}

impl Repo {
    fn new(cache: Cache) -> Self {
        Repo {
            cache,
            calls: AtomicU32::new(0),
        }
    }

    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }

    #[redis_cached(key = "user:<id>", ttl = 60, cache = self.cache)]
    async fn get_user(&self, id: u64) -> Result<Option<User>, String> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match id {
            0 => Err("database down".to_owned()),
            1..=1000 => Ok(Some(User {
                id,
                name: format!("u{id}"),
            })),
            _ => Ok(None),
        }
    }

    #[redis_cached(key = "opt:<id>", ttl = 60, cache_none = "2s", cache = self.cache)]
    async fn find(&self, id: u64) -> Option<u64> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        (id < 10).then_some(id)
    }

    #[redis_cached(key = "short:<id>", ttl = "300ms", cache = self.cache)]
    async fn short(&self, id: u64) -> u64 {
        self.calls.fetch_add(1, Ordering::SeqCst);
        id
    }

    #[redis_cached(key = "slow:<id>", cache = self.cache)]
    async fn slow(&self, id: u64) -> u64 {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(150)).await;
        id
    }
}

async fn hit_miss_and_the_stored_entry(env: &Env) {
    let repo = Repo::new(env.cache());
    let expected = Some(User {
        id: 42,
        name: "u42".into(),
    });
    assert_eq!(repo.get_user(42).await, Ok(expected.clone()));
    assert_eq!(repo.get_user(42).await, Ok(expected.clone()));
    assert_eq!(repo.calls(), 1);

    // The key is the template, exactly; the entry is a 4-byte header then JSON.
    let raw: Vec<u8> = env.raw(::redis::cmd("GET").arg(env.key("user:42"))).await;
    assert_eq!(&raw[..4], &[0xCA, 1, 1, 0]);
    assert_eq!(&raw[4..], br#"{"id":42,"name":"u42"}"#);
    let ttl_ms: i64 = env.raw(::redis::cmd("PTTL").arg(env.key("user:42"))).await;
    assert!((59_000..=60_000).contains(&ttl_ms), "ttl {ttl_ms}");

    let stats = repo.cache.stats();
    assert_eq!(
        (stats.hits, stats.misses, stats.writes, stats.errors),
        (1, 1, 1, 0)
    );
}

/// What is cached and what is not, seen through the cache alone.
async fn hits_misses_and_what_is_not_cached(env: &Env) {
    let repo = Repo::new(env.cache());
    assert_eq!(repo.get_user(42).await.unwrap().unwrap().id, 42);
    assert_eq!(repo.get_user(42).await.unwrap().unwrap().id, 42);
    assert_eq!(repo.calls(), 1, "the second call hit");
    assert!(repo.get_user(0).await.is_err());
    assert!(repo.get_user(0).await.is_err());
    assert_eq!(repo.calls(), 3, "an Err is never cached");
    assert_eq!(repo.get_user(5000).await, Ok(None));
    assert_eq!(repo.get_user(5000).await, Ok(None));
    assert_eq!(repo.calls(), 5, "None is not cached without cache_none");
    assert_eq!(repo.find(50).await, None);
    assert_eq!(repo.find(50).await, None);
    assert_eq!(repo.calls(), 6, "None is cached with cache_none");
    let stats = repo.cache.stats();
    assert_eq!((stats.hits, stats.errors), (2, 0), "{stats:?}");
}

async fn err_is_never_cached_and_none_only_with_cache_none(env: &Env) {
    let repo = Repo::new(env.cache());
    assert!(repo.get_user(0).await.is_err());
    assert!(repo.get_user(0).await.is_err());
    assert_eq!(repo.calls(), 2);
    let exists: u32 = env.raw(::redis::cmd("EXISTS").arg(env.key("user:0"))).await;
    assert_eq!(exists, 0, "an Err leaves nothing in Redis");

    assert_eq!(repo.get_user(5000).await, Ok(None));
    assert_eq!(repo.get_user(5000).await, Ok(None));
    assert_eq!(repo.calls(), 4, "None is not cached without cache_none");

    assert_eq!(repo.find(50).await, None);
    assert_eq!(repo.find(50).await, None);
    assert_eq!(repo.calls(), 5, "None is cached with cache_none");
    let ttl_ms: i64 = env.raw(::redis::cmd("PTTL").arg(env.key("opt:50"))).await;
    assert!(
        (1..=2000).contains(&ttl_ms),
        "absence lives cache_none = 2s, got {ttl_ms}"
    );
}

async fn entries_expire_after_their_ttl(env: &Env) {
    let repo = Repo::new(env.cache());
    assert_eq!(repo.short(3).await, 3);
    assert_eq!(repo.short(3).await, 3);
    assert_eq!(repo.calls(), 1);
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(repo.short(3).await, 3);
    assert_eq!(repo.calls(), 2);
}

async fn garbage_at_a_key_is_recomputed_and_overwritten(env: &Env) {
    let repo = Repo::new(env.cache());
    let key = env.key("user:7");
    for garbage in [
        &b"garbage"[..],
        b"",
        b"\xCA\x01\x01\x00{\"id\":",
        b"\xCA\x01\x01\x00\"a string\"",
    ] {
        let _: () = env.raw(::redis::cmd("SET").arg(&key).arg(garbage)).await;
        assert_eq!(
            repo.get_user(7).await,
            Ok(Some(User {
                id: 7,
                name: "u7".into()
            }))
        );
        let raw: Vec<u8> = env.raw(::redis::cmd("GET").arg(&key)).await;
        assert_eq!(&raw[4..], br#"{"id":7,"name":"u7"}"#, "overwritten");
    }
    assert_eq!(repo.calls(), 4);
    // The empty string reads as no entry at all (no entry is ever empty);
    // the other three are undecodable.
    assert_eq!(repo.cache.stats().decode_errors, 3);
    assert_eq!(repo.get_user(7).await.unwrap().unwrap().id, 7);
    assert_eq!(repo.calls(), 4, "hit once repaired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_is_one_command_and_a_miss_two() {
    let server = RedisServer::start();
    let repo = Repo::new(Cache::redis(&server.url()).expect("valid URL"));
    // Connect and load the store script first, so set-up does not count.
    repo.get_user(10).await.unwrap();
    let monitor = server.monitor();
    monitor.take_client_commands().await;

    repo.get_user(11).await.unwrap();
    let miss = monitor.take_client_commands().await;
    assert_eq!(
        miss.len(),
        2,
        "miss: GET, then the compare-and-set script: {miss:?}"
    );
    assert_eq!(miss[0], "\"GET\" \"user:11\"", "{miss:?}");
    assert!(miss[1].starts_with("\"EVALSHA\""), "{miss:?}");

    repo.get_user(11).await.unwrap();
    let hit = monitor.take_client_commands().await;
    assert_eq!(hit, vec!["\"GET\" \"user:11\"".to_owned()], "hit: one GET");
}

async fn concurrent_calls_for_one_key_run_the_body_once(env: &Env) {
    let repo = std::sync::Arc::new(Repo::new(env.cache()));
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let repo = repo.clone();
            tokio::spawn(async move { repo.slow(9).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), 9);
    }
    assert_eq!(repo.calls(), 1);
    assert_eq!(repo.slow(9).await, 9);
    assert_eq!(repo.calls(), 1);
}

async fn runtime_api_set_get_invalidate_and_namespace(env: &Env) {
    let cache = env.builder().namespace("app").build().unwrap();
    cache
        .set("k", &vec![1, 2, 3], Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(cache.get::<Vec<u8>>("k").await, Some(vec![1, 2, 3]));
    let exists: u32 = env.raw(::redis::cmd("EXISTS").arg("app:k")).await;
    assert_eq!(exists, 1, "namespace is a `<ns>:` prefix");
    assert_eq!(cache.get::<String>("k").await, None, "wrong type is a miss");
    cache.invalidate("k").await.unwrap();
    assert_eq!(cache.get::<Vec<u8>>("k").await, None);

    let computed = cache
        .get_or_compute("gc", Duration::from_secs(5), || async { 5u8 })
        .await;
    let again = cache
        .get_or_compute("gc", Duration::from_secs(5), || async { 6u8 })
        .await;
    assert_eq!((computed, again), (5, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_over_the_size_limit_are_misses_read_only_in_part() {
    let server = RedisServer::start();
    let cache = Cache::builder(&server.url())
        .max_value_bytes(1024)
        .bounded_reads(true)
        .build()
        .unwrap();
    let repo = Repo {
        cache,
        calls: AtomicU32::new(0),
    };
    // Someone stored a 1 MiB value at our key.
    let _: () = server
        .cmd(::redis::cmd("SET").arg("user:8").arg(vec![b'x'; 1 << 20]))
        .await;
    let monitor = server.monitor();
    monitor.take_client_commands().await;
    assert_eq!(
        repo.get_user(8).await,
        Ok(Some(User {
            id: 8,
            name: "u8".into()
        }))
    );
    let commands = monitor.take_client_commands().await;
    assert!(
        commands[0].starts_with("\"GETRANGE\" \"user:8\" \"0\" \"1024\""),
        "{commands:?}"
    );
    let stats = repo.cache.stats();
    assert_eq!((stats.oversized, stats.writes), (1, 1), "{stats:?}");
    assert_eq!(repo.get_user(8).await.unwrap().unwrap().id, 8);
    assert_eq!(repo.calls(), 1, "overwritten with our own value, then hit");
    // A value of ours over the limit is not stored at all.
    let big = "x".repeat(2000);
    assert!(repo
        .cache
        .set("big", &big, Duration::from_secs(5))
        .await
        .is_err());
    assert_eq!(repo.cache.stats().oversized, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_over_the_size_limit_are_misses_with_whole_reads_too() {
    let server = RedisServer::start();
    let cache = Cache::builder(&server.url())
        .max_value_bytes(1024)
        .build()
        .unwrap();
    let repo = Repo {
        cache,
        calls: AtomicU32::new(0),
    };
    let _: () = server
        .cmd(::redis::cmd("SET").arg("user:9").arg(vec![b'x'; 1 << 20]))
        .await;
    assert_eq!(repo.get_user(9).await.unwrap().unwrap().id, 9);
    assert_eq!(repo.get_user(9).await.unwrap().unwrap().id, 9);
    let stats = repo.cache.stats();
    assert_eq!(
        (stats.oversized, stats.writes, stats.hits),
        (1, 1, 1),
        "{stats:?}"
    );
}

mod counted {
    use std::sync::Arc;
    use std::time::Duration;

    use redis_cached::{redis_cached, Cache};

    use super::per_backend;
    use crate::support::backends::Env;

    per_backend!(a_coalesced_pair_is_two_misses_with_or_without_the_lock);

    struct Slow {
        cache: Cache,
    }

    impl Slow {
        #[redis_cached(key = "plain:<id>", cache = self.cache)]
        async fn plain(&self, id: u64) -> u64 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            id
        }

        #[redis_cached(key = "locked:<id>", lock = true, cache = self.cache)]
        async fn locked(&self, id: u64) -> u64 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            id
        }
    }

    /// Two concurrent calls for one cold key: one computes, one waits for
    /// it; both are misses, whether each read the key (no lock) or the
    /// second joined before reading (`lock = true`).
    async fn a_coalesced_pair_is_two_misses_with_or_without_the_lock(env: &Env) {
        for locked in [false, true] {
            let slow = Arc::new(Slow { cache: env.cache() });
            let calls: Vec<_> = (0..2)
                .map(|_| {
                    let slow = Arc::clone(&slow);
                    tokio::spawn(async move {
                        if locked {
                            slow.locked(1).await
                        } else {
                            slow.plain(1).await
                        }
                    })
                })
                .collect();
            for call in calls {
                assert_eq!(call.await.unwrap(), 1);
            }
            let stats = slow.cache.stats();
            assert_eq!(
                (stats.hits, stats.misses, stats.computes, stats.coalesced),
                (0, 2, 1, 1),
                "lock = {locked}: {stats:?}"
            );
        }
    }
}
