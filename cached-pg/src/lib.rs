//! Invalidation from Postgres itself, for `redis-cached`.
//!
//! Cache-aside is only as fresh as the writes that go through the
//! application: a row changed by another service, a migration, a batch job
//! or someone in `psql` stays stale in the cache until its TTL. A
//! [`Listener`] closes that gap. It follows the database's own change
//! stream (logical replication: a publication and a replication slot),
//! maps each changed row, through the same key and tag templates as the
//! attribute, to the cache entries made from it, and invalidates them,
//! whoever made the change.
//!
//! ```no_run
//! use redis_cached::{redis_cached, Cache};
//! use redis_cached_pg::{Listener, Mapping, Table};
//! # #[derive(serde::Serialize, serde::Deserialize)] struct User;
//! # struct Repo { cache: Cache }
//!
//! impl Repo {
//!     #[redis_cached(key = "user:<id>", tags = ["users"], cache = self.cache)]
//!     async fn user(&self, id: i64) -> Option<User> {
//!         // SELECT … FROM users WHERE id = $1
//! #       None
//!     }
//!
//!     #[redis_cached(key = "team-members:<team_id>", tags = ["team:<team_id>", "users"], cache = self.cache)]
//!     async fn team_members(&self, team_id: i64) -> Vec<User> {
//!         // SELECT … FROM users WHERE team_id = $1
//! #       Vec::new()
//!     }
//! }
//!
//! # async fn start(cache: Cache) -> Result<(), redis_cached_pg::Error> {
//! // The same templates, filled from the row's columns.
//! let mapping = Mapping::new().table(
//!     Table::new("users", "users")
//!         .key("user:<id>")
//!         .tag("team:<team_id>"),
//! );
//! let listener = Listener::builder("postgres://cache@db/app", cache, mapping)
//!     .start()
//!     .await?;
//! // An UPDATE of user 7 from anywhere now invalidates `user:7`, and the
//! // tags `team:<old team>` and `team:<new team>`.
//! # listener.stop().await;
//! # Ok(())
//! # }
//! ```
//!
//! This crate is not part of `redis-cached`'s build: add
//! `redis-cached-pg` beside it. It needs Postgres 14 or later, and libpq
//! to build (Debian's `libpq-dev`).
//!
//! # The mapping
//!
//! A [`Table`] lists the key templates ([`Table::key`],
//! [`Table::versioned_key`]) and tag templates ([`Table::tag`]) its rows
//! fill, written exactly as in the attribute, with the table's column
//! names as placeholders. They are rendered by `redis_cached::tag`, the
//! function that renders the attribute's templates, so the two cannot
//! disagree. A column's value stands for the argument the cached function
//! takes: `smallint`, `integer`, `bigint` and `oid` as integers, `boolean`
//! as `bool`, `real` and `double precision` as `f32`/`f64`, `NULL` as
//! `None` (an `Option` argument), and every other type as its Postgres text
//! (`text`, `varchar`, `uuid` in its usual form, `numeric` as written; a
//! `char(n)` keeps its padding).
//!
//! Each table also names its *table tag*: the one tag that reaches every
//! entry made from its rows, listed in the `tags` of every cached function
//! that reads the table. A `TRUNCATE` invalidates it (and the templates
//! without placeholders); so does everything below that cannot name rows.
//!
//! # What it guarantees
//!
//! - **Committed changes, in commit order, each once at least.** An
//!   `INSERT`, `UPDATE` or `DELETE` invalidates the keys and tags its row
//!   renders; an `UPDATE` those of the old row and of the new one, so that
//!   a row moved from one tag to another invalidates both. A
//!   transaction's position is confirmed to Postgres only once all its
//!   invalidations are done. The keys and tags of one batch (of one or
//!   several transactions) go out as several invalidations at once, so a
//!   reader may see one of them land a moment before another; all land
//!   within the bound below.
//! - **A bound from `COMMIT` to invalidation.** Measured on one machine
//!   (loopback, two cores shared with other work, Postgres with `fsync`
//!   on), from sending a single-row `UPDATE` to its tombstone landing in
//!   Redis, over 1,000 updates: p50 0.8 to 0.9 ms, p99 5 to 6.5 ms, max 8
//!   to 32 ms in three runs (`cargo bench -p redis-cached-pg`). A
//!   computation that read the row before the change and stores after the
//!   invalidation is refused (the cache's no-stale-set rule), so a read is
//!   stale by at most that bound while the listener streams. One
//!   exception: a `#[cache_put]` (write-through) stores its value over
//!   whatever the key holds, tombstones included. If another writer
//!   commits a change to the same row between the put's own `COMMIT` and
//!   its store, the listener's invalidation can land first and the put's
//!   older row then stays until its TTL. Where outside writers change the
//!   rows that a `#[cache_put]` writes, prefer `#[cache_evict]` there (an
//!   eviction stores nothing) or give those entries a short TTL.
//! - **Nothing is missed across a disconnect or a restart.** The slot
//!   keeps every change not yet confirmed; a new connection, or a listener
//!   started again, resumes from it, and invalidates again what it had
//!   not confirmed (harmless). While the stream is down, the cache serves
//!   what it holds as before: [`ListenerStats::cut_off`] says for how
//!   long, and a warning is logged at each attempt to reconnect. When
//!   Redis fails, invalidations are tried again and the position of a
//!   transaction is not confirmed until all of its invalidations landed
//!   ([`ListenerStats::lag`] grows), so that a listener that dies
//!   meanwhile leaves them to the next one.
//! - **When it cannot know what it missed, it invalidates everything the
//!   mapping covers** (every table tag): when it creates its slot (the
//!   first start included), when the slot was dropped or invalidated by
//!   Postgres (`max_slot_wal_keep_size`), when a mapped table was added to
//!   the publication. Until those invalidations are done, a physical slot
//!   `<slot>_reset` that reserves no WAL marks them as owed, so a listener
//!   that dies meanwhile does them at its next start.
//! - **Bounded batches.** Whatever the size of a transaction (an `UPDATE`
//!   of a million rows), at most [`ListenerBuilder::batch`] keys and tags
//!   are gathered before they are sent, keys in pipelines of at most 512
//!   ([`Cache::invalidate_many`](redis_cached::Cache::invalidate_many)),
//!   tags each through
//!   [`Cache::invalidate_tag`](redis_cached::Cache::invalidate_tag) (itself
//!   in rounds of 500 keys), at most [`ListenerBuilder::in_flight`] at
//!   once. Throughput measured as above: 155,000 to 170,000 rows/s for
//!   one 200,000-row `UPDATE`, 137,000 to 154,000 rows/s for a backlog of
//!   200 transactions of 1,000 rows.
//!
//! # Old rows: the replica identity
//!
//! For an `UPDATE` or a `DELETE`, Postgres sends the old row's columns only
//! as far as the table's *replica identity* holds them: by default the
//! primary key's, and for an `UPDATE` only when the key changed. A
//! template on other columns (`team:<team_id>`) cannot be rendered for the
//! old row then, and the listener invalidates the table tag instead
//! (counted in [`ListenerStats::fallbacks`], with a warning when the table
//! is first seen): correct, but every entry of the table goes. Give such
//! tables `ALTER TABLE … REPLICA IDENTITY FULL`. A published table also
//! needs a primary key or `REPLICA IDENTITY FULL`, or Postgres refuses its
//! updates and deletes.
//!
//! # Postgres settings and rights
//!
//! - `wal_level = logical` (a restart), and a free replication slot and
//!   WAL sender per listener (`max_replication_slots`, `max_wal_senders`).
//! - The listener's user needs the `REPLICATION` attribute, and, to create
//!   the publication (named after the slot unless
//!   [`ListenerBuilder::publication`] says otherwise) or add tables to it,
//!   to own the mapped tables. A publication made beforehand must publish
//!   every insert, update, delete and truncate of the mapped tables, with
//!   no row filter, and the columns the templates name.
//!
//! # Disk: a slot left behind
//!
//! A replication slot keeps the WAL its listener has not confirmed. A
//! running listener confirms as it goes (and, when idle, up to what
//! Postgres has sent, so WAL of other tables is not held). A listener
//! that is stopped for good (or a process that died and is not started
//! again) leaves its slot holding WAL from then on: nothing in this crate
//! can drop it, since only the next start knows it was not coming back.
//! Bound it, find it, drop it:
//!
//! - **Bound it**: set `max_slot_wal_keep_size` (say `10GB`; a reload,
//!   no restart). Past it Postgres invalidates the slot instead of
//!   filling the disk, and a listener started on it again resets (below).
//!   The listener logs a warning at each start while it is unlimited. On
//!   Postgres 18, `idle_replication_slot_timeout` also invalidates a slot
//!   that no listener has used for that long.
//! - **Find it**: a slot no listener streams from is `active = false`;
//!   how much WAL it holds:
//!   `SELECT slot_name, active, wal_status,
//!   pg_size_pretty(pg_current_wal_lsn() - restart_lsn) FROM
//!   pg_replication_slots`. Alert on it (or on this crate's
//!   `redis_cached_pg_streaming` gauge, feature `metrics`, staying 0).
//! - **Drop it**: [`drop_slot`] with the listener's URL and slot name (it
//!   also drops the `<slot>_reset` marker), or
//!   `SELECT pg_drop_replication_slot('<slot>')` as a superuser. A
//!   listener started later creates a new slot and resets.
//!
//! # A slot lost
//!
//! A slot dropped by hand, or invalidated by Postgres
//! (`max_slot_wal_keep_size`, `idle_replication_slot_timeout`, a
//! `wal_level` lowered), no longer holds the changes made since its last
//! confirmed position. A listener connected to it sees its stream fail,
//! and reconnects; any listener's set-up then finds the slot missing or
//! `wal_status = lost`, creates it again (a lost one is dropped first) and,
//! before it streams, invalidates everything the mapping covers (every
//! table tag, and the templates without placeholders), counted in
//! [`ListenerStats::resets`] with a warning naming the cause. Until then
//! (while no listener runs), entries made from rows changed after the
//! last confirmed position stay as they are, at most until their TTL.
//!
//! # Metrics (feature `metrics`)
//!
//! With `redis-cached-pg = { …, features = ["metrics"] }`, each listener
//! exports through the [`metrics`](https://docs.rs/metrics) facade, to
//! the recorder the program installs, with a `slot` label, brought up to
//! date once a second (so that a listener waiting for a failing Redis
//! still shows its lag growing) and when it stops; each is described (a
//! `# HELP` line in Prometheus's text):
//!
//! | Name | Type | What |
//! |---|---|---|
//! | `redis_cached_pg_streaming` | gauge | 1 while the change stream is up, else 0 |
//! | `redis_cached_pg_cut_off_seconds` | gauge | how long the stream has been down (0 while up) |
//! | `redis_cached_pg_lag_seconds` | gauge | age (by commit time) of the oldest transaction received but not yet invalidated; 0 when caught up |
//! | `redis_cached_pg_lag_bytes` | gauge | WAL received but not yet confirmed to Postgres |
//! | `redis_cached_pg_<name>_total` | counter | `transactions`, `rows`, `keys`, `tags`, `fallbacks`, `truncates`, `resets`, `reconnects`, `failed_invalidations`, `batches`, as in [`ListenerStats`] |
//!
//! Alert on `redis_cached_pg_lag_seconds` above the staleness the
//! application accepts, and on `redis_cached_pg_streaming` at 0 for
//! longer than a restart takes.
//!
//! # One listener per slot
//!
//! Two listeners given the same slot take turns: the second retries until
//! the first stops, which makes a stand-by. Listeners of different
//! mappings need different slots.
//!
//! # How it reads the change stream
//!
//! Through [`pg_walstream`] (the `pgoutput` plugin over Postgres's
//! replication protocol), with its libpq backend: the crate is maintained,
//! parses protocol versions 1 to 4, and confirms positions only as told,
//! which is what a listener that must not lose a change needs. Its default
//! pure-Rust backend was left out for its build (aws-lc-rs: cmake and
//! minutes of C). `tokio-postgres` has no replication protocol (only a
//! fork does), and supabase's `etl` is not published as a library; polling
//! `pg_logical_slot_get_changes` over SQL would add the poll interval to
//! every invalidation. No LISTEN/NOTIFY mode is offered: triggers that
//! notify lose what happens while the listener is disconnected, which is
//! what the slot is for.

#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs)]

mod apply;
mod error;
#[cfg(feature = "metrics")]
mod exported;
mod listener;
mod mapping;
mod setup;
mod stats;
mod stream;

pub use error::Error;
pub use listener::{Listener, ListenerBuilder};
pub use mapping::{Mapping, Table};
pub use setup::drop_slot;
pub use stats::ListenerStats;

/// Ends the listener's task, and whatever waits inside it.
type Shutdown = pg_walstream::CancellationToken;
