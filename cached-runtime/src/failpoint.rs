//! Failpoints for the crate's own crash and fault tests (feature
//! `failpoints`, never on in a release build of an application): named
//! places in the code where a test makes the process abort, or an
//! operation fail, as a crash or a fault would at that moment.
//!
//! Without the feature, [`hit`] is an empty inline function.

/// What a failpoint does when it fires.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The process aborts at once, as if killed: no destructor runs, no
    /// buffer is flushed, nothing is sent to Redis.
    Abort,
    /// The operation at the failpoint fails as if Redis had.
    Fail,
    /// The task at the failpoint stops for this many milliseconds, as a
    /// process descheduled (or a garbage-collection pause) would.
    Pause(u64),
}

#[cfg(feature = "failpoints")]
mod armed {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    use super::Action;

    /// Each armed point: its action and how many hits are left before it
    /// fires (0: fires on every hit).
    fn points() -> &'static Mutex<HashMap<String, (Action, u64)>> {
        static POINTS: OnceLock<Mutex<HashMap<String, (Action, u64)>>> = OnceLock::new();
        POINTS.get_or_init(|| {
            // `REDIS_CACHED_FAILPOINTS=point=abort@5,other=fail`: for a
            // child process, armed before it runs anything (`@n`: the
            // n-th hit alone; none: every hit).
            let mut points = HashMap::new();
            if let Ok(spec) = std::env::var("REDIS_CACHED_FAILPOINTS") {
                for item in spec.split(',').filter(|s| !s.is_empty()) {
                    let Some((name, action)) = item.split_once('=') else {
                        continue;
                    };
                    let (action, nth) = action.split_once('@').unwrap_or((action, "0"));
                    let action = match action {
                        "abort" => Action::Abort,
                        "fail" => Action::Fail,
                        pause => match pause.strip_prefix("pause").map(str::parse) {
                            Some(Ok(ms)) => Action::Pause(ms),
                            _ => continue,
                        },
                    };
                    points.insert(name.to_owned(), (action, nth.parse().unwrap_or(0)));
                }
            }
            Mutex::new(points)
        })
    }

    pub(crate) fn arm(name: &str, action: Action, nth: u64) {
        let mut points = points().lock().unwrap_or_else(|p| p.into_inner());
        points.insert(name.to_owned(), (action, nth));
    }

    pub(crate) fn disarm(name: &str) {
        let mut points = points().lock().unwrap_or_else(|p| p.into_inner());
        points.remove(name);
    }

    pub(crate) fn hit(name: &str, scope: &str) -> Option<Action> {
        let mut points = points().lock().unwrap_or_else(|p| p.into_inner());
        let scoped = format!("{name}:{scope}");
        let key = if points.contains_key(&scoped) {
            scoped
        } else {
            name.to_owned()
        };
        let (action, left) = points.get_mut(&key)?;
        match *left {
            // Every hit.
            0 => {}
            // This hit, and no later one.
            1 => {
                let action = *action;
                points.remove(&key);
                drop(points);
                return fire(action);
            }
            _ => {
                *left -= 1;
                return None;
            }
        }
        let action = *action;
        drop(points);
        fire(action)
    }

    fn fire(action: Action) -> Option<Action> {
        if action == Action::Abort {
            std::process::abort();
        }
        Some(action)
    }
}

/// Arms the failpoint `name` (`point`, or `point:scope` for one scope
/// alone, such as one journal's stream): its `nth` hit does `action` and
/// disarms it; with `nth` = 0, every hit does.
#[cfg(feature = "failpoints")]
pub fn arm(name: &str, action: Action, nth: u64) {
    armed::arm(name, action, nth);
}

/// Disarms the failpoint `name`.
#[cfg(feature = "failpoints")]
pub fn disarm(name: &str) {
    armed::disarm(name);
}

/// Passes the failpoint `name` in `scope`: aborts the process if it is
/// armed so, `Some(Action::Fail)` if the operation here must fail,
/// `Some(Action::Pause(ms))` if the task must stop a while (see [`pause`]).
#[inline(always)]
pub(crate) fn hit(name: &str, scope: &str) -> Option<Action> {
    #[cfg(feature = "failpoints")]
    {
        armed::hit(name, scope)
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = (name, scope);
        None
    }
}

/// Passes the failpoint `name` in `scope` where the only fault is a pause.
pub(crate) async fn pause(name: &str, scope: &str) {
    if let Some(Action::Pause(ms)) = hit(name, scope) {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}
