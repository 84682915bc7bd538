//! The Redis backend: one multiplexed connection per cache, managed by
//! redis-rs's `ConnectionManager`, which reconnects in the background.
//!
//! The manager is created on first use, inside the caller's Tokio runtime,
//! so building a cache never touches the network and works outside a
//! runtime. When the breaker opens, the manager is dropped and the next
//! probe builds a fresh one: redis-rs only reconnects after I/O errors, so a
//! connection that failed for another reason (a wrong password that has
//! since been fixed) would otherwise stay failed.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Backend, Bytes};
use crate::error::{Error, Result};

/// Compare-and-set: `SET` only if the key still holds what the caller saw.
/// KEYS[1] the key; ARGV: `1` if a value is expected (else `0`: nothing, or
/// an empty string, which no entry is), that value, the new value, its TTL
/// in ms.
const SET_IF: &str = r"
local cur = redis.call('GET', KEYS[1])
if (ARGV[1] == '0' and (not cur or cur == '')) or (ARGV[1] == '1' and cur == ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
  return 1
end
return 0
";

/// Adds ARGV[1] to each tag set in KEYS, keeping each set at least ARGV[2] ms.
const TAG: &str = r"
for _, tag in ipairs(KEYS) do
  redis.call('SADD', tag, ARGV[1])
  if redis.call('PTTL', tag) < tonumber(ARGV[2]) then
    redis.call('PEXPIRE', tag, ARGV[2])
  end
end
return 0
";

/// Replaces every key of the tag set KEYS[1] by the tombstone ARGV[1] for
/// ARGV[2] ms, deletes the set, and returns how many keys it held.
const INVALIDATE_TAG: &str = r"
local members = redis.call('SMEMBERS', KEYS[1])
for _, key in ipairs(members) do
  redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
end
redis.call('DEL', KEYS[1])
return #members
";

/// The sources of the scripts above, in the order of [`RedisBackend`]'s
/// fields; also loaded ahead of use by [`RedisBackend::prepare`].
const SCRIPTS: [&str; 3] = [SET_IF, TAG, INVALIDATE_TAG];

pub(crate) struct RedisBackend {
    client: redis::Client,
    set_if: redis::Script,
    tag: redis::Script,
    invalidate_tag: redis::Script,
    config: ConnectionManagerConfig,
    /// Read on every operation: an `ArcSwap` load shares no cache line
    /// between threads, where a mutex would.
    manager: ArcSwapOption<ConnectionManager>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let info = self.client.get_connection_info();
        f.debug_struct("RedisBackend")
            .field("addr", &info.addr().to_string())
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// Parses `url` and prepares the connection settings; connects nothing.
    /// `tls_root` (PEM) replaces the system's trusted roots for `rediss://`.
    pub(crate) fn new(
        url: &str,
        connect_timeout: Duration,
        tls_root: Option<&[u8]>,
    ) -> Result<Self> {
        let client = open_client(url, tls_root)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            // Every operation is already bounded by the cache's own
            // op_timeout; a second timer per request inside redis-rs would
            // only cost hit-path throughput.
            .set_response_timeout(None)
            // No retries inside redis-rs: a refused connection fails at once and
            // the breaker paces the next attempts.
            .set_number_of_retries(0)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(500));
        let [set_if, tag, invalidate_tag] = SCRIPTS.map(redis::Script::new);
        Ok(RedisBackend {
            client,
            set_if,
            tag,
            invalidate_tag,
            config,
            manager: ArcSwapOption::empty(),
        })
    }

    fn connection(&self) -> Result<ConnectionManager> {
        if let Some(manager) = self.manager.load().as_ref() {
            return Ok(ConnectionManager::clone(manager));
        }
        let fresh = Arc::new(
            ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())
                .map_err(|e| Error::from_redis(&e))?,
        );
        // Two callers may race to create one; the first stored wins and the
        // other's unused manager is dropped.
        let previous = self
            .manager
            .compare_and_swap(&None::<Arc<ConnectionManager>>, Some(fresh.clone()));
        let manager = previous.as_ref().map_or(fresh, Arc::clone);
        Ok(ConnectionManager::clone(&manager))
    }

    /// The client, for the dedicated subscriber connection.
    pub(crate) fn client(&self) -> &redis::Client {
        &self.client
    }

    /// Drops the current connection; the next operation connects afresh.
    pub(crate) fn reset(&self) {
        self.manager.store(None);
    }

    /// Connects if need be and loads this backend's scripts and `more`
    /// (one round trip), so that no later call pays for a `NOSCRIPT` retry.
    pub(crate) async fn prepare(&self, more: &[&str]) -> Result<()> {
        let mut pipe = redis::pipe();
        for source in SCRIPTS.iter().chain(more) {
            pipe.cmd("SCRIPT").arg("LOAD").arg(*source);
        }
        let mut conn = self.connection()?;
        let _: Vec<String> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| Error::from_redis(&e))?;
        Ok(())
    }

    /// Runs `script` (EVALSHA, loading it on NOSCRIPT).
    pub(crate) async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        let mut conn = self.connection()?;
        invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| Error::from_redis(&e))
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T> {
        let mut conn = self.connection()?;
        cmd.query_async(&mut conn)
            .await
            .map_err(|e| Error::from_redis(&e))
    }
}

impl Backend for RedisBackend {
    async fn get(&self, key: &str, limit: Option<usize>) -> Result<Option<Bytes>> {
        let value: Option<Vec<u8>> = match limit {
            // GETRANGE reads at most limit + 1 bytes: an oversized value
            // costs no more than that to reject.
            Some(limit) => {
                self.query(redis::cmd("GETRANGE").arg(key).arg(0).arg(limit))
                    .await?
            }
            None => self.query(redis::cmd("GET").arg(key)).await?,
        };
        // A missing key reads as empty through GETRANGE; no entry is empty.
        Ok(value.filter(|v| !v.is_empty()).map(Bytes::Owned))
    }

    async fn set(&self, key: &str, value: Arc<[u8]>, ttl: Duration) -> Result<()> {
        self.query(
            redis::cmd("SET")
                .arg(key)
                .arg(&*value)
                .arg("PX")
                .arg(px(ttl)),
        )
        .await
    }

    async fn set_if(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: Arc<[u8]>,
        ttl: Duration,
    ) -> Result<bool> {
        let mut invocation = self.set_if.key(key);
        invocation
            .arg(if expected.is_some() { "1" } else { "0" })
            .arg(expected.unwrap_or_default())
            .arg(&*value)
            .arg(px(ttl));
        let stored: i64 = self.invoke(&invocation).await?;
        Ok(stored == 1)
    }

    async fn tag(&self, key: &str, tag_keys: &[String], ttl: Duration) -> Result<()> {
        let mut invocation = self.tag.prepare_invoke();
        for tag_key in tag_keys {
            invocation.key(tag_key);
        }
        invocation.arg(key).arg(px(ttl));
        let _: i64 = self.invoke(&invocation).await?;
        Ok(())
    }

    async fn invalidate_tag(
        &self,
        tag_key: &str,
        tombstone: Arc<[u8]>,
        window: Duration,
    ) -> Result<u64> {
        let mut invocation = self.invalidate_tag.key(tag_key);
        invocation.arg(&*tombstone).arg(px(window));
        self.invoke(&invocation).await
    }
}

fn invalid_url(err: &redis::RedisError) -> Error {
    // The error text of a URL parse never needs the URL itself.
    Error::InvalidUrl(format!("{:?}", err.kind()))
}

#[cfg(feature = "tls")]
fn open_client(url: &str, tls_root: Option<&[u8]>) -> Result<redis::Client> {
    // One process-wide provider; if the application installed its own, keep it.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match tls_root {
        Some(pem) => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
            },
        ),
        None => redis::Client::open(url),
    }
    .map_err(|e| invalid_url(&e))
}

#[cfg(not(feature = "tls"))]
fn open_client(url: &str, tls_root: Option<&[u8]>) -> Result<redis::Client> {
    if tls_root.is_some() || url.starts_with("rediss://") {
        return Err(Error::Config(
            "rediss:// needs the `tls` feature of redis-cached".into(),
        ));
    }
    redis::Client::open(url).map_err(|e| invalid_url(&e))
}

/// A TTL in whole milliseconds for PX; under 1 ms still lives 1 ms.
pub(crate) fn px(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}
