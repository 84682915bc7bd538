//! The Lua scripts the Redis backend runs, and their parsed replies.
//!
//! Every script touches only the keys it is given in `KEYS`, and all of a
//! script's keys share one hash slot (a value and its companions), so each
//! runs as one atomic step on a standalone server or a cluster node.
//!
//! Several scripts compare a key with what a caller saw when it read it
//! (`unchanged`): mode `0`, the key held nothing; mode `1`, exactly these
//! bytes; mode `2`, a value longer than this many bytes (one the cache
//! would not read whole, and never writes itself).

use std::time::Duration;

/// Defines `unchanged(key, mode, seen)`, shared by the scripts below.
macro_rules! unchanged_fn {
    () => {
        r"
local function unchanged(key, mode, seen)
  if mode == '2' then
    return redis.call('STRLEN', key) > tonumber(seen)
  end
  local cur = redis.call('GET', key)
  if mode == '0' then
    return (not cur) or cur == ''
  end
  return cur == seen
end
"
    };
}

/// Compare-and-set. KEYS: the key. ARGV: mode, seen, the new value, its TTL
/// in ms. Returns 1 if it stored.
const SET_IF: &str = concat!(
    unchanged_fn!(),
    r"
if unchanged(KEYS[1], ARGV[1], ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
  return 1
end
return 0
"
);

/// Takes the lock unless the value changed since it was read.
/// KEYS: value, lock. ARGV: mode, seen, token, lock TTL in ms, the largest
/// value the cache reads.
/// Returns `{1, entry}` when another entry landed, `{2, state, entry}` when
/// the lock was taken (state 0: the key holds nothing, 1: `entry`, 2: a
/// value over the limit), `{3, token}` when another caller holds it (its
/// token: a waiter takes a value only from the holder it waited for).
const ACQUIRE: &str = concat!(
    unchanged_fn!(),
    r"
if not unchanged(KEYS[1], ARGV[1], ARGV[2]) then
  local cur = redis.call('GET', KEYS[1])
  if cur and cur ~= '' then
    if #cur > tonumber(ARGV[5]) then return {1, ''} end
    return {1, cur}
  end
end
if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[4]) then
  if redis.call('STRLEN', KEYS[1]) > tonumber(ARGV[5]) then return {2, 2, ''} end
  local cur = redis.call('GET', KEYS[1])
  if cur and cur ~= '' then return {2, 1, cur} end
  return {2, 0, ''}
end
return {3, redis.call('GET', KEYS[2]) or ''}
"
);

/// Releases the lock if this token holds it, stores the value by
/// compare-and-set if asked, and tells the waiters what happened:
/// `<key length>:<key><kind>[…]`:
/// - `V<token length>:<token><entry>` when the entry was stored, or shared
///   without storing while the key still held what the holder read, and
///   is small; the token names the holder, so that a waiter takes the
///   entry only from the holder it waited for (a late message from an
///   earlier holder may predate an invalidation);
/// - `f` when it was stored but is large (read it);
/// - `r` when nothing was stored, or a shared result no longer matches the
///   key (invalidated meanwhile): try the lock again;
/// - `x` when the computation failed or its large result was not stored
///   (compute without waiting).
///
/// A holder whose lock had expired and been taken by another tells nothing
/// but a stored value: the waiters wait for the new holder.
/// KEYS: value, lock. ARGV: token, what to do (`1` store, `2` share without
/// storing, `0` nothing), mode, seen, the entry, its TTL in ms, the channel,
/// the key as given, `1` if the computation failed, the largest entry a
/// message carries, the publishing command (`PUBLISH`, or `SPUBLISH` to a
/// shard channel of the value's slot on a cluster).
const RELEASE: &str = concat!(
    unchanged_fn!(),
    r"
local held = redis.call('GET', KEYS[2]) == ARGV[1]
if held then
  redis.call('DEL', KEYS[2])
end
local stored = 0
if ARGV[2] == '1' and unchanged(KEYS[1], ARGV[3], ARGV[4]) then
  redis.call('SET', KEYS[1], ARGV[5], 'PX', ARGV[6])
  stored = 1
end
local small = #ARGV[5] <= tonumber(ARGV[10])
local message = #ARGV[8] .. ':' .. ARGV[8]
local function value()
  return 'V' .. #ARGV[1] .. ':' .. ARGV[1] .. ARGV[5]
end
if stored == 1 then
  if small then
    message = message .. value()
  else
    message = message .. 'f'
  end
elseif not held then
  return stored
elseif ARGV[2] == '2' and small then
  if unchanged(KEYS[1], ARGV[3], ARGV[4]) then
    message = message .. value()
  else
    message = message .. 'r'
  end
elseif ARGV[9] == '1' or ARGV[2] == '2' then
  message = message .. 'x'
else
  message = message .. 'r'
end
redis.call(ARGV[11], ARGV[7], message)
return stored
"
);

/// Extends the lock if this token still holds it. KEYS: lock. ARGV: token,
/// TTL in ms.
const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Records each member ARGV[2..] in each tag set in KEYS (sorted sets
/// scored by when the record expires, Unix ms by the server's clock) for
/// ARGV[1] ms, keeping a later expiry already recorded. Each call also
/// drops up to 128 members that expired, so a set stays proportional to its
/// live keys at a bounded cost per call, and each set expires with its last
/// member.
const TAG: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local ttl = tonumber(ARGV[1])
for _, tag in ipairs(KEYS) do
  for i = 2, #ARGV do
    -- Every record raises the score, so that removing a batch unless
    -- recorded again (UNTAG) sees any record made since it was read.
    local score = now + ttl
    local current = redis.call('ZSCORE', tag, ARGV[i])
    if current and tonumber(current) >= score then
      score = tonumber(current) + 1
    end
    redis.call('ZADD', tag, score, ARGV[i])
  end
  local expired = redis.call('ZRANGE', tag, '-inf', now, 'BYSCORE', 'LIMIT', 0, 128)
  if #expired > 0 then
    redis.call('ZREM', tag, unpack(expired))
  end
  if redis.call('PTTL', tag) < ttl then
    redis.call('PEXPIRE', tag, ttl)
  end
end
return 0
";

/// Removes from the tag set KEYS[1] each member ARGV[2k+1] whose score is
/// still ARGV[2k+2] (one that was recorded again meanwhile stays).
const UNTAG: &str = r"
local removed = 0
for i = 1, #ARGV, 2 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
    removed = removed + 1
  end
end
return removed
";

/// Moves the tag set KEYS[1] to KEYS[2], where an invalidation drains it,
/// unless KEYS[2] is still being drained: 1 if moved (or there was nothing
/// to move), 0 if KEYS[2] exists. O(1), whatever the set's size.
const DRAIN: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 1
end
return redis.call('RENAMENX', KEYS[1], KEYS[2])
";

/// The scripts, hashed once per backend.
pub(crate) struct Scripts {
    pub(crate) set_if: redis::Script,
    pub(crate) acquire: redis::Script,
    pub(crate) release: redis::Script,
    pub(crate) extend: redis::Script,
    pub(crate) tag: redis::Script,
    pub(crate) untag: redis::Script,
    pub(crate) drain: redis::Script,
}

/// Every script's source, in [`Scripts`]' field order; `prepare` loads
/// them all in one round trip.
pub(crate) const SOURCES: [&str; 7] = [SET_IF, ACQUIRE, RELEASE, EXTEND, TAG, UNTAG, DRAIN];

impl Default for Scripts {
    fn default() -> Self {
        let [set_if, acquire, release, extend, tag, untag, drain] = SOURCES.map(redis::Script::new);
        Scripts {
            set_if,
            acquire,
            release,
            extend,
            tag,
            untag,
            drain,
        }
    }
}

/// A TTL in whole milliseconds for PX; under 1 ms still lives 1 ms.
pub(crate) fn px(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}
