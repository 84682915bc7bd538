//! Bytes and keys.

pub(crate) mod codec;
pub(crate) mod key;
pub(crate) mod shape;
pub(crate) mod weigh;
