//! Building a write-behind: its settings, checked once, and the start of
//! its flusher.

use std::marker::PhantomData;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::flusher;
use super::handle::{Handle, WriteBehind};
use super::integrity::IntegrityKey;
use super::shared::{Limits, Shared};
use super::stats::Counters;
use super::Sink;
use crate::backend::JournalKeys;
use crate::cache::Cache;
use crate::encoding::key::{internal_key, KeyParts, Template};
use crate::error::{Error, Result};
use crate::token::lock_token;

impl WriteBehind<(), ()> {
    /// Starts building a write-behind named `name` (its journal's name in
    /// Redis; processes that share it share the journal) over `cache`,
    /// flushing to `sink`.
    pub fn builder<K, V, S>(name: &str, cache: &Cache, sink: S) -> WriteBehindBuilder<K, V, S>
    where
        K: Serialize + DeserializeOwned + KeyParts + Clone + Send + Sync + 'static,
        V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        S: Sink<K, V>,
    {
        WriteBehindBuilder::new(name, cache, sink)
    }
}

/// The shortest secret `integrity_key` takes.
const MIN_SECRET_BYTES: usize = 16;

/// Builds a [`WriteBehind`]; from [`WriteBehind::builder`].
pub struct WriteBehindBuilder<K, V, S> {
    name: String,
    cache: Cache,
    sink: S,
    key: Option<String>,
    version: Option<u32>,
    integrity: Option<IntegrityKey>,
    /// Whether the secret given to `integrity_key` was too short to keep
    /// anyone from guessing it.
    weak_integrity: bool,
    limits: Limits,
    _types: PhantomData<fn(K, V)>,
}

impl<K, V, S> WriteBehindBuilder<K, V, S>
where
    K: Serialize + DeserializeOwned + KeyParts + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    S: Sink<K, V>,
{
    pub(super) fn new(name: &str, cache: &Cache, sink: S) -> Self {
        WriteBehindBuilder {
            name: name.to_owned(),
            cache: cache.clone(),
            sink,
            key: None,
            version: None,
            integrity: None,
            weak_integrity: false,
            limits: Limits {
                ttl: cache.default_ttl(),
                batch_size: 256,
                max_delay: Duration::from_millis(100),
                max_len: 100_000,
                lease: Duration::from_secs(10),
                max_attempts: 10,
                retry_base: Duration::from_millis(100),
                retry_max: Duration::from_secs(10),
                sink_timeout: Duration::from_secs(30),
                max_dead_letters: 10_000,
                park_for: Duration::from_secs(3600),
                log_sink_errors: false,
                flusher: true,
            },
            _types: PhantomData,
        }
    }

    /// The key template of a written key's cache entry (required): the
    /// getter's `key = "…"`, rendered exactly as the attribute renders it,
    /// so that the getter reads what the write-behind writes. One
    /// placeholder takes the whole key (`"user:<id>"` with `u64` keys); a
    /// tuple key fills several in order (`"order:<tenant>:<id>"` with
    /// `(String, u64)` keys). The placeholder names are not read.
    ///
    /// The template is checked by [`WriteBehindBuilder::start`] with the
    /// attribute's rules. The getter's key must be an explicit template
    /// over parameters of concrete types: a default key, or a placeholder
    /// of generic type, adds a digest that no template renders. Entries
    /// written here carry no tags (`invalidate_tag` does not reach them).
    pub fn key_template(mut self, template: &str) -> Self {
        self.key = Some(template.to_owned());
        self
    }

    /// The getter's `version = n`, if it has one: entries are written at
    /// the key the getter reads (`…@v<n>`).
    pub fn version(mut self, version: u32) -> Self {
        self.version = Some(version);
        self
    }

    /// How long a written entry stays in the cache (default: the cache's
    /// `default_ttl`), from the write, and again from its flush.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.limits.ttl = ttl;
        self
    }

    /// The most writes one sink call gets (default 256, at most 4096).
    pub fn batch_size(mut self, size: usize) -> Self {
        self.limits.batch_size = size;
        self
    }

    /// How long a write may wait for more to fill its batch (default
    /// 100 ms); a full batch goes at once.
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.limits.max_delay = delay;
        self
    }

    /// The most writes the journal holds (default 100,000): beyond it,
    /// writes are refused with [`Error::Backlog`] until the sink catches
    /// up. Nothing is ever trimmed from the journal unflushed.
    pub fn max_len(mut self, max_len: u64) -> Self {
        self.limits.max_len = max_len;
        self
    }

    /// The flusher lease's time to live (default 10 s): how long after a
    /// flusher dies another process takes its pending writes over. The
    /// holder extends it every third of that, also while the sink works
    /// and while it backs off, and stops a sink call by its own clock
    /// once the lease may have run out.
    pub fn takeover_after(mut self, lease: Duration) -> Self {
        self.limits.lease = lease;
        self
    }

    /// How often one write may fail alone, while the sink takes other
    /// writes, before it goes to the dead letters (default 10; see
    /// [`WriteBehind`]).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.limits.max_attempts = attempts;
        self
    }

    /// The back-off between failed sink calls: from `base`, doubling, at
    /// most `max` (default 100 ms to 10 s).
    pub fn retry(mut self, base: Duration, max: Duration) -> Self {
        self.limits.retry_base = base;
        self.limits.retry_max = max;
        self
    }

    /// How long one sink call may take (default 30 s): a call still
    /// running then is abandoned (its future dropped) and counts as a
    /// failure, so that a hung database cannot hold the lease for ever.
    /// An async database driver rolls back a transaction whose future is
    /// dropped.
    pub fn sink_timeout(mut self, timeout: Duration) -> Self {
        self.limits.sink_timeout = timeout;
        self
    }

    /// The most dead letters kept (default 10,000). Nothing is dropped from
    /// them: while they are full, a write given up on stays in the journal
    /// (counted in
    /// [`WriteBehindStats::dead_letters_full`](super::WriteBehindStats::dead_letters_full)),
    /// until they are drained (`XRANGE`, then `XDEL`).
    pub fn max_dead_letters(mut self, most: u64) -> Self {
        self.limits.max_dead_letters = most;
        self
    }

    /// How long a journaled write that this process cannot decode (a
    /// newer format, written by a newer version of the application during
    /// a rolling deploy) stays in the journal for a flusher that can,
    /// before it goes to the dead letters (default 1 h). Meanwhile it is
    /// retried with back-off, and a later write of its key replaces it.
    pub fn park_undecodable_for(mut self, period: Duration) -> Self {
        self.limits.park_for = period;
        self
    }

    /// Whether the sink's error text goes into the log lines of a failed
    /// flush and of a write given up on (default: no). A database's error
    /// often quotes the row it refused (`invalid input syntax for type
    /// integer: "…"`), and no stored value reaches the logs unless you
    /// ask. Off, the lines say how many writes failed and how often; the
    /// error text is kept with the write when it is moved to the dead
    /// letters, which are as private as the journal (while they are full,
    /// the write stays in the journal and is tried again, and its reason
    /// with it).
    pub fn log_sink_errors(mut self, on: bool) -> Self {
        self.limits.log_sink_errors = on;
        self
    }

    /// Signs each journaled write with an HMAC-SHA256 under `secret`, a
    /// key the application holds (every process that shares the journal
    /// needs the same): the flusher hands the sink only writes whose MAC
    /// matches, and parks, then moves to the dead letters, any other entry
    /// of the stream (one another program added: a forged database write,
    /// or an entry copied and added again more than five minutes after it
    /// was signed). For a Redis shared with other applications, on top of
    /// an ACL that keeps the journal's keys private (see the crate's
    /// Security notes). Off by default. The secret must be at least 16
    /// bytes (32 random bytes are best); [`WriteBehindBuilder::start`]
    /// refuses a shorter one.
    ///
    /// What it does not stop: a copy of a signed entry added again within
    /// five minutes of the original passes the check, and can put that
    /// write's value back over a later write of the same key (the copy
    /// has a newer journal id, so an id-fenced sink takes it too). Only
    /// the ACL keeps others from adding to the journal at all.
    ///
    /// The time signed is the writer's clock, checked against the entry's
    /// stream id (Redis's clock) as it is appended: a writer whose clock
    /// is more than five minutes off Redis's gets
    /// [`Error::Rejected`](crate::Error::Rejected)`("JOURNALSKEW")` and
    /// nothing is journaled, rather than an acknowledged write that the
    /// flusher would refuse later.
    pub fn integrity_key(mut self, secret: &[u8]) -> Self {
        self.integrity = Some(IntegrityKey::new(secret));
        self.weak_integrity = secret.len() < MIN_SECRET_BYTES;
        self
    }

    /// Whether this process flushes (default `true`). With `false` it only
    /// journals writes, and a process with a flusher applies them.
    pub fn flusher(mut self, flusher: bool) -> Self {
        self.limits.flusher = flusher;
        self
    }

    /// Checks the settings and starts the flusher (in the current Tokio
    /// runtime).
    ///
    /// # Errors
    /// [`Error::Config`] when the cache is not on Redis (a journal in
    /// process memory would lose writes on a crash), the name, the key
    /// template or a limit is invalid, no key template was given, or the
    /// flusher has no runtime.
    pub fn start(self) -> Result<WriteBehind<K, V>> {
        let key = self.check()?;
        let runtime = match tokio::runtime::Handle::try_current() {
            Ok(runtime) => Some(runtime),
            Err(_) if self.limits.flusher => {
                return Err(Error::Config(
                    "a write-behind flusher starts inside a Tokio runtime".into(),
                ))
            }
            Err(_) => None,
        };
        let namespace = self.cache.inner.settings.namespace.as_deref();
        let tag = format!("{{{}}}", self.name);
        let counters = Counters::for_journal(&self.name, self.cache.inner.cache_label());
        let shared = Arc::new(Shared {
            journal: JournalKeys {
                stream: internal_key(namespace, "wb", &tag),
                dead: internal_key(namespace, "wb-dead", &tag),
                lease: internal_key(namespace, "wb-lease", &tag),
                group: "flushers".into(),
            },
            consumer: lock_token(),
            key,
            version: self.version,
            integrity: self.integrity,
            cache: self.cache,
            sink: self.sink,
            limits: self.limits,
            counters,
            wake: tokio::sync::Notify::new(),
            urgent: tokio::sync::Notify::new(),
            draining: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            running: AtomicBool::new(false),
            ended: tokio::sync::Notify::new(),
            server_ok: OnceLock::new(),
            server_refused: Mutex::new(None),
            _types: PhantomData,
        });
        if let Some(runtime) = runtime.filter(|_| shared.limits.flusher) {
            flusher::spawn(&shared, &runtime);
        }
        Ok(WriteBehind {
            handle: Arc::new(Handle(shared)),
        })
    }

    /// The key template, once every setting is found valid.
    fn check(&self) -> Result<Template> {
        let limits = &self.limits;
        let problem = if !self.cache.inner.backend.is_redis() {
            Some("write-behind needs a Redis cache: its journal must outlive this process")
        } else if self.name.is_empty()
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b))
        {
            Some("a write-behind name is ASCII letters, digits and `_-.:`")
        } else if self.weak_integrity {
            Some("an integrity_key secret must be at least 16 bytes (32 random bytes are best)")
        } else if !(1..=4096).contains(&limits.batch_size) {
            Some("batch_size must be 1 to 4096")
        } else if limits.max_len == 0 || limits.max_attempts == 0 || limits.max_dead_letters == 0 {
            Some("max_len, max_attempts and max_dead_letters must be at least 1")
        } else if limits.lease < Duration::from_millis(100) {
            Some("takeover_after must be at least 100 ms")
        } else if limits.max_delay > limits.lease / 2 {
            Some("max_delay must be at most half of takeover_after")
        } else if limits.ttl.is_zero() || limits.sink_timeout.is_zero() {
            Some("ttl and sink_timeout must not be zero")
        } else if limits.retry_base.is_zero() || limits.retry_max < limits.retry_base {
            Some("the retry base must not be zero, nor above the retry maximum")
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(Error::Config(problem.into()));
        }
        let Some(text) = self.key.as_deref() else {
            return Err(Error::Config(
                "a write-behind needs the getter's key template: `.key_template(\"user:<id>\")`"
                    .into(),
            ));
        };
        let template = Template::parse(text)
            .map_err(|why| Error::Config(format!("write-behind key template: {why}")))?;
        if template.placeholders() != K::COUNT {
            return Err(Error::Config(format!(
                "write-behind key template: {} placeholders, but a key fills {} (one \
                 placeholder for a single value, one per element for a tuple)",
                template.placeholders(),
                K::COUNT
            )));
        }
        Ok(template)
    }
}
