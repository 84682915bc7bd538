//! SQLite lets one connection write at a time; a second that tries waits
//! in SQLite's busy handler, sleeping (1, 2, 5 … 100 ms) while other
//! writers may take the lock before it. The service's writes queue for a
//! connection of their own instead, so they never meet another of the
//! service's writes holding the lock: with no busy timeout at all, many
//! concurrent writes all succeed (two meeting would fail with "database
//! is locked").

use std::time::Duration;

use demo::db::Db;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_never_meet_a_locked_database() {
    let dir = std::env::temp_dir().join(format!("demo-writes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let url = format!("sqlite://{}/demo.sqlite3?mode=rwc", dir.display());
    let db = Db::open_with_busy_timeout(&url, Duration::ZERO)
        .await
        .expect("SQLite opens and is seeded");
    let mut writers = tokio::task::JoinSet::new();
    for task in 0..32_i64 {
        let db = db.clone();
        writers.spawn(async move {
            for round in 0..20_i64 {
                let user = (task * 20 + round) % 100 + 1;
                if round % 2 == 0 {
                    db.rename_user(user, &format!("writer {task} round {round}"))
                        .await?;
                } else {
                    db.add_order(user, 100 + round).await?;
                }
            }
            Ok::<_, demo::db::DbError>(())
        });
    }
    let mut failures = Vec::new();
    while let Some(ended) = writers.join_next().await {
        if let Err(err) = ended.expect("a writer task ends") {
            failures.push(err.0);
        }
    }
    assert!(
        failures.is_empty(),
        "{} writes failed: {failures:?}",
        failures.len()
    );
    assert_eq!(db.statements(), 32 * 20);
    let _ = std::fs::remove_dir_all(&dir);
}
