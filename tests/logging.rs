//! What the cache logs: failures, never keys, values or passwords, at any
//! level, so that turning on debug logging in production leaks no data.

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis_cached::{cache_evict, cache_put, redis_cached, BreakerConfig, Cache};
use support::write_behind::{builder, Recorder};
use support::RedisServer;
use tracing_subscriber::fmt::format::FmtSpan;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// What was logged, as text.
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().expect("log buffer").clone()).expect("UTF-8 logs")
    }
}

/// A subscriber that writes, without colours, into the buffer returned
/// with it: events up to `level`, and spans as `spans` says.
fn capture(
    level: tracing::Level,
    spans: FmtSpan,
) -> (Captured, impl tracing::Subscriber + Send + Sync) {
    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_span_events(spans)
        .with_writer(move || sink.clone())
        .finish();
    (captured, subscriber)
}

#[redis_cached(key = "secret-key-name:<id>", cache = cache)]
async fn lookup(cache: &Cache, id: u64) -> String {
    format!("secret-value-{id}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_values_and_passwords_are_never_logged() {
    let (captured, subscriber) = capture(tracing::Level::TRACE, FmtSpan::NONE);
    let _guard = tracing::subscriber::set_default(subscriber);

    let server = RedisServer::start_with(&["--requirepass", "pw-in-url"]);
    // Wrong password: failures are logged, the breaker opens.
    let wrong = Cache::builder(&format!(
        "redis://:wrong-pw-in-url@127.0.0.1:{}/",
        server.port()
    ))
    .breaker(BreakerConfig {
        failure_threshold: 2,
        cooldown: Duration::from_secs(5),
    })
    .build()
    .unwrap();
    for id in 0..5 {
        assert_eq!(lookup(&wrong, id).await, format!("secret-value-{id}"));
    }
    // Right password, then garbage at a key and a dead server.
    let mut server = server;
    let good = Cache::builder(&format!("redis://:pw-in-url@127.0.0.1:{}/", server.port()))
        .breaker(BreakerConfig {
            failure_threshold: 2,
            cooldown: Duration::from_secs(5),
        })
        .build()
        .unwrap();
    lookup(&good, 1).await;
    server.kill();
    for id in 0..5 {
        lookup(&good, id).await;
    }

    let logs = captured.text();
    assert!(logs.contains("WARN"), "failures are logged: {logs}");
    // Under the crate users depend on, so `RUST_LOG=redis_cached=debug`
    // shows them.
    let ours: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains(" redis_cached:"))
        .collect();
    assert!(ours.iter().any(|l| l.contains("WARN")), "{logs}");
    assert!(
        !logs.contains("cached_runtime"),
        "logged under the inner crate: {logs}"
    );
    for secret in ["secret-key-name", "secret-value", "pw-in-url"] {
        assert!(
            !logs.contains(secret),
            "{secret:?} leaked into the logs:\n{logs}"
        );
    }
}

/// While Redis stays down the breaker probes every cool-down; the warning
/// comes once per outage, and its end is one line that says how long it
/// lasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_one_warning_and_one_summary() {
    let (captured, subscriber) = capture(tracing::Level::INFO, FmtSpan::NONE);
    let _guard = tracing::subscriber::set_default(subscriber);

    let mut server = RedisServer::start();
    let cache = Cache::builder(&server.url())
        .op_timeout(Duration::from_millis(100))
        .breaker(BreakerConfig {
            failure_threshold: 2,
            cooldown: Duration::from_millis(100),
        })
        .build()
        .unwrap();
    lookup(&cache, 1).await;
    server.kill();
    let until = std::time::Instant::now() + Duration::from_millis(800);
    while std::time::Instant::now() < until {
        lookup(&cache, 2).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stats = cache.stats();
    assert!(
        stats.breaker_opens == 1 && stats.breaker_failed_probes >= 2,
        "one outage, probed every cool-down: {stats:?}"
    );
    server.restart();
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while cache.is_degraded() && std::time::Instant::now() < until {
        lookup(&cache, 3).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!cache.is_degraded(), "recovered");

    let logs = captured.text();
    let warnings = logs.lines().filter(|l| l.contains("WARN")).count();
    assert_eq!(warnings, 1, "one warning per outage:\n{logs}");
    let summary: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("reachable again after"))
        .collect();
    assert_eq!(summary.len(), 1, "{logs}");
    assert!(summary[0].contains("failed probes"), "{logs}");
}

/// Runs `calls` on a runtime of its own under a `debug` subscriber: all
/// that was logged.
fn traced(calls: impl std::future::Future<Output = ()>) -> String {
    let (captured, subscriber) = capture(tracing::Level::DEBUG, FmtSpan::CLOSE);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    tracing::subscriber::with_default(subscriber, || runtime.block_on(calls));
    captured.text()
}

/// The lines of `logs` that close a span named `name`, in order.
fn closed(logs: &str, name: &str) -> Vec<String> {
    logs.lines()
        .filter(|l| l.contains(&format!("{name}{{")) && l.contains("close"))
        .map(str::to_owned)
        .collect()
}

/// [`traced`], and the lines of the `cached` spans as they closed.
fn cached_spans(calls: impl std::future::Future<Output = ()>) -> (String, Vec<String>) {
    let logs = traced(calls);
    let spans = closed(&logs, "cached");
    (logs, spans)
}

/// One span per call at `debug`, target `redis_cached`: the function and
/// how the call got its result; never the key or the value.
#[test]
fn each_call_has_a_span_with_its_outcome() {
    #[redis_cached(key = "span-key:<id>", cache = cache)]
    async fn traced(cache: &Cache, id: u64) -> String {
        format!("span-value-{id}")
    }
    let (logs, spans) = cached_spans(async {
        let server = RedisServer::start();
        let cache = Cache::redis(&server.url()).expect("valid URL");
        traced(&cache, 1).await; // miss
        traced(&cache, 1).await; // hit
        let dead = Cache::builder("redis://127.0.0.1:1/")
            .build()
            .expect("valid");
        traced(&dead, 1).await; // fallback
        traced(&Cache::in_memory(), 2).await; // miss, in memory
    });
    let outcomes: Vec<&str> = spans
        .iter()
        .map(|l| {
            ["miss", "hit", "fallback"]
                .into_iter()
                .find(|o| l.contains(&format!("outcome=\"{o}\"")))
                .unwrap_or("?")
        })
        .collect();
    assert_eq!(outcomes, ["miss", "hit", "fallback", "miss"], "{logs}");
    assert!(spans.iter().all(|l| l.contains("::traced")), "{logs}");
    assert!(spans[0].contains("compute_ms="), "{logs}");
    // Milliseconds to the microsecond: `6.19`, not `6.190074999999999`.
    let compute_ms = spans[0]
        .split("compute_ms=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_default();
    let decimals = compute_ms.split('.').nth(1).map_or(0, str::len);
    assert!(decimals <= 3, "compute_ms={compute_ms}");
    // Time spent waiting for Redis, on Redis only.
    assert!(
        spans[0].contains("redis_ms=") && spans[1].contains("redis_ms="),
        "{logs}"
    );
    assert!(!spans[3].contains("redis_ms="), "{logs}");
    assert!(
        !logs.contains("span-key") && !logs.contains("span-value"),
        "{logs}"
    );
}

/// `log_keys(true)` names each call's key in its span; values still never.
#[test]
fn keys_are_in_spans_only_when_asked_for() {
    #[redis_cached(key = "opted-key:<id>", cache = cache)]
    async fn traced(cache: &Cache, id: u64) -> String {
        format!("opted-value-{id}")
    }
    let (logs, spans) = cached_spans(async {
        let server = RedisServer::start();
        let cache = Cache::builder(&server.url())
            .namespace("app")
            .log_keys(true)
            .build()
            .expect("valid URL");
        traced(&cache, 1).await;
        traced(&cache, 1).await;
        traced(&Cache::in_memory(), 2).await;
    });
    assert_eq!(spans.len(), 3, "{logs}");
    assert!(spans[0].contains("key=\"app:opted-key:1\""), "{logs}");
    assert!(spans[1].contains("key=\"app:opted-key:1\""), "{logs}");
    assert!(!spans[2].contains("opted-key"), "not asked for: {logs}");
    assert!(!logs.contains("opted-value"), "{logs}");
}

/// Batch functions, `#[cache_put]`, `#[cache_evict]` and the runtime API
/// have spans of their own, with how each went; never a key or a value.
#[test]
fn batches_writes_and_runtime_calls_have_spans_of_their_own() {
    #[redis_cached(key = "batch-key:<ids[]>", cache = cache)]
    async fn names(cache: &Cache, ids: Vec<u64>) -> HashMap<u64, String> {
        ids.into_iter()
            .map(|id| (id, format!("batch-value-{id}")))
            .collect()
    }
    #[cache_put(key = "batch-key:<id>", cache = cache)]
    async fn rename(cache: &Cache, id: u64) -> String {
        format!("put-value-{id}")
    }
    #[cache_evict(key = "batch-key:<id>", cache = cache)]
    async fn remove(cache: &Cache, id: u64) -> Result<(), String> {
        if id == 0 {
            return Err("refused".into());
        }
        Ok(())
    }
    let logs = traced(async {
        let server = RedisServer::start();
        let cache = Cache::redis(&server.url()).expect("valid URL");
        names(&cache, vec![1, 2]).await;
        names(&cache, vec![1, 2, 3]).await;
        names(&cache, vec![3, 1]).await;
        rename(&cache, 1).await;
        remove(&cache, 1).await.expect("evicted");
        remove(&cache, 0).await.expect_err("failed body");
        assert_eq!(
            cache.get::<String>("batch-key:2").await.as_deref(),
            Some("batch-value-2")
        );
        cache
            .set("plain-key", &"plain-value", Duration::from_secs(60))
            .await
            .expect("stored");
        let got = cache.get_many::<String>(&["plain-key", "absent-key"]).await;
        assert_eq!(got, [Some("plain-value".to_owned()), None]);
        cache.invalidate("plain-key").await.expect("invalidated");
        cache.invalidate_tag("some-tag").await.expect("invalidated");
        let dead = Cache::builder("redis://127.0.0.1:1/")
            .build()
            .expect("valid");
        assert_eq!(dead.get::<String>("plain-key").await, None);
        dead.set("plain-key", &1, Duration::from_secs(60))
            .await
            .expect_err("Redis down");
        rename(&Cache::in_memory(), 2).await;
    });
    let field = |line: &str, name: &str| -> String {
        let start = line
            .find(&format!(" {name}="))
            .or_else(|| line.find(&format!("{{{name}=")))
            .unwrap_or_else(|| panic!("no {name} in {line}"));
        let rest = &line[start + name.len() + 2..];
        rest[..rest.find([' ', '}']).unwrap_or(rest.len())]
            .trim_matches('"')
            .to_owned()
    };
    let batches = closed(&logs, "cached_batch");
    let got: Vec<(String, String)> = batches
        .iter()
        .map(|l| (field(l, "outcome"), field(l, "computed")))
        .collect();
    let want = [("miss", "2"), ("miss", "1"), ("hit", "0")];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(o, c)| (o.to_string(), c.to_string()))
        .collect();
    assert_eq!(got, want, "{logs}");
    assert!(batches.iter().all(|l| l.contains("::names")), "{logs}");
    assert!(batches.iter().all(|l| l.contains("redis_ms=")), "{logs}");
    assert!(batches[0].contains("compute_ms="), "{logs}");
    assert!(!batches[2].contains("compute_ms="), "{logs}");

    let puts = closed(&logs, "cache_put");
    let got: Vec<String> = puts.iter().map(|l| field(l, "outcome")).collect();
    assert_eq!(got, ["stored", "stored"], "{logs}");
    assert!(puts.iter().all(|l| l.contains("::rename")), "{logs}");
    assert!(
        puts[0].contains("redis_ms=") && puts[0].contains("compute_ms="),
        "{logs}"
    );
    assert!(!puts[1].contains("redis_ms="), "in memory: {logs}");

    let evictions = closed(&logs, "cache_evict");
    let got: Vec<String> = evictions.iter().map(|l| field(l, "outcome")).collect();
    assert_eq!(got, ["evicted", "skipped"], "{logs}");
    assert!(evictions.iter().all(|l| l.contains("::remove")), "{logs}");
    assert_eq!(field(&evictions[0], "evicted"), "1", "{logs}");
    assert!(evictions[0].contains("redis_ms="), "{logs}");

    let ops = closed(&logs, "cache_op");
    let got: Vec<(String, String)> = ops
        .iter()
        .map(|l| (field(l, "op"), field(l, "outcome")))
        .collect();
    let want = [
        ("get", "hit"),
        ("set", "ok"),
        ("get_many", "miss"),
        ("invalidate", "ok"),
        ("invalidate_tag", "ok"),
        ("get", "fallback"),
        ("set", "error"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(o, c)| (o.to_string(), c.to_string()))
        .collect();
    assert_eq!(got, want, "{logs}");
    assert_eq!(field(&ops[2], "hits"), "1", "{logs}");
    assert_eq!(field(&ops[2], "keys"), "2", "{logs}");
    assert_eq!(ops[4].matches("keys=").count(), 1, "{logs}");
    assert_eq!(field(&ops[4], "keys"), "0", "{logs}");
    assert!(ops[..5].iter().all(|l| l.contains("redis_ms=")), "{logs}");
    for secret in [
        "batch-key",
        "batch-value",
        "put-value",
        "plain-key",
        "plain-value",
        "some-tag",
    ] {
        assert!(!logs.contains(secret), "{secret} logged: {logs}");
    }
}

/// With `log_keys(true)`, writes and runtime calls name their key (a
/// tag invalidation its tag); values still never.
#[test]
fn writes_and_runtime_calls_name_keys_only_when_asked_for() {
    #[cache_put(key = "named-key:<id>", cache = cache)]
    async fn rename(cache: &Cache, id: u64) -> String {
        format!("named-value-{id}")
    }
    #[cache_evict(key = "named-key:<id>", cache = cache)]
    async fn remove(cache: &Cache, id: u64) {}
    let logs = traced(async {
        let server = RedisServer::start();
        let cache = Cache::builder(&server.url())
            .namespace("app")
            .log_keys(true)
            .build()
            .expect("valid URL");
        rename(&cache, 1).await;
        assert_eq!(
            cache.get::<String>("named-key:1").await.as_deref(),
            Some("named-value-1")
        );
        remove(&cache, 1).await;
        cache
            .invalidate_tag("named-tag")
            .await
            .expect("invalidated");
        rename(&Cache::in_memory(), 2).await;
    });
    let puts = closed(&logs, "cache_put");
    assert!(puts[0].contains("key=\"app:named-key:1\""), "{logs}");
    assert!(!puts[1].contains("named-key"), "not asked for: {logs}");
    let evictions = closed(&logs, "cache_evict");
    assert!(evictions[0].contains("key=\"app:named-key:1\""), "{logs}");
    let ops = closed(&logs, "cache_op");
    assert!(ops[0].contains("key=\"app:named-key:1\""), "{logs}");
    assert!(ops[1].contains("key=\"named-tag\""), "{logs}");
    assert!(!logs.contains("named-value"), "{logs}");
}

/// A value over `max_value_bytes` is not cached, and says so once at
/// `warn`, naming the usual cause (bytes serialized as a list of numbers).
#[test]
fn a_value_too_large_to_cache_is_reported_once() {
    #[redis_cached(key = "blob:<id>", cache = cache)]
    async fn blob(cache: &Cache, id: u8) -> Vec<u8> {
        vec![id; 4_000]
    }
    let (captured, subscriber) = capture(tracing::Level::INFO, FmtSpan::NONE);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cache = Cache::builder("memory://")
        .max_value_bytes(8_000)
        .build()
        .expect("valid");
    tracing::subscriber::with_default(subscriber, || {
        runtime.block_on(async {
            for _ in 0..3 {
                assert_eq!(blob(&cache, 200).await.len(), 4_000);
            }
        });
    });
    let stats = cache.stats();
    // 4,000 bytes are some 16,000 as JSON: never stored, computed each time.
    assert_eq!(
        (stats.computes, stats.writes, stats.oversized),
        (3, 0, 3),
        "{stats}"
    );
    let logs = captured.text();
    let warnings: Vec<&str> = logs.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{logs}");
    assert!(warnings[0].contains("serde_bytes"), "{logs}");
}

#[redis_cached(key = "profile:<id>", cache = cache)]
async fn email(cache: &Cache, id: u64) -> String {
    format!("alice-{id}@example.com")
}

/// The same key, read as another type: what is stored there cannot be
/// decoded as it.
#[redis_cached(key = "profile:<id>", cache = cache)]
async fn visits(cache: &Cache, id: u64) -> u64 {
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_values_and_tags_never_reach_the_logs() {
    let (captured, subscriber) = capture(tracing::Level::TRACE, FmtSpan::FULL);
    let _guard = tracing::subscriber::set_default(subscriber);
    let server = RedisServer::start();
    let cache = Cache::redis(&server.url()).expect("valid URL");
    assert_eq!(email(&cache, 1).await, "alice-1@example.com");
    // Undecodable as a number: a miss, logged without what was stored.
    assert_eq!(visits(&cache, 1).await, 1);
    assert_eq!(cache.stats().decode_errors, 1);
    // Garbage written by someone else, read through the runtime API.
    let _: () = server
        .cmd(
            redis::cmd("SET")
                .arg("profile:2")
                .arg("\u{ca}\u{1}\u{1}\u{0}{\"mail\":\"bob@example.com\"}"),
        )
        .await;
    assert_eq!(cache.get::<u64>("profile:2").await, None);
    // A tag holding user input, in an invalidation that fails.
    server.pause();
    let failed = cache.invalidate_tag("q:carol@example.com").await;
    server.resume();
    assert!(failed.is_err());
    let logs = captured.text();
    assert!(
        logs.contains("undecodable"),
        "the decode error was logged: {logs}"
    );
    for secret in [
        "alice-1@example.com",
        "bob@example.com",
        "carol@example.com",
    ] {
        assert!(!logs.contains(secret), "{secret} in the logs:\n{logs}");
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ProfileV1 {
    name: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ProfileV2 {
    name: String,
    plan: u32,
}

#[redis_cached(key = "drift:<id>", cache = cache)]
async fn profile_v1(cache: &Cache, id: u64) -> ProfileV1 {
    ProfileV1 {
        name: format!("user {id}"),
    }
}

/// The same function after a deploy that added a field.
#[redis_cached(key = "drift:<id>", cache = cache)]
async fn profile_v2(cache: &Cache, id: u64) -> ProfileV2 {
    ProfileV2 {
        name: format!("user {id}"),
        plan: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_return_type_is_reported_once_naming_version() {
    let (captured, subscriber) = capture(tracing::Level::WARN, FmtSpan::NONE);
    let _guard = tracing::subscriber::set_default(subscriber);
    let cache = Cache::in_memory();
    for id in 0..5 {
        profile_v1(&cache, id).await;
    }
    for id in 0..5 {
        assert_eq!(profile_v2(&cache, id).await.plan, 1);
    }
    assert_eq!(cache.stats().decode_errors, 5, "every old entry recomputed");
    let logs = captured.text();
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains("does not decode"))
        .collect();
    assert_eq!(warnings.len(), 1, "once per function: {logs}");
    assert!(warnings[0].contains("version = N"), "{}", warnings[0]);
    assert!(
        warnings[0].contains("profile_v2"),
        "names the function: {}",
        warnings[0]
    );
}

#[redis_cached(key = "near-off:<id>", near = "30s", cache = cache)]
async fn near_off(cache: &Cache, id: u64) -> u64 {
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_on_a_cache_without_a_near_tier_is_reported_once() {
    let (captured, subscriber) = capture(tracing::Level::WARN, FmtSpan::NONE);
    let _guard = tracing::subscriber::set_default(subscriber);
    let server = RedisServer::start();
    let cache = Cache::builder(&server.url())
        .near_capacity(0)
        .build()
        .expect("valid");
    for id in 0..3 {
        assert_eq!(near_off(&cache, id).await, id);
    }
    let logs = captured.text();
    assert_eq!(logs.matches("keeps no near tier").count(), 1, "{logs}");
}

/// A stream entry as `XRANGE` gives it: its id and its fields.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// A database's error often quotes the row it refused: write-behind keeps
/// it out of the logs unless asked (and in the dead letter always). Here,
/// not beside the other write-behind tests: their flushers hit the same
/// log lines from other threads, and a callsite first met on another
/// thread while this test installs its subscriber can be cached as
/// disabled (tracing's interest cache), which would hide every line.
#[tokio::test(flavor = "current_thread")]
async fn the_sinks_error_text_stays_out_of_the_logs_unless_asked_for() {
    for asked in [false, true] {
        let captured = support::logs::Captured::default();
        let _guard = tracing::subscriber::set_default(captured.subscriber(tracing::Level::TRACE));
        let server = RedisServer::start();
        let cache = Cache::redis(&server.url()).expect("valid URL");
        let sink = Recorder {
            poison: Some(13),
            ..Recorder::default()
        };
        let wb = builder("quiet", &cache, sink)
            .max_attempts(2)
            .log_sink_errors(asked)
            .start()
            .expect("valid");
        wb.write(13, &"a row".to_owned()).await.expect("journaled");
        // Other rows go through meanwhile: the database is up, row 13 is
        // what it refuses.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut other = 100;
        while wb.stats().dead_letters == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the refused row was not buried"
            );
            wb.write(other, &"fine".to_owned())
                .await
                .expect("journaled");
            other += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let logs = captured.text();
        assert!(logs.contains("the write-behind sink failed"), "{logs}");
        assert_eq!(
            logs.contains("row 13 violates a constraint"),
            asked,
            "log_sink_errors({asked}):\n{logs}"
        );
        // The reason is kept with the write, as private as the journal.
        let dead: Vec<StreamEntry> = server
            .cmd(
                redis::cmd("XRANGE")
                    .arg("~wb-dead:{quiet}")
                    .arg("-")
                    .arg("+"),
            )
            .await;
        let reason = dead[0]
            .1
            .iter()
            .find(|(name, _)| name == "error")
            .map(|(_, why)| String::from_utf8_lossy(why).into_owned());
        assert_eq!(reason.as_deref(), Some("row 13 violates a constraint"));
    }
}
