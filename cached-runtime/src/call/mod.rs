//! One call's algorithms: the hit path, the miss, refresh ahead and stale
//! serving, the stampede lock, batches, and the per-call directives.

pub(crate) mod batch;
pub(crate) mod directive;
pub(crate) mod hit;
pub(crate) mod lock;
pub(crate) mod miss;
pub(crate) mod refresh;
