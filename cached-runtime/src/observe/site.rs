//! A cached function's own counters and metrics: a `static` the attribute
//! writes in each function's body.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use crate::observe::meters::{Meters, Series};
use crate::observe::stats::Counters;

/// One cached function's own counters: a `static` that the attribute
/// writes in each function, so that [`stats_of`](crate::stats_of) can
/// report that function alone. Not a stable API.
#[doc(hidden)]
#[derive(Debug)]
pub struct Site {
    /// The type name of a closure in the site's `static`:
    /// `<path>::<function>::<static>::{{closure}}::{{closure}}`.
    namer: fn() -> &'static str,
    /// On the heap, made on first use: the striped counters take a dozen
    /// KiB, which would otherwise sit in the binary once per function.
    counters: OnceLock<Box<Counters>>,
    meters: Meters,
    /// Whether a stored value that no longer decodes was reported.
    drift_warned: AtomicBool,
    /// Whether it is in [`SITES`].
    registered: AtomicBool,
}

/// Every cached function called so far in this process.
static SITES: Mutex<Vec<&'static Site>> = Mutex::new(Vec::new());

impl Site {
    /// The site of the function whose `static` holds it; `namer` returns
    /// the type name of a closure defined in the static's initializer
    /// (which, unlike `module_path!`, names the `impl`'s type).
    pub const fn new(namer: fn() -> &'static str) -> Site {
        Site {
            namer,
            counters: OnceLock::new(),
            meters: Meters::new(),
            drift_warned: AtomicBool::new(false),
            registered: AtomicBool::new(false),
        }
    }

    /// Lists the function among those called so far, and notes the
    /// `series` it can export (computed once; an atomic load on every later
    /// call).
    /// Before its first event: a call registers before it counts.
    pub(crate) fn register(&'static self, series: impl FnOnce() -> Series) {
        if self.registered.load(Ordering::Acquire) {
            return;
        }
        // Before the flag, so that a call that sees it set finds them; a
        // function's series are the same on every call.
        self.meters.expect(series());
        if !self.registered.swap(true, Ordering::AcqRel) {
            SITES
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(self);
        }
    }

    /// The function's path: module, type for a method, and name.
    pub fn name(&self) -> &'static str {
        const CLOSURE: &str = "::{{closure}}";
        let full = (self.namer)().trim_end_matches(CLOSURE);
        // The static's own segment, then the `async fn` body's closure.
        let function = full
            .rsplit_once("::")
            .map_or(full, |(function, _)| function);
        function.trim_end_matches(CLOSURE)
    }

    pub(crate) fn counters(&self) -> &Counters {
        self.counters.get_or_init(Box::default)
    }

    pub(crate) fn meters(&self) -> &Meters {
        &self.meters
    }

    /// Whether this is the first stored value of the function found not to
    /// decode (reported once, at `warn`).
    pub(crate) fn first_drift(&self) -> bool {
        !self.drift_warned.swap(true, Ordering::Relaxed)
    }
}

/// Every cached function called so far in this process, by name (module
/// path, type for a method, function), with its counters: what
/// [`stats_of`](crate::stats_of) reports for each, without a call.
///
/// ```
/// # extern crate cached_runtime as redis_cached;
/// for (function, stats) in redis_cached::cached_functions() {
///     println!("{function}: {} hits, {} misses", stats.hits, stats.misses);
/// }
/// ```
pub fn cached_functions() -> Vec<(&'static str, crate::Stats)> {
    let sites = SITES.lock().unwrap_or_else(PoisonError::into_inner);
    sites
        .iter()
        .map(|site| (site.name(), site.counters().snapshot()))
        .collect()
}

/// The counters of the cached function named `name` (its full path, or
/// its end: `"Repo::user"` for `my_app::repo::Repo::user`), once it has
/// been called in this process; `None` when no function, or more than
/// one, has that name.
pub fn stats_named(name: &str) -> Option<crate::Stats> {
    let sites = SITES.lock().unwrap_or_else(PoisonError::into_inner);
    let suffix = format!("::{name}");
    let mut named = sites
        .iter()
        .filter(|site| site.name() == name || site.name().ends_with(&suffix));
    let site = named.next()?;
    if named.next().is_some() {
        return None;
    }
    Some(site.counters().snapshot())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_is_named_after_its_function() {
        struct Repo;
        impl Repo {
            fn get_user() -> &'static Site {
                static SITE: Site = Site::new(|| std::any::type_name_of_val(&|| ()));
                &SITE
            }
        }
        let name = Repo::get_user().name();
        assert!(name.ends_with("::Repo::get_user"), "{name}");
        assert!(
            name.starts_with("cached_runtime::observe::site::tests"),
            "{name}"
        );
        // In an `async fn`, the static is inside the body's closure.
        async fn load() -> &'static Site {
            static SITE: Site = Site::new(|| std::any::type_name_of_val(&|| ()));
            &SITE
        }
        let site = std::pin::pin!(load());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let std::task::Poll::Ready(site) = std::future::Future::poll(site, &mut cx) else {
            panic!("ready at once");
        };
        assert!(
            site.name()
                .ends_with("::a_site_is_named_after_its_function::load"),
            "{}",
            site.name()
        );
    }
}
