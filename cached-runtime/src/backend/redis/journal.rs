//! The write-behind journal's Redis side: a Stream of accepted writes read
//! through a consumer group, a lease naming the one flusher, a dead-letter
//! Stream, and the versioned cache update that keeps concurrent writers'
//! cache entries in journal order.
//!
//! A journal's keys (stream, dead letters, lease) share one hash tag, so
//! each script below runs on one node of a cluster. The versioned update
//! touches a value and its companion, which share the value's slot.

use std::time::Duration;

use futures_util::future::try_join_all;
use redis::Value;

use super::scripts::px;
use super::RedisBackend;
use crate::error::{server_code, Error, Result};

/// Appends a write unless the stream holds `max_len` entries already.
/// KEYS: stream. ARGV: max_len, key, entry, and with an integrity check
/// the writer's time, the MAC and the largest distance allowed between
/// that time and the entry id's (else empty). Returns the entry's id, or
/// nil when full; a `JOURNALBLOCKED` error when the stream's last id is
/// the largest there is (someone added an entry with that id by hand); a
/// `JOURNALSKEW` error, with nothing journaled, when a signed entry's id
/// is farther from the writer's time than a flusher accepts (the writer's
/// clock is off Redis's, or the stream holds an id in the future): the
/// write fails now rather than being refused by the flusher later.
const APPEND: &str = r"
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then
  return false
end
local fields = {'XADD', KEYS[1], '*', 'k', ARGV[2], 'v', ARGV[3]}
if ARGV[4] ~= '' then
  fields[#fields + 1] = 't'
  fields[#fields + 1] = ARGV[4]
  fields[#fields + 1] = 'h'
  fields[#fields + 1] = ARGV[5]
end
local id = redis.pcall(unpack(fields))
if type(id) == 'table' and id.err then
  if string.find(id.err, 'exhausted', 1, true) or string.find(id.err, 'equal or smaller', 1, true) then
    return redis.error_reply('JOURNALBLOCKED the journal stream holds the largest id there is')
  end
  return redis.error_reply(id.err)
end
if ARGV[4] ~= '' then
  local ms = tonumber(string.match(id, '^(%d+)-'))
  local stamp = tonumber(ARGV[4])
  if ms and stamp and math.abs(ms - stamp) > tonumber(ARGV[6]) then
    redis.call('XDEL', KEYS[1], id)
    return redis.error_reply('JOURNALSKEW the writer signed at ' .. ARGV[4] ..
      ' ms, the journal id is ' .. id .. ': sync the clocks (or the stream holds an id in the future)')
  end
end
return id
";

/// Stores an entry unless a write with a later journal id was stored at the
/// key: the cache update of an accepted write, of a flushed one (which a
/// crash may have kept out of the cache, or a reader may have replaced by
/// the database's older row), and the invalidation of a buried one. KEYS:
/// value, its version companion. ARGV: journal id (`ms-seq`), entry, TTL
/// in ms. Returns 1 if it stored. A version companion of another type
/// (not one of ours) is overwritten.
const PUT: &str = r"
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local current = redis.pcall('GET', KEYS[2])
if type(current) == 'string' then
  local cms, cseq = parse(current)
  local nms, nseq = parse(ARGV[1])
  if cms and nms and (cms > nms or (cms == nms and cseq > nseq)) then
    return 0
  end
end
local stored = redis.pcall('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if type(stored) == 'table' and stored.err then
  -- As is (`OOM …`), also on servers that would wrap it.
  return redis.error_reply(stored.err)
end
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
/// group, consumer, count, `all` (the consumer's pending writes after the
/// id ARGV[7], then new ones) or `new`, that id. Returns `{0}` without the
/// lease, else `{1, entries}`. A group that is gone (`FLUSHALL`, a replica
/// promoted without the stream) is made again.
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
  entries = read(ARGV[7], count)
end
if #entries < count then
  for _, entry in ipairs(read('>', count - #entries)) do
    entries[#entries + 1] = entry
  end
end
return {1, entries}
";

/// Takes the journal over for the lease holder, in one step with the
/// lease check, so that a process whose lease lapsed can neither claim
/// nor forget anything: makes the consumer group if it is missing, claims
/// up to ARGV[5] of the writes other consumers left pending (flushers that
/// died or were cut off), and removes from the group the other consumers
/// left with nothing. KEYS: stream, lease. ARGV: token, lease TTL in ms,
/// group, consumer, count. Returns `{0}` without the lease, else
/// `{1, claimed, more}` (`more` = 1: call again).
const TAKE_OVER: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {0} end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[3], '0', 'MKSTREAM')
local budget = tonumber(ARGV[5])
local claimed = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[3])) do
  local name, pending
  for i = 1, #consumer, 2 do
    if consumer[i] == 'name' then name = consumer[i + 1] end
    if consumer[i] == 'pending' then pending = tonumber(consumer[i + 1]) end
  end
  if name and pending and name ~= ARGV[4] then
    if pending > 0 and budget > 0 then
      local args = {'XCLAIM', KEYS[1], ARGV[3], ARGV[4], 0}
      local listed = redis.call('XPENDING', KEYS[1], ARGV[3], '-', '+', math.min(pending, budget), name)
      for _, entry in ipairs(listed) do
        args[#args + 1] = entry[1]
      end
      if #listed > 0 then
        args[#args + 1] = 'JUSTID'
        redis.call(unpack(args))
        claimed = claimed + #listed
        budget = budget - #listed
        pending = pending - #listed
      end
    end
    if pending <= 0 then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[3], name)
    end
  end
end
if budget <= 0 then return {1, claimed, 1} end
return {1, claimed, 0}
";

/// Gives the lease up if the token holds it. KEYS: lease. ARGV: token.
const UNLEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Removes flushed entries, for the lease holder only (a process whose
/// lease lapsed leaves them to the holder, which applies them again).
/// KEYS: stream, lease. ARGV: token, group, ids. Returns 1, or 0 without
/// the lease.
const ACK: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local ids = {unpack(ARGV, 3)}
redis.call('XACK', KEYS[1], ARGV[2], unpack(ids))
redis.call('XDEL', KEYS[1], unpack(ids))
return 1
";

/// Moves a write to the dead letters, for the lease holder only, unless
/// they hold ARGV[7] entries already (nothing is ever dropped from them),
/// and removes the first of its ids from the journal (the caller removes
/// the others). KEYS: stream, dead letters, lease. ARGV: token, group, key,
/// entry, error, attempts, most, every id (space-separated), the ids to
/// remove now. Returns 1 if it moved the write, 0 when the dead letters
/// are full, -1 without the lease.
const BURY: &str = r"
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return -1 end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[7]) then return 0 end
local ids = {unpack(ARGV, 9)}
redis.call('XADD', KEYS[2], '*', 'k', ARGV[3], 'v', ARGV[4], 'error', ARGV[5],
  'attempts', ARGV[6], 'ids', ARGV[8])
redis.call('XACK', KEYS[1], ARGV[2], unpack(ids))
redis.call('XDEL', KEYS[1], unpack(ids))
return 1
";

/// What the journal's server is: its version and its eviction policy.
/// KEYS: stream (only to route the call to the journal's node).
const SERVER: &str = r"
local version = string.match(redis.call('INFO', 'server'), 'redis_version:([^\r\n]+)')
local policy = string.match(redis.call('INFO', 'memory'), 'maxmemory_policy:([^\r\n]+)')
return {version or '', policy or ''}
";

/// The journal's scripts, hashed once.
pub(crate) struct JournalScripts {
    append: redis::Script,
    put: redis::Script,
    lease: redis::Script,
    read: redis::Script,
    take_over: redis::Script,
    unlease: redis::Script,
    ack: redis::Script,
    bury: redis::Script,
    server: redis::Script,
}

impl Default for JournalScripts {
    fn default() -> Self {
        let [append, put, lease, read, take_over, unlease, ack, bury, server] = [
            APPEND, PUT, LEASE, READ, TAKE_OVER, UNLEASE, ACK, BURY, SERVER,
        ]
        .map(redis::Script::new);
        JournalScripts {
            append,
            put,
            lease,
            read,
            take_over,
            unlease,
            ack,
            bury,
            server,
        }
    }
}

/// One journaled write as read back: its stream id and fields. A write
/// removed from the stream while still pending has none.
#[derive(Debug, Clone)]
pub(crate) struct Journaled {
    pub(crate) id: String,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) entry: Option<Vec<u8>>,
    /// With an integrity check: the writer's time, and the MAC.
    pub(crate) stamp: Option<u64>,
    pub(crate) mac: Option<Vec<u8>>,
}

/// A journaled write's signature: the writer's time (Unix ms), the MAC,
/// and how far the entry's id may be from that time.
pub(crate) struct Signed<'a> {
    pub(crate) stamp: u64,
    pub(crate) mac: &'a [u8],
    pub(crate) max_skew_ms: u64,
}

/// One versioned cache update: store `entry` at `key` for `ttl` unless a
/// write journaled after `id` is stored there.
pub(crate) struct JournalPut<'a> {
    pub(crate) key: &'a str,
    pub(crate) version_key: &'a str,
    pub(crate) id: &'a str,
    pub(crate) entry: &'a [u8],
    pub(crate) ttl: Duration,
}

/// A write given up on, as the dead letters keep it.
pub(crate) struct DeadLetter<'a> {
    pub(crate) key: &'a [u8],
    pub(crate) entry: &'a [u8],
    /// Why: the sink's error, or what could not be decoded (never data).
    pub(crate) error: &'a str,
    pub(crate) attempts: u32,
    /// The ids this call removes from the journal (at most a thousand).
    pub(crate) ids: &'a [&'a str],
    /// The ids of every write it stands for.
    pub(crate) all_ids: &'a [&'a str],
}

/// What became of a write given up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Buried {
    /// It is in the dead letters, out of the journal.
    Yes,
    /// The dead letters are full: it stays in the journal.
    Full,
    /// This process no longer holds the lease: nothing was done.
    NoLease,
}

/// Writes a takeover claims per script call, so that none works for long.
const TAKE_OVER_BATCH: u64 = 1000;

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
        signed: Option<Signed<'_>>,
    ) -> Result<Option<String>> {
        let mut invocation = self.journal.append.key(&journal.stream);
        invocation.arg(max_len).arg(key).arg(entry);
        match signed {
            Some(signed) => invocation
                .arg(signed.stamp)
                .arg(signed.mac)
                .arg(signed.max_skew_ms),
            None => invocation.arg("").arg("").arg(""),
        };
        self.invoke(&invocation).await
    }

    /// Stores `entry` at `key` for `ttl` unless a write journaled after
    /// `id` was stored there; whether it stored.
    pub(crate) async fn journal_put(&self, put: &JournalPut<'_>) -> Result<bool> {
        let stored: i64 = self.invoke(&self.put_invocation(put)).await?;
        Ok(stored == 1)
    }

    /// [`RedisBackend::journal_put`] for each of `puts`: in one pipeline
    /// on a server, one call each (in parallel) on a cluster, where the
    /// keys live in many slots. Fails if any failed.
    pub(crate) async fn journal_put_many(&self, puts: &[JournalPut<'_>]) -> Result<()> {
        if puts.is_empty() {
            return Ok(());
        }
        if self.is_cluster() || puts.len() == 1 {
            try_join_all(puts.iter().map(|put| self.journal_put(put))).await?;
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for put in puts {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(self.journal.put.get_hash())
                .arg(2)
                .arg(put.key)
                .arg(put.version_key)
                .arg(put.id)
                .arg(put.entry)
                .arg(px(put.ttl));
            pipe.add_command(cmd).ignore();
        }
        let mut conn = self.connection().await?;
        let sent: redis::RedisResult<()> = pipe.query_async(&mut conn).await;
        match sent {
            Err(err) if server_code(&err).as_deref() == Some("NOSCRIPT") => {
                // A server that lost its scripts (restarted, flushed):
                // each call alone loads the script.
                drop(conn);
                try_join_all(puts.iter().map(|put| self.journal_put(put))).await?;
                Ok(())
            }
            other => other.map_err(|e| self.failed(&e)),
        }
    }

    fn put_invocation<'a>(&'a self, put: &JournalPut<'a>) -> redis::ScriptInvocation<'a> {
        let mut invocation = self.journal.put.key(put.key);
        invocation
            .key(put.version_key)
            .arg(put.id)
            .arg(put.entry)
            .arg(px(put.ttl));
        invocation
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

    /// Takes the journal over for `token`, the lease holder (the lease
    /// extended to `ttl`): claims for `consumer` what other consumers left
    /// pending and forgets those left with nothing. How many writes it
    /// claimed from others, or `None` without the lease.
    pub(crate) async fn journal_take_over(
        &self,
        journal: &JournalKeys,
        consumer: &str,
        token: &str,
        ttl: Duration,
    ) -> Result<Option<u64>> {
        let mut claimed = 0;
        loop {
            let mut invocation = self.journal.take_over.key(&journal.stream);
            invocation
                .key(&journal.lease)
                .arg(token)
                .arg(px(ttl))
                .arg(&journal.group)
                .arg(consumer)
                .arg(TAKE_OVER_BATCH);
            let reply: Vec<u64> = self.invoke(&invocation).await?;
            match reply[..] {
                [0] => return Ok(None),
                [1, now, more] => {
                    claimed += now;
                    if more == 0 {
                        return Ok(Some(claimed));
                    }
                }
                _ => return Err(malformed("the journal takeover")),
            }
        }
    }

    /// Up to `count` writes for `consumer` if `token` holds the lease
    /// (extended to `ttl`): with `pending_after`, its pending ones with a
    /// later id first (`"0"`: all of them), then new ones, oldest first;
    /// `None` without the lease.
    pub(crate) async fn journal_read(
        &self,
        journal: &JournalKeys,
        consumer: &str,
        token: &str,
        ttl: Duration,
        count: usize,
        pending_after: Option<&str>,
    ) -> Result<Option<Vec<Journaled>>> {
        let mut invocation = self.journal.read.key(&journal.stream);
        invocation
            .key(&journal.lease)
            .arg(token)
            .arg(px(ttl))
            .arg(&journal.group)
            .arg(consumer)
            .arg(count)
            .arg(if pending_after.is_some() {
                "all"
            } else {
                "new"
            })
            .arg(pending_after.unwrap_or("0"));
        let reply: Value = self.invoke(&invocation).await?;
        match as_seq(&reply) {
            Some([Value::Int(0)]) => Ok(None),
            Some([Value::Int(1), entries]) => parse_entries(entries).map(Some),
            _ => Err(malformed("the journal read")),
        }
    }

    /// Removes flushed writes from the journal if `token` holds the lease;
    /// whether it did.
    pub(crate) async fn journal_ack(
        &self,
        journal: &JournalKeys,
        token: &str,
        ids: &[&str],
    ) -> Result<bool> {
        if ids.is_empty() {
            return Ok(true);
        }
        let mut invocation = self.journal.ack.key(&journal.stream);
        invocation
            .key(&journal.lease)
            .arg(token)
            .arg(&journal.group)
            .arg(ids);
        let acked: i64 = self.invoke(&invocation).await?;
        Ok(acked == 1)
    }

    /// Deletes cached entries outright: what a flusher does when Redis
    /// refuses to store them again (out of memory under `noeviction`,
    /// where `DEL` still works), so that readers go to the database, which
    /// holds the writes now.
    pub(crate) async fn journal_uncache(&self, keys: &[&str]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        if self.is_cluster() {
            try_join_all(keys.iter().map(|key| async move {
                let del = redis::cmd("DEL").arg(key).clone();
                self.query::<i64>(&del).await
            }))
            .await?;
            return Ok(());
        }
        let _: i64 = self.query(redis::cmd("DEL").arg(keys)).await?;
        Ok(())
    }

    /// Moves a write that the sink keeps refusing (or nobody can decode)
    /// to the dead letters if `token` holds the lease and they hold fewer
    /// than `most`.
    pub(crate) async fn journal_bury(
        &self,
        journal: &JournalKeys,
        token: &str,
        dead: &DeadLetter<'_>,
        most: u64,
    ) -> Result<Buried> {
        let mut invocation = self.journal.bury.key(&journal.stream);
        invocation
            .key(&journal.dead)
            .key(&journal.lease)
            .arg(token)
            .arg(&journal.group)
            .arg(dead.key)
            .arg(dead.entry)
            .arg(dead.error)
            .arg(dead.attempts)
            .arg(most)
            .arg(dead.all_ids.join(" "))
            .arg(dead.ids);
        let buried: i64 = self.invoke(&invocation).await?;
        Ok(match buried {
            1 => Buried::Yes,
            0 => Buried::Full,
            _ => Buried::NoLease,
        })
    }

    /// The journal's server's `redis_version` and `maxmemory-policy`.
    pub(crate) async fn journal_server(&self, journal: &JournalKeys) -> Result<(String, String)> {
        self.invoke(&self.journal.server.key(&journal.stream)).await
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

fn parse_entry(entry: &Value) -> Result<Journaled> {
    let Some([id, fields, ..]) = as_seq(entry) else {
        return Err(malformed("XREADGROUP"));
    };
    let id = as_string(id).ok_or_else(|| malformed("XREADGROUP"))?;
    let mut journaled = Journaled {
        id,
        key: None,
        entry: None,
        stamp: None,
        mac: None,
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
            Some(b"t") => {
                journaled.stamp = as_bytes(value)
                    .and_then(|t| std::str::from_utf8(t).ok())
                    .and_then(|t| t.parse().ok());
            }
            Some(b"h") => journaled.mac = as_bytes(value).map(<[u8]>::to_vec),
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
}
