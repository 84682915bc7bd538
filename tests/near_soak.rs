//! The near tier under random faults, across processes: this process
//! changes a few keys (new versions through a cache, `#[cache_put]` and
//! another program's plain `SET`s; short TTLs, invalidations, now and then
//! a `FLUSHALL`) and injects faults; two reader processes read the
//! keys through their near tiers, one through a fault proxy (connections
//! reset, replies cut, a black hole, latency), one directly; the server is
//! also paused now and then. Every read is then checked against every
//! write: a read is stale by how long ago the first newer write of its key
//! had completed. None may be stale by the near tier's lease (500 ms) or
//! more; the figures below it are reported.
//!
//! Runs for 8 s in the test command; `REDIS_CACHED_NEAR_SOAK_SECS=60 cargo
//! test --test near_soak -- --nocapture` for longer.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis_cached::Cache;
use support::proxy::Proxy;
use support::RedisServer;

const ENV: &str = "REDIS_CACHED_NEAR_SOAK";
const KEYS: u64 = 8;
const NEAR: Duration = Duration::from_secs(60);
/// The near tier's lease: no read may be stale by this long.
const LEASE: Duration = Duration::from_millis(500);

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A reader process: reads the keys through its near tier until told to
/// stop, writing `key version start_us near` per read to its file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by near_soak as a separate process"]
async fn near_soak_reader() {
    let (Ok(url), Ok(secs), Ok(out)) = (
        std::env::var(format!("{ENV}_URL")),
        std::env::var(format!("{ENV}_SECS")),
        std::env::var(format!("{ENV}_OUT")),
    ) else {
        return; // not started by near_soak
    };
    let secs: u64 = secs.parse().expect("seconds");
    let cache = Cache::builder(&url)
        .op_timeout(Duration::from_millis(200))
        .build()
        .expect("valid URL");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&out).expect("reads file"));
    let until = Instant::now() + Duration::from_secs(secs);
    let mut n = 0u64;
    while Instant::now() < until {
        let key = n % KEYS;
        n += 1;
        let before = cache.stats().near_hits;
        let started = now_us();
        let version = cache.get_near::<u64>(&format!("soak:{key}"), NEAR).await;
        let near = u8::from(cache.stats().near_hits > before);
        if let Some(version) = version {
            writeln!(file, "{key} {version} {started} {near}").expect("write");
        }
        if n.is_multiple_of(64) {
            // Leave the writer's process some of the 2 cores.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    file.flush().expect("flush");
    let stats = cache.stats();
    println!(
        "NEAR_SOAK near_hits={} near_misses={} near_invalidations={} near_flushes={} errors={} timeouts={}",
        stats.near_hits,
        stats.near_misses,
        stats.near_invalidations,
        stats.near_flushes,
        stats.errors,
        stats.timeouts
    );
}

/// A write-through of `version` at `soak:<key>`.
#[redis_cached::cache_put(key = "soak:<key>", ttl = 600, cache = cache)]
async fn put(cache: &Cache, key: u64, version: u64) -> u64 {
    let _ = key;
    version
}

/// A stored entry of `version`, as the cache encodes a JSON value, written
/// by hand: another program's `SET`.
fn entry(version: u64) -> Vec<u8> {
    let mut bytes = vec![0xCA, 1, 1, 0];
    bytes.extend_from_slice(version.to_string().as_bytes());
    bytes
}

#[test]
fn near_soak() {
    let secs: u64 = std::env::var(format!("{ENV}_SECS"))
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let server = RedisServer::start();
    let proxy = Proxy::start(server.port());
    let dir = std::env::temp_dir().join(format!("near-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let exe = std::env::current_exe().expect("test binary");
    let readers: Vec<_> = [proxy.url(), server.url()]
        .iter()
        .enumerate()
        .map(|(n, url)| {
            let out = dir.join(format!("reads-{n}"));
            let child = Command::new(&exe)
                .args([
                    "near_soak_reader",
                    "--exact",
                    "--ignored",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env(format!("{ENV}_URL"), url)
                .env(format!("{ENV}_SECS"), secs.to_string())
                .env(format!("{ENV}_OUT"), &out)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn a reader");
            (child, out)
        })
        .collect();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // Writes: key → (version, completed at, µs), in order.
    let (writes, injected) = runtime.block_on(async {
        let writer = Cache::builder(&server.url())
            .op_timeout(Duration::from_millis(300))
            .build()
            .expect("valid URL");
        let mut raw = server
            .client()
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let mut writes: HashMap<u64, Vec<(u64, u64)>> = HashMap::new();
        let mut version = 0u64;
        for key in 0..KEYS {
            version += 1;
            writer
                .set(&format!("soak:{key}"), &version, Duration::from_secs(600))
                .await
                .expect("first write");
            writes.entry(key).or_default().push((version, now_us()));
        }
        let mut rng = Rng(0x5eed_1234);
        let until = Instant::now() + Duration::from_secs(secs);
        let mut next_fault = Instant::now() + Duration::from_millis(500);
        let mut healed_at: Option<Instant> = None;
        let mut paused = false;
        let mut injected = [0u32; 6];
        while Instant::now() < until {
            // Faults: one at a time, each for a few hundred ms.
            if let Some(at) = healed_at {
                if Instant::now() >= at {
                    proxy.heal();
                    if paused {
                        server.resume();
                        paused = false;
                    }
                    healed_at = None;
                    next_fault = Instant::now() + Duration::from_millis(300 + rng.below(700));
                }
            } else if Instant::now() >= next_fault {
                let fault = rng.below(6) as usize;
                injected[fault] += 1;
                match fault {
                    0 => proxy.reset_all(),
                    1 => proxy.cut_next_reply(),
                    2 => proxy.set_blackhole(true),
                    3 => proxy.set_latency(Duration::from_millis(50)),
                    4 => {
                        server.pause();
                        paused = true;
                    }
                    _ => {
                        let _: Result<redis::Value, _> = redis::cmd("CLIENT")
                            .arg("KILL")
                            .arg("TYPE")
                            .arg("normal")
                            .arg("SKIPME")
                            .arg("yes")
                            .query_async(&mut raw)
                            .await;
                    }
                }
                healed_at = Some(Instant::now() + Duration::from_millis(200 + rng.below(1_300)));
            }
            // A change of a key: a new version through the cache (set or
            // `#[cache_put]`), another program's SET, a value that
            // expires soon, an invalidation, now and then a FLUSHALL. A
            // change that stores no version (an invalidation, an expiry,
            // a flush) is recorded as a version no read can return, so
            // that any read of an older one after it counts as stale.
            let key = rng.below(KEYS);
            let name = format!("soak:{key}");
            version += 1;
            let ttl = Duration::from_secs(600);
            let (written, expires) = match rng.below(100) {
                0..=39 => (writer.set(&name, &version, ttl).await.is_ok(), None),
                40..=59 => {
                    // A write-through reports no failure: its cache's do.
                    let failures = |s: redis_cached::Stats| s.errors + s.timeouts + s.breaker_skips;
                    let before = failures(writer.stats());
                    put(&writer, key, version).await;
                    (failures(writer.stats()) == before, None)
                }
                60..=79 => {
                    let set = redis::cmd("SET")
                        .arg(&name)
                        .arg(entry(version))
                        .query_async::<()>(&mut raw)
                        .await;
                    (set.is_ok(), None)
                }
                80..=89 => {
                    let short = Duration::from_millis(100 + rng.below(400));
                    (
                        writer.set(&name, &version, short).await.is_ok(),
                        Some(short),
                    )
                }
                90..=98 => (writer.invalidate(&name).await.is_ok(), None),
                _ => {
                    let flushed = redis::cmd("FLUSHALL").query_async::<()>(&mut raw).await;
                    if flushed.is_ok() {
                        let done = now_us();
                        for key in 0..KEYS {
                            writes.entry(key).or_default().push((version, done));
                        }
                    }
                    (false, None)
                }
            };
            if written {
                let done = now_us();
                writes.entry(key).or_default().push((version, done));
                if let Some(ttl) = expires {
                    // Gone then: as if a newer version had been written.
                    version += 1;
                    let gone = done + ttl.as_micros() as u64;
                    writes.entry(key).or_default().push((version, gone));
                }
            } else if paused {
                tokio::time::sleep(Duration::from_millis(20)).await;
            } else if let Ok(conn) = server.client().get_multiplexed_async_connection().await {
                // The raw connection may have been killed: a new one.
                raw = conn;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        proxy.heal();
        if paused {
            server.resume();
        }
        (writes, injected)
    });

    let mut reports = Vec::new();
    let mut reads = 0u64;
    let mut near_reads = 0u64;
    // Stale by: 0 (fresh), < 1 ms, < 10 ms, < 100 ms, more.
    let mut stale = [0u64; 5];
    let mut worst = Duration::ZERO;
    let mut violations = Vec::new();
    for (mut child, out) in readers {
        let status = child.wait().expect("reader ends");
        let stdout = child.stdout.take().expect("stdout");
        let report = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.find("NEAR_SOAK ").map(|at| l[at..].to_owned()));
        assert!(status.success(), "a reader failed: {report:?}");
        reports.push(report.unwrap_or_default());
        let file = std::fs::File::open(&out).expect("reads file");
        for line in BufReader::new(file).lines() {
            let line = line.expect("line");
            let fields: Vec<u64> = line.split(' ').filter_map(|f| f.parse().ok()).collect();
            let [key, version, started, near] = fields[..] else {
                panic!("bad line {line:?}");
            };
            reads += 1;
            near_reads += near;
            // The first newer write of the key that completed before the
            // read started.
            let newer = writes[&key]
                .iter()
                .find(|(v, done)| *v > version && *done < started);
            let by = newer.map_or(Duration::ZERO, |(_, done)| {
                Duration::from_micros(started - done)
            });
            let bucket = match by {
                d if d.is_zero() => 0,
                d if d < Duration::from_millis(1) => 1,
                d if d < Duration::from_millis(10) => 2,
                d if d < Duration::from_millis(100) => 3,
                _ => 4,
                // (At or past the lease: a violation, counted below.)
            };
            stale[bucket] += 1;
            worst = worst.max(by);
            if by >= LEASE {
                violations.push(format!("{line} stale by {by:?}"));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let total_writes: usize = writes.values().map(Vec::len).sum();
    println!(
        "near soak {secs} s: {total_writes} writes, {reads} reads ({near_reads} from the near tier); \
         faults injected (reset, cut, black hole, latency, SIGSTOP, CLIENT KILL): {injected:?}"
    );
    println!(
        "  reads fresh {}, stale by < 1 ms {}, < 10 ms {}, < 100 ms {}, more {}; worst {worst:?}",
        stale[0], stale[1], stale[2], stale[3], stale[4]
    );
    for report in &reports {
        println!("  reader: {report}");
    }
    assert!(
        violations.is_empty(),
        "{} reads stale by the lease or more: {:?}",
        violations.len(),
        &violations[..violations.len().min(10)]
    );
    assert!(near_reads > 0, "the near tier never served: {reports:?}");
    assert!(
        total_writes as u64 > secs * 20,
        "the writer wrote: {total_writes}"
    );
}
