//! From changes to invalidations: each change of a mapped table becomes
//! the keys and tags its rows render; they are invalidated in bounded
//! batches, and a transaction's position is confirmed to Postgres only
//! once every invalidation it needs is done.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use futures_util::stream::{self, StreamExt};
use pg_walstream::{ChangeEvent, EventType, ReplicaIdentity, RowData, SharedLsnFeedback};
use redis_cached::Cache;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::error::Error;
use crate::mapping::{Columns, Plan, Row, TablePlan, Targets};
use crate::stats::{add, Meter};
use crate::Shutdown;

/// How long a committed transaction may wait for more changes to share
/// its batch, while more are coming.
const MAX_DELAY: Duration = Duration::from_millis(5);
/// The first pause before failed invalidations are tried again; it
/// doubles up to [`MAX_RETRY_PAUSE`].
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(50);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(5);

/// How invalidations are sent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Keys and tags gathered before a batch is sent.
    pub(crate) batch: usize,
    /// Invalidations of one batch in flight at once.
    pub(crate) in_flight: usize,
}

/// How far the applier has got, for the reader's feedback to Postgres.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// How many of the events handed over are settled: applied, and their
    /// invalidations done.
    pub(crate) settled: AtomicU64,
}

/// One stream's applier: the tables' columns as the stream described
/// them, and the invalidations not yet sent.
pub(crate) struct Applier<'a> {
    pub(crate) plan: &'a Plan,
    pub(crate) cache: &'a Cache,
    pub(crate) meter: &'a Meter,
    pub(crate) limits: Limits,
    relations: HashMap<u32, Columns>,
    pending: Targets,
    /// The end of the last transaction whose changes are in `pending`.
    ack: Option<u64>,
    /// Transactions whose changes are in `pending`, and when the last of
    /// them committed.
    commits: u64,
    last_commit: Option<SystemTime>,
    /// When the first of them arrived.
    first_commit_seen: Option<Instant>,
    /// When the transaction begun and not yet committed committed (its
    /// `Begin` carries that time): still waiting after a flush.
    open: Option<SystemTime>,
}

impl<'a> Applier<'a> {
    pub(crate) fn new(plan: &'a Plan, cache: &'a Cache, meter: &'a Meter, limits: Limits) -> Self {
        Applier {
            plan,
            cache,
            meter,
            limits,
            relations: HashMap::new(),
            pending: Targets::default(),
            ack: None,
            commits: 0,
            last_commit: None,
            first_commit_seen: None,
            open: None,
        }
    }

    /// Applies the events until the reader is done (or `shutdown`), then
    /// sends what is left.
    pub(crate) async fn run(
        &mut self,
        mut events: mpsc::Receiver<ChangeEvent>,
        progress: &Progress,
        feedback: &SharedLsnFeedback,
        shutdown: &Shutdown,
    ) -> Result<(), Error> {
        let mut applied = 0u64;
        loop {
            let deadline = self.first_commit_seen.map(|at| at + MAX_DELAY);
            let next = match deadline {
                Some(deadline) => match tokio::time::timeout_at(deadline, events.recv()).await {
                    Ok(next) => next,
                    Err(_) => {
                        self.flush(feedback, shutdown).await?;
                        progress.settled.store(applied, Ordering::Release);
                        continue;
                    }
                },
                None => events.recv().await,
            };
            let Some(event) = next else { break };
            applied += 1;
            self.apply(event);
            let full = self.pending.len() >= self.limits.batch;
            if full || (self.ack.is_some() && events.is_empty()) {
                self.flush(feedback, shutdown).await?;
            }
            if self.pending.is_empty() && self.ack.is_none() {
                progress.settled.store(applied, Ordering::Release);
            }
        }
        self.flush(feedback, shutdown).await?;
        progress.settled.store(applied, Ordering::Release);
        Ok(())
    }

    /// Adds what `event` invalidates.
    pub(crate) fn apply(&mut self, event: ChangeEvent) {
        match event.event_type {
            EventType::Relation {
                relation_id,
                namespace,
                relation_name,
                replica_identity,
                columns,
            } => {
                if let Some(plan) = self.plan.table(&namespace, &relation_name) {
                    let described = Columns::new(&columns);
                    check_relation(
                        plan,
                        &described,
                        replica_identity,
                        &namespace,
                        &relation_name,
                    );
                    self.relations.insert(relation_id, described);
                }
            }
            EventType::Insert {
                schema,
                table,
                relation_oid,
                data,
            } => self.row_changed(&schema, &table, relation_oid, None, Some(&data)),
            EventType::Update {
                schema,
                table,
                relation_oid,
                old_data,
                new_data,
                ..
            } => self.row_changed(
                &schema,
                &table,
                relation_oid,
                Some(old_data.as_ref()),
                Some(&new_data),
            ),
            EventType::Delete {
                schema,
                table,
                relation_oid,
                old_data,
                ..
            } => self.row_changed(&schema, &table, relation_oid, Some(Some(&old_data)), None),
            EventType::Truncate { tables, .. } => {
                for truncated in &tables {
                    // Named `schema.table`, which a dot inside either name
                    // makes ambiguous: every mapped table so named is
                    // invalidated (more than needed, never less).
                    let plans = self
                        .plan
                        .tables()
                        .filter(|((schema, name), _)| format!("{schema}.{name}") == **truncated);
                    for (_, plan) in plans {
                        add(&self.meter.truncates, 1);
                        plan.whole(&mut self.pending);
                    }
                }
            }
            EventType::Begin {
                commit_timestamp, ..
            } => {
                let at = SystemTime::from(commit_timestamp);
                self.open = Some(at);
                self.meter.pending_since(at);
            }
            EventType::Commit {
                end_lsn,
                commit_timestamp,
                ..
            } => {
                self.ack = Some(end_lsn.value());
                self.open = None;
                self.commits += 1;
                self.last_commit = Some(SystemTime::from(commit_timestamp));
                self.first_commit_seen.get_or_insert_with(Instant::now);
            }
            // Streaming of transactions in progress is off; the rest
            // (types, origins, messages) names no row.
            _ => {}
        }
    }

    /// Adds what a row change invalidates. `old` is `None` for an
    /// insert, `Some(None)` for an update whose old row Postgres did not
    /// send (its replica identity did not change); `new` is `None` for a
    /// delete.
    fn row_changed(
        &mut self,
        schema: &str,
        table: &str,
        relation: u32,
        old: Option<Option<&RowData>>,
        new: Option<&RowData>,
    ) {
        let Some(plan) = self.plan.table(schema, table) else {
            return;
        };
        add(&self.meter.rows, 1);
        let Some(columns) = self.relations.get(&relation) else {
            // Postgres describes a table before its first change; this
            // cannot happen, and costs only a table-wide invalidation.
            self.fallback(plan);
            return;
        };
        let mut complete = true;
        if let Some(new) = new {
            let row = Row {
                columns,
                first: Some(new),
                then: old.flatten(),
                key_from_then: false,
            };
            complete &= plan.row(&row, &mut self.pending);
        }
        match old {
            Some(Some(old)) => {
                let row = Row {
                    columns,
                    first: Some(old),
                    then: None,
                    key_from_then: false,
                };
                complete &= plan.row(&row, &mut self.pending);
            }
            Some(None) => {
                let row = Row {
                    columns,
                    first: None,
                    then: new,
                    key_from_then: true,
                };
                complete &= plan.row(&row, &mut self.pending);
            }
            None => {}
        }
        if !complete {
            self.fallback(plan);
        }
    }

    /// Not every entry of the change could be named: the table tag
    /// reaches them all.
    fn fallback(&mut self, plan: &TablePlan) {
        add(&self.meter.fallbacks, 1);
        self.pending.tags.insert(plan.all.clone());
    }

    /// Sends the pending invalidations (again and again while they fail),
    /// then confirms the last transaction whose changes they were.
    async fn flush(
        &mut self,
        feedback: &SharedLsnFeedback,
        shutdown: &Shutdown,
    ) -> Result<(), Error> {
        let targets = std::mem::take(&mut self.pending);
        if !targets.is_empty() {
            self.meter.batch(targets.len());
            invalidate(self.cache, targets, self.limits, self.meter, shutdown).await?;
        }
        if let Some(lsn) = self.ack.take() {
            feedback.update_applied_lsn(lsn);
            self.meter.confirmed_lsn.fetch_max(lsn, Ordering::Relaxed);
        }
        add(&self.meter.transactions, std::mem::take(&mut self.commits));
        // A transaction still open (its `Begin` applied after the last
        // `Commit` sent, or a batch cut in its middle) keeps the lag going.
        self.meter.caught_up(self.last_commit.take(), self.open);
        self.first_commit_seen = None;
        Ok(())
    }
}

/// Warns about a mapped table whose changes cannot all be followed.
fn check_relation(
    plan: &TablePlan,
    columns: &Columns,
    identity: ReplicaIdentity,
    schema: &str,
    table: &str,
) {
    let missing = columns.missing(plan);
    if !missing.is_empty() {
        tracing::error!(
            target: "redis_cached_pg",
            table = %format!("{schema}.{table}"),
            missing = ?missing,
            "a mapped table lost columns its templates name: each of its changes invalidates its table tag"
        );
    }
    let partial = plan.columns().into_iter().any(|c| !columns.is_key(c));
    if identity != ReplicaIdentity::Full && partial {
        tracing::warn!(
            target: "redis_cached_pg",
            table = %format!("{schema}.{table}"),
            "templates name columns outside the replica identity: an update or delete of the table \
             invalidates its table tag (ALTER TABLE … REPLICA IDENTITY FULL avoids it)"
        );
    }
}

/// The keys of one pipeline: as many as `Cache::invalidate_many` sends
/// in one.
const KEYS_AT_ONCE: usize = 512;

/// One unit of invalidation: a pipeline of keys, or one tag.
enum Target {
    Keys(Vec<String>),
    Tag(String),
}

/// Invalidates every key and tag of `targets`, at most `in_flight`
/// pipelines of keys and tags at once, trying the failed ones again
/// (pausing longer each time) until all are done or `shutdown`.
pub(crate) async fn invalidate(
    cache: &Cache,
    targets: Targets,
    limits: Limits,
    meter: &Meter,
    shutdown: &Shutdown,
) -> Result<(), Error> {
    let keys: Vec<String> = targets.keys.into_iter().collect();
    let mut left: Vec<Target> = keys
        .chunks(KEYS_AT_ONCE)
        .map(|chunk| Target::Keys(chunk.to_vec()))
        .chain(targets.tags.into_iter().map(Target::Tag))
        .collect();
    let mut pause = FIRST_RETRY_PAUSE;
    loop {
        let results: Vec<(Target, bool)> = stream::iter(left)
            .map(|target| async move {
                let done = match &target {
                    Target::Keys(keys) => settle(
                        cache
                            .invalidate_many(keys)
                            .await
                            .map(|()| keys.len() as u64),
                        &meter.keys,
                    ),
                    Target::Tag(tag) => {
                        settle(cache.invalidate_tag(tag).await.map(|_| 1), &meter.tags)
                    }
                };
                (target, done)
            })
            .buffer_unordered(limits.in_flight.max(1))
            .collect()
            .await;
        left = results
            .into_iter()
            .filter_map(|(target, done)| (!done).then_some(target))
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        add(&meter.failed_invalidations, left.len() as u64);
        tracing::warn!(
            target: "redis_cached_pg",
            failed = left.len(),
            retry_in_ms = pause.as_millis() as u64,
            "invalidations failed; trying again (the position is not confirmed meanwhile)"
        );
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = shutdown.cancelled() => return Err(Error::Stopped),
        }
        pause = (pause * 2).min(MAX_RETRY_PAUSE);
    }
}

/// Whether an invalidation of `n` keys or tags is done (counted in
/// `counter`), or must be tried again.
fn settle(result: redis_cached::Result<u64>, counter: &AtomicU64) -> bool {
    match result {
        Ok(n) => {
            add(counter, n);
            true
        }
        // Templates never render the reserved byte: trying again would
        // not help, and would hold up every later change.
        Err(err @ redis_cached::Error::InvalidKey(_)) => {
            tracing::error!(target: "redis_cached_pg", error = %err, "an invalidation the cache refuses was skipped");
            true
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::{Mapping, Table};
    use pg_walstream::Lsn;

    fn event(event_type: EventType) -> ChangeEvent {
        ChangeEvent {
            event_type,
            lsn: Lsn::new(1),
            metadata: None,
            xid: None,
        }
    }

    /// A commit time `seconds_ago`, as Postgres sends it.
    fn at<T: From<SystemTime>>(seconds_ago: u64) -> T {
        T::from(SystemTime::now() - Duration::from_secs(seconds_ago))
    }

    /// A flush that confirms one transaction while the next has begun
    /// leaves the lag counting from that next one: its invalidations may
    /// still fail, and the lag is what says so.
    #[tokio::test]
    async fn a_transaction_still_open_after_a_flush_keeps_the_lag() {
        let plan = Mapping::new()
            .table(Table::new("users", "users"))
            .compile()
            .expect("a valid mapping");
        let cache = Cache::in_memory();
        let meter = Meter::new();
        let limits = Limits {
            batch: 16,
            in_flight: 1,
        };
        let mut applier = Applier::new(&plan, &cache, &meter, limits);
        let (feedback, shutdown) = (SharedLsnFeedback::new(), Shutdown::new());
        applier.apply(event(EventType::Begin {
            transaction_id: 1,
            final_lsn: Lsn::new(10),
            commit_timestamp: at(30),
        }));
        applier.apply(event(EventType::Commit {
            commit_timestamp: at(30),
            commit_lsn: Lsn::new(10),
            end_lsn: Lsn::new(11),
        }));
        applier.apply(event(EventType::Begin {
            transaction_id: 2,
            final_lsn: Lsn::new(20),
            commit_timestamp: at(20),
        }));
        applier.flush(&feedback, &shutdown).await.expect("flushed");
        assert_eq!(feedback.get_applied_lsn(), 11, "the first is confirmed");
        let lag = meter.snapshot().lag;
        assert!(lag >= Duration::from_secs(19), "lag {lag:?}");
        applier.apply(event(EventType::Commit {
            commit_timestamp: at(20),
            commit_lsn: Lsn::new(20),
            end_lsn: Lsn::new(21),
        }));
        applier.flush(&feedback, &shutdown).await.expect("flushed");
        assert_eq!(meter.snapshot().lag, Duration::ZERO);
    }
}
