//! Test support: real `redis-server` processes that a test starts on a free
//! port and can kill, pause, resume and restart.

#![allow(dead_code)] // each test file uses a different part

pub mod backends;
pub mod cluster;
pub mod logs;
pub mod proxy;
pub mod stampede;
pub mod write_behind;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The files a TLS server (or a sentinel beside it) is started with.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: String,
    pub key: String,
    pub ca: String,
}

/// A `redis-server` owned by one test; killed on drop.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
    tls: bool,
    /// Whether the server stops by itself when this test process ends:
    /// for servers kept in a `static`, which is never dropped.
    outlives_nothing: bool,
}

/// A fresh directory of this process's own for a server on `port`: its
/// name also tells the server apart from another one that took the port
/// (see [`RedisServer::ping`]).
pub fn unique_dir(kind: &str, port: u16) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("{kind}-{}-{n}-{port}", std::process::id()));
    // A process with this id before may have left files (a cluster
    // node's `nodes.conf`) that this server must not load.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the server's directory");
    dir
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("the OS hands out a free port")
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments (`--maxmemory`, …).
    pub fn start_with(extra: &[&str]) -> Self {
        Self::anywhere(extra, false)
    }

    /// [`RedisServer::start_with`] for a server shared by the tests of a
    /// process (see [`RedisServer::start_shared_on`]).
    pub fn start_shared(extra: &[&str]) -> Self {
        Self::anywhere(extra, true)
    }

    /// Starts a server on a free port, trying another one if it does not
    /// come up (another process took the port between the check and the
    /// bind).
    fn anywhere(extra: &[&str], outlives_nothing: bool) -> Self {
        for _ in 0..5 {
            if let Some(server) = Self::try_launch(free_port(), extra, outlives_nothing) {
                return server;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// Starts a server on `port`.
    pub fn start_on(port: u16, extra: &[&str]) -> Self {
        Self::launch(port, extra, false)
    }

    /// [`RedisServer::start_on`] for a server shared by the tests of a
    /// process (kept in a `static`): it exits when the process does. Not
    /// to be killed, paused or restarted.
    pub fn start_shared_on(port: u16, extra: &[&str]) -> Self {
        Self::launch(port, extra, true)
    }

    fn launch(port: u16, extra: &[&str], outlives_nothing: bool) -> Self {
        Self::try_launch(port, extra, outlives_nothing)
            .unwrap_or_else(|| panic!("redis-server on port {port} did not start"))
    }

    fn try_launch(port: u16, extra: &[&str], outlives_nothing: bool) -> Option<Self> {
        let dir = unique_dir("redis-cached-test", port);
        std::fs::create_dir_all(&dir).expect("create the server's directory");
        let mut server = RedisServer {
            port,
            dir,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            child: None,
            tls: false,
            outlives_nothing,
        };
        // On failure, dropping it kills what was started.
        server.try_spawn().then_some(server)
    }

    fn try_spawn(&mut self) -> bool {
        // A TLS server gets its ports from `extra`.
        let port_flag: Vec<String> = if self.tls {
            Vec::new()
        } else {
            vec!["--port".to_owned(), self.port.to_string()]
        };
        let mut command = if self.outlives_nothing {
            // A shell runs the server and stops it once this process is
            // gone (or the server exits by itself).
            let mut sh = Command::new("sh");
            sh.arg("-c")
                .arg(format!(
                    "redis-server \"$@\" & s=$!; \
                     while kill -0 {} 2>/dev/null && kill -0 $s 2>/dev/null; do sleep 0.2; done; \
                     kill $s 2>/dev/null; sleep 0.5; rm -rf '{}'",
                    std::process::id(),
                    self.dir.display()
                ))
                .arg("sh");
            sh
        } else {
            Command::new("redis-server")
        };
        let child = command
            .args(&port_flag)
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test.sh installs it)");
        self.child = Some(child);
        self.wait_ready()
    }

    fn spawn(&mut self) {
        assert!(
            self.try_spawn(),
            "redis-server on port {} did not start",
            self.port
        );
    }

    /// Whether the server answers PING within 10 s (`false` at once if it
    /// exited: its port was taken).
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping() {
                return true;
            }
            if let Some(child) = self.child.as_mut() {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return false;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// A server that speaks only TLS, with a certificate for 127.0.0.1
    /// signed by a CA made for it (openssl, at test time); returns the
    /// server and the CA certificate (PEM).
    pub fn start_tls() -> (Self, Vec<u8>) {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("redis-cached-tls-{port}"));
        std::fs::create_dir_all(&dir).expect("certificate directory");
        let openssl = |args: &[&str]| {
            let ok = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "openssl {args:?} (scripts/test.sh installs openssl)");
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=redis-cached test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(
            dir.join("san.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .expect("write san.ext");
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ]);
        let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
        let extra = [
            "--port".to_owned(),
            "0".to_owned(),
            "--tls-port".to_owned(),
            port.to_string(),
            "--tls-cert-file".to_owned(),
            path("server.crt"),
            "--tls-key-file".to_owned(),
            path("server.key"),
            "--tls-ca-cert-file".to_owned(),
            path("ca.crt"),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
        ];
        let ca = std::fs::read(dir.join("ca.crt")).expect("read the CA");
        let mut server = RedisServer {
            port,
            dir,
            extra: extra.to_vec(),
            child: None,
            tls: true,
            outlives_nothing: false,
        };
        server.spawn();
        (server, ca)
    }

    fn ping(&self) -> bool {
        if self.tls {
            // Plain TCP cannot speak to it; a connect shows it listens.
            return TcpStream::connect(("127.0.0.1", self.port)).is_ok();
        }
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        // Not just any server on the port: the port may have been taken
        // between `free_port` and the bind by another test's server, which
        // would answer while this one has exited. Its directory names it.
        let name = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if stream.write_all(b"CONFIG GET dir\r\n").is_err() {
            return false;
        }
        let mut reply = Vec::new();
        let mut buf = [0u8; 512];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return false,
                Ok(n) => reply.extend_from_slice(&buf[..n]),
            }
            let text = String::from_utf8_lossy(&reply);
            if text.contains(&name) {
                return true;
            }
            // A password server cannot be asked before `AUTH`; those are
            // never shared, so `wait_ready` sees their exit.
            if text.starts_with("-NOAUTH") {
                return true;
            }
            if text.starts_with('-') || text.matches("\r\n").count() >= 5 {
                return false;
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The certificate, key and CA files of a server from
    /// [`RedisServer::start_tls`], for other TLS processes to use.
    pub fn tls_files(&self) -> TlsFiles {
        let path = |name: &str| self.dir.join(name).to_string_lossy().into_owned();
        TlsFiles {
            cert: path("server.crt"),
            key: path("server.key"),
            ca: path("ca.crt"),
        }
    }

    /// A plain redis-rs client, to inspect and tamper with what is stored.
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("valid URL")
    }

    /// Runs one command on a fresh connection.
    pub async fn cmd<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        let mut conn = self
            .client()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test server");
        cmd.query_async(&mut conn).await.expect("command succeeds")
    }

    /// How many times the server ran `command` (lower case) since it
    /// started or its last `CONFIG RESETSTAT`, scripts' commands included.
    pub async fn calls(&self, command: &str) -> u64 {
        let info: String = self.cmd(redis::cmd("INFO").arg("commandstats")).await;
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Starts watching every command the server runs (`MONITOR`).
    pub fn monitor(&self) -> Monitor {
        Monitor::start(self.port)
    }

    /// SIGKILL: the server dies without a word, losing its data.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the server keeps its connections but answers nothing.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`RedisServer::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("server running").id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill {sig} {pid}");
    }

    /// Starts the server again on the same port (after [`RedisServer::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_ref() {
            // A paused server ignores SIGKILL until continued on some kernels.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `redis-cli monitor` attached to a server: sees every command, with
/// commands run inside Lua scripts marked as such, so the commands a client
/// sent (its round trips) can be counted exactly.
pub struct Monitor {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Monitor {
    fn start(port: u16) -> Self {
        use std::io::BufRead;
        let mut child = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "monitor"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-cli is installed with redis-server");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().expect("monitor lines").push(line);
            }
        });
        let monitor = Monitor { child, lines };
        // MONITOR answers OK once attached.
        let deadline = Instant::now() + Duration::from_secs(5);
        while monitor.lines.lock().expect("monitor lines").is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        monitor
    }

    /// The client commands (not those inside scripts) seen since the last
    /// call, as `COMMAND arg0`, after letting the output settle.
    pub async fn take_client_commands(&self) -> Vec<String> {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let lines = std::mem::take(&mut *self.lines.lock().expect("monitor lines"));
        lines
            .iter()
            .filter(|l| !l.contains(" lua] ") && l.contains('['))
            .filter_map(|l| l.split_once("] ").map(|(_, cmd)| cmd.to_owned()))
            .collect()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
