//! The listener on real Postgres and Redis: rows changed from outside the
//! process (`psql`, another connection) invalidate the entries that cached
//! functions made from them, through the same templates; nothing is lost
//! when the listener's connection is killed or the listener restarts; a
//! bulk update goes out in bounded batches; a lost slot, a `TRUNCATE` or
//! a change whose old row Postgres did not send reach the table tag.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use redis_cached::{redis_cached, Cache};
use redis_cached_pg::{Listener, Mapping, Table};
use serde::{Deserialize, Serialize};
use support::{eventually, Db, Postgres, Redis};

/// How long a change may take to be invalidated here (a loaded machine
/// running debug builds; the bound measured is in the benchmark).
const BOUND: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: i64,
    team_id: Option<i64>,
    name: String,
}

/// Reads through cached functions, counting the database reads.
struct Repo {
    db: Db,
    cache: Cache,
    reads: AtomicU64,
}

impl Repo {
    fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }

    #[redis_cached(key = "user:<id>", tags = ["users"], cache = self.cache)]
    async fn user(&self, id: i64) -> Option<User> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let rows = self
            .db
            .query(&format!("SELECT team_id, name FROM users WHERE id = {id}"))
            .await;
        rows.first().map(|row| User {
            id,
            team_id: row[0].as_deref().map(|t| t.parse().expect("an integer")),
            name: row[1].clone().unwrap_or_default(),
        })
    }

    #[redis_cached(key = "team-members:<team_id>", tags = ["team:<team_id>", "users"], cache = self.cache)]
    async fn team(&self, team_id: i64) -> Vec<String> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.db
            .query(&format!(
                "SELECT name FROM users WHERE team_id = {team_id} ORDER BY id"
            ))
            .await
            .into_iter()
            .map(|row| row[0].clone().unwrap_or_default())
            .collect()
    }

    #[redis_cached(key = "orders:<user_id>", tags = ["orders-of:<user_id>", "orders"], cache = self.cache)]
    async fn order_total(&self, user_id: i64) -> i64 {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.db
            .query(&format!(
                "SELECT coalesce(sum(total), 0) FROM orders WHERE user_id = {user_id}"
            ))
            .await
            .first()
            .and_then(|row| row[0].as_deref()?.parse().ok())
            .unwrap_or(0)
    }
}

/// The mapping of the tests' tables: the templates of `Repo`'s functions.
fn mapping() -> Mapping {
    Mapping::new()
        .table(
            Table::new("users", "users")
                .key("user:<id>")
                .tag("team:<team_id>"),
        )
        .table(Table::new("orders", "orders").tag("orders-of:<user_id>"))
}

/// One test's database (on `pg`), Redis, cache and repository.
struct Fixture {
    pg: Arc<Postgres>,
    database: String,
    redis: Redis,
    repo: Arc<Repo>,
}

impl Fixture {
    /// `users` with `users` rows (team `id % 3`), `orders` empty.
    async fn new(name: &str, users: u32) -> Fixture {
        Fixture::on(Postgres::shared(), name, users).await
    }

    async fn on(pg: Arc<Postgres>, name: &str, users: u32) -> Fixture {
        let database = pg.database(name);
        pg.psql(
            &database,
            &format!(
                "CREATE TABLE users (id bigint PRIMARY KEY, team_id int, name text NOT NULL);
                 ALTER TABLE users REPLICA IDENTITY FULL;
                 CREATE TABLE orders (id bigserial PRIMARY KEY, user_id bigint NOT NULL, total bigint NOT NULL);
                 ALTER TABLE orders REPLICA IDENTITY FULL;
                 INSERT INTO users SELECT g, g % 3, 'user ' || g FROM generate_series(1, {users}) g;"
            ),
        );
        let redis = Redis::start();
        let cache = Cache::builder(&redis.url())
            .namespace("app")
            .build()
            .expect("a cache");
        let db = Db::connect(&pg.url(&database)).await;
        Fixture {
            pg,
            database,
            redis,
            repo: Arc::new(Repo {
                db,
                cache,
                reads: AtomicU64::new(0),
            }),
        }
    }

    fn psql(&self, sql: &str) -> String {
        self.pg.psql(&self.database, sql)
    }

    async fn listen(&self, slot: &str) -> Listener {
        let listener = Listener::builder(
            &self.pg.url(&self.database),
            self.repo.cache.clone(),
            mapping(),
        )
        .slot(slot)
        .start()
        .await
        .expect("the listener starts");
        assert!(listener.wait_streaming(BOUND).await, "the listener streams");
        listener
    }

    /// The name `user(id)` returns now.
    async fn name(&self, id: i64) -> Option<String> {
        self.repo.user(id).await.map(|u| u.name)
    }

    /// Waits until `listener` has invalidated `transactions` in all,
    /// and the cache reads Redis again (not a fallback to the database
    /// while its breaker is open, which would read fresh rows whatever
    /// Redis holds).
    async fn caught_up(&self, listener: &Listener, transactions: u64) {
        let done = eventually(BOUND, || async {
            let stats = listener.stats();
            stats.transactions >= transactions
                && stats.lag.is_zero()
                && !self.repo.cache.is_degraded()
        })
        .await;
        assert!(done, "not caught up: {:?}", listener.stats());
    }

    /// Waits until `user(id)` returns `name`.
    async fn until_name(&self, id: i64, name: Option<&str>) {
        let fresh = eventually(BOUND, || async { self.name(id).await.as_deref() == name }).await;
        assert!(
            fresh,
            "user {id} still reads {:?}, not {name:?}",
            self.name(id).await
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_in_psql_invalidate_the_mapped_keys_and_tags() {
    let f = Fixture::new("psql_changes", 6).await;
    let listener = f.listen("psql_changes").await;
    let repo = &f.repo;

    // Cached: the second read does not reach the database.
    assert_eq!(f.name(1).await.as_deref(), Some("user 1"));
    assert_eq!(repo.team(1).await, ["user 1", "user 4"]);
    assert_eq!(repo.order_total(1).await, 0);
    let reads = repo.reads();
    assert_eq!(f.name(1).await.as_deref(), Some("user 1"));
    assert_eq!(repo.team(1).await, ["user 1", "user 4"]);
    assert_eq!(repo.reads(), reads, "served from the cache");

    // UPDATE: the key, and the row's tag.
    f.psql("UPDATE users SET name = 'Ada' WHERE id = 1");
    f.until_name(1, Some("Ada")).await;
    assert!(eventually(BOUND, || async { repo.team(1).await == ["Ada", "user 4"] }).await);

    // INSERT: the new row's tag.
    f.psql("INSERT INTO users VALUES (7, 1, 'Grace')");
    assert!(
        eventually(BOUND, || async {
            repo.team(1).await == ["Ada", "user 4", "Grace"]
        })
        .await
    );

    // DELETE: the old row's key and tag.
    assert_eq!(f.name(4).await.as_deref(), Some("user 4"));
    f.psql("DELETE FROM users WHERE id = 4");
    f.until_name(4, None).await;
    assert!(eventually(BOUND, || async { repo.team(1).await == ["Ada", "Grace"] }).await);

    // Another table, another tag.
    f.psql("INSERT INTO orders (user_id, total) VALUES (1, 30), (1, 12), (2, 5)");
    assert!(eventually(BOUND, || async { repo.order_total(1).await == 42 }).await);
    assert_eq!(repo.order_total(2).await, 5);
    assert_eq!(repo.order_total(3).await, 0);

    // TRUNCATE: every entry of the table, through its table tag.
    f.psql("TRUNCATE orders");
    assert!(eventually(BOUND, || async { repo.order_total(1).await == 0 }).await);
    assert_eq!(repo.order_total(2).await, 0);

    let stats = listener.stats();
    assert_eq!(stats.truncates, 1);
    assert_eq!(
        stats.fallbacks, 0,
        "REPLICA IDENTITY FULL: every change named"
    );
    assert_eq!(stats.resets, 1, "one, for the slot it created");
    assert!(stats.rows >= 6, "{stats:?}");
    listener.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_moved_between_tags_invalidates_both() {
    let f = Fixture::new("moved_row", 6).await;
    let listener = f.listen("moved_row").await;
    let repo = &f.repo;
    assert_eq!(repo.team(1).await, ["user 1", "user 4"]);
    assert_eq!(repo.team(2).await, ["user 2", "user 5"]);

    // Written through a connection of the test's own, outside the cache.
    let writer = Db::connect(&f.pg.url(&f.database)).await;
    writer
        .execute("UPDATE users SET team_id = 2 WHERE id = 1")
        .await;
    assert!(
        eventually(BOUND, || async { repo.team(1).await == ["user 4"] }).await,
        "the old tag"
    );
    assert!(
        eventually(BOUND, || async {
            repo.team(2).await == ["user 1", "user 2", "user 5"]
        })
        .await,
        "the new tag"
    );
    assert_eq!(listener.stats().fallbacks, 0);

    // Without REPLICA IDENTITY FULL, Postgres does not send the old
    // team: the table tag reaches both teams' entries instead.
    f.psql("ALTER TABLE users REPLICA IDENTITY DEFAULT");
    assert_eq!(repo.team(0).await, ["user 3", "user 6"]);
    f.psql("UPDATE users SET team_id = 0 WHERE id = 2");
    assert!(
        eventually(BOUND, || async {
            repo.team(2).await == ["user 1", "user 5"]
        })
        .await
    );
    assert!(
        eventually(BOUND, || async {
            repo.team(0).await == ["user 2", "user 3", "user 6"]
        })
        .await
    );
    assert!(listener.stats().fallbacks >= 1);
    listener.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_listeners_connection_during_10000_updates_loses_none() {
    const ROWS: i64 = 10_000;
    let f = Fixture::new("killed_connection", ROWS as u32).await;
    let listener = f.listen("killed_connection").await;
    fill_users(&f.repo, 1..=ROWS).await;

    // 10,000 transactions of one row each, from another process.
    let mut writer = f.pg.psql_spawn(
        &f.database,
        &format!(
            "DO $$ BEGIN FOR i IN 1..{ROWS} LOOP \
               UPDATE users SET name = 'new ' || i WHERE id = i; COMMIT; \
             END LOOP; END $$"
        ),
    );
    let mut kills = 0;
    while writer.try_wait().expect("psql runs").is_none() {
        tokio::time::sleep(Duration::from_millis(150)).await;
        if f.pg.kill_walsender(&f.database, "killed_connection") {
            kills += 1;
        }
    }
    assert!(writer.wait().expect("psql").success());
    assert!(kills >= 1, "the connection was killed during the updates");

    // Confirmed in commit order, but the keys of the transactions of one
    // batch go out in several invalidations at once: wait for all.
    f.until_name(ROWS, Some(&format!("new {ROWS}"))).await;
    let caught_up = eventually(BOUND, || async {
        stale_users(&f.repo, 1..=ROWS, "new ").await.is_empty()
    })
    .await;
    let stale = stale_users(&f.repo, 1..=ROWS, "new ").await;
    assert!(caught_up, "rows whose update was lost: {stale:?}");
    let stats = listener.stats();
    assert!(stats.reconnects >= 1, "{stats:?}");
    assert_eq!(
        stats.resets, 1,
        "reconnects resume from the slot: {stats:?}"
    );
    listener.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_listener_resumes_from_its_slot() {
    const ROWS: i64 = 200;
    let f = Fixture::new("restarted", ROWS as u32).await;
    let first = f.listen("restarted").await;
    fill_users(&f.repo, 1..=ROWS).await;
    f.psql("UPDATE users SET name = 'one ' || id WHERE id <= 10");
    f.until_name(10, Some("one 10")).await;
    f.until_name(1, Some("one 1")).await;
    // Gone at once, as a crash would: nothing confirmed since is lost.
    drop(first);

    f.psql(&format!(
        "UPDATE users SET name = 'two ' || id WHERE id > 100; \
         DELETE FROM users WHERE id = 1; \
         INSERT INTO users VALUES ({}, 1, 'new')",
        ROWS + 1
    ));
    // Nothing invalidates them meanwhile.
    assert_eq!(f.name(150).await.as_deref(), Some("user 150"));
    assert_eq!(f.name(1).await.as_deref(), Some("one 1"));

    let second = f.listen("restarted").await;
    f.until_name(1, None).await;
    // One transaction's keys and tags go out as several invalidations at
    // once (the tag of the inserted row's team reaches key 1 too), and a
    // slow one is retried: all of them land within the bound.
    let caught_up = eventually(BOUND, || async {
        stale_users(&f.repo, 101..=ROWS, "two ").await.is_empty()
    })
    .await;
    let stale = stale_users(&f.repo, 101..=ROWS, "two ").await;
    assert!(
        caught_up,
        "still stale after the listener resumed: {stale:?}"
    );
    assert_eq!(f.name(50).await.as_deref(), Some("user 50"));
    let stats = second.stats();
    assert_eq!(
        stats.resets, 0,
        "resumed from the slot, not invalidated wholesale"
    );
    assert!(stats.rows >= 102, "{stats:?}");
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_update_of_100000_rows_goes_out_in_bounded_batches() {
    const ROWS: i64 = 100_000;
    const BATCH: usize = 512;
    let f = Fixture::new("bulk_update", ROWS as u32).await;
    let listener = Listener::builder(&f.pg.url(&f.database), f.repo.cache.clone(), mapping())
        .slot("bulk_update")
        .batch(BATCH)
        .start()
        .await
        .expect("the listener starts");
    let sample: Vec<i64> = (1..=ROWS).step_by(997).collect();
    for &id in &sample {
        f.name(id).await;
    }
    let sets_before = f.redis.calls("set");

    f.psql("UPDATE users SET name = 'bulk ' || id");
    let last = *sample.last().expect("a sample");
    f.until_name(last, Some(&format!("bulk {last}"))).await;
    for &id in &sample {
        assert_eq!(f.name(id).await, Some(format!("bulk {id}")), "user {id}");
    }
    let stats = listener.stats();
    assert!(stats.keys >= ROWS as u64, "{stats:?}");
    // A batch holds at most BATCH keys and tags plus what one row adds
    // (a key and a tag, old and new).
    assert!(stats.largest_batch <= (BATCH + 4) as u64, "{stats:?}");
    assert!(
        stats.batches >= ROWS as u64 / (BATCH as u64 + 4),
        "{stats:?}"
    );
    // One short command per key: no command of 100,000 keys.
    assert!(f.redis.calls("set") - sets_before >= ROWS as u64);
    listener.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_invalidates_everything_the_mapping_covers() {
    let f = Fixture::new("dropped_slot", 6).await;
    let listener = f.listen("dropped_slot").await;
    for id in 1..=6 {
        f.name(id).await;
    }
    f.repo.order_total(1).await;
    listener.stop().await;

    // While no listener runs, the slot is dropped (an operator, a
    // failover to a replica without it) and rows change.
    let dropped = eventually(BOUND, || async {
        f.psql(
            "SELECT count(pg_drop_replication_slot(slot_name)) FROM pg_replication_slots \
             WHERE slot_name = 'dropped_slot' AND NOT active",
        ) == "1"
    })
    .await;
    assert!(dropped, "the slot is free once the listener stopped");
    f.psql("UPDATE users SET name = 'lost' WHERE id = 2");
    f.psql("INSERT INTO orders (user_id, total) VALUES (1, 9)");
    assert_eq!(
        f.name(2).await.as_deref(),
        Some("user 2"),
        "stale meanwhile"
    );

    let listener = f.listen("dropped_slot").await;
    f.until_name(2, Some("lost")).await;
    assert!(eventually(BOUND, || async { f.repo.order_total(1).await == 9 }).await);
    // Every entry of the mapped tables went, changed or not.
    let reads = f.repo.reads();
    f.name(5).await;
    assert_eq!(f.repo.reads(), reads + 1, "user 5 was invalidated too");
    assert_eq!(listener.stats().resets, 1);
    listener.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_cut_short_is_done_at_the_next_start() {
    let f = Fixture::new("reset_marker", 3).await;
    let listener = f.listen("reset_marker").await;
    listener.stop().await;
    f.name(1).await;
    // What a listener that died between creating its slot and finishing
    // its invalidations leaves behind.
    f.psql("SELECT pg_create_physical_replication_slot('reset_marker_reset')");

    let listener = f.listen("reset_marker").await;
    assert!(eventually(BOUND, || async { listener.stats().resets == 1 }).await);
    let reads = f.repo.reads();
    f.name(1).await;
    assert_eq!(f.repo.reads(), reads + 1, "user 1 was invalidated");
    assert_eq!(
        f.psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'reset_marker_reset'"),
        "0"
    );
    listener.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_lost_to_max_slot_wal_keep_size_invalidates_everything() {
    // A server of its own: 1 MB WAL segments, a slot keeps at most 2 MB.
    let pg = Arc::new(Postgres::start(
        &["--wal-segsize=1"],
        &[
            "max_slot_wal_keep_size=2MB",
            "min_wal_size=2MB",
            "max_wal_size=4MB",
        ],
    ));
    let f = Fixture::on(pg, "lost_slot", 6).await;
    let listener = f.listen("lost_slot").await;
    for id in 1..=6 {
        f.name(id).await;
    }
    listener.stop().await;

    // A stopped listener's slot no longer fills the disk: past 2 MB of
    // WAL, Postgres invalidates it.
    f.psql("UPDATE users SET name = 'while stopped' WHERE id = 3");
    f.psql(
        "CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 40000) g",
    );
    for _ in 0..3 {
        f.psql("SELECT pg_switch_wal(); CHECKPOINT;");
    }
    assert_eq!(
        f.psql("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'lost_slot'"),
        "lost"
    );
    assert_eq!(
        f.name(3).await.as_deref(),
        Some("user 3"),
        "stale meanwhile"
    );

    let listener = f.listen("lost_slot").await;
    f.until_name(3, Some("while stopped")).await;
    let reads = f.repo.reads();
    f.name(6).await;
    assert_eq!(f.repo.reads(), reads + 1, "user 6 was invalidated too");
    assert_eq!(listener.stats().resets, 1);
    // Streaming again from the new slot.
    f.psql("UPDATE users SET name = 'after' WHERE id = 6");
    f.until_name(6, Some("after")).await;
    listener.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_cut_off_reads_are_served_and_the_lag_is_visible() {
    let pg = Arc::new(Postgres::start(&[], &[]));
    let f = Fixture::on(pg.clone(), "cut_off", 3).await;
    let listener = f.listen("cut_off").await;
    assert_eq!(f.name(1).await.as_deref(), Some("user 1"));
    assert_eq!(listener.stats().cut_off, None);

    pg.stop();
    assert!(eventually(BOUND, || async { !listener.stats().streaming }).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = listener.stats();
    assert!(
        stats
            .cut_off
            .is_some_and(|d| d >= Duration::from_millis(300)),
        "{stats:?}"
    );
    // The cache still serves what it holds.
    assert_eq!(f.name(1).await.as_deref(), Some("user 1"));

    pg.restart();
    assert!(listener.wait_streaming(BOUND).await);
    assert_eq!(listener.stats().cut_off, None);
    assert!(listener.stats().reconnects >= 1);
    f.psql("UPDATE users SET name = 'back' WHERE id = 1");
    f.until_name(1, Some("back")).await;
    listener.stop().await;
}

/// Redis stops answering (SIGSTOP) while rows change: the listener keeps
/// receiving them, but confirms none whose invalidations did not land, so
/// that after Redis is back every changed row's entries are invalidated,
/// by the same listener or (had it died meanwhile) by the next one, which
/// resumes from the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_failing_while_changes_stream_loses_no_invalidation() {
    // Fewer events than the reader reads ahead: it keeps sending feedback
    // to Postgres while the applier waits for Redis.
    const ROWS: i64 = 1_000;
    let f = Fixture::new("redis_paused", ROWS as u32).await;
    let listener = f.listen("redis_paused").await;
    let resets = listener.stats().resets;
    fill_users(&f.repo, 1..=ROWS).await;

    // Updates in separate transactions while Redis is paused, then long
    // enough for several feedback rounds (once a second) to Postgres.
    let updated_while_paused = |name: &str| {
        f.redis.pause();
        let before = f.psql("SELECT pg_current_wal_lsn()");
        f.psql(&format!(
            "DO $$ BEGIN FOR i IN 1..{ROWS} LOOP \
               UPDATE users SET name = '{name} ' || i WHERE id = i; COMMIT; \
             END LOOP; END $$"
        ));
        before
    };
    let confirmed_at_most = |lsn: &str| {
        f.psql(&format!(
            "SELECT confirmed_flush_lsn <= '{lsn}'::pg_lsn FROM pg_replication_slots \
             WHERE slot_name = 'redis_paused'"
        )) == "t"
    };

    // The same listener, once Redis is back.
    let before = updated_while_paused("first");
    assert!(
        eventually(BOUND, || async {
            listener.stats().failed_invalidations > 0
        })
        .await,
        "the listener tried: {:?}",
        listener.stats()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        confirmed_at_most(&before),
        "the slot was confirmed past changes not invalidated: {:?}",
        listener.stats()
    );
    assert!(
        listener.stats().lag >= Duration::from_secs(2),
        "{:?}",
        listener.stats()
    );
    f.redis.resume();
    f.caught_up(&listener, ROWS as u64).await;
    let stale = stale_users(&f.repo, 1..=ROWS, "first ").await;
    assert_eq!(stale, Vec::<i64>::new(), "rows whose invalidation was lost");
    assert_eq!(listener.stats().resets, resets, "nothing was reset");

    // A listener that dies while Redis is down: the next one does it.
    let failed = listener.stats().failed_invalidations;
    let before = updated_while_paused("second");
    assert!(
        eventually(BOUND, || async {
            listener.stats().failed_invalidations > failed
        })
        .await,
        "the listener tried: {:?}",
        listener.stats()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(confirmed_at_most(&before), "{:?}", listener.stats());
    drop(listener);
    f.redis.resume();
    let next = f.listen("redis_paused").await;
    f.caught_up(&next, ROWS as u64).await;
    let stale = stale_users(&f.repo, 1..=ROWS, "second ").await;
    assert_eq!(stale, Vec::<i64>::new(), "rows whose invalidation was lost");
    assert_eq!(next.stats().resets, 0, "resumed from the slot, no reset");
    next.stop().await;
}

/// Reads `ids` through `user`, 32 at a time, so that each is cached.
async fn fill_users(repo: &Arc<Repo>, ids: std::ops::RangeInclusive<i64>) {
    let ids: Vec<i64> = ids.collect();
    for chunk in ids.chunks(32) {
        let reads = chunk.iter().map(|&id| {
            let repo = repo.clone();
            async move { repo.user(id).await }
        });
        for user in join_all(reads).await {
            assert!(user.is_some());
        }
    }
}

/// The ids among `ids` whose `user` does not read `<prefix><id>`.
async fn stale_users(
    repo: &Arc<Repo>,
    ids: std::ops::RangeInclusive<i64>,
    prefix: &str,
) -> Vec<i64> {
    let ids: Vec<i64> = ids.collect();
    let mut stale = Vec::new();
    for chunk in ids.chunks(32) {
        let reads = chunk.iter().map(|&id| {
            let repo = repo.clone();
            async move { (id, repo.user(id).await.map(|u| u.name)) }
        });
        for (id, name) in join_all(reads).await {
            if name != Some(format!("{prefix}{id}")) {
                stale.push(id);
            }
        }
    }
    stale
}
