//! The repository: database reads and writes, cached with `redis-cached`.

use redis_cached::{cache_evict, cache_put, redis_cached, Cache};

use crate::db::{Db, DbError, OrderSummary, User};

/// Database access for the service, each read cached, each write keeping
/// the cache right.
#[derive(Clone)]
pub struct Repo {
    /// Where the rows are.
    pub db: Db,
    /// Where the functions below keep their results.
    pub cache: Cache,
}

impl Repo {
    /// One user; a missing user is cached as absent too. `lock`: when a
    /// hot user expires, one caller in all processes reads the row. The
    /// tag `users` is on every entry made from `users` rows, for a
    /// listener on the database (`crate::outside`).
    #[redis_cached(
        key = "user:<id>",
        ttl = "60s",
        cache_none = "60s",
        lock = true,
        tags = ["users"],
        cache = self.cache
    )]
    pub async fn user(&self, id: i64) -> Result<Option<User>, DbError> {
        self.db.user(id).await
    }

    /// One user's order count and total: the slow aggregate. Once 60 s
    /// old it is served for up to 5 minutes more while one caller
    /// refreshes it in the background.
    #[redis_cached(
        key = "orders:<user_id>",
        ttl = "60s",
        stale = "5m",
        lock = true,
        tags = ["orders-of:<user_id>", "orders"],
        cache = self.cache
    )]
    pub async fn order_summary(&self, user_id: i64) -> Result<OrderSummary, DbError> {
        self.db.order_summary(user_id).await
    }

    /// Renames a user and writes the new row to the cache (write-through),
    /// under the tags of [`Repo::user`]: an entry made here is one that
    /// invalidating a tag must reach too.
    #[cache_put(
        key = "user:<id>",
        ttl = "60s",
        cache_none = "60s",
        tags = ["users"],
        cache = self.cache
    )]
    pub async fn rename_user(&self, id: i64, name: String) -> Result<Option<User>, DbError> {
        self.db.rename_user(id, &name).await
    }

    /// Adds an order and invalidates everything tagged with the user's
    /// orders.
    #[cache_evict(tags = ["orders-of:<user_id>"], cache = self.cache)]
    pub async fn add_order(&self, user_id: i64, amount_cents: i64) -> Result<i64, DbError> {
        self.db.add_order(user_id, amount_cents).await
    }
}
