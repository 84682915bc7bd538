//! How values and keys become bytes: the value codec and its stored
//! envelope (`codec`), key encoding and escaping (`key`), which part of a
//! result is stored (`shape`), and the memory estimate made while a value
//! is decoded (`weigh`).
//!
//! May import `observe` and the leaves only.

pub(crate) mod codec;
pub(crate) mod key;
pub(crate) mod shape;
pub(crate) mod weigh;
