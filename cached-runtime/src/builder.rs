//! [`CacheBuilder`]: the settings of a [`Cache`] and their validation.

use std::sync::Arc;
use std::time::Duration;

use crate::backend::{
    AnyBackend, ClusterTarget, MemoryBackend, MemoryConfig, RedisBackend, SentinelTarget, Target,
};
use crate::cache::Cache;
use crate::encoding::codec::Codec;
use crate::encoding::key::{internal_key, MAX_NAMESPACE_LEN};
use crate::engine::breaker::{BreakerConfig, Health};
use crate::engine::flight::Flights;
use crate::engine::refresh_claims::Claims;
use crate::engine::store::{Inner, Settings};
use crate::error::{Error, Result};
use crate::observe::meters::{Meters, Series};
use crate::observe::stats::Counters;

/// The URL that selects the in-memory backend in [`Cache::builder`].
pub const MEMORY_URL: &str = "memory://";

impl Cache {
    /// A Redis-backed cache with default settings.
    ///
    /// Lazy: only the URL is checked here (`redis://`, `rediss://`,
    /// `unix://`, with an optional `user:password@`), so this never fails
    /// because Redis is down; the connection is made on first use.
    pub fn redis(url: &str) -> Result<Cache> {
        Cache::builder(url).build()
    }

    /// An embedded in-memory cache with the same semantics as Redis
    /// (per-entry TTL, bounded size), for tests, development and single
    /// processes.
    pub fn in_memory() -> Cache {
        Cache::builder(MEMORY_URL).build_in_memory()
    }

    /// Starts configuring a cache at `url`: a Redis URL, or
    /// [`MEMORY_URL`] (`memory://`) for the in-memory backend.
    ///
    /// ```
    /// # extern crate cached_runtime as redis_cached;
    /// use std::time::Duration;
    /// use redis_cached::Cache;
    ///
    /// let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "memory://".into());
    /// let cache = Cache::builder(&url)
    ///     .namespace("shop")
    ///     .default_ttl(Duration::from_secs(600))
    ///     .op_timeout(Duration::from_millis(100))
    ///     .build()?;
    /// # Ok::<(), redis_cached::Error>(())
    /// ```
    pub fn builder(url: &str) -> CacheBuilder {
        CacheBuilder::new(Deployment::Url(url.to_owned()))
    }

    /// A cache on a Redis Cluster (or Valkey cluster) with default
    /// settings, given the URLs of some of its nodes (one is enough; more
    /// let it start while a node is down). Lazy like [`Cache::redis`].
    ///
    /// The annotated functions need no change: a value, its lock and its
    /// other companion keys share one hash slot, lock wake-ups go through
    /// sharded pub/sub, and redirections during failover or resharding
    /// are followed without reaching the caller.
    pub fn redis_cluster(urls: &[&str]) -> Result<Cache> {
        Cache::cluster_builder(urls).build()
    }

    /// Starts configuring a cache on a Redis Cluster; see
    /// [`Cache::redis_cluster`].
    ///
    /// ```
    /// # extern crate cached_runtime as redis_cached;
    /// use std::time::Duration;
    /// use redis_cached::Cache;
    ///
    /// let cache = Cache::cluster_builder(&["redis://10.0.0.1:7000/", "redis://10.0.0.2:7000/"])
    ///     .namespace("shop")
    ///     .op_timeout(Duration::from_millis(100))
    ///     .build()?;
    /// # Ok::<(), redis_cached::Error>(())
    /// ```
    pub fn cluster_builder(urls: &[&str]) -> CacheBuilder {
        CacheBuilder::new(Deployment::Cluster(
            urls.iter().map(|url| (*url).to_owned()).collect(),
        ))
    }

    /// A cache on the master that Redis Sentinel manages under `master`,
    /// with default settings, given the sentinels' URLs
    /// (`redis://host:26379/`). Lazy like [`Cache::redis`]: the sentinels
    /// are asked on first use, and again after a failover.
    pub fn redis_sentinel(sentinels: &[&str], master: &str) -> Result<Cache> {
        Cache::sentinel_builder(sentinels, master).build()
    }

    /// Starts configuring a cache on a Sentinel-managed master; see
    /// [`Cache::redis_sentinel`]. A master that needs a password gets it
    /// from [`CacheBuilder::master_credentials`] (the sentinels' own
    /// credentials go in their URLs).
    ///
    /// ```
    /// # extern crate cached_runtime as redis_cached;
    /// use redis_cached::Cache;
    ///
    /// let cache = Cache::sentinel_builder(
    ///     &["redis://10.0.0.1:26379/", "redis://10.0.0.2:26379/", "redis://10.0.0.3:26379/"],
    ///     "mymaster",
    /// )
    /// .master_credentials(Some("app"), "secret")
    /// .namespace("shop")
    /// .build()?;
    /// # Ok::<(), redis_cached::Error>(())
    /// ```
    pub fn sentinel_builder(sentinels: &[&str], master: &str) -> CacheBuilder {
        CacheBuilder::new(Deployment::Sentinel {
            sentinels: sentinels.iter().map(|url| (*url).to_owned()).collect(),
            master: master.to_owned(),
        })
    }
}

/// What a builder connects to.
#[derive(Clone)]
enum Deployment {
    /// One server's URL, or [`MEMORY_URL`].
    Url(String),
    /// Some nodes of a cluster.
    Cluster(Vec<String>),
    /// The sentinels, and the name of the master they watch.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
}

impl std::fmt::Debug for Deployment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls = |urls: &[String]| urls.iter().map(|u| redact(u)).collect::<Vec<_>>();
        match self {
            Deployment::Url(url) => write!(f, "{:?}", redact(url)),
            Deployment::Cluster(nodes) => write!(f, "cluster {:?}", urls(nodes)),
            Deployment::Sentinel { sentinels, master } => {
                write!(f, "sentinel {master:?} at {:?}", urls(sentinels))
            }
        }
    }
}

/// Configures a [`Cache`]; from [`Cache::builder`].
#[derive(Clone)]
#[must_use]
pub struct CacheBuilder {
    deployment: Deployment,
    master_credentials: Option<(Option<String>, String)>,
    namespace: Option<String>,
    default_ttl: Duration,
    op_timeout: Duration,
    connect_timeout: Duration,
    invalidation_window: Duration,
    coalesce_wait: Duration,
    max_value_bytes: usize,
    bounded_reads: bool,
    log_keys: bool,
    merge_lookups: bool,
    near_capacity: usize,
    near_max_bytes: usize,
    tls_root: Option<Vec<u8>>,
    codec: Codec,
    breaker: BreakerConfig,
    memory: MemoryConfig,
}

impl std::fmt::Debug for CacheBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("deployment", &self.deployment)
            .field("namespace", &self.namespace)
            .field("default_ttl", &self.default_ttl)
            .field("op_timeout", &self.op_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}

/// `url` with any `user:password@` replaced, for logs and `Debug`.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***@{}", &url[..scheme_end], &url[at + 1..])
        }
        // No scheme: whatever precedes the last `@` may be credentials.
        (None, Some(at)) => format!("***@{}", &url[at + 1..]),
        _ => url.to_owned(),
    }
}

impl CacheBuilder {
    fn new(deployment: Deployment) -> Self {
        CacheBuilder {
            deployment,
            master_credentials: None,
            namespace: None,
            default_ttl: Duration::from_secs(3600),
            op_timeout: Duration::from_millis(200),
            connect_timeout: Duration::from_secs(1),
            invalidation_window: Duration::from_secs(60),
            coalesce_wait: Duration::from_secs(30),
            tls_root: None,
            max_value_bytes: 16 * 1024 * 1024,
            bounded_reads: false,
            log_keys: false,
            merge_lookups: true,
            near_capacity: 10_000,
            near_max_bytes: 64 * 1024 * 1024,
            codec: Codec::Json,
            breaker: BreakerConfig::default(),
            memory: MemoryConfig::default(),
        }
    }

    /// Prefixes every key, and the lock notification channel, with
    /// `<namespace>:`. Letters, digits and `- _ . /` only: no `:`, so that
    /// two namespaces never produce one key (`a` + `b:c`, `a:b` + `c`); at
    /// most 64 bytes, so that a shortened key keeps all of it.
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = Some(namespace.to_owned());
        self
    }

    /// TTL of entries whose function or call gives none. Default 3600 s.
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// Upper bound of each Redis operation; a slower one counts as a failure
    /// and the caller computes instead. Default 200 ms.
    pub fn op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// Upper bound of one connection attempt (made in the background of
    /// the operations, which stay bounded by `op_timeout`). Default 1 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Circuit-breaker settings.
    pub fn breaker(mut self, config: BreakerConfig) -> Self {
        self.breaker = config;
        self
    }

    /// Serialization format of stored values. Default JSON.
    pub fn codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// Limits of the in-memory backend (ignored for Redis).
    pub fn memory(mut self, config: MemoryConfig) -> Self {
        self.memory = config;
        self
    }

    /// Trusts this CA certificate (PEM) for `rediss://` (or `valkeys://`)
    /// instead of the system's roots: for servers with a private CA. With
    /// Sentinel, for the sentinels reached with TLS and the masters (which
    /// are reached with TLS when the sentinels are).
    #[cfg(feature = "tls")]
    pub fn tls_root_cert(mut self, pem: &[u8]) -> Self {
        self.tls_root = Some(pem.to_vec());
        self
    }

    /// The credentials of a Sentinel-managed master (and its replicas):
    /// an ACL user name, or `None` for the default user, and its password.
    /// Ignored for other deployments, whose URLs carry theirs.
    pub fn master_credentials(mut self, username: Option<&str>, password: &str) -> Self {
        self.master_credentials = Some((username.map(str::to_owned), password.to_owned()));
        self
    }

    /// How long an invalidation blocks the computations that began before
    /// it from storing their results. Default 60 s.
    pub fn invalidation_window(mut self, window: Duration) -> Self {
        self.invalidation_window = window;
        self
    }

    /// How long a caller waits for the computation of its key that another
    /// caller in this process runs before it computes by itself (counted
    /// in `coalesce_timeouts`). Default 30 s. A bound, not a schedule: it
    /// ends the wait of a call that waits for itself in a way no marker
    /// can see (a body that spawns a task which calls it for the same key
    /// and awaits that task), and with it the wait of every later caller.
    pub fn coalesce_wait(mut self, wait: Duration) -> Self {
        self.coalesce_wait = wait;
        self
    }

    /// Largest stored value, in bytes (header included); larger values are
    /// neither stored nor read. Default 16 MiB.
    pub fn max_value_bytes(mut self, bytes: usize) -> Self {
        self.max_value_bytes = bytes;
        self
    }

    /// Whether a lookup reads at most `max_value_bytes + 1` bytes of an
    /// entry (`GETRANGE key 0 max`), so that a huge value at a key (another
    /// program's, or a hostile writer's) costs no more memory than the limit
    /// to reject. Off by default: a lookup is then a plain `GET`, which on a
    /// busy 2-core machine gave 0 to 9% more hit throughput, and a value
    /// over the limit is rejected after it was read (Redis caps a value at
    /// 512 MB). Turn it on when programs you do not trust can write to the
    /// cache's Redis.
    pub fn bounded_reads(mut self, bounded: bool) -> Self {
        self.bounded_reads = bounded;
        self
    }

    /// Whether each call's tracing span names its key (the field `key`,
    /// namespace included). Off by default: keys hold user ids, emails and
    /// other arguments, and logs travel further than the cache. Values are
    /// never logged.
    pub fn log_keys(mut self, log: bool) -> Self {
        self.log_keys = log;
        self
    }

    /// Whether lookups that many tasks make at the same moment are merged
    /// into one `MGET` (on a server or a Sentinel master; a cluster reads
    /// key by key). A lookup that finds no other on the wire goes out at
    /// once as a `GET`, so a lone caller waits no longer; under
    /// concurrency, Redis answers many keys for the work of one command.
    /// On by default; merged reads are whole (`bounded_reads` turns merging
    /// off).
    pub fn merge_lookups(mut self, merge: bool) -> Self {
        self.merge_lookups = merge;
        self
    }

    /// About how many entries the near tier (`near = "…"`,
    /// [`Cache::get_near`]) keeps at most; the least used go first. Default 10,000; 0 turns the
    /// tier off (every call reads Redis). The tier exists on a server or a
    /// Sentinel master, not on a cluster, nor in memory (which is local).
    pub fn near_capacity(mut self, entries: usize) -> Self {
        self.near_capacity = entries;
        self
    }

    /// About how much memory the near tier holds at most, decoded values
    /// included: each entry counts its bytes as stored, its key, and, once
    /// a hit has decoded it, an estimate of what the decoded value holds
    /// (its strings and collections as serde shows them, each rounded up
    /// as an allocator would; before that, as much as the stored bytes).
    /// Default 64 MiB. Whichever of this and
    /// [`near_capacity`](Self::near_capacity) is reached first bounds it;
    /// an entry over 1/64 of it (stored or decoded) is not kept.
    pub fn near_max_bytes(mut self, bytes: usize) -> Self {
        self.near_max_bytes = bytes;
        self
    }

    /// Checks the settings and builds the cache. Connects nothing.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] for a malformed URL, [`Error::Config`] for a
    /// zero TTL or timeout or a namespace longer than 64 bytes or with
    /// characters outside `A-Z a-z 0-9 - _ . /`.
    pub fn build(self) -> Result<Cache> {
        if let Some(ns) = &self.namespace {
            let valid = !ns.is_empty()
                && ns.len() <= MAX_NAMESPACE_LEN
                && ns
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
            if !valid {
                return Err(Error::Config(format!(
                    "namespace {ns:?} must be 1 to {MAX_NAMESPACE_LEN} bytes of A-Z a-z 0-9 - _ . /"
                )));
            }
        }
        for (name, value) in [
            ("default_ttl", self.default_ttl),
            ("op_timeout", self.op_timeout),
            ("connect_timeout", self.connect_timeout),
            ("invalidation_window", self.invalidation_window),
            ("coalesce_wait", self.coalesce_wait),
            ("breaker cooldown", self.breaker.cooldown),
        ] {
            if value.is_zero() {
                return Err(Error::Config(format!("{name} must be greater than zero")));
            }
        }
        if self.breaker.failure_threshold == 0 {
            return Err(Error::Config(
                "breaker failure_threshold must be at least 1".into(),
            ));
        }
        let target = match &self.deployment {
            Deployment::Url(url) if url == MEMORY_URL => return Ok(self.build_in_memory()),
            Deployment::Url(url) => Target::server(url, self.tls_root.as_deref())?,
            Deployment::Cluster(nodes) => {
                let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
                Target::Cluster(Arc::new(ClusterTarget::new(
                    &nodes,
                    self.connect_timeout,
                    self.tls_root.as_deref(),
                )?))
            }
            Deployment::Sentinel { sentinels, master } => {
                let sentinels: Vec<&str> = sentinels.iter().map(String::as_str).collect();
                let credentials = self
                    .master_credentials
                    .as_ref()
                    .map(|(user, password)| (user.as_deref(), password.as_str()));
                Target::Sentinel(Arc::new(SentinelTarget::new(
                    &sentinels,
                    master,
                    credentials,
                    self.tls_root.as_deref(),
                    self.connect_timeout,
                )?))
            }
        };
        let channel = match &self.namespace {
            Some(ns) => format!("{ns}:redis-cached:filled"),
            None => "redis-cached:filled".to_owned(),
        };
        // Changed every 100 ms by a cache with a near tier, to prove that
        // its tracking connection hears invalidations.
        let near_canary = internal_key(
            self.namespace.as_deref(),
            "near",
            &crate::token::lock_token(),
        );
        let backend = AnyBackend::Redis(RedisBackend::new(
            target,
            (self.connect_timeout, self.op_timeout),
            channel,
            self.max_value_bytes,
            (self.merge_lookups && !self.bounded_reads).then_some(self.op_timeout),
            (self.near_capacity, self.near_max_bytes, near_canary),
        )?);
        Ok(self.finish(backend))
    }

    /// The in-memory cache these settings describe (the URL unread).
    pub(crate) fn build_in_memory(self) -> Cache {
        let backend = AnyBackend::Memory(MemoryBackend::new(self.memory, self.invalidation_window));
        self.finish(backend)
    }

    fn finish(self, backend: AnyBackend) -> Cache {
        let health = Health::new(self.breaker, backend.is_cluster());
        let series = Series::of_cache(backend.is_redis(), backend.tracker().is_some());
        let cache = Cache::from_inner(Inner {
            backend,
            settings: Settings {
                namespace: self.namespace,
                default_ttl: self.default_ttl,
                op_timeout: self.op_timeout,
                connect_timeout: self.connect_timeout,
                invalidation_window: self.invalidation_window,
                coalesce_wait: self.coalesce_wait,
                max_value_bytes: self.max_value_bytes,
                bounded_reads: self.bounded_reads,
                log_keys: self.log_keys,
                codec: self.codec,
            },
            health,
            counters: Arc::new(Counters::default()),
            meters: Arc::new(Meters::of(series)),
            oversized_warned: std::sync::atomic::AtomicBool::new(false),
            near_off_warned: std::sync::atomic::AtomicBool::new(false),
            flights: Flights::default(),
            try_flights: Default::default(),
            refreshing: Claims::default(),
            recent: Default::default(),
        });
        let inner = &cache.inner;
        if let Some(tracker) = inner.backend.tracker() {
            tracker.store.count_in(inner.counting());
        }
        cache
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_password() {
        let builder = Cache::builder("redis://app:hunter2@db.internal:6379/0");
        let shown = format!("{builder:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redis://***@db.internal:6379/0"), "{shown}");
        let builder = Cache::sentinel_builder(&["redis://s:pw@h:26379/"], "m")
            .master_credentials(None, "hunter2");
        let shown = format!("{builder:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("pw@"),
            "{shown}"
        );
        assert_eq!(redact("redis://localhost/"), "redis://localhost/");
        assert_eq!(redact(":pw@localhost:6379"), "***@localhost:6379");
    }
}
