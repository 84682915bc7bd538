//! A stampede across OS processes: each worker process runs many concurrent
//! calls for one cold key whose body takes a while and counts its runs in
//! Redis. Used by the stampede tests and by `cargo bench --bench stampede`.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis_cached::{redis_cached, Cache};

/// What one worker process saw.
#[derive(Debug, Clone, Default)]
pub struct WorkerReport {
    pub calls: usize,
    pub failed: usize,
    pub wrong: usize,
    pub max: Duration,
    pub p50: Duration,
    /// How long the body took in this process (zero if it did not run here).
    pub body: Duration,
}

/// The settings a worker reads from its environment.
pub struct WorkerConfig {
    /// A server's URL, or `cluster:` and the nodes' URLs, comma-separated.
    pub url: String,
    pub run: String,
    pub lock: bool,
    pub tasks: usize,
    pub body: Duration,
    pub start_at_ms: u64,
}

pub const ENV_WORKER: &str = "REDIS_CACHED_STAMPEDE_WORKER";

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A connection to where the cache is, for the body's run counter.
#[derive(Clone)]
pub enum Counter {
    Server(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Counter {
    async fn connect(url: &str) -> Counter {
        match url.strip_prefix("cluster:") {
            Some(nodes) => Counter::Cluster(
                redis::cluster::ClusterClient::new(nodes.split(',').collect::<Vec<_>>())
                    .expect("valid URLs")
                    .get_async_connection()
                    .await
                    .expect("connect the counter"),
            ),
            None => Counter::Server(
                redis::Client::open(url)
                    .expect("valid URL")
                    .get_multiplexed_async_connection()
                    .await
                    .expect("connect the counter"),
            ),
        }
    }

    /// How many times the body of `run` ran, at `url`.
    pub async fn runs(url: &str, run: &str) -> u64 {
        let get = redis::cmd("GET").arg(format!("body-runs:{run}")).clone();
        let runs: Option<u64> = match Counter::connect(url).await {
            Counter::Server(mut conn) => get.query_async(&mut conn).await,
            Counter::Cluster(mut conn) => get.query_async(&mut conn).await,
        }
        .expect("read the counter");
        runs.unwrap_or(0)
    }

    async fn incr(&self, key: &str) -> redis::RedisResult<u64> {
        let incr = redis::cmd("INCR").arg(key).clone();
        match self.clone() {
            Counter::Server(mut conn) => incr.query_async(&mut conn).await,
            Counter::Cluster(mut conn) => incr.query_async(&mut conn).await,
        }
    }
}

/// A cache on `url` as [`WorkerConfig::url`] gives it.
pub fn cache_on(url: &str) -> redis_cached::CacheBuilder {
    match url.strip_prefix("cluster:") {
        Some(nodes) => Cache::cluster_builder(&nodes.split(',').collect::<Vec<_>>()),
        None => Cache::builder(url),
    }
}

struct Db {
    cache: Cache,
    /// Connected before the start, so the body is the INCR and the sleep.
    counter: Counter,
    body: Duration,
    /// How long the last run of the body took, in microseconds.
    body_took_us: AtomicU64,
}

impl Db {
    async fn query(&self, run: &str) -> Result<u64, String> {
        let started = Instant::now();
        self.counter
            .incr(&format!("body-runs:{run}"))
            .await
            .map_err(|e| e.to_string())?;
        tokio::time::sleep(self.body).await;
        let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.body_took_us.store(took, Ordering::Relaxed);
        Ok(run.len() as u64 * 1000 + 7)
    }

    #[redis_cached(key = "stampede:<run>", ttl = 60, lock = true, lock_ttl = "1s", lock_wait = "5s", cache = self.cache)]
    async fn locked(&self, run: &str) -> Result<u64, String> {
        self.query(run).await
    }

    #[redis_cached(key = "stampede:<run>", ttl = 60, cache = self.cache)]
    async fn unlocked(&self, run: &str) -> Result<u64, String> {
        self.query(run).await
    }
}

impl WorkerConfig {
    pub fn from_env() -> Option<WorkerConfig> {
        let var = |name: &str| std::env::var(format!("{ENV_WORKER}_{name}")).ok();
        std::env::var(ENV_WORKER).ok()?;
        Some(WorkerConfig {
            url: var("URL")?,
            run: var("RUN")?,
            lock: var("LOCK")? == "1",
            tasks: var("TASKS")?.parse().ok()?,
            body: Duration::from_millis(var("BODY_MS")?.parse().ok()?),
            start_at_ms: var("START_AT")?.parse().ok()?,
        })
    }

    /// Runs the worker's calls and prints its report line.
    pub fn run(self) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        // Callers are spawned from a worker thread, as a server's accept
        // loop spawns its requests, not from outside the runtime.
        let report = runtime
            .block_on(async { tokio::spawn(self.calls()).await })
            .expect("the worker's calls");
        println!(
            "WORKER calls={} failed={} wrong={} max_us={} p50_us={} body_us={}",
            report.calls,
            report.failed,
            report.wrong,
            report.max.as_micros(),
            report.p50.as_micros(),
            report.body.as_micros()
        );
    }

    async fn calls(self) -> WorkerReport {
        let db = Arc::new(Db {
            cache: cache_on(&self.url)
                .op_timeout(Duration::from_millis(500))
                .build()
                .expect("valid URL"),
            counter: Counter::connect(&self.url).await,
            body: self.body,
            body_took_us: AtomicU64::new(0),
        });
        // Connect and subscribe before the start, so set-up is not timed.
        db.cache.connect().await.expect("connect before the start");
        let expected = self.run.len() as u64 * 1000 + 7;
        let wait = self.start_at_ms.saturating_sub(now_ms());
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let tasks: Vec<_> = (0..self.tasks)
            .map(|_| {
                let db = db.clone();
                let run = self.run.clone();
                let lock = self.lock;
                tokio::spawn(async move {
                    let start = Instant::now();
                    let result = if lock {
                        db.locked(&run).await
                    } else {
                        db.unlocked(&run).await
                    };
                    (result, start.elapsed())
                })
            })
            .collect();
        let mut report = WorkerReport::default();
        let mut latencies = Vec::new();
        for task in tasks {
            report.calls += 1;
            match task.await {
                Ok((Ok(value), elapsed)) => {
                    if value != expected {
                        report.wrong += 1;
                    }
                    latencies.push(elapsed);
                }
                _ => report.failed += 1,
            }
        }
        // Stay up until every process should be done: one exiting while
        // others still wait would take the cores they need to wake up.
        let linger_until = self.start_at_ms + 3 * self.body.as_millis() as u64 + 300;
        let linger = linger_until.saturating_sub(now_ms());
        tokio::time::sleep(Duration::from_millis(linger)).await;
        report.body = Duration::from_micros(db.body_took_us.load(Ordering::Relaxed));
        latencies.sort();
        report.max = latencies.last().copied().unwrap_or_default();
        report.p50 = latencies
            .get(latencies.len() / 2)
            .copied()
            .unwrap_or_default();
        report
    }
}

/// One stampede: `processes` worker processes of `tasks` callers each.
pub struct Stampede<'a> {
    pub url: &'a str,
    pub run: &'a str,
    pub lock: bool,
    pub processes: usize,
    pub tasks: usize,
    pub body: Duration,
}

impl Stampede<'_> {
    /// Spawns the workers as processes of `exe` (with `args`), all set to
    /// start at one instant.
    pub fn spawn(&self, exe: &std::path::Path, args: &[&str]) -> Vec<std::process::Child> {
        let start_at = now_ms() + 1500;
        (0..self.processes)
            .map(|_| {
                Command::new(exe)
                    .args(args)
                    .env(ENV_WORKER, "1")
                    .env(format!("{ENV_WORKER}_URL"), self.url)
                    .env(format!("{ENV_WORKER}_RUN"), self.run)
                    .env(
                        format!("{ENV_WORKER}_LOCK"),
                        if self.lock { "1" } else { "0" },
                    )
                    .env(format!("{ENV_WORKER}_TASKS"), self.tasks.to_string())
                    .env(
                        format!("{ENV_WORKER}_BODY_MS"),
                        self.body.as_millis().to_string(),
                    )
                    .env(format!("{ENV_WORKER}_START_AT"), start_at.to_string())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn a worker process")
            })
            .collect()
    }
}

/// Waits for a worker and reads its report line.
pub fn collect(child: std::process::Child) -> Option<WorkerReport> {
    let output = child.wait_with_output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find_map(|l| l.find("WORKER ").map(|at| &l[at..]))?;
    let field = |name: &str| -> Option<u128> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
    };
    Some(WorkerReport {
        calls: field("calls")? as usize,
        failed: field("failed")? as usize,
        wrong: field("wrong")? as usize,
        max: Duration::from_micros(field("max_us")? as u64),
        p50: Duration::from_micros(field("p50_us")? as u64),
        body: Duration::from_micros(field("body_us")? as u64),
    })
}
