//! What the cache tells about itself: its counters (`stats`), each cached
//! function's own record (`site`), the `metrics` export (`meters`), and the
//! time a call spends waiting for Redis (`redis_time`).
//!
//! May import the leaves only.

pub(crate) mod meters;
pub(crate) mod redis_time;
pub(crate) mod site;
pub(crate) mod stats;
