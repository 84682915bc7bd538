//! `demo serve`: the service; `demo bench`: the service under load, with
//! the cache and without, in a closed loop and then in an open loop at one
//! offered rate, then two tables and a chart; with `--outside-writer`, the
//! cached service once more while rows change behind its back, with the
//! stale reads counted (and on Postgres again with a listener).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use demo::load::LoadReport;
use demo::outside::{self, OutsideConfig, OutsideWriter, Staleness};
use redis_cached::Cache;

use demo::load::{self, LoadConfig};
use demo::service::{prometheus, App};
use demo::{db::Db, repo::Repo, report};

const USAGE: &str = "\
usage: demo bench [--requests N] [--zipf S] [--writes F] [--concurrency C] [--seed N] [--chart FILE]
                  [--load F | --rate R] [--max-connections N]
                  [--outside-writer UPDATES_PER_S] [--stale-bound MS]
       demo serve [--port P] [--no-cache]
DATABASE_URL: sqlite://… or postgres://… (default: sqlite://demo.sqlite3?mode=rwc)
REDIS_URL:    the cache's Redis (default: in process memory)";

type Failure = Box<dyn std::error::Error>;

#[tokio::main]
async fn main() {
    if let Err(err) = run().await {
        eprintln!("demo: {err}");
        std::process::exit(1);
    }
}

/// `--name value` from the arguments, parsed, or `default`.
fn option<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T, Failure> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => {
            let value = args.get(i + 1).ok_or(format!("{name} needs a value"))?;
            value
                .parse()
                .map_err(|_| format!("{name}: cannot read {value:?}").into())
        }
    }
}

async fn run() -> Result<(), Failure> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let database = std::env::var("DATABASE_URL").unwrap_or_else(|_| demo::DEFAULT_DATABASE.into());
    let redis = std::env::var("REDIS_URL").ok();
    prometheus();
    match args.first().map(String::as_str) {
        Some("serve") => {
            let port: u16 = option(&args, "--port", 3000)?;
            let db = Db::open(&database).await?;
            let cache = demo::cache(redis.as_deref(), "demo")?;
            let app = App {
                repo: Repo { db, cache },
                cached: !args.iter().any(|a| a == "--no-cache"),
            };
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
            println!(
                "serving on http://{}/users/1 (metrics on /metrics)",
                listener.local_addr()?
            );
            axum::serve(listener, demo::service::router(std::sync::Arc::new(app))).await?;
            Ok(())
        }
        Some("bench") => bench(&args, &database, redis.as_deref()).await,
        _ => {
            println!("{USAGE}");
            Ok(())
        }
    }
}

async fn bench(args: &[String], database: &str, redis: Option<&str>) -> Result<(), Failure> {
    let config = LoadConfig {
        requests: option(args, "--requests", 50_000)?,
        zipf_s: option(args, "--zipf", 1.0)?,
        writes: option(args, "--writes", 0.05)?,
        concurrency: option(args, "--concurrency", 32)?,
        seed: option(args, "--seed", 1)?,
        progress: true,
        ..LoadConfig::default()
    };
    let chart_file: String = option(args, "--chart", "demo-chart.png".to_owned())?;
    // The open loop: a share of the uncached service's capacity, or a rate.
    let load: f64 = option(args, "--load", 0.6)?;
    let fixed_rate: Option<f64> = match option(args, "--rate", 0.0)? {
        rate if rate > 0.0 => Some(rate),
        _ => None,
    };
    let max_connections: usize = option(args, "--max-connections", 256)?;
    let outside_rate: f64 = option(args, "--outside-writer", 0.0)?;
    let stale_bound = Duration::from_millis(option(args, "--stale-bound", 100)?);
    println!(
        "database: {}",
        database.split('@').next_back().unwrap_or(database)
    );
    let db = Db::open(database).await?;
    // Every bench starts from the seeded data, whatever earlier ones wrote.
    db.reset().await?;
    // A namespace of its own, so that entries of an earlier run are not
    // found (with Redis).
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let cache = demo::cache(redis, &format!("demo{stamp}"))?;
    println!(
        "cache: {}",
        if redis.is_some() {
            "Redis (REDIS_URL)"
        } else {
            "in process memory"
        }
    );
    let cached = demo::spawn(App {
        repo: Repo {
            db: db.clone(),
            cache: cache.clone(),
        },
        cached: true,
    })
    .await?;
    let step = |what: &str| {
        println!(
            "{what}: {} requests, Zipf({}) over {} users, {}% writes",
            config.requests,
            config.zipf_s,
            config.users,
            config.writes * 100.0
        )
    };
    // The runs before the measured one, each with a seed of its own.
    let earlier = [config.seed + 1, config.seed + 2].map(|seed| LoadConfig {
        seed,
        ..config.clone()
    });
    step("with the cache, from empty (cold)");
    let cold = load::run(cached, &earlier[0]).await?;
    step("with the cache, warming up further");
    load::run(cached, &earlier[1]).await?;
    step("with the cache, warm (measured)");
    let warm = load::run(cached, &config).await?;
    let exported = check_metrics(cached).await?;
    let uncached = demo::spawn(App {
        repo: Repo {
            db: db.clone(),
            cache: demo::cache(None, "unused")?,
        },
        cached: false,
    })
    .await?;
    // The baseline runs on the data the measured run saw: seeded, then
    // changed by the writes of the runs before it, replayed.
    db.reset().await?;
    let mut replay_failures = 0;
    for config in earlier {
        let writes = LoadConfig {
            writes_only: true,
            progress: false,
            ..config
        };
        replay_failures += load::run(uncached, &writes).await?.failures;
    }
    step("without the cache (same requests as the measured run)");
    let baseline = load::run(uncached, &config).await?;
    // The open loop: both services offered the same requests at one rate,
    // the cached one first (its entries then match the database again,
    // as they do after the baseline's replay).
    let capacity = baseline.throughput();
    let rate = fixed_rate.unwrap_or(capacity * load);
    let open = LoadConfig {
        seed: config.seed + 3,
        rate: Some(rate),
        concurrency: max_connections,
        ..config.clone()
    };
    let open_step = |what: &str| {
        println!(
            "open loop, {what}: {} requests at {} req/s ({:.0}% of the closed-loop no-cache throughput), up to {} connections",
            open.requests,
            rate.round(),
            rate / capacity * 100.0,
            open.concurrency
        )
    };
    open_step("with the cache");
    let open_cached = load::run(cached, &open).await?;
    open_step("without the cache");
    let open_uncached = load::run(uncached, &open).await?;
    println!();
    println!("Closed loop ({} connections):", config.concurrency);
    println!();
    println!(
        "{}",
        report::table(&[
            ("cache, cold start", &cold),
            ("cache, warm", &warm),
            ("no cache", &baseline),
        ])
    );
    println!(
        "Open loop (latency from each request's scheduled time, {} req/s offered to both):",
        rate.round()
    );
    println!();
    println!(
        "{}",
        report::table(&[("cache, warm", &open_cached), ("no cache", &open_uncached)])
    );
    println!("{exported}");
    let mut outside_failures = 0;
    if outside_rate > 0.0 {
        let load = LoadConfig {
            seed: open.seed + 1,
            record_reads: true,
            ..open.clone()
        };
        outside_failures = outside_runs(
            database,
            cached,
            cache,
            &load,
            outside_rate,
            stale_bound,
            stamp,
        )
        .await?;
    }
    match report::chart(&warm, &baseline) {
        Ok(png) => {
            std::fs::write(&chart_file, png)?;
            println!("chart: {chart_file}");
        }
        Err(err) => eprintln!("no chart: {err}"),
    }
    let failures = [&cold, &warm, &baseline, &open_cached, &open_uncached]
        .iter()
        .map(|r| r.failures)
        .sum::<u64>();
    if failures + replay_failures + outside_failures > 0 {
        return Err("some requests failed".into());
    }
    Ok(())
}

/// The cached service offered `load` while an outside writer updates
/// rows at `rate`: without a listener, then (on Postgres) with one; a
/// table of the stale reads. The failed requests.
async fn outside_runs(
    database: &str,
    service: std::net::SocketAddr,
    cache: Cache,
    load: &LoadConfig,
    rate: f64,
    bound: Duration,
    stamp: u64,
) -> Result<u64, Failure> {
    let writer = |seed: u64, first_version: u64| OutsideConfig {
        rate,
        users: load.users,
        zipf_s: load.zipf_s,
        seed,
        first_version,
    };
    let step = |what: &str| {
        println!(
            "outside writer, {what}: {rate} updates/s of users.email in SQL, while the cached service is offered {} requests at {} req/s",
            load.requests,
            load.rate.unwrap_or_default().round()
        )
    };
    step("no listener");
    let outside = OutsideWriter::start(database, writer(load.seed, 1)).await?;
    let without = load::run(service, load).await?;
    let mut writes = outside.stop().await?;
    let mut runs = vec![(
        "no listener",
        staleness_of(&without, &writes, bound),
        writes.len(),
        without,
    )];
    if database.starts_with("postgres") {
        // A slot of its own, dropped at the end: a slot left behind keeps
        // the database's WAL.
        let slot = format!("demo_{stamp}");
        let listener = outside::listen(database, cache, &slot).await?;
        step("with the redis-cached-pg listener");
        let next = writes.last().map_or(1, |w| w.version + 1);
        let load = LoadConfig {
            seed: load.seed + 1,
            ..load.clone()
        };
        let outside = OutsideWriter::start(database, writer(load.seed, next)).await?;
        let with = load::run(service, &load).await?;
        let more = outside.stop().await?;
        let count = more.len();
        writes.extend(more);
        let stats = listener.stats();
        listener.stop().await;
        redis_cached_pg::drop_slot(database, &slot).await?;
        println!(
            "listener: {} rows changed, {} keys and {} tags invalidated, last commit-to-invalidation {:?}",
            stats.rows, stats.keys, stats.tags, stats.last_latency
        );
        runs.push((
            "redis-cached-pg listener",
            staleness_of(&with, &writes, bound),
            count,
            with,
        ));
    } else {
        println!(
            "(the listener needs Postgres: DATABASE_URL=postgres://…, see examples/demo/README.md)"
        );
    }
    println!();
    println!(
        "Outside writer ({rate} updates/s), reads of a user checked against the rows' versions (bound {} ms):",
        bound.as_millis()
    );
    println!();
    let rows: Vec<_> = runs
        .iter()
        .map(|(name, stale, writes, run)| (*name, stale, *writes, run))
        .collect();
    println!("{}", report::stale_table(&rows, bound));
    Ok(runs.iter().map(|(_, _, _, run)| run.failures).sum())
}

fn staleness_of(run: &LoadReport, writes: &[outside::OutsideWrite], bound: Duration) -> Staleness {
    outside::staleness(&run.reads, writes, bound)
}

/// Compares `/metrics` with `/stats` at the end of the cached runs.
async fn check_metrics(addr: std::net::SocketAddr) -> Result<String, Failure> {
    let mut conn = load::Connection::open(addr).await?;
    let counts = conn.counts().await?;
    let (_, body) = conn.send("GET", "/metrics", "").await?;
    let text = String::from_utf8(body)?;
    let hits = report::counter_total(&text, "redis_cached_hits_total").unwrap_or(0.0) as u64;
    let misses = report::counter_total(&text, "redis_cached_misses_total").unwrap_or(0.0) as u64;
    if (hits, misses) != (counts.hits, counts.misses) {
        return Err(format!(
            "/metrics says {hits} hits and {misses} misses, the cache {} and {}",
            counts.hits, counts.misses
        )
        .into());
    }
    Ok(format!("/metrics after the cached runs: {hits} hits, {misses} misses (the same as the cache's stats)"))
}
