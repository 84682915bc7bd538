//! `tags = [...]` and `Cache::invalidate_tag`: invalidating a tag reaches
//! every key cached under it and no other, on both backends, including a
//! computation still in flight when the tag is invalidated.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use redis_cached::{redis_cached, Cache};
use support::RedisServer;
use tokio::sync::{oneshot, Notify};

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
}

async fn tags_invalidate_their_keys_only(cache: Cache) {
    let repo = Repo::new(cache);
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

async fn a_tag_invalidated_mid_fill_refuses_the_old_value(cache: Cache) {
    let repo = Repo::new(cache);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory() {
    tags_invalidate_their_keys_only(Cache::in_memory()).await;
    a_tag_invalidated_mid_fill_refuses_the_old_value(Cache::in_memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis() {
    let server = RedisServer::start();
    tags_invalidate_their_keys_only(Cache::redis(&server.url()).unwrap()).await;
    a_tag_invalidated_mid_fill_refuses_the_old_value(Cache::redis(&server.url()).unwrap()).await;
    // Tag sets live under the namespace, beside the keys.
    let cache = Cache::builder(&server.url())
        .namespace("shop")
        .build()
        .unwrap();
    Repo::new(cache).user(3, 3, None).await;
    let members: Vec<String> = server
        .cmd(redis::cmd("SMEMBERS").arg("shop:~tag:tenant:3"))
        .await;
    assert_eq!(members, vec!["shop:user:3:3".to_owned()]);
    let ttl: i64 = server
        .cmd(redis::cmd("PTTL").arg("shop:~tag:tenant:3"))
        .await;
    assert!(ttl > 0, "a tag set expires with its keys: {ttl}");
}
