//! Stampede benchmark: 3 OS processes x 200 concurrent callers ask for one
//! cold key whose body takes 200 ms and counts its runs in Redis. Prints,
//! from one run: how many times the body ran and the worst caller's latency
//! with `lock = true`, and the same without the lock (plain cache-aside,
//! coalesced within each process only).
//!
//! `cargo bench --bench stampede` (needs `redis-server` on the PATH).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use support::stampede::{collect, Stampede, WorkerConfig, WorkerReport};

const PROCESSES: usize = 3;
const TASKS: usize = 200;
const BODY: Duration = Duration::from_millis(200);
const ROUNDS: usize = 5;

fn main() {
    if let Some(config) = WorkerConfig::from_env() {
        config.run();
        return;
    }
    let server = support::RedisServer::start();
    let exe = std::env::current_exe().expect("the benchmark's path");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    println!("{PROCESSES} processes x {TASKS} concurrent callers, one cold key, body {BODY:?}, {ROUNDS} rounds");
    for lock in [true, false] {
        let mut worst = Vec::new();
        let mut runs = Vec::new();
        let mut failed = 0;
        for round in 0..ROUNDS {
            let run = format!("{}-{round}", if lock { "locked" } else { "plain" });
            let url = server.url();
            let stampede = Stampede {
                url: &url,
                run: &run,
                lock,
                processes: PROCESSES,
                tasks: TASKS,
                body: BODY,
            };
            let children = stampede.spawn(&exe, &[]);
            let reports: Vec<WorkerReport> = children.into_iter().filter_map(collect).collect();
            failed += reports.iter().map(|r| r.failed + r.wrong).sum::<usize>()
                + (PROCESSES - reports.len()) * TASKS;
            worst.push(reports.iter().map(|r| r.max).max().unwrap_or_default());
            let count: Option<u64> =
                runtime.block_on(server.cmd(redis::cmd("GET").arg(format!("body-runs:{run}"))));
            runs.push(count.unwrap_or(0));
        }
        worst.sort();
        let median = worst[worst.len() / 2];
        let over = median.saturating_sub(BODY);
        println!(
            "{:<10} body runs per round {:?}; failed callers {failed}; worst caller per round: median {median:.1?} (body + {over:.1?}), max {:.1?}",
            if lock { "lock=true" } else { "no lock" },
            runs,
            worst.last().copied().unwrap_or_default(),
        );
        if lock {
            let ok = runs.iter().all(|&r| r == 1) && failed == 0;
            println!(
                "           target: body once, no failures, worst caller <= body + 5 ms: {} / {}",
                if ok { "met" } else { "NOT MET" },
                if over <= Duration::from_millis(5) {
                    "met"
                } else {
                    "NOT MET"
                }
            );
        }
    }
}
