//! Where the Redis backend's commands go: one server, a Redis Cluster, or
//! the master that a set of Sentinels names. [`Target`] is what the cache
//! was built for; [`Link`] one live connection to it, which every typed
//! operation of the backend sends through.
//!
//! A cluster connection routes each command by its key's slot and follows
//! `MOVED`/`ASK` redirections and topology changes by itself. A Sentinel
//! target asks the sentinels for the master each time it connects afresh;
//! the backend drops its link when the master stops being one (errors open
//! the breaker, or a write is refused as `READONLY`), so the next probe
//! finds the promoted replica.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{
    Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisFuture, Value,
};

use super::flag::ClearOnDrop;
use super::topology::Topology;
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
            Target::Sentinel(sentinel) => write!(f, "sentinel master {:?}", sentinel.master),
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

fn open_client(url: &str, tls_root: Option<&[u8]>) -> Result<redis::Client> {
    #[cfg(not(feature = "tls"))]
    if tls_root.is_some() || url.starts_with("rediss://") {
        return Err(no_tls());
    }
    let info = url
        .into_connection_info()
        .map_err(|e| invalid_url_in(&[url], &e))?;
    open_client_with(info, tls_root).map_err(|e| invalid_url_in(&[url], &e))
}

/// A client for the server `client` connects to, speaking RESP3 (for
/// push messages), with the same credentials and TLS settings.
pub(crate) fn resp3(client: &redis::Client) -> redis::RedisResult<redis::Client> {
    let info = client.get_connection_info().clone();
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(redis::ProtocolVersion::RESP3);
    redis::Client::open(info.set_redis_settings(settings))
}

#[cfg(feature = "tls")]
fn open_client_with(
    info: ConnectionInfo,
    tls_root: Option<&[u8]>,
) -> redis::RedisResult<redis::Client> {
    install_crypto_provider();
    match tls_root {
        Some(pem) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
            },
        ),
        None => redis::Client::open(info),
    }
}

/// Without the `tls` feature, callers refuse a root certificate first.
#[cfg(not(feature = "tls"))]
fn open_client_with(
    info: ConnectionInfo,
    _tls_root: Option<&[u8]>,
) -> redis::RedisResult<redis::Client> {
    redis::Client::open(info)
}

#[cfg(feature = "tls")]
fn install_crypto_provider() {
    // One process-wide provider; if the application installed its own, keep it.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(not(feature = "tls"))]
fn no_tls() -> Error {
    Error::Config("rediss:// needs the `tls` feature of redis-cached".into())
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
        if tls_root.is_some() || seeds.iter().any(|url| url.starts_with("rediss://")) {
            return Err(no_tls());
        }
        #[cfg(feature = "tls")]
        install_crypto_provider();
        // Builds the table of slot tags now rather than in the first
        // lock release.
        crate::key::slot_tag(0);
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

/// How to find a Sentinel-managed master.
pub(crate) struct SentinelTarget {
    master: String,
    node: SentinelNodeConnectionInfo,
    /// One client per sentinel, to hear of failovers (`+switch-master`).
    sentinels: Vec<redis::Client>,
    /// Whether a task listens for failovers; cleared when it ends.
    watching: Arc<AtomicBool>,
    /// The sentinels' URLs, in the order given.
    urls: Vec<String>,
    /// Failovers heard of so far: a lookup that started before one may
    /// have found the old master.
    switches: AtomicU64,
    /// The sentinel that announced the last failover, asked first since
    /// it knows of it (the others may hear of it seconds later).
    announced_by: AtomicUsize,
}

impl SentinelTarget {
    pub(crate) fn new(
        sentinels: &[&str],
        master: &str,
        credentials: Option<(Option<&str>, &str)>,
    ) -> Result<Self> {
        if sentinels.is_empty() {
            return Err(Error::Config(
                "Sentinel needs at least one sentinel URL".into(),
            ));
        }
        if master.is_empty() {
            return Err(Error::Config("Sentinel needs the master's name".into()));
        }
        let tls = sentinels.iter().any(|url| url.starts_with("rediss://"));
        #[cfg(not(feature = "tls"))]
        if tls {
            return Err(no_tls());
        }
        #[cfg(feature = "tls")]
        install_crypto_provider();
        // Checks the URLs now; lookups build their own.
        Sentinel::build(sentinels.to_vec()).map_err(|e| invalid_url_in(sentinels, &e))?;
        let clients = sentinels
            .iter()
            .map(|url| redis::Client::open(*url).map_err(|e| invalid_url_in(&[url], &e)))
            .collect::<Result<Vec<_>>>()?;
        let mut redis_info = redis::RedisConnectionInfo::default();
        if let Some((username, password)) = credentials {
            redis_info = redis_info.set_password(password);
            if let Some(username) = username {
                redis_info = redis_info.set_username(username);
            }
        }
        let mut node = SentinelNodeConnectionInfo::default().set_redis_connection_info(redis_info);
        if tls {
            node = node.set_tls_mode(redis::TlsMode::Secure);
        }
        Ok(SentinelTarget {
            master: master.to_owned(),
            node,
            sentinels: clients,
            watching: Arc::new(AtomicBool::new(false)),
            urls: sentinels.iter().map(|url| (*url).to_owned()).collect(),
            switches: AtomicU64::new(0),
            announced_by: AtomicUsize::new(0),
        })
    }

    /// Starts, unless one runs, a task that listens to the sentinels'
    /// `+switch-master` events (from one sentinel at a time, the next one
    /// when it fails) and calls `switched` when this master fails over, so
    /// that the cache moves to the new master at once rather than when the
    /// old one starts refusing writes (Sentinel demotes a live old master
    /// only about ten seconds later; writes in between would be lost). The
    /// task ends when `alive` says the cache is gone.
    pub(crate) fn watch_failovers(
        self: &Arc<Self>,
        alive: impl Fn() -> bool + Send + Sync + 'static,
        switched: impl Fn() + Send + Sync + 'static,
    ) {
        if self.watching.load(Ordering::Acquire) || self.watching.swap(true, Ordering::AcqRel) {
            return;
        }
        let watching = ClearOnDrop(Arc::clone(&self.watching));
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let target = Arc::downgrade(self);
        runtime.spawn(async move {
            let _watching = watching;
            let mut next = 0;
            loop {
                let Some((client, master)) = target.upgrade().and_then(|t| {
                    let client = t.sentinels.get(next % t.sentinels.len())?.clone();
                    Some((client, t.master.clone()))
                }) else {
                    return;
                };
                next += 1;
                if !alive() {
                    return;
                }
                let heard = || {
                    if let Some(t) = target.upgrade() {
                        t.announced_by.store(next - 1, Ordering::Relaxed);
                        t.switches.fetch_add(1, Ordering::AcqRel);
                    }
                    switched();
                };
                if !listen_for_switches(&client, &master, &alive, &heard).await {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }

    /// A client for the current master, as the sentinels name it (checked
    /// to call itself master).
    ///
    /// Each lookup connects to the sentinels afresh (lookups are rare: a
    /// first connection, a failover), so none waits for another; the one
    /// that announced the last failover is asked first.
    pub(crate) async fn master(&self) -> Result<redis::Client> {
        let first = self.announced_by.load(Ordering::Relaxed) % self.urls.len();
        let order: Vec<&str> = self.urls[first..]
            .iter()
            .chain(&self.urls[..first])
            .map(String::as_str)
            .collect();
        let mut sentinel = Sentinel::build(order).map_err(|e| invalid_url(&e))?;
        sentinel
            .async_master_for(&self.master, Some(&self.node))
            .await
            .map_err(|e| Error::from_redis(&e))
    }

    /// How many failovers this process has heard of.
    pub(crate) fn switches(&self) -> u64 {
        self.switches.load(Ordering::Acquire)
    }

    /// Whether a task listens for failovers.
    pub(crate) fn is_watched(&self) -> bool {
        self.watching.load(Ordering::Acquire)
    }
}

/// Listens to one sentinel's `+switch-master` until its connection fails
/// (`true`: try another) or the cache is gone (`false`).
async fn listen_for_switches(
    sentinel: &redis::Client,
    master: &str,
    alive: &(impl Fn() -> bool + Send + Sync),
    switched: &(impl Fn() + Send + Sync),
) -> bool {
    const CONNECT: Duration = Duration::from_secs(2);
    let connect = async {
        let mut pubsub = sentinel.get_async_pubsub().await?;
        pubsub.subscribe("+switch-master").await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    let Ok(Ok(pubsub)) = tokio::time::timeout(CONNECT, connect).await else {
        return true;
    };
    let (mut sink, mut messages) = pubsub.split();
    let mut quiet = 0;
    loop {
        // Wake up now and then to notice a dropped cache, and after a few
        // quiet seconds make sure the sentinel is still there: one that
        // vanished without closing the connection would otherwise be
        // listened to for ever.
        match tokio::time::timeout(Duration::from_secs(1), messages.next()).await {
            // `<master name> <old ip> <old port> <new ip> <new port>`
            Ok(Some(message)) => {
                quiet = 0;
                let payload = message.get_payload_bytes();
                if payload.split(|&b| b == b' ').next() == Some(master.as_bytes()) {
                    tracing::info!(target: "redis_cached", "Redis Sentinel failed the master over; following it");
                    switched();
                }
            }
            Ok(None) => return true,
            Err(_) if !alive() => return false,
            Err(_) => {
                quiet += 1;
                if quiet >= 5 {
                    quiet = 0;
                    let ping = tokio::time::timeout(CONNECT, sink.ping::<redis::Value>()).await;
                    if !matches!(ping, Ok(Ok(_))) {
                        return true;
                    }
                }
            }
        }
    }
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

pub(crate) fn invalid_url(err: &redis::RedisError) -> Error {
    // The error text of a URL parse never needs the URL itself.
    Error::InvalidUrl(format!("{:?}", err.kind()))
}

/// What is wrong with `urls`, when redis-rs refuses one: a scheme it does
/// not know, named (never the rest of a URL, which may hold a password), a
/// URL with no scheme, or else redis-rs's kind of error.
pub(crate) fn invalid_url_in<S: AsRef<str>>(urls: &[S], err: &redis::RedisError) -> Error {
    urls.iter()
        .find_map(|url| scheme_problem(url.as_ref()))
        .unwrap_or_else(|| invalid_url(err))
}

fn scheme_problem(url: &str) -> Option<Error> {
    const SCHEMES: &str = "redis:// (or valkey://), rediss:// (TLS), redis+unix:// or unix://";
    match url.split_once("://") {
        Some((scheme, _))
            if !scheme.is_empty()
                && scheme.len() <= 16
                && scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+')
                && !matches!(
                    scheme,
                    "redis" | "rediss" | "valkey" | "valkeys" | "redis+unix" | "unix"
                ) =>
        {
            Some(Error::InvalidUrl(format!(
                "unknown scheme `{scheme}`: use {SCHEMES}"
            )))
        }
        None => Some(Error::InvalidUrl(format!(
            "not a Redis URL (no `scheme://`): write e.g. redis://[user:password@]host[:port][/db]; schemes are {SCHEMES}"
        ))),
        Some(_) => None,
    }
}
