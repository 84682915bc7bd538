//! Finding the master that a set of Sentinels manages, and hearing when it
//! fails over.
//!
//! One lookup serves the whole cache: the data connection, the lock
//! subscriber and the near tier's tracking all ask [`SentinelTarget::master`],
//! which runs one lookup at a time and hands its answer to whoever asks
//! within the next second. A lookup asks every sentinel at once, on a
//! connection to each that it keeps (so a cache dials a sentinel once, not
//! once per lookup), and trusts an address only once two sentinels name it
//! (one, if only one sentinel is configured, or if it is the master found
//! last): a single sentinel, compromised or lagging, cannot send the cache
//! (and the master's credentials) anywhere. Only then does the cache
//! connect to that address, with the credentials, and check with `ROLE`
//! that it is a master.
//!
//! A failover is heard as `+switch-master` from one sentinel at a time (the
//! next one if it fails). It has the cache look the master up again at
//! once, and the address the master moved away from is not trusted for a
//! while, since the sentinels that have not heard of the failover yet still
//! name it. The announcing sentinel gains no trust: its word still needs a
//! second sentinel's.
//!
//! TLS is decided by the sentinels' parsed URLs (`rediss://`, `valkeys://`,
//! in any case): a TLS sentinel set means TLS masters, trusting the same
//! private CA if one is given.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionAddr, IntoConnectionInfo, Value};

use super::flag::ClearOnDrop;
#[cfg(not(feature = "tls"))]
use super::url::no_tls;
use super::url::{invalid_url_in, is_tls, open_client_with};
use crate::error::{Error, Result};

/// A master's address, as the sentinels name it.
type Address = (String, u16);

/// How long a lookup's answer serves the callers that ask after it.
const FRESH: Duration = Duration::from_secs(1);
/// How long the address a master failed over from is not trusted.
const DISTRUST_OLD_MASTER: Duration = Duration::from_secs(60);

/// How to find a Sentinel-managed master.
pub(crate) struct SentinelTarget {
    name: String,
    sentinels: Vec<Sentinel>,
    /// What a connection to a master is made with.
    master: MasterSettings,
    connect_timeout: Duration,
    /// Whether a task listens for failovers; cleared when it ends.
    watching: Arc<AtomicBool>,
    /// Failovers heard of so far: a lookup that started before one may
    /// have found the old master.
    switches: AtomicU64,
    /// The lookup running or made last; held while one runs.
    lookup: tokio::sync::Mutex<Option<Found>>,
    trust: Mutex<Trust>,
}

/// One sentinel: how to reach it, and the connection lookups use.
struct Sentinel {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
}

/// What a connection to a master is made with: TLS (`Some(insecure)`) or
/// not, the master's credentials, the CA to trust.
struct MasterSettings {
    tls: Option<bool>,
    redis: redis::RedisConnectionInfo,
    tls_root: Option<Vec<u8>>,
}

/// A lookup's answer, and when it was made.
struct Found {
    at: Instant,
    switches: u64,
    master: Result<redis::Client>,
}

/// Which addresses the sentinels' word is taken for.
#[derive(Default)]
struct Trust {
    /// The master found last (checked with `ROLE`).
    confirmed: Option<Address>,
    /// The address the last failover moved away from, and when.
    left: Option<(Address, Instant)>,
}

impl SentinelTarget {
    /// The master `name` of the sentinels at `sentinels`, reached with
    /// `credentials` (user, password), trusting `tls_root` (PEM) for TLS;
    /// each connection takes at most `connect_timeout`.
    pub(crate) fn new(
        sentinels: &[&str],
        name: &str,
        credentials: Option<(Option<&str>, &str)>,
        tls_root: Option<&[u8]>,
        connect_timeout: Duration,
    ) -> Result<Self> {
        if sentinels.is_empty() {
            return Err(Error::Config(
                "Sentinel needs at least one sentinel URL".into(),
            ));
        }
        if name.is_empty() {
            return Err(Error::Config("Sentinel needs the master's name".into()));
        }
        #[cfg(not(feature = "tls"))]
        if tls_root.is_some() || sentinels.iter().any(|url| super::url::wants_tls(url)) {
            return Err(no_tls());
        }
        let infos = sentinels
            .iter()
            .map(|url| {
                url.into_connection_info()
                    .map_err(|e| invalid_url_in(&[url], &e))
            })
            .collect::<Result<Vec<_>>>()?;
        // TLS if any sentinel is reached with TLS (the safer reading of a
        // mixed list), without checking certificates only if every TLS
        // sentinel URL says so (`#insecure`).
        let tls_infos: Vec<_> = infos.iter().filter(|info| is_tls(info)).collect();
        let tls = (!tls_infos.is_empty()).then(|| {
            tls_infos
                .iter()
                .all(|info| matches!(info.addr(), ConnectionAddr::TcpTls { insecure: true, .. }))
        });
        let sentinels = infos
            .into_iter()
            .zip(sentinels)
            .map(|(info, url)| {
                let client =
                    open_client_with(info, tls_root).map_err(|e| invalid_url_in(&[url], &e))?;
                Ok(Sentinel {
                    client,
                    conn: tokio::sync::Mutex::new(None),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut redis = redis::RedisConnectionInfo::default();
        if let Some((username, password)) = credentials {
            redis = redis.set_password(password);
            if let Some(username) = username {
                redis = redis.set_username(username);
            }
        }
        Ok(SentinelTarget {
            name: name.to_owned(),
            sentinels,
            master: MasterSettings {
                tls,
                redis,
                tls_root: tls_root.map(<[u8]>::to_vec),
            },
            connect_timeout,
            watching: Arc::new(AtomicBool::new(false)),
            switches: AtomicU64::new(0),
            lookup: tokio::sync::Mutex::new(None),
            trust: Mutex::new(Trust::default()),
        })
    }

    /// The master's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    fn trust(&self) -> MutexGuard<'_, Trust> {
        self.trust.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A client for the current master: the answer of the lookup made
    /// within the last second if no failover was heard of since, else a
    /// lookup's (one at a time; see the module's documentation).
    pub(crate) async fn master(&self) -> Result<redis::Client> {
        let mut last = self.lookup.lock().await;
        let switches = self.switches();
        if let Some(found) = last.as_ref() {
            if found.switches == switches && found.at.elapsed() < FRESH {
                return found.master.clone();
            }
        }
        let master = self.find().await;
        *last = Some(Found {
            at: Instant::now(),
            switches,
            master: master.clone(),
        });
        master
    }

    /// Asks every sentinel at once for the master's address, and takes the
    /// first that enough of them name; checks that it is a master.
    async fn find(&self) -> Result<redis::Client> {
        let (confirmed, left) = {
            let trust = self.trust();
            let left = trust
                .left
                .clone()
                .filter(|(_, at)| at.elapsed() < DISTRUST_OLD_MASTER)
                .map(|(address, _)| address);
            (trust.confirmed.clone(), left)
        };
        let needed = |address: &Address| {
            if self.sentinels.len() == 1 || confirmed.as_ref() == Some(address) {
                1
            } else {
                2
            }
        };
        let mut asked: FuturesUnordered<_> = self.sentinels.iter().map(|s| self.ask(s)).collect();
        let mut named: Vec<(Address, usize)> = Vec::new();
        let mut answered = 0;
        let mut chosen = None;
        while let Some(answer) = asked.next().await {
            let Ok(Some(address)) = answer else {
                continue;
            };
            answered += 1;
            if left.as_ref() == Some(&address) {
                continue;
            }
            let votes = match named.iter_mut().find(|(known, _)| *known == address) {
                Some((_, votes)) => {
                    *votes += 1;
                    *votes
                }
                None => {
                    named.push((address.clone(), 1));
                    1
                }
            };
            if votes >= needed(&address) {
                chosen = Some(address);
                break;
            }
        }
        drop(asked);
        let Some((host, port)) = chosen else {
            return Err(Error::Redis(format!(
                "no master address named by enough sentinels ({answered} of {} answered)",
                self.sentinels.len()
            )));
        };
        let client = self.master_client(&host, port)?;
        self.check_role(&client).await?;
        self.trust().confirmed = Some((host, port));
        Ok(client)
    }

    /// The address `sentinel` names for the master, if any, on the
    /// connection kept for it (made now if need be; dropped if it fails).
    async fn ask(&self, sentinel: &Sentinel) -> Result<Option<Address>> {
        let mut slot = sentinel.conn.lock().await;
        let mut conn = match slot.as_ref() {
            Some(conn) => conn.clone(),
            None => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.connect_timeout))
                    .set_response_timeout(Some(self.connect_timeout));
                let conn = sentinel
                    .client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(|e| Error::from_redis(&e))?;
                slot.insert(conn).clone()
            }
        };
        let reply = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&self.name)
            .query_async::<Option<(String, String)>>(&mut conn)
            .await;
        match reply {
            Ok(named) => Ok(named.and_then(|(host, port)| Some((host, port.parse().ok()?)))),
            Err(err) => {
                *slot = None;
                Err(Error::from_redis(&err))
            }
        }
    }

    /// A client for the master at `host:port`, with its credentials, over
    /// TLS if the sentinels are.
    fn master_client(&self, host: &str, port: u16) -> Result<redis::Client> {
        let addr = match self.master.tls {
            None => ConnectionAddr::Tcp(host.to_owned(), port),
            Some(insecure) => ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure,
                tls_params: None,
            },
        };
        let info = addr
            .into_connection_info()
            .map_err(|e| Error::from_redis(&e))?
            .set_redis_settings(self.master.redis.clone());
        open_client_with(info, self.master.tls_root.as_deref()).map_err(|e| Error::from_redis(&e))
    }

    /// Checks that `client`'s server calls itself master (`ROLE`).
    async fn check_role(&self, client: &redis::Client) -> Result<()> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.connect_timeout));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| Error::from_redis(&e))?;
        let role: Value = redis::cmd("ROLE")
            .query_async(&mut conn)
            .await
            .map_err(|e| Error::from_redis(&e))?;
        match role {
            Value::Array(fields) if matches!(fields.first(), Some(Value::BulkString(role)) if role == b"master") => {
                Ok(())
            }
            _ => Err(Error::Redis(
                "the address the sentinels name is not a master".into(),
            )),
        }
    }

    /// How many failovers this process has heard of.
    pub(crate) fn switches(&self) -> u64 {
        self.switches.load(Ordering::Acquire)
    }

    /// Whether a task listens for failovers.
    pub(crate) fn is_watched(&self) -> bool {
        self.watching.load(Ordering::Acquire)
    }

    /// A failover announced by `message` (`<name> <old ip> <old port> <new
    /// ip> <new port>`): whether it is this master's. The address it left
    /// is not trusted for a while (until then, a failover back to it ends
    /// that, leaving the other).
    fn heard(&self, message: &[u8]) -> bool {
        let text = String::from_utf8_lossy(message);
        let mut fields = text.split(' ');
        if fields.next() != Some(self.name.as_str()) {
            return false;
        }
        let old = match (fields.next(), fields.next().and_then(|p| p.parse().ok())) {
            (Some(host), Some(port)) => Some((host.to_owned(), port)),
            _ => None,
        };
        {
            let mut trust = self.trust();
            if let Some(old) = old {
                if trust.confirmed.as_ref() == Some(&old) {
                    trust.confirmed = None;
                }
                trust.left = Some((old, Instant::now()));
            }
        }
        self.switches.fetch_add(1, Ordering::AcqRel);
        true
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
                let Some(client) = target.upgrade().and_then(|t| {
                    let count = t.sentinels.len();
                    Some(t.sentinels.get(next % count)?.client.clone())
                }) else {
                    return;
                };
                next += 1;
                if !alive() {
                    return;
                }
                let heard = |message: &[u8]| {
                    if target.upgrade().is_some_and(|t| t.heard(message)) {
                        tracing::info!(target: "redis_cached", "Redis Sentinel failed the master over; following it");
                        switched();
                    }
                };
                if !listen_for_switches(&client, &alive, &heard).await {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
}

/// Listens to one sentinel's `+switch-master` until its connection fails
/// (`true`: try another) or the cache is gone (`false`).
async fn listen_for_switches(
    sentinel: &redis::Client,
    alive: &(impl Fn() -> bool + Send + Sync),
    heard: &(impl Fn(&[u8]) + Send + Sync),
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
            Ok(Some(message)) => {
                quiet = 0;
                heard(message.get_payload_bytes());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn target(urls: &[&str], tls_root: Option<&[u8]>) -> SentinelTarget {
        SentinelTarget::new(
            urls,
            "m",
            Some((None, "pw")),
            tls_root,
            Duration::from_secs(1),
        )
        .expect("valid settings")
    }

    #[cfg(feature = "tls")]
    #[test]
    fn masters_are_reached_with_tls_when_the_sentinels_are() {
        for urls in [
            &["valkeys://127.0.0.1:26379/"][..],
            &["REDISS://127.0.0.1:26379/"],
            &["redis://127.0.0.1:26379/", "rediss://127.0.0.1:26380/"],
        ] {
            let target = target(urls, None);
            let master = target.master_client("10.0.0.1", 6379).expect("a client");
            assert!(
                matches!(
                    master.get_connection_info().addr(),
                    ConnectionAddr::TcpTls {
                        insecure: false,
                        ..
                    }
                ),
                "{urls:?}"
            );
        }
        let plain = target(&["valkey://127.0.0.1:26379/"], None);
        let master = plain.master_client("10.0.0.1", 6379).expect("a client");
        assert!(matches!(
            master.get_connection_info().addr(),
            ConnectionAddr::Tcp(..)
        ));
        assert_eq!(
            master.get_connection_info().redis_settings().password(),
            Some("pw")
        );
    }

    #[test]
    fn a_failover_distrusts_the_master_it_left() {
        let target = target(&["redis://127.0.0.1:1/", "redis://127.0.0.1:2/"], None);
        target.trust().confirmed = Some(("10.0.0.1".into(), 6379));
        assert!(
            !target.heard(b"other 10.0.0.1 6379 10.0.0.2 6379"),
            "another master's"
        );
        assert_eq!(target.switches(), 0);
        assert!(target.heard(b"m 10.0.0.1 6379 10.0.0.2 6379"));
        assert_eq!(target.switches(), 1);
        {
            let trust = target.trust();
            assert_eq!(
                trust.confirmed, None,
                "the old master needs two sentinels again"
            );
            assert_eq!(
                trust.left.as_ref().map(|(address, _)| address.clone()),
                Some(("10.0.0.1".into(), 6379))
            );
        }
        // A failover back: the address left is the other one now.
        assert!(target.heard(b"m 10.0.0.2 6379 10.0.0.1 6379"));
        let trust = target.trust();
        assert_eq!(
            trust.left.as_ref().map(|(address, _)| address.clone()),
            Some(("10.0.0.2".into(), 6379))
        );
    }
}
