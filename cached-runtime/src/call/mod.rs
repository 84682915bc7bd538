//! One call's algorithms: the hit path (`hit`), the miss (`miss`: lead or
//! follow the computation, store only if the key did not change), refresh
//! ahead of expiry and stale serving (`refresh`), the cross-process
//! stampede lock (`lock`), batches (`batch`), write-through (`put`),
//! eviction (`evict`), and what one call is told to do differently
//! (`directive`).
//!
//! May import `engine`, `backend`, `near`, `encoding`, `observe` and the
//! leaves (`error`, `failpoint`, `sync`, `token`); never the handle
//! (`cache`, `builder`, `global`, `private`) nor `write_behind`.

pub(crate) mod batch;
pub(crate) mod directive;
pub(crate) mod evict;
pub(crate) mod hit;
pub(crate) mod lock;
pub(crate) mod miss;
pub(crate) mod put;
pub(crate) mod refresh;
