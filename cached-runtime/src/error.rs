//! The one error type of the fallible public API.
//!
//! Cached functions never see these: inside the cache every Redis or codec
//! failure becomes a counted, logged event and the value is computed instead.

/// What can go wrong when building a [`Cache`](crate::Cache) or calling its
/// fallible methods.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The Redis URL could not be parsed. The URL itself is not repeated,
    /// since it may hold a password.
    #[error("invalid Redis URL: {0}")]
    InvalidUrl(String),
    /// A key given to the runtime API is not allowed (it holds the byte
    /// `~`, which marks the cache's own keys).
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// A builder setting is out of range.
    #[error("invalid cache configuration: {0}")]
    Config(String),
    /// Redis answered with an error or could not be reached.
    #[error("Redis error: {0}")]
    Redis(String),
    /// Redis is up but refused the command (out of memory with
    /// `noeviction`, a read-only replica, failing persistence): counted,
    /// but not held against the circuit breaker, since reads still work.
    #[error("Redis refused the command: {0}")]
    Refused(String),
    /// Redis rejected this command for this key or this user (`WRONGTYPE`:
    /// another program's data of another type at the key; `NOPERM`: an ACL
    /// forbids it; `TRYAGAIN`: the key's cluster slot is being moved to
    /// another node for longer than the command could wait): a miss for
    /// this key alone, counted, and not held against the circuit breaker,
    /// since other keys still work.
    #[error("Redis rejected the command: {0}")]
    Rejected(String),
    /// A Redis operation took longer than the cache's `op_timeout`.
    #[error("Redis operation timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The circuit breaker is open: Redis is skipped until its cool-down ends.
    #[error("Redis skipped: circuit breaker open")]
    BreakerOpen,
    /// A value could not be serialized or deserialized.
    #[error("codec error: {0}")]
    Codec(String),
    /// A write-behind journal holds its `max_len` writes: the write was
    /// not accepted (back-pressure while the sink falls behind).
    #[error("write-behind journal full: {0} writes wait for the sink")]
    Backlog(u64),
    /// The write-behind was shut down (or its last handle dropped): it
    /// accepts no more writes.
    #[error("write-behind shut down: it accepts no more writes")]
    Closed,
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Describes a redis-rs error without anything that could carry a secret.
    ///
    /// redis-rs errors never include the password, but connection errors can
    /// include the whole connection info in their detail; only the kind,
    /// category and code are kept.
    pub(crate) fn from_redis(err: &redis::RedisError) -> Self {
        let code = server_code(err);
        match code.as_deref() {
            Some(code @ ("OOM" | "READONLY" | "MISCONF")) => {
                return Error::Refused(code.to_owned())
            }
            // One key's type, or what an ACL lets this user do: other keys
            // still work. Everything else (the server's state, the
            // credentials, `ERR max number of clients reached`) may affect
            // every key, and feeds the breaker.
            // `JOURNALBLOCKED`: a write-behind journal that cannot take
            // another entry (see the write-behind's docs).
            Some(code @ ("WRONGTYPE" | "NOPERM" | "JOURNALBLOCKED")) => {
                return Error::Rejected(code.to_owned())
            }
            // The key's slot is being moved to another cluster node: a
            // command on several of its keys cannot run until the move
            // ends. The node is fine, and the slot's other commands work.
            Some(code @ ("TRYAGAIN" | "ASK" | "MOVED")) => return Error::Rejected(code.to_owned()),
            _ => {}
        }
        // Credentials: say what to fix (neither message carries a secret;
        // the error's own text is only searched, never repeated).
        if err.kind() == redis::ErrorKind::AuthenticationFailed {
            return Error::Redis(
                "authentication failed: the server refused the user name or password in the URL"
                    .into(),
            );
        }
        if err.code() == Some("NOAUTH") || err.to_string().contains("NOAUTH") {
            return Error::Redis(
                "authentication required: the server needs a password; give it in the URL \
                 (redis://:password@host/ or redis://user:password@host/)"
                    .into(),
            );
        }
        let mut text = format!("{:?}", err.kind());
        if let Some(code) = code {
            text.push_str(": ");
            text.push_str(&code);
        }
        if err.is_timeout() {
            text.push_str(" (timeout)");
        } else if err.is_connection_refusal() {
            text.push_str(" (connection refused)");
        } else if err.is_io_error() {
            text.push_str(" (I/O error)");
        }
        Error::Redis(text)
    }

    /// Whether this is a command refused while its slot moves between
    /// cluster nodes: worth trying again after a pause.
    pub(crate) fn is_migrating(&self) -> bool {
        matches!(self, Error::Rejected(code) if is_migrating_code(code))
    }
}

/// The error codes of a slot being moved between cluster nodes.
pub(crate) fn is_migrating_code(code: &str) -> bool {
    matches!(code, "TRYAGAIN" | "ASK" | "MOVED")
}

/// The server's error code of `err` (`OOM`, `NOSCRIPT`, …), also when it
/// is a pipeline's error (that of its first failing command).
pub(crate) fn server_code(err: &redis::RedisError) -> Option<String> {
    if let Some(code) = err.code() {
        return Some(code.to_owned());
    }
    let failed = err.clone().into_server_errors()?;
    failed.first().map(|(_, failure)| failure.code().to_owned())
}
