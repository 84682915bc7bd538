//! The [`Listener`] handle and the task behind it: set up, stream, apply,
//! and start over after any failure, for as long as the handle lives.

use std::sync::Arc;
use std::time::Duration;

use pg_walstream::PgReplicationConnection;
use redis_cached::Cache;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::apply::{self, Applier, Limits, Progress};
use crate::error::Error;
use crate::mapping::{Mapping, Plan, Targets};
use crate::setup::{self, Names};
use crate::stats::{add, ListenerStats, Meter};
use crate::stream;
use crate::Shutdown;

/// Events read ahead of the applier.
const READ_AHEAD: usize = 4096;
/// The first pause before a failed stream is set up again; it doubles up
/// to [`MAX_RECONNECT_PAUSE`].
const FIRST_RECONNECT_PAUSE: Duration = Duration::from_millis(100);
const MAX_RECONNECT_PAUSE: Duration = Duration::from_secs(5);

/// Invalidates the cache entries made from every row that changes in
/// Postgres, whoever changes it: a task that follows the database's
/// logical replication and maps each changed row to its keys and tags
/// (see the [crate's guide](crate)).
///
/// The task runs until [`Listener::stop`], or until the handle is dropped
/// (which ends it at once: changes not yet confirmed are streamed again
/// at the next start).
#[derive(Debug)]
pub struct Listener {
    meter: Arc<Meter>,
    shutdown: Shutdown,
    task: Option<JoinHandle<()>>,
}

/// Settings of a [`Listener`], from [`Listener::builder`].
#[derive(Debug, Clone)]
pub struct ListenerBuilder {
    url: String,
    cache: Cache,
    mapping: Mapping,
    slot: String,
    publication: Option<String>,
    limits: Limits,
}

impl Listener {
    /// A listener on the database at `url` (a libpq connection string or
    /// URI, `postgres://user:password@host:5432/db`; the user needs the
    /// `REPLICATION` attribute, and, to create the publication, to own the
    /// mapped tables), invalidating in `cache` what `mapping` names.
    pub fn builder(url: &str, cache: Cache, mapping: Mapping) -> ListenerBuilder {
        ListenerBuilder {
            url: url.to_owned(),
            cache,
            mapping,
            slot: "redis_cached".to_owned(),
            publication: None,
            limits: Limits {
                batch: 1024,
                in_flight: 16,
            },
        }
    }

    /// A snapshot of the listener's counters, and how far behind it is.
    pub fn stats(&self) -> ListenerStats {
        self.meter.snapshot()
    }

    /// Waits until the listener streams changes, at most `timeout`;
    /// whether it does.
    pub async fn wait_streaming(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.meter.snapshot().streaming {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the listener: it applies what it has received, confirms it
    /// to Postgres, and closes its connection. The slot stays, so that the
    /// next start resumes where this one stopped.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl ListenerBuilder {
    /// The replication slot's name (lower-case letters, digits and `_`);
    /// `redis_cached` by default. Each listener of a database needs its
    /// own; two listeners with the same slot take turns (the second
    /// streams once the first stops).
    pub fn slot(mut self, slot: &str) -> Self {
        self.slot = slot.to_owned();
        self
    }

    /// The publication's name; the slot's name by default. Created with
    /// the mapped tables if it does not exist; mapped tables it lacks are
    /// added to it.
    pub fn publication(mut self, publication: &str) -> Self {
        self.publication = Some(publication.to_owned());
        self
    }

    /// How many keys and tags are gathered before they are sent (1024 by
    /// default): the bound on one batch, whatever the size of a
    /// transaction.
    pub fn batch(mut self, keys_and_tags: usize) -> Self {
        self.limits.batch = keys_and_tags.max(1);
        self
    }

    /// How many Redis operations of a batch are in flight at once (16 by
    /// default): each a pipeline of at most 512 keys
    /// ([`Cache::invalidate_many`]) or one tag ([`Cache::invalidate_tag`],
    /// itself in rounds of at most 500 keys).
    pub fn in_flight(mut self, invalidations: usize) -> Self {
        self.limits.in_flight = invalidations.max(1);
        self
    }

    /// Starts the listener: connects, checks the mapped tables and their
    /// columns, creates the publication and the slot if they are missing,
    /// then streams in a task of its own. Returns once that set-up is done;
    /// later failures are retried in the task (see
    /// [`ListenerStats::cut_off`]).
    ///
    /// # Errors
    /// [`Error::Mapping`] or [`Error::Config`] for a mapping or name it
    /// cannot use (a bad template, a missing table or column, a
    /// publication that filters rows), [`Error::Postgres`] when the first
    /// set-up fails.
    pub async fn start(self) -> Result<Listener, Error> {
        let plan = self.mapping.compile()?;
        let publication = self.publication.as_deref().unwrap_or(&self.slot);
        let names = Names::new(&self.slot, publication)?;
        let context = Arc::new(Context {
            conninfo: setup::replication_conninfo(&self.url),
            cache: self.cache,
            names,
            plan,
            limits: self.limits,
            meter: Arc::new(Meter::new()),
        });
        let shutdown = Shutdown::new();
        #[cfg(feature = "metrics")]
        tokio::spawn(crate::exported::run(
            context.meter.clone(),
            context.names.slot.clone(),
            shutdown.clone(),
        ));
        let (ready, first) = oneshot::channel();
        let task = tokio::spawn(supervise(context.clone(), ready, shutdown.clone()));
        let listener = Listener {
            meter: context.meter.clone(),
            shutdown,
            task: Some(task),
        };
        match first.await {
            Ok(Ok(())) => Ok(listener),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(Error::Stopped),
        }
    }
}

/// What the task works with.
struct Context {
    conninfo: String,
    cache: Cache,
    names: Names,
    plan: Plan,
    limits: Limits,
    meter: Arc<Meter>,
}

/// Runs sessions until `shutdown`, pausing longer after each failure in
/// a row. The first session's set-up is reported on `ready`; if it
/// fails, the task ends.
async fn supervise(
    context: Arc<Context>,
    ready: oneshot::Sender<Result<(), Error>>,
    shutdown: Shutdown,
) {
    let mut ready = Some(ready);
    let mut pause = FIRST_RECONNECT_PAUSE;
    let mut sessions = 0u64;
    loop {
        let outcome = session(&context, &mut ready, &shutdown, &mut sessions).await;
        if shutdown.is_cancelled() {
            context.meter.disconnected();
            return;
        }
        let err = match outcome {
            Ok(streamed) => {
                if streamed {
                    pause = FIRST_RECONNECT_PAUSE;
                }
                Error::Postgres("the change stream ended".into())
            }
            Err((err, streamed)) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(err));
                    return;
                }
                if streamed {
                    pause = FIRST_RECONNECT_PAUSE;
                }
                err
            }
        };
        let cut_off = context.meter.disconnected();
        tracing::warn!(
            target: "redis_cached_pg",
            error = %err,
            cut_off_ms = cut_off.as_millis() as u64,
            retry_in_ms = pause.as_millis() as u64,
            "the change stream is down: entries of rows changed meanwhile are served as they are until it is back"
        );
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = shutdown.cancelled() => return,
        }
        pause = (pause * 2).min(MAX_RECONNECT_PAUSE);
    }
}

/// One connection: set up (and reset, if owed), then stream until
/// failure or `shutdown`. Whether it streamed, with the error if any.
async fn session(
    context: &Context,
    ready: &mut Option<oneshot::Sender<Result<(), Error>>>,
    shutdown: &Shutdown,
    sessions: &mut u64,
) -> Result<bool, (Error, bool)> {
    let not_streamed = |err: Error| (err, false);
    let mut conn = PgReplicationConnection::connect_async(&context.conninfo)
        .await
        .map_err(|err| not_streamed(err.into()))?;
    let reset = setup::prepare(&mut conn, &context.names, &context.plan)
        .await
        .map_err(not_streamed)?;
    if let Some(ready) = ready.take() {
        let _ = ready.send(Ok(()));
    }
    if reset {
        invalidate_everything(context, shutdown)
            .await
            .map_err(not_streamed)?;
        setup::reset_done(&mut conn, &context.names)
            .await
            .map_err(not_streamed)?;
    }
    drop(conn);
    let mut stream = stream::open(&context.conninfo, &context.names)
        .await
        .map_err(not_streamed)?;
    *sessions += 1;
    if *sessions > 1 {
        add(&context.meter.reconnects, 1);
    }
    context.meter.connected();

    let progress = Progress::default();
    let feedback = stream.shared_lsn_feedback.clone();
    let (events, received) = mpsc::channel(READ_AHEAD);
    let mut applier = Applier::new(
        &context.plan,
        &context.cache,
        &context.meter,
        context.limits,
    );
    let reading = async {
        let read = stream::read(&mut stream, events, &progress, &context.meter, shutdown).await;
        if read.is_err() {
            // Cut off now, even while the applier still works through
            // what it holds (it may wait on a failing Redis).
            context.meter.disconnected();
        }
        read
    };
    let applying = applier.run(received, &progress, &feedback, shutdown);
    // The reader ends first (failure or shutdown) and closes the channel;
    // the applier then applies what it holds.
    let (read, applied) = tokio::join!(reading, applying);
    if applied.is_ok() && shutdown.is_cancelled() {
        // What the applier confirmed reaches Postgres before the
        // connection closes.
        let _ = stream.stop().await;
    }
    read.and(applied).map(|()| true).map_err(|err| (err, true))
}

/// Invalidates everything the mapping covers: each table's table tag,
/// and the templates without placeholders.
async fn invalidate_everything(context: &Context, shutdown: &Shutdown) -> Result<(), Error> {
    let mut targets = Targets::default();
    for (_, table) in context.plan.tables() {
        table.whole(&mut targets);
    }
    apply::invalidate(
        &context.cache,
        targets,
        context.limits,
        &context.meter,
        shutdown,
    )
    .await?;
    add(&context.meter.resets, 1);
    Ok(())
}
