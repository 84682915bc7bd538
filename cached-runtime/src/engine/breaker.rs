//! The circuit breakers in front of Redis.
//!
//! After `failure_threshold` consecutive failures a breaker opens and every
//! Redis operation it guards is skipped (a miss, then the computation) for
//! `cooldown`. Then one operation goes through as a probe: its success
//! closes the breaker, its failure opens it for another cool-down. A probe
//! that never reports (its caller was cancelled) is replaced after one more
//! cool-down.
//!
//! A cache has one breaker ([`Health::whole`]) for one server or a Sentinel
//! master; on a cluster, one per master as well ([`Health::of`]), so that
//! the keys of a sick master skip Redis while the other masters keep
//! serving theirs (and a run of its failures opens no other's breaker).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// Settings of the circuit breaker, see [`CacheBuilder::breaker`](crate::CacheBuilder::breaker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker. Default 5.
    pub failure_threshold: u32,
    /// How long an open breaker skips Redis before probing. Default 1 s.
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            cooldown: Duration::from_secs(1),
        }
    }
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// What a call to [`Breaker::failure`] did, for the caller to count and log.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Transition {
    None,
    /// Closed to open: an outage begins.
    Opened,
    /// A probe failed: open again for another cool-down, same outage.
    Reopened,
}

#[derive(Debug)]
pub(crate) struct Breaker {
    config: BreakerConfig,
    state: AtomicU8,
    failures: AtomicU32,
    /// Milliseconds since `epoch` at which an open breaker lets a probe through.
    retry_at_ms: AtomicU64,
    /// When the current outage began (ms since `epoch`), and how many
    /// probes have failed in it: for one warning per outage and a summary
    /// when it ends.
    opened_at_ms: AtomicU64,
    failed_probes: AtomicU32,
    epoch: Instant,
}

/// An outage that ended: how long it lasted, how many probes failed in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outage {
    pub(crate) lasted: Duration,
    pub(crate) failed_probes: u32,
}

impl Breaker {
    pub(crate) fn new(config: BreakerConfig) -> Self {
        Breaker {
            config,
            state: AtomicU8::new(CLOSED),
            failures: AtomicU32::new(0),
            retry_at_ms: AtomicU64::new(0),
            opened_at_ms: AtomicU64::new(0),
            failed_probes: AtomicU32::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn cooldown_ms(&self) -> u64 {
        u64::try_from(self.config.cooldown.as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether an operation may go to Redis now.
    pub(crate) fn allow(&self) -> bool {
        match self.state.load(Ordering::Acquire) {
            CLOSED => true,
            _ => {
                // Open, or half-open with a probe out: once the retry time has
                // passed, exactly one caller wins the right to probe.
                let now = self.now_ms();
                let retry_at = self.retry_at_ms.load(Ordering::Acquire);
                now >= retry_at
                    && self
                        .retry_at_ms
                        .compare_exchange(
                            retry_at,
                            now.saturating_add(self.cooldown_ms()),
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        )
                        .is_ok()
                    && {
                        // Half-open only if still open: an operation sent
                        // before the outage may have closed it meanwhile,
                        // and a closed breaker must stay closed.
                        let _ = self.state.compare_exchange(
                            OPEN,
                            HALF_OPEN,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        );
                        true
                    }
            }
        }
    }

    /// Records a successful operation; the outage it ended, if the breaker
    /// was not closed before (it recovered).
    pub(crate) fn success(&self) -> Option<Outage> {
        // Called on every operation: write only when something changes, so
        // that threads do not trade the cache line back and forth.
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        let recovered = self.state.load(Ordering::Acquire) != CLOSED
            && self.state.swap(CLOSED, Ordering::AcqRel) != CLOSED;
        recovered.then(|| Outage {
            lasted: Duration::from_millis(
                self.now_ms()
                    .saturating_sub(self.opened_at_ms.load(Ordering::Acquire)),
            ),
            failed_probes: self.failed_probes.load(Ordering::Acquire),
        })
    }

    /// Records a failed operation.
    pub(crate) fn failure(&self) -> Transition {
        let opened = match self.state.load(Ordering::Acquire) {
            HALF_OPEN => true,
            OPEN => false,
            _ => {
                let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
                failures >= self.config.failure_threshold
            }
        };
        if !opened {
            return Transition::None;
        }
        self.retry_at_ms.store(
            self.now_ms().saturating_add(self.cooldown_ms()),
            Ordering::Release,
        );
        match self.state.swap(OPEN, Ordering::AcqRel) {
            OPEN => Transition::None,
            HALF_OPEN => {
                self.failed_probes.fetch_add(1, Ordering::AcqRel);
                Transition::Reopened
            }
            _ => {
                self.failures.store(0, Ordering::Relaxed);
                self.opened_at_ms.store(self.now_ms(), Ordering::Release);
                self.failed_probes.store(0, Ordering::Release);
                Transition::Opened
            }
        }
    }

    /// Whether the breaker is currently open or probing.
    pub(crate) fn is_open(&self) -> bool {
        self.state.load(Ordering::Acquire) != CLOSED
    }
}

/// A cache's breakers: the whole one, and on a cluster one per master.
#[derive(Debug)]
pub(crate) struct Health {
    /// For one server or a Sentinel master; on a cluster, for the
    /// operations that name no key or whose master is not known yet.
    pub(crate) whole: Breaker,
    /// On a cluster, one per master, by its number (see the backend's
    /// topology), made as masters are first met: a fixed table, so that
    /// finding a master's breaker on every operation writes nothing shared.
    nodes: Box<[OnceLock<Breaker>]>,
    config: BreakerConfig,
    /// Held while the number of open breakers is counted and published,
    /// so that two transitions at once cannot publish in the wrong order.
    publishing: Mutex<()>,
}

/// How many cluster masters have a breaker of their own: as many as the
/// topology numbers (it reuses the number of a master gone once all are
/// taken, and that master's breaker with it).
const MASTERS: usize = crate::backend::MASTER_NUMBERS;

impl Health {
    /// The breakers of a cache; with one per master if on a `cluster`.
    pub(crate) fn new(config: BreakerConfig, cluster: bool) -> Self {
        let masters = if cluster { MASTERS } else { 0 };
        Health {
            whole: Breaker::new(config),
            nodes: (0..masters).map(|_| OnceLock::new()).collect(),
            config,
            publishing: Mutex::new(()),
        }
    }

    /// The breaker of cluster master number `node` (the whole one for
    /// `None`, or a master with no breaker of its own), and the master's
    /// number if it has one.
    pub(crate) fn of(&self, node: Option<usize>) -> (&Breaker, Option<usize>) {
        match node.and_then(|n| Some((self.nodes.get(n)?, n))) {
            Some((breaker, n)) => (breaker.get_or_init(|| Breaker::new(self.config)), Some(n)),
            None => (&self.whole, None),
        }
    }

    /// How many breakers are open or probing.
    /// Counts the open breakers and hands the count to `publish`, one
    /// transition at a time (a gauge set from two threads at once could
    /// keep the older count).
    pub(crate) fn publish_open_count(&self, publish: impl FnOnce(usize)) {
        let _one = self
            .publishing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        publish(self.open_count());
    }

    /// How many breakers are open or probing now.
    pub(crate) fn open_count(&self) -> usize {
        usize::from(self.whole.is_open())
            + self
                .nodes
                .iter()
                .filter(|b| b.get().is_some_and(Breaker::is_open))
                .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(cooldown_ms: u64) -> Breaker {
        Breaker::new(BreakerConfig {
            failure_threshold: 3,
            cooldown: Duration::from_millis(cooldown_ms),
        })
    }

    #[test]
    fn opens_after_threshold_consecutive_failures() {
        let b = breaker(10_000);
        assert_eq!(b.failure(), Transition::None);
        assert_eq!(b.failure(), Transition::None);
        assert!(b.allow());
        assert_eq!(b.failure(), Transition::Opened);
        assert!(!b.allow());
        assert!(b.is_open());
    }

    #[test]
    fn success_resets_the_count() {
        let b = breaker(10_000);
        b.failure();
        b.failure();
        assert!(b.success().is_none());
        b.failure();
        b.failure();
        assert!(b.allow());
    }

    #[test]
    fn probes_once_after_cooldown_and_recovers() {
        let b = breaker(20);
        for _ in 0..3 {
            b.failure();
        }
        assert!(!b.allow());
        std::thread::sleep(Duration::from_millis(30));
        assert!(b.allow(), "one probe after the cool-down");
        assert!(!b.allow(), "only one probe at a time");
        let outage = b.success().expect("recovered");
        assert_eq!(outage.failed_probes, 0);
        assert!(outage.lasted >= Duration::from_millis(20), "{outage:?}");
        assert!(b.allow());
        assert!(!b.is_open());
    }

    #[test]
    fn failed_probe_reopens() {
        let b = breaker(20);
        for _ in 0..3 {
            b.failure();
        }
        std::thread::sleep(Duration::from_millis(30));
        assert!(b.allow());
        assert_eq!(b.failure(), Transition::Reopened, "the same outage");
        assert!(!b.allow());
        std::thread::sleep(Duration::from_millis(30));
        assert!(b.allow());
        assert_eq!(b.success().map(|o| o.failed_probes), Some(1));
    }

    #[test]
    fn a_masters_failures_open_its_breaker_alone() {
        let health = Health::new(
            BreakerConfig {
                failure_threshold: 3,
                cooldown: Duration::from_secs(10),
            },
            true,
        );
        let of = |node| health.of(Some(node)).0;
        // Master 1 fails while master 0 keeps answering.
        for _ in 0..3 {
            assert!(of(0).success().is_none());
            of(1).failure();
        }
        assert!(of(1).is_open());
        assert!(!of(1).allow(), "its keys skip Redis");
        assert!(of(0).allow(), "the other master's are served");
        assert!(health.whole.allow());
        assert_eq!(health.open_count(), 1);
        // The same breaker, however many masters were met since.
        assert!(of(7).allow());
        assert!(of(1).is_open());
        // Past the table, the whole breaker.
        assert_eq!(health.of(Some(MASTERS)).1, None);
        assert_eq!(
            Health::new(BreakerConfig::default(), false).of(Some(0)).1,
            None
        );
    }
}
