//! Test support: a real Postgres (Debian's `postgresql` package: `initdb`
//! in a temporary directory, `wal_level = logical`, run as the `postgres`
//! user when the tests run as root) and a real `redis-server`, each on a
//! free port, stopped with the test (or with the test process); writes
//! from outside the process through `psql`, and from a connection of the
//! test's own through libpq.

#![allow(dead_code)] // each test file uses a different part

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex, OnceLock};
use std::time::{Duration, Instant};

use pg_walstream::PgReplicationConnection;
use tokio::sync::Mutex;

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("the OS hands out a free port")
}

/// A fresh directory of this process's own.
fn unique_dir(kind: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("{kind}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    dir
}

/// A process that kills `pid` with `signal` once this test process is
/// gone, then removes `dir` once `pid` has ended: servers and their files
/// never outlive a test run, even one that was killed or a server shared
/// through a `static` (never dropped).
fn watchdog(pid: u32, signal: &str, dir: &std::path::Path) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while [ -d /proc/{me} ] && [ -d /proc/{pid} ]; do sleep 0.3; done; \
             kill -{signal} {pid} 2>/dev/null; \
             while [ -d /proc/{pid} ]; do sleep 0.1; done; rm -rf '{dir}'",
            me = std::process::id(),
            dir = dir.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sh runs")
}

/// Where Postgres's server programs are: `PG_BIN`, else the newest
/// `/usr/lib/postgresql/<major>/bin` (scripts/test.sh installs them).
fn pg_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("PG_BIN") {
        return PathBuf::from(bin);
    }
    let mut majors: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("Postgres is installed (scripts/test.sh installs the postgresql package)")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    majors.sort_unstable();
    let major = majors
        .last()
        .expect("a Postgres major version is installed");
    PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"))
}

/// The uid and gid of the `postgres` system user, when this process is
/// root (Postgres refuses to run as root).
fn postgres_user() -> Option<(u32, u32)> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !root {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("the postgres user exists (the postgresql package creates it)");
    let fields: Vec<&str> = line.split(':').collect();
    Some((
        fields[2].parse().expect("uid"),
        fields[3].parse().expect("gid"),
    ))
}

/// A command run as the `postgres` user when this process is root.
fn as_postgres(program: &Path) -> Command {
    let mut command = Command::new(program);
    if let Some((uid, gid)) = postgres_user() {
        command.uid(uid).gid(gid);
    }
    command
}

/// A Postgres server owned by one test (or by the test process).
pub struct Postgres {
    dir: PathBuf,
    port: u16,
    settings: Vec<String>,
    /// The server process and its watchdog, while it runs.
    process: StdMutex<Option<(Child, Child)>>,
}

impl Postgres {
    /// The server the tests of this process share (each makes a database
    /// of its own): it stops when the process ends.
    pub fn shared() -> Arc<Postgres> {
        static SHARED: OnceLock<Arc<Postgres>> = OnceLock::new();
        SHARED
            .get_or_init(|| Arc::new(Postgres::start(&[], &[])))
            .clone()
    }

    /// A server of its own: `initdb` with `init_args` (`--wal-segsize=1`),
    /// then `postgres` with `-c` `settings` beside the tests' own.
    pub fn start(init_args: &[&str], settings: &[&str]) -> Postgres {
        let dir = unique_dir("redis-cached-pg");
        if let Some((uid, gid)) = postgres_user() {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown the directory");
        }
        let initdb = as_postgres(&pg_bin().join("initdb"))
            .arg("-D")
            .arg(dir.join("data"))
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "-N",
            ])
            .args(init_args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("initdb runs");
        assert!(
            initdb.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&initdb.stderr)
        );
        let mut server = Postgres {
            dir,
            port: 0,
            settings: settings.iter().map(|s| (*s).to_owned()).collect(),
            process: StdMutex::new(None),
        };
        for _ in 0..5 {
            server.port = free_port();
            if server.spawn() {
                return server;
            }
            server.stop();
        }
        panic!("postgres did not start on any of 5 free ports");
    }

    /// Starts the server process on its port; whether it answers.
    fn spawn(&self) -> bool {
        let mut command = as_postgres(&pg_bin().join("postgres"));
        command
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.dir)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "wal_level=logical"])
            .args(["-c", "max_replication_slots=64"])
            .args(["-c", "max_wal_senders=64"])
            .args(["-c", "max_connections=200"])
            .args(["-c", "fsync=off"])
            .args(["-c", "shared_buffers=64MB"]);
        for setting in &self.settings {
            command.args(["-c", setting]);
        }
        let log = std::fs::File::create(self.dir.join("server.log")).expect("log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("postgres runs");
        let guard = watchdog(child.id(), "QUIT", &self.dir);
        *self.process() = Some((child, guard));
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some((child, _)) = self.process().as_mut() {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return false;
                }
            }
            if self.try_psql("postgres", "SELECT 1").is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn process(&self) -> std::sync::MutexGuard<'_, Option<(Child, Child)>> {
        self.process.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the server (immediate shutdown: as a crash would).
    pub fn stop(&self) {
        if let Some((mut child, mut guard)) = self.process().take() {
            // The watchdog first: once the server is gone it would remove
            // the data a restart needs.
            let _ = guard.kill();
            let _ = guard.wait();
            let _ = Command::new("kill")
                .args(["-QUIT", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// Starts the server again, on the same port and data.
    pub fn restart(&self) {
        assert!(
            self.spawn(),
            "postgres did not start again on port {}",
            self.port
        );
    }

    /// A libpq connection string for `database`.
    pub fn url(&self, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={database}",
            self.port
        )
    }

    /// A new, empty database.
    pub fn database(&self, name: &str) -> String {
        self.psql("postgres", &format!("DROP DATABASE IF EXISTS {name}"));
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        name.to_owned()
    }

    /// Runs `sql` with `psql` (another process, its own connection, as
    /// an outside writer would); its output, unaligned, one row a line.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        self.try_psql(database, sql)
            .unwrap_or_else(|err| panic!("psql failed on {sql:?}: {err}"))
    }

    fn try_psql(&self, database: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(pg_bin().join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-U", "postgres"])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(database)
            .arg("-c")
            .arg(sql)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Starts `psql` running `sql` in the background.
    pub fn psql_spawn(&self, database: &str, sql: &str) -> Child {
        Command::new(pg_bin().join("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-U", "postgres"])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(database)
            .arg("-c")
            .arg(sql)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("psql runs")
    }

    /// Ends the listener's connection (its `walsender`) on `slot`, as a
    /// network failure or an operator would; whether there was one.
    pub fn kill_walsender(&self, database: &str, slot: &str) -> bool {
        self.psql(
            database,
            &format!(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                 WHERE slot_name = '{slot}' AND active_pid IS NOT NULL"
            ),
        ) == "t"
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A connection of the test's own, through libpq: for reads by cached
/// functions and for writes in the test's process.
pub struct Db {
    url: String,
    conn: Mutex<PgReplicationConnection>,
}

impl Db {
    pub async fn connect(url: &str) -> Db {
        Db {
            url: url.to_owned(),
            conn: Mutex::new(
                PgReplicationConnection::connect_async(url)
                    .await
                    .expect("connect to Postgres"),
            ),
        }
    }

    /// The rows of `sql`, each a list of text values (`None` for NULL);
    /// connects again once if the connection broke (a server restarted).
    pub async fn query(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let mut conn = self.conn.lock().await;
        let result = match conn.exec_async(sql).await {
            Ok(result) => result,
            Err(_) => {
                *conn = PgReplicationConnection::connect_async(&self.url)
                    .await
                    .expect("connect to Postgres again");
                conn.exec_async(sql).await.expect("query")
            }
        };
        (0..result.ntuples())
            .map(|row| {
                (0..result.nfields())
                    .map(|col| result.get_value(row, col))
                    .collect()
            })
            .collect()
    }

    pub async fn execute(&self, sql: &str) {
        self.query(sql).await;
    }
}

/// A `redis-server` owned by one test; killed on drop.
pub struct Redis {
    port: u16,
    dir: PathBuf,
    child: Child,
    watchdog: Child,
}

impl Redis {
    pub fn start() -> Redis {
        for _ in 0..5 {
            let port = free_port();
            let dir = unique_dir("redis-cached-pg-redis");
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is installed");
            let watchdog = watchdog(child.id(), "KILL", &dir);
            let mut redis = Redis {
                port,
                dir,
                child,
                watchdog,
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if redis.cli(&["PING"]) == "PONG" {
                    return redis;
                }
                if matches!(redis.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Runs a command with `redis-cli`; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    }

    /// How many times Redis ran `command` (`INFO commandstats`).
    pub fn calls(&self, command: &str) -> u64 {
        let info = self.cli(&["INFO", "commandstats"]);
        info.lines()
            .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until `check` holds, at most `timeout`; whether it did.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
