//! A flag that says whether a background task runs: set when the task is
//! started, cleared however it ends (its runtime shutting down included).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Clears its flag when dropped: held by the task the flag stands for.
pub(crate) struct ClearOnDrop(pub(crate) Arc<AtomicBool>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}
