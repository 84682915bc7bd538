//! A Redis user confined to its namespace, with the ACL line the README's
//! Security section recommends (`~shop:*` `&shop:*`, no `@dangerous`
//! command but `INFO` and `ROLE`), uses every feature: every key and
//! channel the cache touches starts with `shop:`, and no command it sends
//! is refused. And no key of the runtime API can name one of the cache's
//! own keys.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis_cached::{cache_evict, cache_put, redis_cached, Cache, Change, Error};
use support::write_behind::{builder, drained, Recorder};
use support::RedisServer;

struct Repo {
    cache: Cache,
    calls: AtomicU32,
}

impl Repo {
    #[redis_cached(key = "user:<id>", cache = self.cache)]
    async fn user(&self, id: u64) -> u64 {
        self.calls.fetch_add(1, Ordering::SeqCst);
        id
    }

    #[redis_cached(key = "report:<id>", lock = true, cache = self.cache)]
    async fn report(&self, id: u64) -> u64 {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        id * 2
    }

    #[redis_cached(key = "hot:<id>", ttl = "100ms", stale = "1h", lock = true, cache = self.cache)]
    async fn hot(self: Arc<Self>, id: u64) -> u64 {
        u64::from(self.calls.fetch_add(1, Ordering::SeqCst)) + id
    }

    #[redis_cached(key = "order:<id>", tags = ["tenant:<tenant>"], cache = self.cache)]
    async fn order(&self, tenant: u32, id: u64) -> u64 {
        self.calls.fetch_add(1, Ordering::SeqCst);
        u64::from(tenant) + id
    }

    #[cache_put(key = "user:<id>", cache = self.cache)]
    async fn save(&self, id: u64) -> u64 {
        id + 1000
    }

    #[redis_cached(key = "plan:<id>", ttl = 60, near = "30s", cache = self.cache)]
    async fn plan(&self, id: u64) -> u64 {
        id
    }

    #[cache_evict(key = "user:<id>", cache = self.cache)]
    async fn delete(&self, id: u64) -> Result<(), String> {
        let _ = id;
        Ok(())
    }
}

fn confined_server() -> RedisServer {
    RedisServer::start_with(&[
        "--user",
        "default",
        "on",
        "nopass",
        "~*",
        "&*",
        "+@all",
        "--user",
        "app",
        "on",
        ">pw",
        "resetkeys",
        "~shop:*",
        "resetchannels",
        "&shop:*",
        "+@all",
        "-@dangerous",
        "+info",
        "+role",
    ])
}

fn repo(server: &RedisServer) -> Arc<Repo> {
    let url = format!("redis://app:pw@127.0.0.1:{}/", server.port());
    Arc::new(Repo {
        cache: Cache::builder(&url)
            .namespace("shop")
            .op_timeout(Duration::from_secs(1))
            .build()
            .expect("valid"),
        calls: AtomicU32::new(0),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_confined_to_the_namespace_uses_every_feature() {
    let server = confined_server();
    let (a, b) = (repo(&server), repo(&server));
    a.cache
        .connect()
        .await
        .expect("connected as the confined user");
    b.cache
        .connect()
        .await
        .expect("connected as the confined user");

    assert_eq!(a.user(1).await, 1);
    assert_eq!(a.user(1).await, 1);

    // The lock: b waits for a's computation and is woken by it.
    let holder = {
        let a = a.clone();
        tokio::spawn(async move { a.report(5).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(b.report(5).await, 10);
    assert_eq!(holder.await.expect("no panic"), 10);

    // Refresh under the lock.
    let first = a.clone().hot(1).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(a.clone().hot(1).await, first, "stale while refreshing");

    // Tags, write-through, eviction, the runtime API.
    assert_eq!(a.order(3, 1).await, 4);
    a.cache
        .invalidate_tag("tenant:3")
        .await
        .expect("tag invalidated");
    assert_eq!(a.save(1).await, 1001);
    assert_eq!(a.cache.get::<u64>("user:1").await, Some(1001));
    a.delete(1).await.expect("deleted");
    a.cache
        .set("direct", &7u32, Duration::from_secs(60))
        .await
        .expect("set");
    a.cache.invalidate("direct").await.expect("invalidated");

    // The near tier (client-side tracking, its invalidations on `shop:`).
    // Its tracking connection opens in the background: read until it
    // answers.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while a.cache.stats().near_hits == 0 {
        assert_eq!(a.plan(2).await, 2);
        assert!(
            std::time::Instant::now() < deadline,
            "the near tier never answered: {:?}",
            a.cache.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Write-behind: its journal, lease and scripts.
    let sink = Recorder::default();
    let wb = builder("users", &a.cache, sink.clone())
        .max_delay(Duration::from_millis(100))
        .start()
        .expect("valid settings");
    wb.write(9, &"ada".to_owned()).await.expect("journaled");
    drained(&wb).await;
    let writes = sink.writes();
    assert_eq!(writes.len(), 1, "{writes:?}");
    assert_eq!(writes[0].change, Change::Upsert("ada".to_owned()));
    assert_eq!(
        (wb.stats().failed, wb.stats().refused),
        (0, 0),
        "{:?}",
        wb.stats()
    );

    for (name, stats) in [("a", a.cache.stats()), ("b", b.cache.stats())] {
        assert_eq!(
            (stats.errors, stats.rejected, stats.timeouts),
            (0, 0, 0),
            "{name}: {stats:?}"
        );
    }
    let (sa, sb) = (a.cache.stats(), b.cache.stats());
    assert!(sa.lock_acquired >= 1, "{sa:?}");
    assert_eq!((sb.lock_waits, sb.lock_wait_timeouts), (1, 0), "{sb:?}");
    let denied: Vec<::redis::Value> = server.cmd(::redis::cmd("ACL").arg("LOG")).await;
    assert!(denied.is_empty(), "the ACL denied something: {denied:?}");
}

#[tokio::test]
async fn no_key_of_the_runtime_api_names_the_caches_own() {
    let cache = Cache::in_memory();
    for reserved in ["~lock{user:1}", "~tag:tenant:1", "user~1"] {
        assert!(matches!(
            cache.set(reserved, &1u32, Duration::from_secs(60)).await,
            Err(Error::InvalidKey(_))
        ));
        assert!(matches!(
            cache.invalidate(reserved).await,
            Err(Error::InvalidKey(_))
        ));
        assert_eq!(cache.get::<u32>(reserved).await, None);
    }
    // Two namespaces can no longer make one key (`a` + `b:c`, `a:b` + `c`).
    assert!(matches!(
        Cache::builder("memory://").namespace("a:b").build(),
        Err(Error::Config(_))
    ));
}
