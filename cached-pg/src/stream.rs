//! The change stream: Postgres's logical replication (the `pgoutput`
//! plugin, committed transactions only, in commit order) from the
//! listener's slot, read by `pg_walstream` and handed to the applier.

use std::sync::atomic::Ordering;
use std::time::Duration;

use pg_walstream::{
    ChangeEvent, EventType, LogicalReplicationStream, ReplicationError, ReplicationStreamConfig,
    RetryConfig, StreamingMode,
};
use tokio::sync::mpsc;

use crate::apply::Progress;
use crate::error::Error;
use crate::setup::Names;
use crate::Shutdown;

/// How often the reader tells Postgres how far the listener has got.
const FEEDBACK_EVERY: Duration = Duration::from_secs(1);
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to the slot and starts streaming from its confirmed position:
/// every transaction committed after it, none before.
pub(crate) async fn open(conninfo: &str, names: &Names) -> Result<LogicalReplicationStream, Error> {
    let config = ReplicationStreamConfig::builder(&names.slot, &names.publication)
        .with_protocol_version(1)
        // A transaction reaches the listener once it has committed, whole.
        .with_streaming_mode(StreamingMode::Off)
        // A missing slot is the set-up's to create (and to reset for).
        .with_existing_slot_required(true)
        .with_feedback_interval(FEEDBACK_EVERY)
        .with_connection_timeout(CONNECT_TIMEOUT)
        // The listener reconnects by itself, through the set-up again.
        .with_retry_config(RetryConfig {
            max_attempts: 1,
            ..RetryConfig::default()
        });
    let mut stream = LogicalReplicationStream::new(conninfo, config).await?;
    stream.start(None).await?;
    Ok(stream)
}

/// Hands every change event to the applier until the stream fails or
/// `shutdown`; once a second, confirms to Postgres what the applier has
/// settled.
pub(crate) async fn read(
    stream: &mut LogicalReplicationStream,
    events: mpsc::Sender<ChangeEvent>,
    progress: &Progress,
    shutdown: &Shutdown,
) -> Result<(), Error> {
    let mut handed = 0u64;
    let mut feedback = tokio::time::interval(FEEDBACK_EVERY);
    feedback.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            event = stream.next_event(shutdown) => match event {
                Ok(event) => {
                    if !names_rows(&event) {
                        continue;
                    }
                    handed += 1;
                    if events.send(event).await.is_err() {
                        return Ok(());
                    }
                }
                Err(ReplicationError::Cancelled(_)) => return Ok(()),
                Err(err) => return Err(err.into()),
            },
            _ = feedback.tick() => {
                if progress.settled.load(Ordering::Acquire) == handed {
                    // Everything received is invalidated, so Postgres may
                    // forget up to what it has sent: WAL of tables outside
                    // the publication is not kept for an idle listener.
                    let received = stream.current_lsn();
                    stream.shared_lsn_feedback.update_applied_lsn(received);
                }
                stream.send_feedback().await?;
            }
        }
    }
}

/// Whether the applier needs `event`.
fn names_rows(event: &ChangeEvent) -> bool {
    matches!(
        event.event_type,
        EventType::Relation { .. }
            | EventType::Insert { .. }
            | EventType::Update { .. }
            | EventType::Delete { .. }
            | EventType::Truncate { .. }
            | EventType::Begin { .. }
            | EventType::Commit { .. }
    )
}
