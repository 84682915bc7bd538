//! The write-behind journal's Redis side: a Stream of accepted writes read
//! through a consumer group, a lease naming the one flusher, a dead-letter
//! Stream, and the versioned cache update that keeps concurrent writers'
//! cache entries in journal order.
//!
//! A journal's keys (stream, dead letters, lease) share one hash tag, so
//! each script below runs on one node of a cluster. The versioned update
//! touches a value and its companion, which share the value's slot.

use std::time::Duration;

use redis::Value;

use super::scripts::px;
use super::RedisBackend;
use crate::error::{Error, Result};

/// Appends a write unless the stream holds `max_len` entries already.
/// KEYS: stream. ARGV: max_len, key, entry. Returns the entry's id, or nil
/// when full.
const APPEND: &str = r"
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then
  return false
end
return redis.call('XADD', KEYS[1], '*', 'k', ARGV[2], 'v', ARGV[3])
";

/// Stores an entry unless a write with a later journal id was stored at the
/// key. KEYS: value, its version companion. ARGV: journal id (`ms-seq`),
/// entry, TTL in ms. Returns 1 if it stored.
const PUT: &str = r"
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local current = redis.call('GET', KEYS[2])
if current then
  local cms, cseq = parse(current)
  local nms, nseq = parse(ARGV[1])
  if cms and (cms > nms or (cms == nms and cseq >= nseq)) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
return 1
";

/// Extends the lease, or with ARGV[3] = 1 takes it if it is free.
/// KEYS: lease. ARGV: token, TTL in ms, take. Returns 1 if the token holds
/// it now.
const LEASE: &str = r"
local holder = redis.call('GET', KEYS[1])
if not holder then
  if ARGV[3] ~= '1' then return 0 end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// Reads writes for the lease holder only, extending its lease: a process
/// that lost the lease can never take writes out of the stream, so every
/// write a dead or cut-off flusher read is pending under a consumer the
/// next holder claims. KEYS: stream, lease. ARGV: token, lease TTL in ms,
/// group, consumer, count, `all` (the consumer's pending writes, then new
/// ones) or `new`. Returns `{0}` without the lease, else `{1, entries}`.
/// A group that is gone (`FLUSHALL`, a replica promoted without the
/// stream) is made again.
const READ: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {0} end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
local function read(from, count)
  local args = {'XREADGROUP', 'GROUP', ARGV[3], ARGV[4], 'COUNT', count, 'STREAMS', KEYS[1], from}
  local r = redis.pcall(unpack(args))
  if type(r) == 'table' and r.err then
    if string.find(r.err, 'NOGROUP', 1, true) then
      redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[3], '0', 'MKSTREAM')
    end
    r = redis.call(unpack(args))
  end
  if not r then return {} end
  return r[1][2]
end
local count = tonumber(ARGV[5])
local entries = {}
if ARGV[6] == 'all' then
  entries = read('0', count)
end
if #entries < count then
  for _, entry in ipairs(read('>', count - #entries)) do
    entries[#entries + 1] = entry
  end
end
return {1, entries}
";

/// Gives the lease up if the token holds it. KEYS: lease. ARGV: token.
const UNLEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Removes flushed entries. KEYS: stream. ARGV: group, ids.
const ACK: &str = r"
local ids = {unpack(ARGV, 2)}
redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
return redis.call('XDEL', KEYS[1], unpack(ids))
";

/// Moves a write to the dead letters. KEYS: stream, dead letters. ARGV:
/// group, key, entry, error, attempts, ids.
const BURY: &str = r"
local ids = {unpack(ARGV, 6)}
redis.call('XADD', KEYS[2], '*', 'k', ARGV[2], 'v', ARGV[3], 'error', ARGV[4],
  'attempts', ARGV[5], 'ids', table.concat(ids, ' '))
redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
return redis.call('XDEL', KEYS[1], unpack(ids))
";

/// The journal's scripts, hashed once.
pub(crate) struct JournalScripts {
    append: redis::Script,
    put: redis::Script,
    lease: redis::Script,
    read: redis::Script,
    unlease: redis::Script,
    ack: redis::Script,
    bury: redis::Script,
}

impl Default for JournalScripts {
    fn default() -> Self {
        let [append, put, lease, read, unlease, ack, bury] =
            [APPEND, PUT, LEASE, READ, UNLEASE, ACK, BURY].map(redis::Script::new);
        JournalScripts {
            append,
            put,
            lease,
            read,
            unlease,
            ack,
            bury,
        }
    }
}

/// One journaled write as read back: its stream id and fields. A write
/// removed from the stream while still pending has neither field.
#[derive(Debug, Clone)]
pub(crate) struct Journaled {
    pub(crate) id: String,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) entry: Option<Vec<u8>>,
}

/// Where a journal lives: its stream, consumer group, dead letters and
/// lease.
#[derive(Debug, Clone)]
pub(crate) struct JournalKeys {
    pub(crate) stream: String,
    pub(crate) group: String,
    pub(crate) dead: String,
    pub(crate) lease: String,
}

impl RedisBackend {
    /// Appends `(key, entry)` to the journal; its id, or `None` when the
    /// journal holds `max_len` writes already.
    pub(crate) async fn journal_append(
        &self,
        journal: &JournalKeys,
        max_len: u64,
        key: &[u8],
        entry: &[u8],
    ) -> Result<Option<String>> {
        let mut invocation = self.journal.append.key(&journal.stream);
        invocation.arg(max_len).arg(key).arg(entry);
        self.invoke(&invocation).await
    }

    /// Stores `entry` at `key` for `ttl` unless a write journaled after
    /// `id` was stored there; whether it stored.
    pub(crate) async fn journal_put(
        &self,
        key: &str,
        version_key: &str,
        id: &str,
        entry: &[u8],
        ttl: Duration,
    ) -> Result<bool> {
        let mut invocation = self.journal.put.key(key);
        invocation.key(version_key).arg(id).arg(entry).arg(px(ttl));
        let stored: i64 = self.invoke(&invocation).await?;
        Ok(stored == 1)
    }

    /// Extends the flusher lease to `ttl`, or with `take` takes it if it
    /// is free; whether `token` holds it.
    pub(crate) async fn lease(
        &self,
        lease: &str,
        token: &str,
        ttl: Duration,
        take: bool,
    ) -> Result<bool> {
        let mut invocation = self.journal.lease.key(lease);
        invocation.arg(token).arg(px(ttl)).arg(u8::from(take));
        let held: i64 = self.invoke(&invocation).await?;
        Ok(held == 1)
    }

    /// Gives the flusher lease up if `token` holds it.
    pub(crate) async fn unlease(&self, lease: &str, token: &str) -> Result<()> {
        let mut invocation = self.journal.unlease.key(lease);
        invocation.arg(token);
        let _: i64 = self.invoke(&invocation).await?;
        Ok(())
    }

    /// Creates the consumer group (and the stream) unless it exists; it
    /// starts at the stream's first entry.
    pub(crate) async fn journal_group(&self, journal: &JournalKeys) -> Result<()> {
        let mut conn = self.connection().await?;
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&journal.stream)
            .arg(&journal.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match created {
            Err(err) if err.code() != Some("BUSYGROUP") => Err(self.failed(&err)),
            _ => Ok(()),
        }
    }

    /// Makes every pending write of the group `consumer`'s, whoever read
    /// it (a flusher that died); how many.
    pub(crate) async fn journal_claim(
        &self,
        journal: &JournalKeys,
        consumer: &str,
    ) -> Result<usize> {
        let mut cursor = "0-0".to_owned();
        let mut claimed = 0;
        loop {
            let reply: Value = self
                .query(
                    redis::cmd("XAUTOCLAIM")
                        .arg(&journal.stream)
                        .arg(&journal.group)
                        .arg(consumer)
                        .arg(0)
                        .arg(&cursor)
                        .arg("COUNT")
                        .arg(1000)
                        .arg("JUSTID"),
                )
                .await?;
            let Some([next, ids, ..]) = as_seq(&reply) else {
                return Err(malformed("XAUTOCLAIM"));
            };
            claimed += as_seq(ids).map_or(0, <[Value]>::len);
            cursor = as_string(next).ok_or_else(|| malformed("XAUTOCLAIM"))?;
            if cursor == "0-0" {
                return Ok(claimed);
            }
        }
    }

    /// Up to `count` writes for `consumer` if `token` holds the lease
    /// (extended to `ttl`): its pending ones first unless `new_only`, then
    /// new ones, oldest first; `None` without the lease.
    pub(crate) async fn journal_read(
        &self,
        journal: &JournalKeys,
        consumer: &str,
        token: &str,
        ttl: Duration,
        count: usize,
        new_only: bool,
    ) -> Result<Option<Vec<Journaled>>> {
        let mut invocation = self.journal.read.key(&journal.stream);
        invocation
            .key(&journal.lease)
            .arg(token)
            .arg(px(ttl))
            .arg(&journal.group)
            .arg(consumer)
            .arg(count)
            .arg(if new_only { "new" } else { "all" });
        let reply: Value = self.invoke(&invocation).await?;
        match as_seq(&reply) {
            Some([Value::Int(0)]) => Ok(None),
            Some([Value::Int(1), entries]) => parse_entries(entries).map(Some),
            _ => Err(malformed("the journal read")),
        }
    }

    /// Removes from the group the consumers other than `consumer` that
    /// hold no pending write (flushers that stopped), so that the group
    /// does not grow with every process start.
    pub(crate) async fn journal_forget(&self, journal: &JournalKeys, consumer: &str) -> Result<()> {
        let reply: Value = self
            .query(
                redis::cmd("XINFO")
                    .arg("CONSUMERS")
                    .arg(&journal.stream)
                    .arg(&journal.group),
            )
            .await?;
        for (name, pending) in parse_consumers(&reply) {
            if pending == 0 && name != consumer {
                let _: i64 = self
                    .query(
                        redis::cmd("XGROUP")
                            .arg("DELCONSUMER")
                            .arg(&journal.stream)
                            .arg(&journal.group)
                            .arg(&name),
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// Removes flushed writes from the journal.
    pub(crate) async fn journal_ack(&self, journal: &JournalKeys, ids: &[&str]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut invocation = self.journal.ack.key(&journal.stream);
        invocation.arg(&journal.group).arg(ids);
        let _: i64 = self.invoke(&invocation).await?;
        Ok(())
    }

    /// Moves a write that the sink keeps refusing to the dead letters.
    pub(crate) async fn journal_bury(
        &self,
        journal: &JournalKeys,
        key: &[u8],
        entry: &[u8],
        error: &str,
        attempts: u32,
        ids: &[&str],
    ) -> Result<()> {
        let mut invocation = self.journal.bury.key(&journal.stream);
        invocation
            .key(&journal.dead)
            .arg(&journal.group)
            .arg(key)
            .arg(entry)
            .arg(error)
            .arg(attempts)
            .arg(ids);
        let _: i64 = self.invoke(&invocation).await?;
        Ok(())
    }

    /// How many entries `stream` holds.
    pub(crate) async fn stream_len(&self, stream: &str) -> Result<u64> {
        self.query(redis::cmd("XLEN").arg(stream)).await
    }
}

fn malformed(command: &str) -> Error {
    Error::Redis(format!("unexpected reply to {command}"))
}

fn as_seq(value: &Value) -> Option<&[Value]> {
    match value {
        Value::Array(items) | Value::Set(items) => Some(items),
        _ => None,
    }
}

fn as_bytes(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(s) | Value::VerbatimString { text: s, .. } => Some(s.as_bytes()),
        _ => None,
    }
}

fn as_string(value: &Value) -> Option<String> {
    as_bytes(value).and_then(|b| String::from_utf8(b.to_vec()).ok())
}

/// The entries of a journal read.
fn parse_entries(entries: &Value) -> Result<Vec<Journaled>> {
    match entries {
        Value::Nil => Ok(Vec::new()),
        other => as_seq(other)
            .ok_or_else(|| malformed("the journal read"))?
            .iter()
            .map(parse_entry)
            .collect(),
    }
}

/// The (name, pending) of each consumer in an `XINFO CONSUMERS` reply
/// (RESP2 flat arrays or RESP3 maps).
fn parse_consumers(reply: &Value) -> Vec<(String, i64)> {
    let Some(consumers) = as_seq(reply) else {
        return Vec::new();
    };
    consumers
        .iter()
        .filter_map(|consumer| {
            let pairs: Vec<(&Value, &Value)> = match consumer {
                Value::Map(pairs) => pairs.iter().map(|(f, v)| (f, v)).collect(),
                other => as_seq(other)?
                    .chunks_exact(2)
                    .map(|pair| (&pair[0], &pair[1]))
                    .collect(),
            };
            let mut name = None;
            let mut pending = None;
            for (field, value) in pairs {
                match as_bytes(field) {
                    Some(b"name") => name = as_string(value),
                    Some(b"pending") => {
                        if let Value::Int(n) = value {
                            pending = Some(*n);
                        }
                    }
                    _ => {}
                }
            }
            Some((name?, pending?))
        })
        .collect()
}

fn parse_entry(entry: &Value) -> Result<Journaled> {
    let Some([id, fields, ..]) = as_seq(entry) else {
        return Err(malformed("XREADGROUP"));
    };
    let id = as_string(id).ok_or_else(|| malformed("XREADGROUP"))?;
    let mut journaled = Journaled {
        id,
        key: None,
        entry: None,
    };
    let pairs: Vec<(&Value, &Value)> = match fields {
        Value::Nil => Vec::new(),
        Value::Map(pairs) => pairs.iter().map(|(f, v)| (f, v)).collect(),
        other => {
            let flat = as_seq(other).ok_or_else(|| malformed("XREADGROUP"))?;
            flat.chunks_exact(2)
                .map(|pair| (&pair[0], &pair[1]))
                .collect()
        }
    };
    for (field, value) in pairs {
        match as_bytes(field) {
            Some(b"k") => journaled.key = as_bytes(value).map(<[u8]>::to_vec),
            Some(b"v") => journaled.entry = as_bytes(value).map(<[u8]>::to_vec),
            _ => {}
        }
    }
    Ok(journaled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn entries_are_parsed_with_removed_ones() {
        let entries = Value::Array(vec![
            Value::Array(vec![
                bulk("1-0"),
                Value::Array(vec![bulk("k"), bulk("key"), bulk("v"), bulk("entry")]),
            ]),
            Value::Array(vec![bulk("2-0"), Value::Nil]),
        ]);
        let read = parse_entries(&entries).expect("parsed");
        assert_eq!(read.len(), 2);
        assert_eq!(read[0].id, "1-0");
        assert_eq!(read[0].key.as_deref(), Some(&b"key"[..]));
        assert_eq!(read[0].entry.as_deref(), Some(&b"entry"[..]));
        assert!(read[1].key.is_none() && read[1].entry.is_none());
        assert!(parse_entries(&Value::Nil).expect("nil").is_empty());
        assert!(parse_entries(&Value::Int(3)).is_err());
    }

    #[test]
    fn consumers_are_parsed() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                bulk("name"),
                bulk("a"),
                bulk("pending"),
                Value::Int(0),
            ]),
            Value::Map(vec![
                (bulk("name"), bulk("b")),
                (bulk("pending"), Value::Int(3)),
            ]),
            Value::Array(vec![bulk("name"), bulk("c")]),
        ]);
        assert_eq!(
            parse_consumers(&reply),
            [("a".to_owned(), 0), ("b".to_owned(), 3)]
        );
    }
}
