//! The load generator: HTTP/1.1 requests over keep-alive connections,
//! user ids drawn from a Zipf distribution, a fixed mix of reads and
//! writes decided by the seed alone (two runs with one seed send the same
//! requests), the service's own counts read before, during and after.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Connections sending at once.
    pub concurrency: usize,
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
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            requests: 50_000,
            concurrency: 32,
            users: crate::db::USERS as u64,
            zipf_s: 1.0,
            writes: 0.05,
            summary_reads: 0.1,
            seed: 1,
            progress: false,
            writes_only: false,
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
    /// Median latency of a request.
    pub p50: Duration,
    /// 99th percentile latency of a request.
    pub p99: Duration,
    /// The run in intervals of 250 ms.
    pub timeline: Vec<Sample>,
}

impl LoadReport {
    /// Requests per second over the run.
    pub fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
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

/// Sends `config.requests` requests to the service at `addr`.
pub async fn run(addr: SocketAddr, config: &LoadConfig) -> io::Result<LoadReport> {
    let zipf = Arc::new(Zipf::new(config.users, config.zipf_s));
    let mut probe = Connection::open(addr).await?;
    let before = probe.counts().await?;
    let next = Arc::new(AtomicU64::new(0));
    let bar = if config.progress {
        let bar = ProgressBar::new(config.requests);
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} requests ({per_sec})",
        ) {
            bar.set_style(style);
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    let started = Instant::now();
    let mut workers = Vec::new();
    // The last worker to end says so, so that the last sample ends then.
    let running = Arc::new(AtomicU64::new(config.concurrency.max(1) as u64));
    let all_done = Arc::new(tokio::sync::Notify::new());
    for _ in 0..config.concurrency.max(1) {
        let (config, zipf, next, bar) = (config.clone(), zipf.clone(), next.clone(), bar.clone());
        let (running, all_done) = (running.clone(), all_done.clone());
        let mut conn = Connection::open(addr).await?;
        workers.push(tokio::spawn(async move {
            struct Ended(Arc<AtomicU64>, Arc<tokio::sync::Notify>);
            impl Drop for Ended {
                fn drop(&mut self) {
                    if self.0.fetch_sub(1, Ordering::AcqRel) == 1 {
                        self.1.notify_one();
                    }
                }
            }
            let _ended = Ended(running, all_done);
            let mut latencies = Vec::new();
            let mut failures = 0u64;
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= config.requests {
                    return Ok::<_, io::Error>((latencies, failures));
                }
                let (method, path, body) = request(&config, &zipf, index);
                if config.writes_only && method == "GET" {
                    continue;
                }
                let sent = Instant::now();
                let (status, _) = conn.send(method, &path, &body).await?;
                latencies.push(sent.elapsed());
                if !(200..300).contains(&status) && status != 404 {
                    failures += 1;
                }
                bar.inc(1);
            }
        }));
    }
    // Samples the service's counts until the workers are done.
    let mut timeline = Vec::new();
    let mut last = (Instant::now(), before, 0u64);
    let interval = Duration::from_millis(250);
    let mut finished = false;
    while !finished {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = all_done.notified() => finished = true,
        }
        let now = probe.counts().await?;
        let done = next.load(Ordering::Relaxed).min(config.requests);
        let seconds = last.0.elapsed().as_secs_f64();
        if seconds < 0.05 {
            continue; // the run ended just after the last sample
        }
        let (hits, misses) = (now.hits - last.1.hits, now.misses - last.1.misses);
        timeline.push(Sample {
            at: started.elapsed().as_secs_f64(),
            requests_per_s: (done - last.2) as f64 / seconds,
            sql_per_s: (now.sql - last.1.sql) as f64 / seconds,
            hit_ratio: (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64),
        });
        last = (Instant::now(), now, done);
    }
    let mut latencies = Vec::with_capacity(config.requests as usize);
    let mut failures = 0;
    for worker in workers {
        let (times, failed) = worker
            .await
            .map_err(|e| io::Error::other(e.to_string()))??;
        latencies.extend(times);
        failures += failed;
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    let after = probe.counts().await?;
    latencies.sort_unstable();
    let at = |q: f64| percentile(&latencies, q);
    Ok(LoadReport {
        requests: latencies.len() as u64,
        failures,
        counts: Counts {
            sql: after.sql - before.sql,
            hits: after.hits - before.hits,
            misses: after.misses - before.misses,
        },
        elapsed,
        p50: at(0.50),
        p99: at(0.99),
        timeline,
    })
}

/// The nearest-rank `q` quantile of `sorted`: the smallest value with at
/// least `q` of all at or below it; zero for none.
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let rank = (sorted.len() as f64 * q).ceil() as usize;
    sorted
        .get(rank.clamp(1, sorted.len().max(1)) - 1)
        .copied()
        .unwrap_or_default()
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
    fn percentiles_are_nearest_rank() {
        let ms = |n: u64| Duration::from_millis(n);
        let hundred: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(percentile(&hundred, 0.50), ms(50));
        assert_eq!(percentile(&hundred, 0.99), ms(99));
        assert_eq!(percentile(&hundred, 1.0), ms(100));
        assert_eq!(percentile(&[ms(7)], 0.99), ms(7));
        assert_eq!(percentile(&[ms(1), ms(2)], 0.50), ms(1));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
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
}
