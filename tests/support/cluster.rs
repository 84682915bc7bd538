//! A real local Redis Cluster (3 masters, 3 replicas on free ports) and a
//! Sentinel set-up (a master, a replica, 3 sentinels), started by the
//! tests themselves.

use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{free_port, unique_dir, RedisServer, TlsFiles};

/// A cluster of six `redis-server --cluster-enabled yes` nodes.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts a cluster of its own (killed on drop), for tests that stop
    /// its nodes.
    pub fn start() -> Self {
        Self::launch(false)
    }

    /// The cluster shared by the tests of this process: started on first
    /// use, stopped when the process ends. Tests keep apart by namespace.
    pub fn shared() -> &'static RedisCluster {
        static SHARED: OnceLock<RedisCluster> = OnceLock::new();
        SHARED.get_or_init(|| Self::launch(true))
    }

    /// Starts six nodes and joins them; a node that dies or a join that
    /// hangs (`redis-cli --cluster create` waits for ever on a node that
    /// is not there) is retried with new nodes.
    fn launch(shared: bool) -> Self {
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Self::try_launch(shared) {
                Ok(cluster) => return cluster,
                Err(why) => failures.push(why),
            }
        }
        panic!("the test cluster did not come up: {failures:?}");
    }

    fn try_launch(shared: bool) -> Result<Self, String> {
        let nodes: Vec<RedisServer> = (0..6)
            .map(|_| {
                let args = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    // Replicas sync at once (not after the default 5 s),
                    // and may take over however long they were cut off.
                    "--repl-diskless-sync-delay",
                    "0",
                    "--cluster-replica-validity-factor",
                    "0",
                ];
                if shared {
                    RedisServer::start_shared(&args)
                } else {
                    RedisServer::start_with(&args)
                }
            })
            .collect();
        let ports: Vec<u16> = nodes.iter().map(RedisServer::port).collect();
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        for port in &ports {
            create.arg(format!("127.0.0.1:{port}"));
        }
        create.args(["--cluster-replicas", "1", "--cluster-yes"]);
        let cluster = RedisCluster { nodes };
        let joined =
            finish_within(create, Duration::from_secs(60)).and_then(|()| cluster.until_ok());
        if let Err(why) = joined {
            cluster.shut_down();
            return Err(why);
        }
        Ok(cluster)
    }

    /// Stops every node, shared ones included (their watching shell only
    /// stops them when this process ends).
    fn shut_down(&self) {
        for node in &self.nodes {
            // Only a node that is still this one (its port may have gone
            // to another test's server).
            if node.ping() {
                cli(node.port(), &["SHUTDOWN", "NOSAVE"]);
            }
        }
    }

    /// Waits until every node says the cluster is up and knows 3 masters,
    /// and every replica is in sync with its master.
    pub fn wait_ok(&self) {
        if let Err(why) = self.until_ok() {
            panic!("{why}");
        }
    }

    fn until_ok(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let ok = self.nodes.iter().all(|node| {
                let info = cli(node.port(), &["CLUSTER", "INFO"]);
                let replication = cli(node.port(), &["INFO", "replication"]);
                info.contains("cluster_state:ok")
                    && info.contains("cluster_size:3")
                    && (replication.contains("role:master")
                        || replication.contains("master_link_status:up"))
            });
            if ok {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err("the cluster's nodes did not all report it up within 30 s".to_owned())
    }

    /// Every node's URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// How many commands the nodes refused as `CROSSSLOT` since they started.
    pub fn crossslot_errors(&self) -> u64 {
        self.nodes
            .iter()
            .map(|node| {
                let info = cli(node.port(), &["INFO", "errorstats"]);
                info.lines()
                    .filter_map(|line| line.strip_prefix("errorstat_CROSSSLOT:count="))
                    .filter_map(|n| n.trim().parse::<u64>().ok())
                    .sum::<u64>()
            })
            .sum()
    }

    /// The `INFO commandstats` lines, with their node's port, of every
    /// command a node rejected at least once (`CROSSSLOT` is a rejection).
    pub fn rejected_commands(&self) -> Vec<String> {
        self.nodes
            .iter()
            .flat_map(|node| {
                let info = cli(node.port(), &["INFO", "commandstats"]);
                info.lines()
                    .filter(|line| {
                        line.starts_with("cmdstat_") && !line.contains("rejected_calls=0")
                    })
                    .map(|line| format!("{}: {line}", node.port()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// How many times the nodes ran `command` (lower case), from their
    /// `INFO commandstats`, commands run by scripts included.
    pub fn command_calls(&self, command: &str) -> u64 {
        let prefix = format!("cmdstat_{command}:calls=");
        self.nodes
            .iter()
            .map(|node| {
                let info = cli(node.port(), &["INFO", "commandstats"]);
                info.lines()
                    .filter_map(|line| line.strip_prefix(&prefix))
                    .filter_map(|rest| rest.split(',').next()?.parse::<u64>().ok())
                    .sum::<u64>()
            })
            .sum()
    }

    /// How many times the node on `port` ran `command` (lower case).
    pub fn node_command_calls(&self, port: u16, command: &str) -> u64 {
        let prefix = format!("cmdstat_{command}:calls=");
        cli(port, &["INFO", "commandstats"])
            .lines()
            .filter_map(|line| line.strip_prefix(&prefix))
            .filter_map(|rest| rest.split(',').next()?.parse::<u64>().ok())
            .sum()
    }

    /// The ports of the masters.
    pub fn master_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .map(RedisServer::port)
            .filter(|&port| cli(port, &["ROLE"]).starts_with("master"))
            .collect()
    }

    /// How many shard channels named `<prefix>…` the masters have
    /// subscribers on.
    pub fn shard_channels(&self, prefix: &str) -> usize {
        let pattern = format!("{prefix}*");
        self.master_ports()
            .into_iter()
            .map(|port| {
                cli(port, &["PUBSUB", "SHARDCHANNELS", &pattern])
                    .lines()
                    .filter(|channel| !channel.is_empty())
                    .count()
            })
            .sum()
    }

    /// `key`'s slot, as a node that answers computes it.
    pub fn slot_of(&self, key: &str) -> u16 {
        self.nodes
            .iter()
            .find_map(|node| {
                cli(node.port(), &["CLUSTER", "KEYSLOT", key])
                    .trim()
                    .parse()
                    .ok()
            })
            .expect("a node answers")
    }

    /// Whether the master of `key`'s slot has a subscriber on a shard
    /// channel named `<prefix>…` of that slot.
    pub fn has_shard_subscriber(&self, key: &str, prefix: &str) -> bool {
        let slot = self.slot_of(key);
        let owner = self.master_of(key).port();
        let pattern = format!("{prefix}*");
        cli(owner, &["PUBSUB", "SHARDCHANNELS", &pattern])
            .lines()
            .filter(|channel| !channel.is_empty())
            .any(|channel| self.slot_of(channel) == slot)
    }

    /// The node serving `key`'s slot as master.
    pub fn master_of(&self, key: &str) -> &RedisServer {
        let slot = self.slot_of(key);
        self.nodes
            .iter()
            .find(|node| owns(node.port(), slot))
            .expect("a master owns every slot")
    }

    /// The first slot the master on `port` serves, by its own `CLUSTER
    /// NODES` line.
    pub fn first_slot_of(&self, port: u16) -> u16 {
        cli(port, &["CLUSTER", "NODES"])
            .lines()
            .find(|line| line.contains("myself"))
            .and_then(|line| line.split_whitespace().nth(8))
            .and_then(|range| range.split('-').next()?.parse().ok())
            .expect("the master serves slots")
    }

    /// The port of the master serving `slot` by its own word, asking no
    /// node on `skip` (a frozen one would never answer); `None` while none
    /// says it does.
    pub fn master_of_slot_but(&self, slot: u16, skip: u16) -> Option<u16> {
        self.nodes
            .iter()
            .map(RedisServer::port)
            .filter(|&port| port != skip)
            .find(|&port| owns(port, slot))
    }

    /// The port of the master serving `slot`.
    pub fn master_of_slot(&self, slot: u16) -> u16 {
        self.nodes
            .iter()
            .map(RedisServer::port)
            .find(|&port| owns(port, slot))
            .expect("a master owns every slot")
    }
}

/// A slot set MIGRATING at its owner and IMPORTING at another master with
/// no key moved: until [`Migration::end`], a command on two keys of the
/// slot of which one is missing gets `ASK` at the owner, then `TRYAGAIN`
/// at the other master (single-key commands are served).
pub struct Migration {
    slot: String,
    owner_id: String,
    target_id: String,
    ports: Vec<u16>,
}

impl RedisCluster {
    /// Starts a [`Migration`] of `slot` to another master.
    pub fn start_migration(&self, slot: u16) -> Migration {
        let slot = slot.to_string();
        let owner = self
            .nodes
            .iter()
            .map(RedisServer::port)
            .find(|&port| owns(port, slot.parse().expect("a number")))
            .expect("a master owns every slot");
        let target = self
            .nodes
            .iter()
            .map(RedisServer::port)
            .find(|&port| port != owner && cli(port, &["ROLE"]).starts_with("master"))
            .expect("another master");
        let id = |port: u16| cli(port, &["CLUSTER", "MYID"]).trim().to_owned();
        let (owner_id, target_id) = (id(owner), id(target));
        let imported = cli(
            target,
            &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &owner_id],
        );
        let migrated = cli(
            owner,
            &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &target_id],
        );
        assert!(
            imported.contains("OK") && migrated.contains("OK"),
            "SETSLOT: {imported} {migrated}"
        );
        Migration {
            slot,
            owner_id,
            target_id,
            ports: self.nodes.iter().map(RedisServer::port).collect(),
        }
    }
}

impl Migration {
    /// Ends the migration with the slot moved to the other master (it must
    /// hold no key).
    pub fn end_at_target(&self) {
        for &port in &self.ports {
            cli(
                port,
                &["CLUSTER", "SETSLOT", &self.slot, "NODE", &self.target_id],
            );
        }
    }

    /// Ends the migration with the slot where it was. (`NODE` alone would
    /// leave the owner MIGRATING while the slot holds keys.)
    pub fn end(&self) {
        for &port in &self.ports {
            cli(port, &["CLUSTER", "SETSLOT", &self.slot, "STABLE"]);
            cli(
                port,
                &["CLUSTER", "SETSLOT", &self.slot, "NODE", &self.owner_id],
            );
        }
    }
}

/// `key`'s cluster slot, computed here as Redis does (CRC16/XMODEM of the
/// hash tag, or of the whole key without one, mod 16384).
pub fn key_slot(key: &str) -> u16 {
    let key = key.as_bytes();
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    let crc = hashed.iter().fold(0u16, |mut crc, &byte| {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
        crc
    });
    crc % 16384
}

/// Whether the node on `port` serves `slot` as master, by its own
/// `CLUSTER NODES` line.
fn owns(port: u16, slot: u16) -> bool {
    let nodes = cli(port, &["CLUSTER", "NODES"]);
    nodes
        .lines()
        .find(|line| line.contains("myself"))
        .is_some_and(|line| {
            line.contains("master")
                && line.split_whitespace().skip(8).any(|range| {
                    let mut ends = range.splitn(2, '-');
                    let (Some(start), end) = (ends.next(), ends.next()) else {
                        return false;
                    };
                    let (Ok(start), Ok(end)) =
                        (start.parse::<u16>(), end.unwrap_or(start).parse::<u16>())
                    else {
                        return false;
                    };
                    (start..=end).contains(&slot)
                })
        })
}

/// Runs `command` to its end, or kills it after `limit`; `Err` says why
/// it failed, with its output.
fn finish_within(mut command: Command, limit: Duration) -> Result<(), String> {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("redis-cli is installed (scripts/test.sh installs it)");
    let pid = child.id();
    let (done, outcome) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match outcome.recv_timeout(limit) {
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => Err(format!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stdout)
        )),
        Ok(Err(e)) => Err(format!("{command:?}: {e}")),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            Err(format!("{command:?} did not finish within {limit:?}"))
        }
    }
}

/// `redis-cli -p port args…`'s output.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A master, its replica and three sentinels watching them as `mymaster`
/// (a quorum of two, failure noticed after one second).
pub struct SentinelSetup {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<Sentinel>,
    /// The master's and the replica's password, if they need one.
    password: Option<String>,
}

/// One `redis-server --sentinel` process.
pub struct Sentinel {
    pub port: u16,
    child: Option<std::process::Child>,
    dir: std::path::PathBuf,
    /// Set for a sentinel that speaks only TLS.
    tls: Option<TlsFiles>,
}

pub const MASTER_NAME: &str = "mymaster";

impl SentinelSetup {
    /// A set-up of its own (killed on drop), for tests that fail it over.
    pub fn start() -> Self {
        Self::launch(false)
    }

    /// The set-up shared by the tests of this process, stopped when the
    /// process ends. Tests keep apart by namespace.
    pub fn shared() -> &'static SentinelSetup {
        static SHARED: OnceLock<SentinelSetup> = OnceLock::new();
        SHARED.get_or_init(|| Self::launch(true))
    }

    /// A set-up of its own whose master and replica need `password`.
    pub fn start_with_password(password: &str) -> Self {
        Self::launch_with(false, Some(password))
    }

    fn launch(shared: bool) -> Self {
        Self::launch_with(shared, None)
    }

    fn launch_with(shared: bool, password: Option<&str>) -> Self {
        let start = |args: &[&str]| {
            let mut args = args.to_vec();
            if let Some(password) = password {
                args.extend(["--requirepass", password, "--masterauth", password]);
            }
            if shared {
                RedisServer::start_shared(&args)
            } else {
                RedisServer::start_with(&args)
            }
        };
        let master = start(&["--repl-diskless-sync-delay", "0"]);
        let master_port = master.port().to_string();
        let replica = start(&[
            "--replicaof",
            "127.0.0.1",
            &master_port,
            "--repl-diskless-sync-delay",
            "0",
        ]);
        let auth = password
            .map(|password| format!("sentinel auth-pass {MASTER_NAME} {password}\n"))
            .unwrap_or_default();
        let sentinels = (0..3)
            .map(|_| Sentinel::start(master.port(), shared, &auth))
            .collect();
        let setup = SentinelSetup {
            master,
            replica,
            sentinels,
            password: password.map(str::to_owned),
        };
        setup.wait_ready();
        setup
    }

    /// Waits until the replica is in sync and every sentinel knows the
    /// master, its replica and the other sentinels.
    /// `redis-cli args…`'s output from the master or the replica (on
    /// `port`), with the password if they need one.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        match &self.password {
            None => cli(port, args),
            Some(password) => {
                let mut all = vec!["-a", password.as_str(), "--no-auth-warning"];
                all.extend_from_slice(args);
                cli(port, &all)
            }
        }
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let synced = self
                .cli(self.replica.port(), &["INFO", "replication"])
                .contains("master_link_status:up");
            let known = self.sentinels.iter().all(|s| {
                let info = cli(s.port, &["SENTINEL", "MASTER", MASTER_NAME]);
                let field = |name: &str| {
                    let mut lines = info.lines();
                    lines.find(|l| l.trim() == name);
                    lines.next().map(str::trim).unwrap_or("").to_owned()
                };
                field("num-slaves") == "1" && field("num-other-sentinels") == "2"
            });
            if synced && known {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the test sentinels did not come up");
    }

    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("redis://127.0.0.1:{}/", s.port))
            .collect()
    }

    /// The port of the master the sentinels name now.
    pub fn master_port(&self) -> u16 {
        let reply = cli(
            self.sentinels[0].port,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME],
        );
        reply
            .lines()
            .nth(1)
            .and_then(|port| port.trim().parse().ok())
            .expect("the sentinels name a master")
    }
}

impl Sentinel {
    /// Starts a sentinel on a free port, trying another one if it does not
    /// come up (another process took the port between the check and the
    /// bind). `extra` is more configuration (`sentinel auth-pass …`).
    pub fn start(master_port: u16, shared: bool, extra: &str) -> Sentinel {
        Self::start_with_tls(master_port, shared, extra, None)
    }

    /// [`Sentinel::start`] for a TLS master: the sentinel speaks only TLS
    /// (with `files`), and reaches the master with TLS.
    pub fn start_tls(master_port: u16, files: &TlsFiles) -> Sentinel {
        Self::start_with_tls(master_port, false, "", Some(files))
    }

    fn start_with_tls(
        master_port: u16,
        shared: bool,
        extra: &str,
        tls: Option<&TlsFiles>,
    ) -> Sentinel {
        for _ in 0..5 {
            if let Some(sentinel) = Self::try_start(master_port, shared, extra, tls) {
                return sentinel;
            }
        }
        panic!("no sentinel started on any of 5 free ports");
    }

    fn try_start(
        master_port: u16,
        shared: bool,
        extra: &str,
        tls: Option<&TlsFiles>,
    ) -> Option<Sentinel> {
        let port = free_port();
        let dir = unique_dir("redis-cached-sentinel", port);
        let config = dir.join("sentinel.conf");
        let listen = match tls {
            None => format!("port {port}\n"),
            Some(files) => format!(
                "port 0\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\n\
                 tls-ca-cert-file {}\ntls-auth-clients no\ntls-replication yes\n",
                files.cert, files.key, files.ca
            ),
        };
        std::fs::write(
            &config,
            format!(
                "{listen}bind 127.0.0.1\ndir {}\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                 sentinel failover-timeout {MASTER_NAME} 5000\n{extra}",
                dir.display()
            ),
        )
        .expect("write the sentinel's configuration");
        let config = config.display().to_string();
        let child = if shared {
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "redis-server \"$1\" --sentinel & s=$!; \
                     while kill -0 {} 2>/dev/null && kill -0 $s 2>/dev/null; do sleep 0.2; done; \
                     kill $s 2>/dev/null; sleep 0.5; rm -rf '{}'",
                    std::process::id(),
                    dir.display()
                ))
                .args(["sh", &config])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
        } else {
            Command::new("redis-server")
                .args([&config, "--sentinel"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
        }
        .expect("redis-server is installed");
        // This sentinel's own answer (its configuration file is in its
        // directory), not another process's that took the port.
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut sentinel = Sentinel {
            port,
            child: Some(child),
            dir,
            tls: tls.cloned(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sentinel.cli(&["INFO", "server"]).contains(&name) {
            let exited = sentinel
                .child
                .as_mut()
                .is_some_and(|child| matches!(child.try_wait(), Ok(Some(_))));
            if exited || Instant::now() >= deadline {
                // Dropping it stops what was started.
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(sentinel)
    }
}

impl Sentinel {
    /// `redis-cli args…`'s output, from this sentinel (with TLS if it
    /// speaks only TLS).
    pub fn cli(&self, args: &[&str]) -> String {
        match &self.tls {
            None => cli(self.port, args),
            Some(files) => {
                let mut all = vec!["--tls", "--cacert", files.ca.as_str()];
                all.extend_from_slice(args);
                cli(self.port, &all)
            }
        }
    }

    /// How many connections the sentinel has accepted since it started.
    pub fn connections_received(&self) -> u64 {
        self.cli(&["INFO", "stats"])
            .lines()
            .find_map(|line| line.strip_prefix("total_connections_received:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("INFO stats counts connections")
    }

    /// Waits until this sentinel knows its master and `others` other
    /// sentinels.
    pub fn wait_knows(&self, others: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let info = self.cli(&["SENTINEL", "MASTER", MASTER_NAME]);
            let mut lines = info.lines();
            let known = lines.any(|l| l.trim() == "num-other-sentinels")
                && lines.next().map(str::trim) == Some(&*others.to_string());
            if known {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinel did not meet the others: {info}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGSTOP: the sentinel keeps its connections but answers nothing.
    /// For a set-up of its own ([`SentinelSetup::start`]).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Sentinel::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("sentinel running").id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
