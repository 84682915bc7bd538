//! Observation.

pub(crate) mod meters;
pub(crate) mod redis_time;
pub(crate) mod site;
pub(crate) mod stats;
