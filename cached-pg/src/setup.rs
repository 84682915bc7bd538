//! What must exist in Postgres before changes can stream: the mapped
//! tables with their columns, a publication of them, a logical replication
//! slot; and whether changes may have been missed, so that everything the
//! mapping covers must be invalidated (a *reset*).
//!
//! A reset owed is remembered in Postgres itself until it is done: by a
//! physical replication slot `<slot>_reset` that reserves no WAL (so it
//! holds no disk), created before whatever makes the reset necessary and
//! dropped once the invalidations are done. A listener that dies between
//! the two finds it at its next start and resets then.

use pg_walstream::{quote_ident, quote_literal, PgReplicationConnection, PgResult};

use crate::error::Error;
use crate::mapping::Plan;

/// The names the listener uses in Postgres.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    pub(crate) slot: String,
    pub(crate) publication: String,
    pub(crate) marker: String,
}

impl Names {
    /// Checks `slot` (Postgres allows lower-case letters, digits and `_`,
    /// at most 63 bytes; the marker's suffix needs 6) and `publication`.
    pub(crate) fn new(slot: &str, publication: &str) -> Result<Names, Error> {
        let valid = !slot.is_empty()
            && slot.len() <= 57
            && slot
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(Error::Config(format!(
                "slot name {slot:?}: use 1 to 57 lower-case letters, digits and `_`"
            )));
        }
        if slot.ends_with("_reset") {
            // Another listener's reset marker would be this name.
            return Err(Error::Config(format!(
                "slot name {slot:?}: a name ending in `_reset` is kept for reset markers"
            )));
        }
        if publication.is_empty() || publication.len() > 63 {
            return Err(Error::Config(format!(
                "publication name {publication:?}: use 1 to 63 bytes"
            )));
        }
        Ok(Names {
            slot: slot.to_owned(),
            publication: publication.to_owned(),
            marker: format!("{slot}_reset"),
        })
    }
}

/// A connection string with `replication=database`, which both the
/// stream and the set-up (plain SQL works on it too) need.
pub(crate) fn replication_conninfo(url: &str) -> String {
    if url.contains("replication=") {
        return url.to_owned();
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}replication=database")
    } else {
        format!("{url} replication=database")
    }
}

/// Runs `sql`.
async fn run(conn: &mut PgReplicationConnection, sql: &str) -> Result<PgResult, Error> {
    conn.exec_async(sql).await.map_err(Error::from)
}

/// The first column of every row of `sql`'s result.
async fn column(
    conn: &mut PgReplicationConnection,
    sql: &str,
) -> Result<Vec<Option<String>>, Error> {
    let result = run(conn, sql).await?;
    Ok((0..result.ntuples())
        .map(|row| result.get_value(row, 0))
        .collect())
}

fn literal(text: &str) -> Result<String, Error> {
    quote_literal(text).map_err(Error::from)
}

fn ident(text: &str) -> Result<String, Error> {
    quote_ident(text).map_err(Error::from)
}

/// The state of the replication slot.
#[derive(Debug, PartialEq, Eq)]
enum Slot {
    Missing,
    /// Invalidated by Postgres (`max_slot_wal_keep_size`, on 17 and later
    /// `idle_replication_slot_timeout` too): the changes it held are gone.
    Lost,
    Ready,
}

/// Sets up the publication and the slot; whether a reset is owed (the
/// marker is then in place).
pub(crate) async fn prepare(
    conn: &mut PgReplicationConnection,
    names: &Names,
    plan: &Plan,
) -> Result<bool, Error> {
    check_columns(conn, plan).await?;
    warn_if_unbounded(conn).await;
    let marker = marker_exists(conn, &names.marker).await?;
    let publication = publication_state(conn, names, plan).await?;
    let slot = slot_state(conn, names).await?;
    let reset = marker || publication != Publication::Complete || slot != Slot::Ready;
    if !reset {
        return Ok(false);
    }
    if !marker {
        // Before anything that makes the reset necessary.
        run(
            conn,
            &format!(
                "SELECT pg_catalog.pg_create_physical_replication_slot({})",
                literal(&names.marker)?
            ),
        )
        .await?;
    }
    let mut drop_slot = slot == Slot::Lost;
    match publication {
        Publication::Missing => {
            let tables: Vec<(String, String)> =
                plan.tables().map(|(name, _)| name.clone()).collect();
            run(
                conn,
                &format!(
                    "CREATE PUBLICATION {} FOR TABLE {}",
                    ident(&names.publication)?,
                    table_list(&tables)?
                ),
            )
            .await?;
            // Decoding WAL older than a publication fails on it: the slot
            // must start after it.
            drop_slot |= slot == Slot::Ready;
            tracing::info!(target: "redis_cached_pg", publication = %names.publication, "publication created");
        }
        Publication::Lacks(tables) => {
            run(
                conn,
                &format!(
                    "ALTER PUBLICATION {} ADD TABLE {}",
                    ident(&names.publication)?,
                    table_list(&tables)?
                ),
            )
            .await?;
            tracing::warn!(target: "redis_cached_pg", publication = %names.publication, tables = ?tables, "tables added to the publication: their earlier changes were not streamed, everything is invalidated");
        }
        Publication::Complete => {}
    }
    if drop_slot {
        run(
            conn,
            &format!(
                "SELECT pg_catalog.pg_drop_replication_slot({})",
                literal(&names.slot)?
            ),
        )
        .await?;
    }
    if drop_slot || slot == Slot::Missing {
        run(
            conn,
            &format!(
                "SELECT pg_catalog.pg_create_logical_replication_slot({}, 'pgoutput')",
                literal(&names.slot)?
            ),
        )
        .await?;
        let why = match slot {
            Slot::Lost => {
                "the replication slot was invalidated by Postgres (max_slot_wal_keep_size, \
                 idle_replication_slot_timeout)"
            }
            Slot::Missing => "the replication slot did not exist",
            Slot::Ready => "the replication slot predated the publication",
        };
        tracing::warn!(target: "redis_cached_pg", slot = %names.slot, "{why}: created it; everything the mapping covers is invalidated");
    }
    Ok(true)
}

/// The reset is done: the marker goes.
pub(crate) async fn reset_done(
    conn: &mut PgReplicationConnection,
    names: &Names,
) -> Result<(), Error> {
    run(
        conn,
        &format!(
            "SELECT pg_catalog.pg_drop_replication_slot(slot_name) FROM pg_catalog.pg_replication_slots \
             WHERE slot_name = {} AND slot_type = 'physical'",
            literal(&names.marker)?
        ),
    )
    .await?;
    Ok(())
}

/// `"s"."t", …`
fn table_list(tables: &[(String, String)]) -> Result<String, Error> {
    let mut list = Vec::new();
    for (schema, name) in tables {
        list.push(format!("{}.{}", ident(schema)?, ident(name)?));
    }
    Ok(list.join(", "))
}

/// Every mapped table exists and has the columns its templates name.
async fn check_columns(conn: &mut PgReplicationConnection, plan: &Plan) -> Result<(), Error> {
    for ((schema, name), table) in plan.tables() {
        let columns = column(
            conn,
            &format!(
                "SELECT a.attname FROM pg_catalog.pg_attribute a \
                 JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = {} AND c.relname = {} AND a.attnum > 0 AND NOT a.attisdropped",
                literal(schema)?,
                literal(name)?
            ),
        )
        .await?;
        if columns.is_empty() {
            return Err(Error::Mapping(format!(
                "table {schema}.{name} does not exist"
            )));
        }
        let mut missing: Vec<&str> = table
            .columns()
            .into_iter()
            .filter(|c| !columns.iter().any(|have| have.as_deref() == Some(*c)))
            .collect();
        missing.sort_unstable();
        if !missing.is_empty() {
            return Err(Error::Mapping(format!(
                "table {schema}.{name} has no column {}",
                missing.join(", ")
            )));
        }
    }
    Ok(())
}

/// A slot left behind holds WAL until it is dropped or invalidated:
/// without `max_slot_wal_keep_size`, until the disk is full.
async fn warn_if_unbounded(conn: &mut PgReplicationConnection) {
    if let Ok(value) = column(conn, "SHOW max_slot_wal_keep_size").await {
        if value.first().and_then(|v| v.as_deref()) == Some("-1") {
            tracing::warn!(
                target: "redis_cached_pg",
                "max_slot_wal_keep_size is unlimited: the replication slot of a listener that is stopped \
                 and never dropped keeps WAL until the disk is full; set it, or drop the slot \
                 (redis_cached_pg::drop_slot) when a listener is retired"
            );
        }
    }
}

/// Whether the reset marker `marker` (a physical slot) is in place.
async fn marker_exists(conn: &mut PgReplicationConnection, marker: &str) -> Result<bool, Error> {
    let rows = column(
        conn,
        &format!(
            "SELECT 1 FROM pg_catalog.pg_replication_slots \
             WHERE slot_name = {} AND slot_type = 'physical'",
            literal(marker)?
        ),
    )
    .await?;
    Ok(!rows.is_empty())
}

async fn slot_state(conn: &mut PgReplicationConnection, names: &Names) -> Result<Slot, Error> {
    let result = run(
        conn,
        &format!(
            // `invalidation_reason` (Postgres 17 and later: `wal_removed`,
            // `idle_timeout`, `wal_level_insufficient`, …) read through
            // the row as JSON, so that older versions, which lack the
            // column, read it as NULL.
            "SELECT slot_type, plugin, database = pg_catalog.current_database(), wal_status, \
             pg_catalog.to_jsonb(s) ->> 'invalidation_reason' \
             FROM pg_catalog.pg_replication_slots s WHERE slot_name = {}",
            literal(&names.slot)?
        ),
    )
    .await?;
    if result.ntuples() == 0 {
        return Ok(Slot::Missing);
    }
    let get = |col| result.get_value(0, col);
    let ours = get(0).as_deref() == Some("logical")
        && get(1).as_deref() == Some("pgoutput")
        && get(2).as_deref() == Some("t");
    if !ours {
        return Err(Error::Config(format!(
            "replication slot {} is not a pgoutput slot of this database",
            names.slot
        )));
    }
    // A slot Postgres invalidated cannot stream again: as good as lost.
    Ok(if get(3).as_deref() == Some("lost") || get(4).is_some() {
        Slot::Lost
    } else {
        Slot::Ready
    })
}

/// The state of the publication.
#[derive(Debug, PartialEq, Eq)]
enum Publication {
    Missing,
    /// It lacks these mapped tables.
    Lacks(Vec<(String, String)>),
    Complete,
}

/// Whether the publication publishes every change of the mapped tables;
/// an error if it exists but leaves out some changes of a table it has.
async fn publication_state(
    conn: &mut PgReplicationConnection,
    names: &Names,
    plan: &Plan,
) -> Result<Publication, Error> {
    let publication = literal(&names.publication)?;
    let actions = run(
        conn,
        &format!(
            "SELECT pubinsert AND pubupdate AND pubdelete AND pubtruncate \
             FROM pg_catalog.pg_publication WHERE pubname = {publication}"
        ),
    )
    .await?;
    if actions.ntuples() == 0 {
        return Ok(Publication::Missing);
    }
    if actions.get_value(0, 0).as_deref() != Some("t") {
        return Err(Error::Config(format!(
            "publication {} does not publish every insert, update, delete and truncate",
            names.publication
        )));
    }
    let published = run(
        conn,
        &format!(
            "SELECT schemaname, tablename, rowfilter IS NOT NULL, attnames::text[] \
             FROM pg_catalog.pg_publication_tables WHERE pubname = {publication}"
        ),
    )
    .await?;
    let mut lacks = Vec::new();
    for ((schema, name), table) in plan.tables() {
        let row = (0..published.ntuples()).find(|&row| {
            published.get_value(row, 0).as_deref() == Some(schema.as_str())
                && published.get_value(row, 1).as_deref() == Some(name.as_str())
        });
        let Some(row) = row else {
            lacks.push((schema.clone(), name.clone()));
            continue;
        };
        if published.get_value(row, 2).as_deref() == Some("t") {
            return Err(Error::Config(format!(
                "publication {} filters the rows of {schema}.{name}: changes to the others would be missed",
                names.publication
            )));
        }
        let attnames = published.get_value(row, 3).unwrap_or_default();
        let listed = |column: &str| {
            attnames
                .trim_matches(|c| c == '{' || c == '}')
                .split(',')
                .any(|a| a.trim_matches('"') == column)
        };
        if let Some(column) = table.columns().into_iter().find(|c| !listed(c)) {
            return Err(Error::Config(format!(
                "publication {} leaves out column {column} of {schema}.{name}",
                names.publication
            )));
        }
    }
    Ok(if lacks.is_empty() {
        Publication::Complete
    } else {
        Publication::Lacks(lacks)
    })
}

/// Drops the replication slot `slot` (and a reset marker of it) through a
/// connection to `url`: for a listener that is retired for good, whose
/// slot would otherwise keep WAL (see the crate's guide on disk use).
///
/// # Errors
/// When Postgres cannot be reached or refuses (the slot is in use by a
/// running listener, or the user lacks the `REPLICATION` attribute).
pub async fn drop_slot(url: &str, slot: &str) -> Result<(), Error> {
    let names = Names::new(slot, "unused")?;
    let mut conn = PgReplicationConnection::connect_async(&replication_conninfo(url)).await?;
    for (name, kind) in [(&names.slot, "logical"), (&names.marker, "physical")] {
        run(
            &mut conn,
            &format!(
                "SELECT pg_catalog.pg_drop_replication_slot(slot_name) \
                 FROM pg_catalog.pg_replication_slots WHERE slot_name = {} AND slot_type = '{kind}'",
                literal(name)?
            ),
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_is_asked_for_in_both_forms() {
        assert_eq!(
            replication_conninfo("postgres://u@h/db"),
            "postgres://u@h/db?replication=database"
        );
        assert_eq!(
            replication_conninfo("postgresql://u@h/db?sslmode=disable"),
            "postgresql://u@h/db?sslmode=disable&replication=database"
        );
        assert_eq!(
            replication_conninfo("host=/tmp dbname=x"),
            "host=/tmp dbname=x replication=database"
        );
        assert_eq!(
            replication_conninfo("host=/tmp replication=database"),
            "host=/tmp replication=database"
        );
    }

    #[test]
    fn slot_names_are_checked() {
        assert!(Names::new("redis_cached", "p").is_ok());
        assert_eq!(Names::new("a1", "p").unwrap().marker, "a1_reset");
        for bad in ["", "Upper", "with-dash", &"x".repeat(58), "orders_reset"] {
            assert!(Names::new(bad, "p").is_err(), "{bad:?}");
        }
        assert!(Names::new("s", "").is_err());
    }
}
