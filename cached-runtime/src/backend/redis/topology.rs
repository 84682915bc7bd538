//! A cluster's topology: which master serves each hash slot, as a node
//! answers `CLUSTER SLOTS`, asked on a connection of its own (never the
//! data connection, which stays free for the cache's commands) and read
//! again in the background when something suggests it changed. The cache
//! keeps one breaker per master by it ([`Topology::node_of`]), and the
//! lock subscriber subscribes each slot's channel at the master it names.
//!
//! Masters are numbered as they are first seen, by address, and a number
//! names that address for good: a breaker's state survives a refresh, and
//! a replica promoted in a master's place (another address) starts
//! healthy.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::Value;

use super::flag::ClearOnDrop;
use crate::error::{Error, Result};

/// A range of slots and the address of the master that serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotRange {
    pub(crate) first: u16,
    pub(crate) last: u16,
    pub(crate) host: String,
    pub(crate) port: u16,
}

/// How many hash slots a cluster has.
const SLOTS: usize = 16_384;
/// The owner of a slot that no master serves.
const NOBODY: u16 = u16::MAX;
/// The least time between two reads of the slot map.
const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// How many nodes a read of the slot map asks before it gives up.
const ATTEMPTS: usize = 3;

pub(crate) struct Topology {
    client: ClusterClient,
    connect_timeout: Duration,
    /// Where a master that does not know its own address is taken to be:
    /// the first seed's host.
    fallback_host: String,
    /// Every master seen, by address; its index is its number.
    nodes: Mutex<Vec<(String, u16)>>,
    /// The number of the master serving each slot, once read.
    owners: ArcSwapOption<Box<[u16]>>,
    /// The connection that asks; made on first use, kept.
    control: tokio::sync::Mutex<Option<ClusterConnection>>,
    /// Whether a background read runs, and when the last one started.
    refreshing: Arc<AtomicBool>,
    last_refresh: Mutex<Option<Instant>>,
}

impl Topology {
    pub(crate) fn new(
        client: ClusterClient,
        connect_timeout: Duration,
        fallback_host: &str,
    ) -> Self {
        Topology {
            client,
            connect_timeout,
            fallback_host: fallback_host.to_owned(),
            nodes: Mutex::new(Vec::new()),
            owners: ArcSwapOption::empty(),
            control: tokio::sync::Mutex::new(None),
            refreshing: Arc::new(AtomicBool::new(false)),
            last_refresh: Mutex::new(None),
        }
    }

    fn nodes(&self) -> MutexGuard<'_, Vec<(String, u16)>> {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The number of the master serving `slot`, as last read; `None`
    /// while the map is unknown (a read is then started) or no master
    /// serves the slot.
    pub(crate) fn node_of(self: &Arc<Self>, slot: u16) -> Option<usize> {
        match self.owners.load().as_deref() {
            Some(owners) => match owners.get(usize::from(slot)) {
                Some(&NOBODY) | None => None,
                Some(&node) => Some(usize::from(node)),
            },
            None => {
                self.refresh();
                None
            }
        }
    }

    /// The numbers of the masters serving slots now, as last read.
    pub(crate) fn masters(&self) -> Vec<usize> {
        let mut masters: Vec<usize> = Vec::new();
        if let Some(owners) = self.owners.load().as_deref() {
            for &node in owners.iter() {
                if node != NOBODY && !masters.contains(&usize::from(node)) {
                    masters.push(usize::from(node));
                }
            }
        }
        masters
    }

    /// The address of master number `node`.
    pub(crate) fn address(&self, node: usize) -> Option<(String, u16)> {
        self.nodes().get(node).cloned()
    }

    /// Reads the slot map again in a task of its own, unless a read runs
    /// or one started within the last second: the topology may have
    /// changed (a master failing, a slot moved).
    pub(crate) fn refresh(self: &Arc<Self>) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let done = ClearOnDrop(Arc::clone(&self.refreshing));
        {
            let mut last = self
                .last_refresh
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|at| at.elapsed() < REFRESH_EVERY) {
                return; // `done` clears the flag
            }
            *last = Some(Instant::now());
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let topology = Arc::downgrade(self);
        runtime.spawn(async move {
            let _done = done;
            if let Some(topology) = topology.upgrade() {
                if let Err(err) = topology.read().await {
                    tracing::debug!(target: "redis_cached", error = %err, "the cluster's slot map could not be read");
                }
            }
        });
    }

    /// Reads the slot map now, asking up to three nodes, each within the
    /// connection timeout (a frozen one would answer nothing); keeps it
    /// and returns it.
    pub(crate) async fn read(&self) -> Result<Arc<Vec<SlotRange>>> {
        let mut last_err = Error::Redis("no node answered CLUSTER SLOTS".into());
        for _ in 0..ATTEMPTS {
            match tokio::time::timeout(self.connect_timeout * 2, self.ask()).await {
                Ok(Ok(ranges)) => {
                    let ranges = Arc::new(ranges);
                    self.keep(&ranges);
                    return Ok(ranges);
                }
                Ok(Err(err)) => last_err = err,
                Err(_) => last_err = Error::Timeout(self.connect_timeout * 2),
            }
        }
        Err(last_err)
    }

    async fn ask(&self) -> Result<Vec<SlotRange>> {
        let mut control = self.control.lock().await;
        let conn = match &mut *control {
            Some(conn) => conn,
            None => {
                let config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(self.connect_timeout)
                    .set_response_timeout(self.connect_timeout);
                let conn = self
                    .client
                    .get_async_connection_with_config(config)
                    .await
                    .map_err(|e| Error::from_redis(&e))?;
                control.insert(conn)
            }
        };
        let reply = conn
            .route_command(
                redis::cmd("CLUSTER").arg("SLOTS").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await
            .map_err(|e| Error::from_redis(&e))?;
        parse_slot_ranges(&reply, &self.fallback_host)
            .ok_or_else(|| Error::Redis("CLUSTER SLOTS answered in an unknown shape".into()))
    }

    /// Keeps `ranges` as the slot map, numbering new masters.
    fn keep(&self, ranges: &Arc<Vec<SlotRange>>) {
        let mut owners = vec![NOBODY; SLOTS].into_boxed_slice();
        {
            let mut nodes = self.nodes();
            for range in ranges.iter() {
                let address = (range.host.clone(), range.port);
                let node = match nodes.iter().position(|known| *known == address) {
                    Some(node) => node,
                    None => {
                        nodes.push(address);
                        nodes.len() - 1
                    }
                };
                // Past 65,535 masters ever seen, the rest share no breaker.
                let Ok(node) = u16::try_from(node) else {
                    continue;
                };
                if node == NOBODY {
                    continue;
                }
                let (first, last) = (usize::from(range.first), usize::from(range.last));
                if let Some(slots) = owners.get_mut(first..=last.min(SLOTS - 1)) {
                    slots.fill(node);
                }
            }
        }
        self.owners.store(Some(Arc::new(owners)));
    }
}

/// `CLUSTER SLOTS`: `[[first, last, [host, port, …], replicas…], …]`.
/// A master named by no host (NULL or `""`: the node does not know its
/// own address) is taken to be on `fallback_host`, the first seed's host,
/// as redis-rs takes it to be on the node that answered; one still unknown
/// (`?`), or an entry of another shape, is skipped.
fn parse_slot_ranges(reply: &Value, fallback_host: &str) -> Option<Vec<SlotRange>> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    let int = |v: &Value| match v {
        Value::Int(n) => u16::try_from(*n).ok(),
        _ => None,
    };
    let range = |range: &Value| {
        let Value::Array(fields) = range else {
            return None;
        };
        let (first, last) = (int(fields.first()?)?, int(fields.get(1)?)?);
        let Value::Array(master) = fields.get(2)? else {
            return None;
        };
        let host = match master.first()? {
            Value::BulkString(host) => String::from_utf8(host.clone()).ok()?,
            Value::SimpleString(host) => host.clone(),
            Value::Nil => String::new(),
            _ => return None,
        };
        let host = match host.as_str() {
            "?" => return None,
            "" => fallback_host.to_owned(),
            _ => host,
        };
        let port = int(master.get(1)?)?;
        Some(SlotRange {
            first,
            last,
            host,
            port,
        })
    };
    Some(ranges.iter().filter_map(range).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn entry(first: i64, last: i64, host: Value, port: i64) -> Value {
        Value::Array(vec![
            Value::Int(first),
            Value::Int(last),
            Value::Array(vec![host, Value::Int(port), bulk("id")]),
        ])
    }

    #[test]
    fn slot_ranges_are_read_as_redis_rs_reads_them() {
        let reply = Value::Array(vec![
            entry(0, 5460, bulk("10.0.0.1"), 7000),
            entry(5461, 10922, bulk(""), 7001),
            entry(10923, 16000, Value::Nil, 7002),
            entry(16001, 16383, bulk("?"), 7003),
            Value::Array(vec![Value::Int(1)]),
        ]);
        let ranges = parse_slot_ranges(&reply, "seed.host").expect("an array");
        let read: Vec<_> = ranges
            .iter()
            .map(|r| (r.first, r.last, r.host.as_str(), r.port))
            .collect();
        assert_eq!(
            read,
            [
                (0, 5460, "10.0.0.1", 7000),
                (5461, 10922, "seed.host", 7001),
                (10923, 16000, "seed.host", 7002),
            ]
        );
        assert!(parse_slot_ranges(&Value::Int(1), "h").is_none());
    }

    #[tokio::test]
    async fn masters_keep_their_numbers_across_reads() {
        let client = ClusterClient::new(vec!["redis://127.0.0.1:1/"]).expect("a valid URL");
        let topology = Arc::new(Topology::new(client, Duration::from_secs(1), "127.0.0.1"));
        let range = |first, last, port| SlotRange {
            first,
            last,
            host: "10.0.0.1".into(),
            port,
        };
        topology.keep(&Arc::new(vec![range(0, 99, 7000), range(100, 16383, 7001)]));
        assert_eq!(topology.node_of(5), Some(0));
        assert_eq!(topology.node_of(16383), Some(1));
        // Slots 0 to 9 moved to a third master; 7000 went away.
        topology.keep(&Arc::new(vec![range(0, 9, 7002), range(10, 16383, 7001)]));
        assert_eq!(topology.node_of(5), Some(2));
        assert_eq!(topology.node_of(50), Some(1));
        assert_eq!(topology.address(2), Some(("10.0.0.1".into(), 7002)));
        assert_eq!(topology.masters(), [2, 1]);
        // A slot no master serves.
        topology.keep(&Arc::new(vec![range(0, 9, 7002)]));
        assert_eq!(topology.node_of(50), None);
    }
}
