//! An outside writer: another client of the database that changes rows
//! directly in SQL while the service runs (as another service, a batch
//! job or someone in `psql` would), never through the service's cached
//! write path; and the count of the reads that showed a row older than it
//! was by then.
//!
//! The writer changes `users.email`, which the service never writes (its
//! renames change `name`), each time to a new version:
//! `user<id>.v<n>@example.com`, the seeded `user<id>@example.com` being
//! version 0. So each answer of `GET /users/{id}` says which version it
//! showed. A read is *stale* when a newer version had been committed
//! before it was sent, and *stale beyond the bound* when that newer
//! version had been committed more than the bound before it was sent. A
//! write counts as committed when its `UPDATE` returned (the commit is no
//! later).
//!
//! With Postgres, [`listen`] starts a `redis-cached-pg` listener that
//! invalidates the entries made from each changed row, whoever changed
//! it; without it, an entry made before an outside write is served until
//! its TTL.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis_cached::Cache;
use redis_cached_pg::{Listener, Mapping, Table};
use sqlx::{AnyConnection, Connection};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::db::{splitmix, DbError};
use crate::load::{UserRead, Zipf};

/// The version of a user's row that its `email` shows: 0 for the seeded
/// address, `n` for `user<id>.v<n>@example.com`; `None` for anything else.
pub fn email_version(email: &str) -> Option<u64> {
    let local = email.strip_suffix("@example.com")?;
    match local.split_once(".v") {
        None => local.strip_prefix("user")?.parse::<u64>().ok().map(|_| 0),
        Some((_, version)) => version.parse().ok(),
    }
}

/// The `email` of version `version` of user `id`'s row.
pub fn email_of(id: i64, version: u64) -> String {
    if version == 0 {
        format!("user{id}@example.com")
    } else {
        format!("user{id}.v{version}@example.com")
    }
}

/// One write of the outside writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutsideWrite {
    /// Whose row.
    pub id: i64,
    /// The version it wrote.
    pub version: u64,
    /// When its `UPDATE` returned: committed by then.
    pub committed: Instant,
}

/// What the outside writer does.
#[derive(Debug, Clone)]
pub struct OutsideConfig {
    /// Updates per second.
    pub rate: f64,
    /// Ids are drawn as the load generator draws them (`1..=users`, Zipf
    /// with this exponent), so that the rows read most change most.
    pub users: u64,
    /// The Zipf exponent.
    pub zipf_s: f64,
    /// Decides the ids.
    pub seed: u64,
    /// The first version written: above every version written before.
    pub first_version: u64,
}

/// A writer updating rows of `users` at a fixed rate on a connection of
/// its own, until [`OutsideWriter::stop`] (or until dropped, which ends
/// it at its next write).
pub struct OutsideWriter {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<Vec<OutsideWrite>, DbError>>,
}

impl OutsideWriter {
    /// Connects to the database at `url` and starts writing.
    pub async fn start(url: &str, config: OutsideConfig) -> Result<OutsideWriter, DbError> {
        if !(config.rate.is_finite() && config.rate > 0.0) {
            return Err(DbError(format!(
                "the outside writer's rate must be a positive number of updates per second, not {}",
                config.rate
            )));
        }
        sqlx::any::install_default_drivers();
        let mut conn = AnyConnection::connect(url).await?;
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let zipf = Zipf::new(config.users, config.zipf_s);
            let mut writes = Vec::new();
            let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / config.rate));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for n in 0.. {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = ticks.tick() => {}
                }
                let bits = splitmix(config.seed ^ n);
                let id = zipf.id((bits >> 11) as f64 / (1u64 << 53) as f64) as i64;
                let version = config.first_version + n;
                sqlx::query("UPDATE users SET email = $1 WHERE id = $2")
                    .bind(email_of(id, version))
                    .bind(id)
                    .execute(&mut conn)
                    .await?;
                writes.push(OutsideWrite {
                    id,
                    version,
                    committed: Instant::now(),
                });
            }
            conn.close().await?;
            Ok(writes)
        });
        Ok(OutsideWriter {
            stop: Some(stop),
            task,
        })
    }

    /// Stops writing; every write it made.
    pub async fn stop(mut self) -> Result<Vec<OutsideWrite>, DbError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(()); // (the task has ended if it is gone)
        }
        (&mut self.task)
            .await
            .map_err(|e| DbError(format!("the outside writer's task: {e}")))?
    }
}

/// How stale the reads of a run were.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Staleness {
    /// Reads of a user row checked.
    pub reads: u64,
    /// Reads that showed a version older than one committed before they
    /// were sent.
    pub stale: u64,
    /// Stale reads whose newer version had been committed more than the
    /// bound before they were sent.
    pub beyond_bound: u64,
    /// The stalest: how long before the read was sent its version had
    /// been replaced.
    pub worst: Duration,
}

/// Checks `reads` against `writes` (every outside write that may precede
/// them, in the order they were made), with `bound`.
pub fn staleness(reads: &[UserRead], writes: &[OutsideWrite], bound: Duration) -> Staleness {
    let mut by_user: HashMap<i64, Vec<&OutsideWrite>> = HashMap::new();
    for write in writes {
        by_user.entry(write.id).or_default().push(write);
    }
    let mut found = Staleness::default();
    for read in reads {
        found.reads += 1;
        // The writer writes one row at a time, in version order: the
        // first write above the version read is the one that replaced it.
        let replaced = by_user
            .get(&read.id)
            .and_then(|writes| writes.iter().find(|w| w.version > read.version));
        let Some(replaced) = replaced else {
            continue;
        };
        if replaced.committed >= read.sent {
            continue; // committed after the read was sent
        }
        let age = read.sent - replaced.committed;
        found.stale += 1;
        found.worst = found.worst.max(age);
        if age > bound {
            found.beyond_bound += 1;
        }
    }
    found
}

/// What the listener maps: a `users` row to the key of
/// [`Repo::user`](crate::repo::Repo::user), an `orders` row to the tag of
/// [`Repo::order_summary`](crate::repo::Repo::order_summary), each table
/// to the tag that every function reading it lists (`users`, `orders`).
pub fn mapping() -> Mapping {
    Mapping::new()
        .table(Table::new("users", "users").key("user:<id>"))
        .table(Table::new("orders", "orders").tag("orders-of:<user_id>"))
}

/// Starts a listener on the Postgres database at `url` (`wal_level =
/// logical`, a user with `REPLICATION` that owns the tables) for
/// [`mapping`], invalidating in `cache`, on replication slot `slot`; once
/// it streams.
pub async fn listen(url: &str, cache: Cache, slot: &str) -> Result<Listener, String> {
    let listener = Listener::builder(url, cache, mapping())
        .slot(slot)
        .start()
        .await
        .map_err(|e| format!("the listener did not start: {e}"))?;
    if !listener.wait_streaming(Duration::from_secs(30)).await {
        return Err("the listener did not stream within 30 s".into());
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_email_says_its_version() {
        assert_eq!(email_version("user7@example.com"), Some(0));
        assert_eq!(email_version(&email_of(7, 0)), Some(0));
        assert_eq!(email_version(&email_of(7, 12)), Some(12));
        assert_eq!(email_version("someone@example.org"), None);
        assert_eq!(email_version("user7.vx@example.com"), None);
    }

    #[test]
    fn a_read_is_stale_once_a_newer_version_had_committed() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let writes = [
            OutsideWrite {
                id: 1,
                version: 1,
                committed: at(100),
            },
            OutsideWrite {
                id: 2,
                version: 2,
                committed: at(150),
            },
            OutsideWrite {
                id: 1,
                version: 3,
                committed: at(300),
            },
        ];
        let read = |id, version, ms| UserRead {
            id,
            version,
            sent: at(ms),
        };
        let reads = [
            read(1, 0, 50),   // before any write: fresh
            read(1, 0, 120),  // version 1 committed 20 ms before: stale
            read(1, 1, 200),  // the newest: fresh
            read(1, 0, 400),  // replaced 300 ms before: beyond 100 ms
            read(1, 1, 350),  // replaced by 3, 50 ms before: stale
            read(2, 2, 1000), // the newest
            read(3, 0, 1000), // never written
        ];
        let found = staleness(&reads, &writes, Duration::from_millis(100));
        assert_eq!(
            found,
            Staleness {
                reads: 7,
                stale: 3,
                beyond_bound: 1,
                worst: Duration::from_millis(300),
            }
        );
    }
}
