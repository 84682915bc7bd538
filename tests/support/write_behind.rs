//! Write-behind test helpers: sinks (a recorder, a SQLite table), the
//! builder the tests share, a getter over a "database", and a wait for
//! the journal to drain.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis_cached::{redis_cached, Cache, Change, Sink, Write, WriteBehind};

pub type Batches = Arc<Mutex<Vec<Vec<Write<u32, String>>>>>;

/// A sink that records every batch it is given.
#[derive(Clone, Default)]
pub struct Recorder {
    pub batches: Batches,
    /// Keys it refuses, always.
    pub poison: Option<u32>,
    /// It refuses every write while on.
    pub refuse_all: Arc<AtomicBool>,
    /// Keys below this it refuses, always.
    pub refuse_below: u32,
    /// Calls made, failed ones too.
    pub calls: Arc<AtomicU32>,
    /// Calls that panic before it works.
    pub panics: Arc<AtomicU32>,
}

impl Sink<u32, String> for Recorder {
    type Error = String;

    async fn write_batch(&self, batch: Vec<Write<u32, String>>) -> Result<(), String> {
        if self
            .panics
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            panic!("the sink panicked");
        }
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.refuse_all.load(Ordering::SeqCst) {
            return Err("the database refuses every write".into());
        }
        if let Some(w) = batch.iter().find(|w| w.key < self.refuse_below) {
            return Err(format!("row {} violates a constraint", w.key));
        }
        if let Some(poison) = self.poison {
            if batch.iter().any(|w| w.key == poison) {
                return Err(format!("row {poison} violates a constraint"));
            }
        }
        self.batches.lock().expect("not poisoned").push(batch);
        Ok(())
    }
}

impl Recorder {
    pub fn writes(&self) -> Vec<Write<u32, String>> {
        self.batches
            .lock()
            .expect("not poisoned")
            .iter()
            .flatten()
            .cloned()
            .collect()
    }
}

pub fn builder(
    name: &str,
    cache: &Cache,
    sink: Recorder,
) -> redis_cached::WriteBehindBuilder<u32, String, Recorder> {
    WriteBehind::builder(name, cache, sink)
        .key_template("user:<id>")
        .ttl(Duration::from_secs(60))
        .retry(Duration::from_millis(10), Duration::from_millis(50))
}

pub async fn drained<K, V>(wb: &WriteBehind<K, V>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while wb.pending().await.expect("Redis answers") > 0 {
        assert!(
            Instant::now() < deadline,
            "the journal did not drain in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A table of rows: the "database" of [`Users`], and a sink into it.
pub type Rows = Arc<Mutex<BTreeMap<u32, String>>>;

/// A sink that applies writes to [`Rows`].
#[derive(Clone, Default)]
pub struct Table(pub Rows);

impl Sink<u32, String> for Table {
    type Error = String;

    async fn write_batch(&self, batch: Vec<Write<u32, String>>) -> Result<(), String> {
        let mut rows = self.0.lock().expect("not poisoned");
        for write in batch {
            match write.change {
                Change::Upsert(value) => rows.insert(write.key, value),
                Change::Delete => rows.remove(&write.key),
            };
        }
        Ok(())
    }
}

/// A getter over a "database" of users, as the application reads them.
pub struct Users {
    pub cache: Cache,
    /// The rows the getter reads on a miss.
    pub rows: Rows,
    /// How often it read them.
    pub reads: AtomicU32,
}

impl Users {
    pub fn new(cache: &Cache) -> Users {
        Users {
            cache: cache.clone(),
            rows: Rows::default(),
            reads: AtomicU32::new(0),
        }
    }

    #[redis_cached(key = "user:<id>", ttl = 60, cache = self.cache)]
    pub async fn user(&self, id: u32) -> Option<String> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.rows.lock().expect("not poisoned").get(&id).cloned()
    }
}

/// A real database table as the sink; it also records any write that
/// arrives older than one already applied to its key (a reorder).
#[derive(Clone)]
pub struct Sqlite {
    pub path: PathBuf,
    /// Each committed batch is announced on stdout (the child's parent
    /// reads it), then the call waits this long before returning.
    pub after_commit: Duration,
    pub announce: bool,
    /// The sink fails from its `fail_at`-th call for this long.
    pub fail_at: u32,
    pub fail_for: Duration,
    pub calls: Arc<AtomicU32>,
    pub failing_since: Arc<Mutex<Option<Instant>>>,
}

impl Sqlite {
    pub fn new(path: &Path) -> Sqlite {
        let conn = rusqlite::Connection::open(path).expect("open the database");
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS applied (id INTEGER PRIMARY KEY, ms INTEGER, seq INTEGER);
             CREATE TABLE IF NOT EXISTS reordered (id INTEGER, ms INTEGER, seq INTEGER);",
        )
        .expect("create the tables");
        Sqlite {
            path: path.to_owned(),
            after_commit: Duration::ZERO,
            announce: false,
            fail_at: u32::MAX,
            fail_for: Duration::ZERO,
            calls: Arc::default(),
            failing_since: Arc::default(),
        }
    }

    pub fn rows(&self) -> BTreeMap<u32, String> {
        let conn = rusqlite::Connection::open(&self.path).expect("open");
        let mut stmt = conn
            .prepare("SELECT id, name FROM users")
            .expect("valid SQL");
        stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    }

    pub fn reordered(&self) -> u64 {
        let conn = rusqlite::Connection::open(&self.path).expect("open");
        conn.query_row("SELECT COUNT(*) FROM reordered", [], |row| row.get(0))
            .expect("count")
    }

    fn failing(&self, call: u32) -> bool {
        let mut since = self.failing_since.lock().expect("not poisoned");
        if call == self.fail_at {
            *since = Some(Instant::now());
        }
        since.is_some_and(|at| at.elapsed() < self.fail_for)
    }
}

pub fn apply(path: &Path, batch: &[Write<u32, String>]) -> rusqlite::Result<()> {
    let mut conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let tx = conn.transaction()?;
    for write in batch {
        let (ms, seq) = (write.id.ms as i64, write.id.seq as i64);
        let newer: bool = tx.query_row(
            "SELECT EXISTS(SELECT 1 FROM applied WHERE id = ?1 AND (ms > ?2 OR (ms = ?2 AND seq > ?3)))",
            (write.key, ms, seq),
            |row| row.get(0),
        )?;
        if newer {
            tx.execute(
                "INSERT INTO reordered (id, ms, seq) VALUES (?1, ?2, ?3)",
                (write.key, ms, seq),
            )?;
        }
        tx.execute(
            "INSERT INTO applied (id, ms, seq) VALUES (?1, ?2, ?3)
             ON CONFLICT(id) DO UPDATE SET ms = excluded.ms, seq = excluded.seq",
            (write.key, ms, seq),
        )?;
        match &write.change {
            Change::Upsert(name) => tx.execute(
                "INSERT INTO users (id, name) VALUES (?1, ?2)
                 ON CONFLICT(id) DO UPDATE SET name = excluded.name",
                (write.key, name),
            )?,
            Change::Delete => tx.execute("DELETE FROM users WHERE id = ?1", [write.key])?,
        };
    }
    tx.commit()
}

impl Sink<u32, String> for Sqlite {
    type Error = String;

    async fn write_batch(&self, batch: Vec<Write<u32, String>>) -> Result<(), String> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if self.failing(call) {
            return Err("database unavailable".into());
        }
        let path = self.path.clone();
        let n = batch.len();
        tokio::task::spawn_blocking(move || apply(&path, &batch))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if self.announce {
            println!("committed {n}");
        }
        tokio::time::sleep(self.after_commit).await;
        Ok(())
    }
}
