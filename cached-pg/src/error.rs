//! The crate's one error type.

/// What can go wrong building or running a [`Listener`](crate::Listener).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A [`Mapping`](crate::Mapping) the listener cannot use: a template
    /// the attribute would refuse, a table mapped twice, a table tag with
    /// placeholders, a column the table does not have.
    #[error("mapping: {0}")]
    Mapping(String),
    /// A setting the listener cannot use (a slot or publication name).
    #[error("configuration: {0}")]
    Config(String),
    /// Postgres refused, failed or could not be reached.
    #[error("postgres: {0}")]
    Postgres(String),
    /// The listener has stopped.
    #[error("the listener has stopped")]
    Stopped,
}

impl From<pg_walstream::ReplicationError> for Error {
    fn from(err: pg_walstream::ReplicationError) -> Error {
        Error::Postgres(err.to_string())
    }
}
