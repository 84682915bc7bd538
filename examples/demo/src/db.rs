//! The database: SQLite (a file, created and seeded on first use) or
//! Postgres, through sqlx. Every SQL statement the service runs goes
//! through [`Db`], which counts it: the figure the demo compares.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyConnection, AnyPool, Connection, Executor, Row};
use tokio::sync::Mutex;

/// Users seeded.
pub const USERS: i64 = 10_000;
/// Orders seeded, spread unevenly over the users.
pub const ORDERS: i64 = 100_000;

/// A row of `users`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// The primary key.
    pub id: i64,
    /// The display name (what renames change).
    pub name: String,
    /// A made-up address.
    pub email: String,
    /// A two-letter country code.
    pub country: String,
}

/// What one user has ordered: the slow aggregate of the demo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderSummary {
    /// Whose orders.
    pub user_id: i64,
    /// How many.
    pub orders: i64,
    /// Their amounts summed.
    pub total_cents: i64,
}

/// A failed database call.
#[derive(Debug, Clone, PartialEq)]
pub struct DbError(
    /// What the driver said.
    pub String,
);

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "database error: {}", self.0)
    }
}

impl std::error::Error for DbError {}

impl From<sqlx::Error> for DbError {
    fn from(err: sqlx::Error) -> Self {
        DbError(err.to_string())
    }
}

/// A connection pool that counts the statements it runs.
#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    /// SQLite: the one connection that writes while the service runs.
    writer: Option<Arc<Mutex<AnyConnection>>>,
    statements: Arc<AtomicU64>,
}

impl Db {
    /// Connects to `url` (`sqlite://file?mode=rwc` or `postgres://…`),
    /// creates the tables if missing and seeds them if empty.
    pub async fn open(url: &str) -> Result<Db, DbError> {
        Db::open_with_busy_timeout(url, Duration::from_secs(5)).await
    }

    /// [`Db::open`], with how long a SQLite connection that finds the
    /// database locked by another's write waits for it (SQLite's
    /// `busy_timeout`: 5 s in [`Db::open`]; zero: it fails at once with
    /// "database is locked"). Postgres does not use it.
    pub async fn open_with_busy_timeout(url: &str, busy_timeout: Duration) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let pragma = format!("PRAGMA busy_timeout = {}", busy_timeout.as_millis());
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 16 })
            .after_connect(move |conn, _| {
                let pragma = pragma.clone();
                Box::pin(async move {
                    if sqlite {
                        conn.execute(sqlx::AssertSqlSafe(pragma)).await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        // SQLite lets one connection write at a time, and a second one
        // that tries does not queue: it sleeps in SQLite's busy handler
        // (1, 2, 5, 10 … 100 ms, longer while other writers keep taking
        // the lock) on one of the pool's connections, so reads wait behind
        // it too. With the cache, writes are half of the statements, and
        // those sleeps were its slowest answers. The service's writes
        // queue for one connection of their own instead (a pool of one
        // would ping it at each checkout and return), beside the reads
        // (WAL).
        let writer = if sqlite {
            let mut conn = AnyConnection::connect(url).await?;
            let pragma = format!("PRAGMA busy_timeout = {}", busy_timeout.as_millis());
            conn.execute(sqlx::AssertSqlSafe(pragma)).await?;
            Some(Arc::new(Mutex::new(conn)))
        } else {
            None
        };
        let db = Db {
            pool,
            writer,
            statements: Arc::new(AtomicU64::new(0)),
        };
        db.create_and_seed(sqlite).await?;
        Ok(db)
    }

    /// Statements run since this pool was opened (set-up excluded).
    pub fn statements(&self) -> u64 {
        self.statements.load(Ordering::Relaxed)
    }

    fn count(&self) {
        self.statements.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("demo_sql_statements_total").increment(1);
    }

    async fn create_and_seed(&self, sqlite: bool) -> Result<(), DbError> {
        let (users, orders) = if sqlite {
            (
                "CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, \
                 email TEXT NOT NULL, country TEXT NOT NULL)",
                "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, \
                 user_id BIGINT NOT NULL, amount_cents BIGINT NOT NULL)",
            )
        } else {
            (
                "CREATE TABLE IF NOT EXISTS users (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL, \
                 email TEXT NOT NULL, country TEXT NOT NULL)",
                "CREATE TABLE IF NOT EXISTS orders (id BIGSERIAL PRIMARY KEY, \
                 user_id BIGINT NOT NULL, amount_cents BIGINT NOT NULL)",
            )
        };
        if sqlite {
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&self.pool)
                .await?;
        }
        sqlx::query(users).execute(&self.pool).await?;
        sqlx::query(orders).execute(&self.pool).await?;
        sqlx::query("CREATE INDEX IF NOT EXISTS orders_by_user ON orders (user_id)")
            .execute(&self.pool)
            .await?;
        let seeded: i64 = sqlx::query("SELECT COUNT(*) FROM users")
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        if seeded > 0 {
            return Ok(());
        }
        const COUNTRIES: [&str; 8] = ["DE", "FR", "US", "BR", "IN", "JP", "NG", "SE"];
        let mut tx = self.pool.begin().await?;
        // Generated values only (no input): literal rows, 500 per statement.
        for first in (1..=USERS).step_by(500) {
            let rows: Vec<String> = (first..(first + 500).min(USERS + 1))
                .map(|id| {
                    let country = COUNTRIES[(id % 8) as usize];
                    format!("('user {id}', 'user{id}@example.com', '{country}')")
                })
                .collect();
            let sql = format!(
                "INSERT INTO users (name, email, country) VALUES {}",
                rows.join(",")
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut *tx)
                .await?;
        }
        // A fixed pseudo-random spread: some users have many orders.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for first in (0..ORDERS).step_by(500) {
            let rows: Vec<String> = (first..(first + 500).min(ORDERS))
                .map(|_| {
                    state = splitmix(state);
                    let user = (state % USERS as u64) as i64 + 1;
                    let amount = (state >> 32) % 50_000 + 100;
                    format!("({user}, {amount})")
                })
                .collect();
            let sql = format!(
                "INSERT INTO orders (user_id, amount_cents) VALUES {}",
                rows.join(",")
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Undoes what requests changed: orders added after the seeded ones
    /// are deleted, renamed users get their seeded names back (and their
    /// seeded addresses, which only an outside writer changes). Not
    /// counted (set-up, like seeding).
    pub async fn reset(&self) -> Result<(), DbError> {
        // The seeded orders were inserted first, in one transaction: they
        // hold the ORDERS lowest ids.
        let seeded_last: Option<i64> = sqlx::query(
            "SELECT MAX(id) FROM (SELECT id FROM orders ORDER BY id LIMIT $1) AS seeded",
        )
        .bind(ORDERS)
        .fetch_one(&self.pool)
        .await?
        .try_get(0)?;
        if let Some(last) = seeded_last {
            sqlx::query("DELETE FROM orders WHERE id > $1")
                .bind(last)
                .execute(&self.pool)
                .await?;
        }
        sqlx::query("UPDATE users SET name = 'user ' || CAST(id AS TEXT) WHERE name <> 'user ' || CAST(id AS TEXT)")
            .execute(&self.pool)
            .await?;
        // (what an outside writer changed: crate::outside)
        sqlx::query(
            "UPDATE users SET email = 'user' || CAST(id AS TEXT) || '@example.com' \
             WHERE email <> 'user' || CAST(id AS TEXT) || '@example.com'",
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// `SELECT` one user.
    pub async fn user(&self, id: i64) -> Result<Option<User>, DbError> {
        self.count();
        let row = sqlx::query("SELECT id, name, email, country FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| user_of(&row)).transpose()
    }

    /// Counts and sums one user's orders.
    pub async fn order_summary(&self, user_id: i64) -> Result<OrderSummary, DbError> {
        self.count();
        let row = sqlx::query(
            "SELECT COUNT(*), CAST(COALESCE(SUM(amount_cents), 0) AS BIGINT) \
             FROM orders WHERE user_id = $1",
        )
        .bind(user_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(OrderSummary {
            user_id,
            orders: row.try_get(0)?,
            total_cents: row.try_get(1)?,
        })
    }

    /// Renames a user; the row as it is now, `None` if there is none.
    pub async fn rename_user(&self, id: i64, name: &str) -> Result<Option<User>, DbError> {
        self.count();
        let query = sqlx::query(
            "UPDATE users SET name = $1 WHERE id = $2 RETURNING id, name, email, country",
        )
        .bind(name)
        .bind(id);
        let row = match &self.writer {
            Some(writer) => query.fetch_optional(&mut *writer.lock().await).await?,
            None => query.fetch_optional(&self.pool).await?,
        };
        row.map(|row| user_of(&row)).transpose()
    }

    /// Inserts an order; its id.
    pub async fn add_order(&self, user_id: i64, amount_cents: i64) -> Result<i64, DbError> {
        self.count();
        let query =
            sqlx::query("INSERT INTO orders (user_id, amount_cents) VALUES ($1, $2) RETURNING id")
                .bind(user_id)
                .bind(amount_cents);
        let row = match &self.writer {
            Some(writer) => query.fetch_one(&mut *writer.lock().await).await?,
            None => query.fetch_one(&self.pool).await?,
        };
        Ok(row.try_get(0)?)
    }
}

fn user_of(row: &sqlx::any::AnyRow) -> Result<User, DbError> {
    Ok(User {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        email: row.try_get(2)?,
        country: row.try_get(3)?,
    })
}

/// One step of SplitMix64: a fast, well-spread 64-bit sequence.
pub fn splitmix(state: u64) -> u64 {
    let mut z = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
