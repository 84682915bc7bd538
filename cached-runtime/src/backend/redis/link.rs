//! Where the Redis backend's commands go: one server, a Redis Cluster, or
//! the master that a set of Sentinels names. [`Target`] is what the cache
//! was built for; [`Link`] one live connection to it, which every typed
//! operation of the backend sends through.
//!
//! A cluster connection routes each command by its key's slot and follows
//! `MOVED`/`ASK` redirections and topology changes by itself. A Sentinel
//! target asks the sentinels for the master (see [`SentinelTarget`]) each
//! time it connects afresh; the backend drops its link when the master
//! stops being one (errors open the breaker, or a write is refused as
//! `READONLY`), so the next probe finds the promoted replica.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{
    Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisFuture, Value,
};

pub(crate) use super::sentinel::SentinelTarget;
use super::topology::Topology;
#[cfg(feature = "tls")]
use super::url::install_crypto_provider;
pub(crate) use super::url::resp3;
use super::url::{invalid_url_in, open_client, open_client_with};
#[cfg(not(feature = "tls"))]
use super::url::{no_tls, wants_tls};
use crate::error::{Error, Result};

/// The deployment a Redis-backed cache talks to.
// One per cache: boxing the client would gain nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Target {
    /// One server (standalone, or a proxy in front of many).
    Server(redis::Client),
    /// A Redis Cluster, through any of its nodes.
    Cluster(Arc<ClusterTarget>),
    /// The master of a set of Sentinels, looked up on every connect.
    Sentinel(Arc<SentinelTarget>),
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Server(client) => {
                write!(f, "server {}", client.get_connection_info().addr())
            }
            Target::Cluster(cluster) => write!(f, "cluster of {} seed nodes", cluster.seeds.len()),
            Target::Sentinel(sentinel) => write!(f, "sentinel master {:?}", sentinel.name()),
        }
    }
}

impl Target {
    /// One server at `url`; `tls_root` (PEM) replaces the system's trusted
    /// roots for `rediss://`.
    pub(crate) fn server(url: &str, tls_root: Option<&[u8]>) -> Result<Target> {
        open_client(url, tls_root).map(Target::Server)
    }
}

/// How to reach a cluster: its seed nodes, and what every connection to
/// it is built with.
pub(crate) struct ClusterTarget {
    seeds: Vec<String>,
    tls_root: Option<Vec<u8>>,
    connect_timeout: Duration,
    /// For the data connection (no push messages).
    client: ClusterClient,
    /// Which master serves each slot.
    topology: Arc<Topology>,
}

impl ClusterTarget {
    pub(crate) fn new(
        seeds: &[&str],
        connect_timeout: Duration,
        tls_root: Option<&[u8]>,
    ) -> Result<Self> {
        if seeds.is_empty() {
            return Err(Error::Config(
                "a cluster needs at least one node URL".into(),
            ));
        }
        #[cfg(not(feature = "tls"))]
        if tls_root.is_some() || seeds.iter().any(|url| wants_tls(url)) {
            return Err(no_tls());
        }
        #[cfg(feature = "tls")]
        install_crypto_provider();
        // Builds the table of slot tags now rather than in the first
        // lock release.
        crate::encoding::key::slot_tag(0);
        let seeds: Vec<String> = seeds.iter().map(|s| (*s).to_owned()).collect();
        let tls_root = tls_root.map(<[u8]>::to_vec);
        let client = cluster_builder(&seeds, connect_timeout, tls_root.as_deref())
            .build()
            .map_err(|e| invalid_url_in(&seeds, &e))?;
        let seed = seeds[0].as_str().into_connection_info().ok();
        let fallback_host = match seed.as_ref().map(ConnectionInfo::addr) {
            Some(ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. }) => {
                host.as_str()
            }
            _ => "127.0.0.1",
        };
        let topology = Arc::new(Topology::new(
            client.clone(),
            connect_timeout,
            fallback_host,
        ));
        Ok(ClusterTarget {
            seeds,
            tls_root,
            connect_timeout,
            client,
            topology,
        })
    }

    /// Which master serves each slot.
    pub(crate) fn topology(&self) -> &Arc<Topology> {
        &self.topology
    }
}

impl ClusterTarget {
    /// How long connecting to a node may take.
    pub(crate) fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// A RESP3 client for the node at `host:port`, with the first seed's
    /// credentials and TLS settings.
    pub(crate) fn node_client(&self, host: &str, port: u16) -> Result<redis::Client> {
        let seed = self.seeds[0].as_str();
        let info = seed
            .into_connection_info()
            .map_err(|e| invalid_url_in(&[seed], &e))?;
        let addr = match info.addr() {
            ConnectionAddr::TcpTls { insecure, .. } => ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: *insecure,
                tls_params: None,
            },
            _ => ConnectionAddr::Tcp(host.to_owned(), port),
        };
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let info = info.set_addr(addr).set_redis_settings(settings);
        open_client_with(info, self.tls_root.as_deref()).map_err(|e| invalid_url_in(&[seed], &e))
    }
}

fn cluster_builder(
    seeds: &[String],
    connect_timeout: Duration,
    tls_root: Option<&[u8]>,
) -> ClusterClientBuilder {
    let builder = ClusterClientBuilder::new(seeds.to_vec())
        .connection_timeout(connect_timeout)
        // Redirections and reconnections are retried inside the client
        // (each operation stays bounded by the cache's op_timeout), a
        // few times and quickly: a failover takes seconds, during
        // which the breaker, not a retry loop, paces the attempts. (The
        // three pauses take at most 140 ms: up to 20, 40 and 80 ms.) A
        // `TRYAGAIN` (a slot being moved) that outlasts these retries is
        // tried again by the backend, as long as the operation may last.
        .retries(3)
        .min_retry_wait(10)
        .max_retry_wait(200);
    #[cfg(feature = "tls")]
    let builder = match tls_root {
        Some(pem) => builder.certs(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.to_vec()),
        }),
        None => builder,
    };
    #[cfg(not(feature = "tls"))]
    let _ = tls_root;
    builder
}

/// One live connection to a [`Target`]; cheap to clone (a handle).
#[derive(Clone)]
pub(crate) enum Link {
    Server(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Link {
    /// A link to `target` that connects on first use, when that needs no
    /// lookup first (`None` for Sentinel: see [`Link::resolve`]).
    pub(crate) fn lazy(target: &Target, config: &ConnectionManagerConfig) -> Result<Option<Link>> {
        match target {
            Target::Server(client) => {
                ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                    .map(|manager| Some(Link::Server(manager)))
                    .map_err(|e| Error::from_redis(&e))
            }
            Target::Cluster(cluster) => {
                let config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(cluster.connect_timeout);
                Ok(Some(Link::Cluster(
                    cluster
                        .client
                        .get_pending_async_connection_with_config(config),
                )))
            }
            Target::Sentinel(_) => Ok(None),
        }
    }

    /// A link to the master `sentinel` names now.
    pub(crate) async fn to_master(
        sentinel: &SentinelTarget,
        config: &ConnectionManagerConfig,
    ) -> Result<Link> {
        let client = sentinel.master().await?;
        ConnectionManager::new_lazy_with_config(client, config.clone())
            .map(Link::Server)
            .map_err(|e| Error::from_redis(&e))
    }
}

impl Link {
    /// Runs `cmd` on every master: the one server, or each master of a
    /// cluster (replicas, which may be down, are left out).
    pub(crate) async fn on_every_master(&mut self, cmd: &Cmd) -> redis::RedisResult<()> {
        match self {
            Link::Server(conn) => cmd.query_async(conn).await,
            Link::Cluster(conn) => {
                use redis::cluster_routing::{
                    MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo,
                };
                let every_master = RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    Some(ResponsePolicy::AllSucceeded),
                ));
                conn.route_command(cmd.clone(), every_master)
                    .await
                    .map(drop)
            }
        }
    }
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Link::Server(conn) => conn.req_packed_command(cmd),
            Link::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Link::Server(conn) => conn.req_packed_commands(pipeline, offset, count),
            Link::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Server(conn) => conn.get_db(),
            Link::Cluster(conn) => conn.get_db(),
        }
    }
}
