//! `lock = true` across OS processes: three processes of 200 concurrent
//! callers each ask for one cold key; the body runs once, and nobody fails.
//! And when the lock holder is killed mid-computation, the others still
//! complete and the key is filled.

mod support;

use std::time::Duration;

use support::cluster::RedisCluster;
use support::stampede::{collect, Counter, Stampede, WorkerConfig, WorkerReport};
use support::RedisServer;

const WORKER_ARGS: &[&str] = &[
    "stampede_worker",
    "--exact",
    "--ignored",
    "--nocapture",
    "--test-threads",
    "1",
];

/// Not a test: the entry point of the worker processes the tests below
/// spawn (it does nothing unless started as one).
#[test]
#[ignore = "worker process of the stampede tests"]
fn stampede_worker() {
    if let Some(config) = WorkerConfig::from_env() {
        config.run();
    }
}

fn exe() -> std::path::PathBuf {
    std::env::current_exe().expect("the test binary's path")
}

async fn counter(server: &RedisServer, run: &str) -> u64 {
    Counter::runs(&server.url(), run).await
}

fn run_all(url: &str, run: &str, lock: bool) -> Vec<WorkerReport> {
    let stampede = Stampede {
        url,
        run,
        lock,
        processes: 3,
        tasks: 200,
        body: Duration::from_millis(200),
    };
    let children = stampede.spawn(&exe(), WORKER_ARGS);
    children
        .into_iter()
        .map(|c| collect(c).expect("worker report"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_share_one_computation() {
    let server = RedisServer::start();
    let locked = run_all(&server.url(), "locked", true);
    for report in &locked {
        assert_eq!(
            (report.calls, report.failed, report.wrong),
            (200, 0, 0),
            "{report:?}"
        );
    }
    let locked_runs = counter(&server, "locked").await;
    let worst = locked.iter().map(|r| r.max).max().unwrap_or_default();
    println!("lock = true: body ran {locked_runs} time(s) for 600 callers; worst caller {worst:?} (body 200 ms)");
    assert_eq!(locked_runs, 1, "the body runs once across processes");

    let unlocked = run_all(&server.url(), "unlocked", false);
    for report in &unlocked {
        assert_eq!(
            (report.calls, report.failed, report.wrong),
            (200, 0, 0),
            "{report:?}"
        );
    }
    let unlocked_runs = counter(&server, "unlocked").await;
    println!("no lock: body ran {unlocked_runs} time(s) for 600 callers");
    assert!(
        (1..=3).contains(&unlocked_runs),
        "once per process at most: {unlocked_runs}"
    );
}

/// The same on a Redis Cluster: the lock shares the value's slot and the
/// wake-up goes through the slot's shard channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_share_one_computation_on_a_cluster() {
    let cluster = RedisCluster::start();
    let url = format!("cluster:{}", cluster.urls().join(","));
    let locked = run_all(&url, "on-cluster", true);
    for report in &locked {
        assert_eq!(
            (report.calls, report.failed, report.wrong),
            (200, 0, 0),
            "{report:?}"
        );
    }
    let runs = Counter::runs(&url, "on-cluster").await;
    let worst = locked.iter().map(|r| r.max).max().unwrap_or_default();
    println!("cluster, lock = true: body ran {runs} time(s) for 600 callers; worst caller {worst:?} (body 200 ms)");
    assert_eq!(runs, 1, "the body runs once across processes");
    assert_eq!(cluster.crossslot_errors(), 0, "CROSSSLOT errors");
    assert!(
        cluster.command_calls("spublish") >= 1,
        "the holder's release told the waiters through a shard channel"
    );
    assert!(
        cluster.command_calls("ssubscribe") >= 1,
        "the waiting processes listened on a shard channel"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holder_does_not_block_the_others() {
    let server = RedisServer::start();
    let run = "killed";
    // The first process takes the lock and computes for a long time.
    let url = server.url();
    let stampede = |processes, tasks, body| Stampede {
        url: &url,
        run,
        lock: true,
        processes,
        tasks,
        body,
    };
    let mut holder = stampede(1, 1, Duration::from_secs(30)).spawn(&exe(), WORKER_ARGS);
    let lock_key = format!("~lock{{stampede:{run}}}");
    let mut held = false;
    for _ in 0..200 {
        let exists: u32 = server.cmd(redis::cmd("EXISTS").arg(&lock_key)).await;
        if exists == 1 {
            held = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(held, "the first worker took the lock");
    // Two more processes start waiting, then the holder dies mid-computation.
    let waiters = stampede(2, 50, Duration::from_millis(200)).spawn(&exe(), WORKER_ARGS);
    tokio::time::sleep(Duration::from_millis(1800)).await;
    for child in &mut holder {
        child.kill().expect("SIGKILL the holder");
        let _ = child.wait();
    }
    let reports: Vec<_> = waiters
        .into_iter()
        .map(|c| collect(c).expect("worker report"))
        .collect();
    for report in &reports {
        assert_eq!(
            (report.calls, report.failed, report.wrong),
            (50, 0, 0),
            "{report:?}"
        );
        // lock_wait (5 s) + body (200 ms) bounds every call; generous slack
        // for a loaded machine, since this is a liveness check.
        assert!(report.max < Duration::from_secs(10), "{report:?}");
    }
    let worst = reports.iter().map(|r| r.max).max().unwrap_or_default();
    println!("holder killed: worst waiter {worst:?} (lock_ttl 1 s, lock_wait 5 s, body 200 ms)");
    let filled: u32 = server
        .cmd(redis::cmd("EXISTS").arg(format!("stampede:{run}")))
        .await;
    assert_eq!(filled, 1, "the key is filled afterwards");
    assert_eq!(
        counter(&server, run).await,
        2,
        "the dead holder's run and one more"
    );
}
