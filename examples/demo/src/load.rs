//! The load generator: HTTP/1.1 requests over keep-alive connections,
//! user ids drawn from a Zipf distribution, a fixed mix of reads and
//! writes decided by the seed alone (two runs with one seed send the same
//! requests), the service's own counts read before, during and after.
//!
//! Two ways to send. Closed loop: a fixed number of connections, each
//! sending its next request when its answer is in; it measures what the
//! service can do, but a slow answer also delays the requests behind it,
//! which are then never measured as late (coordinated omission), and two
//! services are compared at whatever rate each reaches. Open loop (as wrk2
//! and oha do): requests are due on a fixed schedule, each is sent at its
//! time on a free connection, and its latency counts from when it was due,
//! so a stall shows in every request it delays, and two services are
//! compared at the same offered rate.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::db::splitmix;
use crate::service::Counts;

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Requests in all.
    pub requests: u64,
    /// Closed loop: the connections, each sending its next request when
    /// its answer is in. Open loop: the most connections open at once
    /// (opened as requests need them); a request due when all are busy
    /// waits for one, and its wait counts in its latency.
    pub concurrency: usize,
    /// Requests per second on a fixed schedule (open loop); `None`: as
    /// fast as the connections go (closed loop).
    pub rate: Option<f64>,
    /// Ids are `1..=users`, id `k` drawn with weight `1 / k^zipf_s`.
    pub users: u64,
    /// The Zipf exponent (1.0 by default).
    pub zipf_s: f64,
    /// Share of writes (half renames, half new orders), `0.0..=1.0`.
    pub writes: f64,
    /// Share of reads that ask for the order summary (the rest: the user).
    pub summary_reads: f64,
    /// Decides every request: two runs with one seed send the same.
    pub seed: u64,
    /// Show a progress bar.
    pub progress: bool,
    /// Send only the run's writes (to bring a database to the state this
    /// run leaves it in, without measuring anything).
    pub writes_only: bool,
    /// Keep which version of each user's row every `GET /users/{id}`
    /// answered, and when it was sent ([`LoadReport::reads`]).
    pub record_reads: bool,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            requests: 50_000,
            concurrency: 32,
            rate: None,
            users: crate::db::USERS as u64,
            zipf_s: 1.0,
            writes: 0.05,
            summary_reads: 0.1,
            seed: 1,
            progress: false,
            writes_only: false,
            record_reads: false,
        }
    }
}

/// One interval of a run.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Seconds since the run began, at the end of the interval.
    pub at: f64,
    /// Requests answered per second in the interval.
    pub requests_per_s: f64,
    /// SQL statements per second in the interval.
    pub sql_per_s: f64,
    /// Hits over lookups in the interval; `None` without lookups.
    pub hit_ratio: Option<f64>,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Requests answered.
    pub requests: u64,
    /// Answers other than 2xx and 404.
    pub failures: u64,
    /// The service's counts over the run.
    pub counts: Counts,
    /// From the first request sent to the last answer.
    pub elapsed: Duration,
    /// The offered rate (requests per second) of an open-loop run.
    pub rate: Option<f64>,
    /// Every answer's latency in microseconds: from when the request was
    /// sent (closed loop) or due (open loop) to its answer.
    pub latency: Histogram<u64>,
    /// Open loop: how late each request was sent, in microseconds (the
    /// generator's own delay, or a wait for a free connection); empty in
    /// a closed loop.
    pub send_lag: Histogram<u64>,
    /// The run in intervals of 250 ms.
    pub timeline: Vec<Sample>,
    /// With [`LoadConfig::record_reads`]: every user read answered.
    pub reads: Vec<UserRead>,
}

/// A `GET /users/{id}` answered, and what it showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserRead {
    /// Whose row.
    pub id: i64,
    /// The version of the row's `email` it showed (see
    /// [`crate::outside::email_version`]).
    pub version: u64,
    /// When the request was sent (after any wait for a connection).
    pub sent: Instant,
}

impl LoadReport {
    /// Requests per second over the run.
    pub fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    /// The `q` quantile of the latency (nearest rank, to 3 significant
    /// digits); zero with no answers.
    pub fn latency_at(&self, q: f64) -> Duration {
        Duration::from_micros(self.latency.value_at_quantile(q))
    }

    /// The `q` quantile of how late requests were sent (open loop).
    pub fn send_lag_at(&self, q: f64) -> Duration {
        Duration::from_micros(self.send_lag.value_at_quantile(q))
    }

    /// Hits over lookups; `None` with no lookups (no cache).
    pub fn hit_ratio(&self) -> Option<f64> {
        let lookups = self.counts.hits + self.counts.misses;
        (lookups > 0).then(|| self.counts.hits as f64 / lookups as f64)
    }
}

/// Draws ids `1..=n` with weight `1 / k^s`, by binary search over the
/// cumulative weights.
pub struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    /// Ids `1..=n` with exponent `s`.
    pub fn new(n: u64, s: f64) -> Zipf {
        let mut total = 0.0;
        let mut cumulative: Vec<f64> = (1..=n.max(1))
            .map(|k| {
                total += 1.0 / (k as f64).powf(s);
                total
            })
            .collect();
        for c in &mut cumulative {
            *c /= total;
        }
        Zipf { cumulative }
    }

    /// The id for a uniform `u` in `[0, 1)`.
    pub fn id(&self, u: f64) -> u64 {
        let index = self.cumulative.partition_point(|&c| c <= u);
        index.min(self.cumulative.len() - 1) as u64 + 1
    }
}

/// A uniform number in `[0, 1)` from 53 bits of `bits`.
fn unit(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Request `index` of a run: method, path and body; a function of the
/// seed and the index only.
pub fn request(config: &LoadConfig, zipf: &Zipf, index: u64) -> (&'static str, String, String) {
    let a = splitmix(config.seed ^ index.wrapping_mul(0x2545_f491_4f6c_dd1d));
    let b = splitmix(a);
    let c = splitmix(b);
    let id = zipf.id(unit(b));
    let op = unit(a);
    if op < config.writes / 2.0 {
        (
            "PUT",
            format!("/users/{id}/name"),
            format!("user {id} ({index})"),
        )
    } else if op < config.writes {
        let amount = c % 50_000 + 100;
        ("POST", format!("/users/{id}/orders"), amount.to_string())
    } else if unit(c) < config.summary_reads {
        ("GET", format!("/users/{id}/orders"), String::new())
    } else {
        ("GET", format!("/users/{id}"), String::new())
    }
}

/// One keep-alive HTTP/1.1 connection.
pub struct Connection {
    stream: BufReader<TcpStream>,
}

impl Connection {
    /// Connects to the service at `addr`.
    pub async fn open(addr: SocketAddr) -> io::Result<Connection> {
        let stream = within(TcpStream::connect(addr)).await?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            stream: BufReader::new(stream),
        })
    }

    /// Sends one request; the status and the body. An answer that takes
    /// longer than [`ANSWER_TIMEOUT`] is an error.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: &str,
    ) -> io::Result<(u16, Vec<u8>)> {
        within(self.exchange(method, path, body)).await
    }

    /// [`Connection::send`] with no time bound.
    async fn exchange(
        &mut self,
        method: &str,
        path: &str,
        body: &str,
    ) -> io::Result<(u16, Vec<u8>)> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: demo\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let stream = self.stream.get_mut();
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        let mut line = String::new();
        self.stream.read_line(&mut line).await?;
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| bad(format!("not an HTTP status line: {line:?}")))?;
        let mut length = None;
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await? == 0 {
                return Err(bad("the connection closed mid-answer".into()));
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<usize>().ok();
                }
            }
        }
        let length = length.ok_or_else(|| bad("an answer without content-length".into()))?;
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await?;
        Ok((status, body))
    }

    /// `GET /stats`.
    pub async fn counts(&mut self) -> io::Result<Counts> {
        let (status, body) = self.send("GET", "/stats", "").await?;
        if status != 200 {
            return Err(bad(format!("/stats answered {status}")));
        }
        serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))
    }
}

/// How long a connection or an answer may take before the load generator
/// gives up on the service.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// `io` bounded by [`ANSWER_TIMEOUT`].
async fn within<T>(io: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(ANSWER_TIMEOUT, io)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "the service did not answer in time",
            )
        })?
}

fn bad(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// A histogram of microseconds from 1 µs to a minute (longer values are
/// recorded as a minute), to 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant bounds that are valid")
}

/// What the requests of a run have measured so far, shared by its senders.
struct Tally {
    answered: AtomicU64,
    failures: AtomicU64,
    latency: Mutex<Histogram<u64>>,
    send_lag: Mutex<Histogram<u64>>,
    reads: Option<Mutex<Vec<UserRead>>>,
    bar: ProgressBar,
}

impl Tally {
    /// Sends one request on `conn` and counts its answer, `latency` from
    /// `since` (when it was sent, or due).
    async fn exchange(
        &self,
        conn: &mut Connection,
        (method, path, body): (&str, &str, &str),
        since: Option<Instant>,
    ) -> io::Result<()> {
        let sent = Instant::now();
        let (status, answer) = conn.send(method, path, body).await?;
        self.answer(status, since.unwrap_or(sent).elapsed());
        if let Some(reads) = &self.reads {
            if let Some(read) = user_read(method, path, status, &answer, sent) {
                lock(reads).push(read);
            }
        }
        Ok(())
    }

    /// An answer with `status`, `latency` after it was sent or due.
    fn answer(&self, status: u16, latency: Duration) {
        lock(&self.latency).saturating_record(micros(latency));
        if !(200..300).contains(&status) && status != 404 {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        self.answered.fetch_add(1, Ordering::Relaxed);
        self.bar.inc(1);
    }
}

/// The user row a `GET /users/{id}` answered, if that is what it was.
fn user_read(
    method: &str,
    path: &str,
    status: u16,
    answer: &[u8],
    sent: Instant,
) -> Option<UserRead> {
    if method != "GET" || status != 200 {
        return None;
    }
    let id = path.strip_prefix("/users/")?;
    if id.contains('/') {
        return None; // the orders, not the user
    }
    let user: crate::db::User = serde_json::from_slice(answer).ok()?;
    Some(UserRead {
        id: user.id,
        version: crate::outside::email_version(&user.email)?,
        sent,
    })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn progress_bar(config: &LoadConfig) -> ProgressBar {
    if !config.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(config.requests);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} requests ({per_sec})",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Sends `config.requests` requests to the service at `addr`, in a closed
/// loop, or in an open loop at `config.rate`.
pub async fn run(addr: SocketAddr, config: &LoadConfig) -> io::Result<LoadReport> {
    let zipf = Arc::new(Zipf::new(config.users, config.zipf_s));
    let mut probe = Connection::open(addr).await?;
    let before = probe.counts().await?;
    let tally = Arc::new(Tally {
        answered: AtomicU64::new(0),
        failures: AtomicU64::new(0),
        latency: Mutex::new(histogram()),
        send_lag: Mutex::new(histogram()),
        reads: config.record_reads.then(|| Mutex::new(Vec::new())),
        bar: progress_bar(config),
    });
    let started = Instant::now();
    let mut sending = match config.rate {
        None => tokio::spawn(closed_loop(addr, config.clone(), zipf, tally.clone())),
        Some(rate) => tokio::spawn(open_loop(addr, config.clone(), rate, zipf, tally.clone())),
    };
    // Samples the service's counts until the senders are done.
    let mut timeline = Vec::new();
    let mut last = (Instant::now(), before, 0u64);
    let interval = Duration::from_millis(250);
    let sent = loop {
        let ended = tokio::select! {
            () = tokio::time::sleep(interval) => None,
            ended = &mut sending => Some(ended),
        };
        let now = probe.counts().await?;
        let done = tally.answered.load(Ordering::Relaxed);
        let seconds = last.0.elapsed().as_secs_f64();
        if seconds >= 0.05 {
            // (else the run ended just after the last sample)
            let (hits, misses) = (now.hits - last.1.hits, now.misses - last.1.misses);
            timeline.push(Sample {
                at: started.elapsed().as_secs_f64(),
                requests_per_s: (done - last.2) as f64 / seconds,
                sql_per_s: (now.sql - last.1.sql) as f64 / seconds,
                hit_ratio: (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64),
            });
            last = (Instant::now(), now, done);
        }
        if let Some(ended) = ended {
            break ended;
        }
    };
    let elapsed = sent.map_err(|e| io::Error::other(e.to_string()))??;
    tally.bar.finish_and_clear();
    let after = probe.counts().await?;
    let latency = lock(&tally.latency).clone();
    let send_lag = lock(&tally.send_lag).clone();
    let reads = tally
        .reads
        .as_ref()
        .map(|reads| std::mem::take(&mut *lock(reads)))
        .unwrap_or_default();
    Ok(LoadReport {
        requests: latency.len(),
        failures: tally.failures.load(Ordering::Relaxed),
        counts: Counts {
            sql: after.sql - before.sql,
            hits: after.hits - before.hits,
            misses: after.misses - before.misses,
        },
        elapsed,
        rate: config.rate,
        latency,
        send_lag,
        timeline,
        reads,
    })
}

/// `config.concurrency` connections, each sending the next request when
/// its answer is in; how long from the first request to the last answer.
async fn closed_loop(
    addr: SocketAddr,
    config: LoadConfig,
    zipf: Arc<Zipf>,
    tally: Arc<Tally>,
) -> io::Result<Duration> {
    let next = Arc::new(AtomicU64::new(0));
    let mut connections = Vec::new();
    for _ in 0..config.concurrency.max(1) {
        connections.push(Connection::open(addr).await?);
    }
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for mut conn in connections {
        let (config, zipf, next, tally) =
            (config.clone(), zipf.clone(), next.clone(), tally.clone());
        workers.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= config.requests {
                    return Ok::<_, io::Error>(());
                }
                let (method, path, body) = request(&config, &zipf, index);
                if config.writes_only && method == "GET" {
                    continue;
                }
                tally
                    .exchange(&mut conn, (method, &path, &body), None)
                    .await?;
            }
        });
    }
    while let Some(worker) = workers.join_next().await {
        worker.map_err(|e| io::Error::other(e.to_string()))??;
    }
    Ok(started.elapsed())
}

/// Lets this thread's sleeps end when asked: Linux lets a sleep run up to
/// a thread's timer slack (50 µs by default) late, to batch wake-ups, and
/// that delay would count in the latency of every request an open loop
/// sends.
// The one `unsafe` call of the demo (the workspace denies `unsafe_code`).
#[allow(unsafe_code)]
fn precise_sleep() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_TIMERSLACK takes a number of nanoseconds and changes
    // only the calling thread's timer slack; it reads and writes no memory.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

/// Idle connections of an open-loop run, and the right to open one more
/// (at most `config.concurrency` at once).
struct Connections {
    addr: SocketAddr,
    idle: Mutex<Vec<Connection>>,
    slots: tokio::sync::Semaphore,
}

/// Requests due every `1 / rate` seconds, each sent at its time; how long
/// from the first request's time to the last answer.
async fn open_loop(
    addr: SocketAddr,
    config: LoadConfig,
    rate: f64,
    zipf: Arc<Zipf>,
    tally: Arc<Tally>,
) -> io::Result<Duration> {
    if !(rate.is_finite() && rate > 0.0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the rate must be a positive number of requests per second, not {rate}"),
        ));
    }
    let limit = config.concurrency.max(1);
    let connections = Arc::new(Connections {
        addr,
        idle: Mutex::new(Vec::new()),
        slots: tokio::sync::Semaphore::new(limit),
    });
    // Connections opened before the first request is due, so that the
    // first requests do not count a connect.
    let mut opened = Vec::new();
    for _ in 0..limit.min(32) {
        opened.push(Connection::open(addr).await?);
    }
    *lock(&connections.idle) = opened;
    let first = Instant::now();
    let runtime = tokio::runtime::Handle::current();
    let (ended_tx, ended) = tokio::sync::oneshot::channel();
    // The schedule keeps its own thread: the runtime's timers have a
    // resolution of a millisecond, a thread's sleep of tens of
    // microseconds, and a request's lateness counts in its latency. It
    // starts each request on the runtime itself, at its time (a hop
    // through a channel to a task of the runtime would add that task's
    // wait for a worker to every request).
    std::thread::spawn(move || {
        precise_sleep();
        let mut inflight = tokio::task::JoinSet::new();
        let mut failed = None;
        for index in 0..config.requests {
            if failed.is_some() || ended_tx.is_closed() {
                break; // a request failed, or the run was dropped
            }
            let (method, path, body) = request(&config, &zipf, index);
            if config.writes_only && method == "GET" {
                continue;
            }
            let due = first + Duration::from_secs_f64(index as f64 / rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let request =
                send_when_due(connections.clone(), tally.clone(), due, method, path, body);
            inflight.spawn_on(request, &runtime);
            // Collects what has ended, so that a long run holds only the
            // requests in flight.
            while let Some(ended) = inflight.try_join_next() {
                if let Err(err) = joined(ended) {
                    failed = Some(err);
                }
            }
        }
        // (the receiver is gone only if the run was dropped)
        let _ = ended_tx.send((inflight, failed));
    });
    let (mut inflight, failed) = ended
        .await
        .map_err(|_| io::Error::other("the schedule's thread ended early"))?;
    if let Some(err) = failed {
        return Err(err);
    }
    while let Some(ended) = inflight.join_next().await {
        joined(ended)?;
    }
    Ok(first.elapsed())
}

/// A request of an open loop, due at `due`: on an idle connection, or a
/// new one if fewer than the most allowed are open, else the first that
/// frees up.
async fn send_when_due(
    connections: Arc<Connections>,
    tally: Arc<Tally>,
    due: Instant,
    method: &'static str,
    path: String,
    body: String,
) -> io::Result<()> {
    let _slot = connections
        .slots
        .acquire()
        .await
        .map_err(|e| io::Error::other(e.to_string()))?;
    let idle = lock(&connections.idle).pop();
    let mut conn = match idle {
        Some(conn) => conn,
        None => Connection::open(connections.addr).await?,
    };
    lock(&tally.send_lag).saturating_record(micros(due.elapsed()));
    tally
        .exchange(&mut conn, (method, &path, &body), Some(due))
        .await?;
    lock(&connections.idle).push(conn);
    Ok(())
}

/// What a request's task ended with.
fn joined(ended: Result<io::Result<()>, tokio::task::JoinError>) -> io::Result<()> {
    ended.map_err(|e| io::Error::other(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_favours_low_ids_as_its_exponent_says() {
        let zipf = Zipf::new(10_000, 1.0);
        let draws = 200_000;
        let mut ones = 0;
        let mut seen = std::collections::HashSet::new();
        for i in 0..draws {
            let id = zipf.id(unit(splitmix(i)));
            assert!((1..=10_000).contains(&id));
            ones += u64::from(id == 1);
            seen.insert(id);
        }
        // P(1) = 1 / H(10,000) = 0.1021.
        let share = ones as f64 / draws as f64;
        assert!((share - 0.1021).abs() < 0.005, "{share}");
        assert!(seen.len() > 8_000, "the tail is drawn too: {}", seen.len());
        assert_eq!(zipf.id(0.0), 1);
        assert_eq!(zipf.id(0.999_999_999_999), 10_000);
    }

    #[test]
    fn quantiles_are_nearest_rank_to_three_digits() {
        let mut hundred = histogram();
        for ms in 1..=100 {
            hundred.record(ms * 1000).unwrap();
        }
        let report = LoadReport {
            requests: 100,
            failures: 0,
            counts: Counts::default(),
            elapsed: Duration::from_secs(1),
            rate: None,
            latency: hundred,
            send_lag: histogram(),
            timeline: Vec::new(),
            reads: Vec::new(),
        };
        let near = |q: f64, ms: u64| {
            let at = report.latency_at(q).as_micros() as u64;
            assert!(
                (ms * 1000..=ms * 1001).contains(&at),
                "q {q}: {at} µs, not {ms} ms"
            );
        };
        near(0.50, 50);
        near(0.99, 99);
        near(0.999, 100);
        near(1.0, 100);
        assert_eq!(report.send_lag_at(0.99), Duration::ZERO, "none recorded");
        let mut slow = histogram();
        slow.saturating_record(micros(Duration::from_secs(3600)));
        let minute = slow.max();
        assert!(
            (60_000_000..=60_060_000).contains(&minute),
            "an hour is recorded as a minute: {minute}"
        );
    }

    #[test]
    fn a_seed_decides_every_request() {
        let config = LoadConfig::default();
        let zipf = Zipf::new(config.users, config.zipf_s);
        let first: Vec<_> = (0..1000).map(|i| request(&config, &zipf, i)).collect();
        let again: Vec<_> = (0..1000).map(|i| request(&config, &zipf, i)).collect();
        assert_eq!(first, again);
        let writes = first.iter().filter(|(m, _, _)| *m != "GET").count();
        assert!((30..=70).contains(&writes), "about 5% writes: {writes}");
        let other = LoadConfig { seed: 2, ..config };
        let different = (0..1000)
            .filter(|&i| request(&other, &zipf, i) != first[i as usize])
            .count();
        assert!(different > 900);
    }

    /// A service that answers `/stats` at once and every other request
    /// after `delay`, one request at a time per connection.
    async fn slow_service(delay: Duration) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut stream = BufReader::new(stream);
                    loop {
                        let mut head = String::new();
                        let mut line = String::new();
                        loop {
                            line.clear();
                            if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            head.push_str(&line);
                        }
                        let body = if head.starts_with("GET /stats ") {
                            r#"{"sql":0,"hits":0,"misses":0}"#
                        } else {
                            tokio::time::sleep(delay).await;
                            ""
                        };
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if stream.get_mut().write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    /// One connection to a service that takes 20 ms an answer, offered a
    /// request every 5 ms: request `i` cannot be answered before
    /// `20 (i + 1)` ms, 5 i ms after it was due, so the open loop's median
    /// is at least 15 * 24 + 20 = 380 ms, whatever the machine (a closed
    /// loop reports 20 ms for every one of them).
    #[tokio::test]
    async fn an_open_loop_counts_the_wait_of_requests_due_behind_a_slow_one() {
        let addr = slow_service(Duration::from_millis(20)).await;
        let config = LoadConfig {
            requests: 50,
            concurrency: 1,
            rate: Some(200.0),
            ..LoadConfig::default()
        };
        let open = run(addr, &config).await.unwrap();
        assert_eq!((open.requests, open.failures), (50, 0));
        assert_eq!(open.rate, Some(200.0));
        assert!(
            open.elapsed >= Duration::from_millis(1000),
            "{:?}",
            open.elapsed
        );
        assert!(
            open.latency_at(0.5) >= Duration::from_millis(380),
            "{:?}",
            open.latency_at(0.5)
        );
        assert!(
            open.send_lag_at(0.5) >= Duration::from_millis(360),
            "waiting for the one connection is sending late: {:?}",
            open.send_lag_at(0.5)
        );
        let closed = run(
            addr,
            &LoadConfig {
                rate: None,
                ..config
            },
        )
        .await
        .unwrap();
        assert_eq!(closed.requests, 50);
        assert!(
            closed.latency_at(0.5) < Duration::from_millis(380),
            "a closed loop measures from the send: {:?}",
            closed.latency_at(0.5)
        );
        assert!(closed.send_lag.is_empty());
    }

    /// A fast service offered 400 requests at 2,000 a second: the last is
    /// due at 199.5 ms, so the run cannot end sooner, and each is sent on
    /// time give or take the machine's scheduling.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_open_loop_keeps_to_its_schedule() {
        let addr = slow_service(Duration::ZERO).await;
        let config = LoadConfig {
            requests: 400,
            concurrency: 8,
            rate: Some(2_000.0),
            ..LoadConfig::default()
        };
        let report = run(addr, &config).await.unwrap();
        assert_eq!((report.requests, report.failures), (400, 0));
        assert!(
            report.elapsed >= Duration::from_micros(199_500),
            "{:?}",
            report.elapsed
        );
        assert_eq!(report.send_lag.len(), 400);
    }
}
