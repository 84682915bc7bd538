//! The engine every call runs on.

pub(crate) mod breaker;
pub(crate) mod flight;
pub(crate) mod policy;
pub(crate) mod recent_invalidations;
pub(crate) mod refresh_claims;
pub(crate) mod store;
