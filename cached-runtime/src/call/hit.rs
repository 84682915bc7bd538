//! The future of one call of a cached function (`#[redis_cached]`, with or
//! without `stale`/`early`, and `get_or_compute`): read the key and decode
//! a hit (starting a refresh when one is due), or hand the call to its
//! [`Miss`].
//!
//! A user's crate compiles once per cached function whatever depends on
//! the function's body type, and in a release build LLVM's time grows with
//! all of it. So a call is two parts: its [`Body`], behind a `dyn` once it
//! must run, and the rest, a [`CallState`], which depends on the result
//! type only: compiled once per result type, not once per function. The
//! miss path, which depends on neither, is compiled once in this crate.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;

use crate::backend::{AnyBackend, Bytes, Seen};
use crate::call::directive::{self, Directive};
use crate::call::miss::{keep, unkeep, Compute, Fill, Kept, Miss, Outcome};
use crate::call::refresh::{Detached, Due};
use crate::encoding::shape::Shape;
use crate::engine::policy::Policy;
use crate::engine::store::{Encoded, Inner};
use crate::observe::redis_time;
use crate::observe::site::Site;
use crate::observe::stats::Event;

/// A cached function's body, as its call runs it.
pub(crate) trait Body<R> {
    /// Polls the body.
    fn poll_body(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<R>;
    /// Starts refreshing the value in the background with the body,
    /// unstarted, as a hit that is due does; does nothing if the body
    /// cannot run apart from its call.
    fn refresh(self: Pin<&mut Self>, refresh: Refresh<'_>);
}

/// What a hit that is due hands its refresh.
pub(crate) struct Refresh<'r> {
    inner: &'r Arc<Inner>,
    due: Due,
    key: &'r str,
    tags: &'r [String],
    policy: Policy,
    /// The entry as stored, for the refresh's compare-and-set.
    raw: Bytes,
}

pin_project! {
    /// A body run where it is, in its call's future: never detached.
    pub(crate) struct InPlace<Fut> {
        #[pin]
        body: Fut,
    }
}

impl<Fut: Future> Body<Fut::Output> for InPlace<Fut> {
    fn poll_body(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Fut::Output> {
        self.project().body.poll(cx)
    }

    fn refresh(self: Pin<&mut Self>, _: Refresh<'_>) {}
}

/// A body that a hit may detach to refresh the value in the background
/// (`stale`, `early`): made by its maker (which clones what it borrows)
/// and boxed when it first runs, or when it is detached. `S` is the shape
/// of its result.
pub(crate) struct Detachable<S, F, Fut> {
    unstarted: Option<F>,
    running: Option<Pin<Box<Fut>>>,
    shape: PhantomData<fn() -> S>,
}

impl<S, F, Fut> Body<Fut::Output> for Detachable<S, F, Fut>
where
    S: Shape<Fut::Output> + 'static,
    F: FnOnce() -> Fut,
    Fut: Future + Send + 'static,
    Fut::Output: 'static,
{
    fn poll_body(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Fut::Output> {
        // The body is polled only once boxed: a `Detachable` may move.
        let this = Pin::into_inner(self);
        let running = match &mut this.running {
            Some(running) => running,
            None => {
                let make = this.unstarted.take().expect("a call's body, once");
                this.running.insert(Box::pin(make()))
            }
        };
        running.as_mut().poll(cx)
    }

    fn refresh(self: Pin<&mut Self>, refresh: Refresh<'_>) {
        let unstarted = &mut Pin::into_inner(self).unstarted;
        let Refresh {
            inner,
            due,
            key,
            tags,
            policy,
            raw,
        } = refresh;
        // Made (and what it borrows cloned) only if the refresh starts;
        // boxed, so that the refresh is compiled once per result type, not
        // once per function.
        let mut make = || {
            let make = unstarted.take()?;
            let body: Detached<Fut::Output> = Box::pin(make());
            Some(body)
        };
        inner.start_refresh::<S, Fut::Output>(due, key, tags, policy, raw, &mut make);
    }
}

impl<S, F, Fut> Unpin for Detachable<S, F, Fut> {}

pin_project! {
    /// One call of a cached function: its body, and the rest.
    pub(crate) struct Cached<'a, S, R, Rd, B>
    where
        S: Shape<R>,
    {
        #[pin]
        state: CallState<'a, S, R, Rd>,
        #[pin]
        body: B,
    }
}

impl<S, R, Rd, B> Future for Cached<'_, S, R, Rd, B>
where
    S: Shape<R>,
    Rd: Future<Output = Read>,
    B: Body<R>,
{
    type Output = R;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<R> {
        let this = self.project();
        this.state.poll(cx, this.body)
    }
}

/// What a read of the key found, with the key.
pub(crate) type Read = (String, Result<Bytes, Seen>);

/// Reads `key`, handing it back with what was read; for a function with a
/// near tier, on the tracking connection.
async fn read(inner: &Inner, key: String, policy: Policy) -> Read {
    let read = inner.read_for(&key, &policy).await;
    (key, read)
}

pin_project! {
    /// A call but its body: compiled once per result type. `Rd` is always
    /// the same future, that of [`read`].
    pub(crate) struct CallState<'a, S, R, Rd>
    where
        S: Shape<R>,
    {
        #[pin]
        stage: Stage<'a, Rd>,
        // The stored part of the result, while the miss stores it.
        kept: Option<Kept<S::Value, R>>,
        // The call's span (`redis_cached` at `debug`): entered at each
        // poll, so the body's own spans nest in it; its `outcome` is
        // recorded when the call ends.
        span: tracing::Span,
        // Time spent waiting for Redis in this call's polls, summed while
        // its span is listened to.
        redis: Duration,
    }
}

pin_project! {
    #[project = StageProj]
    enum Stage<'a, Rd> {
        /// Reading the key: a hit ends the call.
        Read {
            #[pin]
            read: Rd,
            inner: &'a Arc<Inner>,
            tags: &'a [String],
            policy: Policy,
            // `refresh(…)`: the read is not used; the body runs and stores.
            forced: bool,
        },
        /// A miss (or a `lock = true` call, which joins this process's
        /// computation before anyone reads).
        Miss { miss: Miss<'a> },
        /// There is no cache (or `bypass(…)`): the body runs alone.
        Uncached,
        /// `key_of(…)`: the key was recorded; nothing runs.
        Captured,
    }
}

/// The call of a cached function whose body runs only in its call. With
/// no cache (`None`), `unset` is called and the body runs uncached.
pub(crate) fn cached<'a, S, R, Fut>(
    inner: Option<&'a Arc<Inner>>,
    unset: fn(),
    key: String,
    tags: &'a [String],
    policy: Policy,
    body: Fut,
) -> Cached<'a, S, R, impl Future<Output = Read> + 'a, InPlace<Fut>>
where
    S: Shape<R>,
    Fut: Future<Output = R>,
{
    Cached {
        state: start(inner, unset, key, tags, policy, Fill::reads_first),
        body: InPlace { body },
    }
}

/// The call of a `stale` or `early` function: a hit that is due detaches
/// the body to refresh the value. The key is always read first (also with
/// `lock = true`): a stale hit is served at once.
pub(crate) fn cached_refreshing<'a, S, R, F, Fut>(
    inner: Option<&'a Arc<Inner>>,
    unset: fn(),
    key: String,
    tags: &'a [String],
    policy: Policy,
    make: F,
) -> Cached<'a, S, R, impl Future<Output = Read> + 'a, Detachable<S, F, Fut>>
where
    S: Shape<R> + 'static,
    R: 'static,
    F: FnOnce() -> Fut,
    Fut: Future<Output = R> + Send + 'static,
{
    Cached {
        state: start(inner, unset, key, tags, policy, |_, _| true),
        body: Detachable {
            unstarted: Some(make),
            running: None,
            shape: PhantomData,
        },
    }
}

/// The state of a call about to start. (Its first poll would do no more:
/// none of this waits, and the call's body has not started.)
fn start<'a, S: Shape<R>, R>(
    inner: Option<&'a Arc<Inner>>,
    unset: fn(),
    key: String,
    tags: &'a [String],
    policy: Policy,
    reads_first: fn(&Inner, &Policy) -> bool,
) -> CallState<'a, S, R, impl Future<Output = Read> + 'a> {
    let directive = directive::take();
    // The key as the span may name it (opt-in): kept only when wanted.
    let logged_key = inner
        .filter(|inner| inner.settings.log_keys && redis_time::wanted())
        .map(|_| key.clone());
    let stage = match (inner, directive) {
        (_, Some(Directive::Bypass)) => Stage::Uncached,
        (Some(inner), Some(Directive::Capture)) => {
            directive::capture(Some((inner.full_key(key), inner)), policy.site);
            Stage::Captured
        }
        (None, Some(Directive::Capture)) => {
            directive::capture(None, policy.site);
            Stage::Captured
        }
        (None, _) => {
            unset();
            Stage::Uncached
        }
        (Some(inner), directive) => {
            let key = inner.full_key(key);
            let forced = directive == Some(Directive::Refresh);
            if forced || reads_first(inner, &policy) {
                Stage::Read {
                    read: read(inner, key, policy),
                    inner,
                    tags,
                    policy,
                    forced,
                }
            } else {
                Stage::Miss {
                    miss: Miss::new(Fill::new(inner, key, tags, policy)),
                }
            }
        }
    };
    let span = match &stage {
        Stage::Captured => tracing::Span::none(),
        _ => tracing::debug_span!(
            target: "redis_cached",
            "cached",
            function = policy.site.map_or("", Site::name),
            outcome = tracing::field::Empty,
            compute_ms = tracing::field::Empty,
            redis_ms = tracing::field::Empty,
            key = tracing::field::Empty,
        ),
    };
    if let (Some(inner), Some(key)) = (inner, logged_key) {
        inner.record_key(&span, &inner.full_key(key));
    }
    CallState {
        stage,
        kept: None,
        span,
        redis: Duration::ZERO,
    }
}

impl<'a, S, R, Rd> CallState<'a, S, R, Rd>
where
    S: Shape<R>,
    Rd: Future<Output = Read>,
{
    /// Advances the call, running `body` if it must.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>, body: Pin<&mut dyn Body<R>>) -> Poll<R> {
        let this = self.project();
        let span = &*this.span;
        let (stage, kept) = (this.stage, this.kept);
        redis_time::poll_in(span, this.redis, || {
            Self::advance(stage, kept, span, cx, body)
        })
    }

    /// [`CallState::poll`] within the call's span.
    fn advance(
        mut stage: Pin<&mut Stage<'a, Rd>>,
        kept: &mut Option<Kept<S::Value, R>>,
        span: &tracing::Span,
        cx: &mut Context<'_>,
        body: Pin<&mut dyn Body<R>>,
    ) -> Poll<R> {
        loop {
            match stage.as_mut().project() {
                StageProj::Read {
                    read,
                    inner,
                    tags,
                    policy,
                    forced,
                } => {
                    let (key, read) = ready!(read.poll(cx));
                    let (inner, tags, policy): (&'a Arc<Inner>, _, _) = (*inner, *tags, *policy);
                    if *forced {
                        let fill = Fill::forced(inner, key, tags, policy, inner.seen(read));
                        stage.set(Stage::Miss {
                            miss: Miss::new(fill),
                        });
                        continue;
                    }
                    let seen = match read {
                        // The hit path: one read, one decode.
                        Ok(bytes) => match inner.decode_hit::<S, R>(bytes, &policy) {
                            Ok((result, due)) => {
                                let outcome = match &due {
                                    Some((Due::Stale, _)) => Outcome::Stale,
                                    _ => Outcome::Hit,
                                };
                                span.record("outcome", outcome.as_str());
                                if let Some((due, raw)) = due {
                                    body.refresh(Refresh {
                                        inner,
                                        due,
                                        key: &key,
                                        tags,
                                        policy,
                                        raw,
                                    });
                                }
                                return Poll::Ready(result);
                            }
                            Err(seen) => seen,
                        },
                        Err(seen) => seen,
                    };
                    inner.count(policy.site, Event::misses);
                    let fill = Fill::after_miss(inner, key, tags, policy, seen);
                    stage.set(Stage::Miss {
                        miss: Miss::new(fill),
                    });
                }
                StageProj::Miss { miss } => {
                    let result = ready!(poll_miss::<S, R>(miss, cx, body, kept));
                    span.record("outcome", miss.outcome().as_str());
                    if let Some(took) = miss.computed() {
                        span.record("compute_ms", crate::observe::redis_time::millis(took));
                    }
                    return Poll::Ready(result);
                }
                StageProj::Uncached => {
                    let result = ready!(body.poll_body(cx));
                    span.record("outcome", Outcome::Uncached.as_str());
                    return Poll::Ready(result);
                }
                StageProj::Captured => return Poll::Pending,
            }
        }
    }
}

/// One poll of a miss: the [`Turn`] lives for this poll only, so that the
/// result it may hold is never kept across polls (the call's future is
/// `Send` whenever its body is, whatever the result's error type).
fn poll_miss<S: Shape<R>, R>(
    miss: &mut Miss<'_>,
    cx: &mut Context<'_>,
    body: Pin<&mut dyn Body<R>>,
    kept: &mut Option<Kept<S::Value, R>>,
) -> Poll<R> {
    let mut result = None;
    let mut turn = Turn::<S, R> {
        body,
        result: &mut result,
        kept,
    };
    ready!(miss.poll(cx, &mut turn));
    match (result, kept.take()) {
        (Some(result), _) => Poll::Ready(result),
        (None, Some(kept)) => Poll::Ready(unkeep::<S, R>(kept)),
        (None, None) => unreachable!("a miss ends with a result"),
    }
}

/// A call's own code for one poll of its miss.
struct Turn<'p, S: Shape<R>, R> {
    body: Pin<&'p mut dyn Body<R>>,
    /// The call's result, once there is one: the miss ends on that poll.
    result: &'p mut Option<R>,
    /// The stored part of the result, while it is being stored.
    kept: &'p mut Option<Kept<S::Value, R>>,
}

impl<S: Shape<R>, R> Compute for Turn<'_, S, R> {
    fn decode(&mut self, inner: &Inner, bytes: Bytes, site: Option<&Site>) -> Result<(), Seen> {
        *self.result = Some(inner.decode_result::<S, R>(bytes, site)?);
        Ok(())
    }

    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        *self.result = Some(ready!(self.body.as_mut().poll_body(cx)));
        Poll::Ready(())
    }

    fn encode(&mut self, fill: &Fill<'_>) -> Option<Encoded> {
        let result = self.result.take()?;
        let Some(encoded) = fill.encode::<S, R>(&result) else {
            *self.result = Some(result);
            return None;
        };
        match keep::<S, R>(result) {
            Ok(kept) => {
                *self.kept = Some(kept);
                Some(encoded)
            }
            Err(result) => {
                *self.result = Some(result);
                None
            }
        }
    }
}

/// The result the near tier holds for `key`, if it may serve it now; not
/// under a directive (`bypass`, `refresh`, `key_of`, …), which the call
/// itself follows.
pub(crate) fn near_hit<S, R>(inner: Option<&Arc<Inner>>, key: &str, policy: &Policy) -> Option<R>
where
    S: Shape<R>,
    S::Value: Clone + Send + Sync + 'static,
{
    let inner = inner?;
    if directive::pending() {
        return None;
    }
    let value = inner.with_full_key(key, |full| inner.near_get::<S::Value>(full))?;
    let result = in_process::<S, R>(inner, key, policy, value, "near")?;
    inner.count(policy.site, Event::near_hits);
    Some(result)
}

/// The result the in-memory backend holds for `key`, from the decoded copy
/// of its entry: no decode, nothing read but the entry. `None` (the call
/// then reads and decodes as any other) on Redis, under a directive, and
/// for anything but a hit.
pub(crate) fn memory_hit<S, R>(inner: Option<&Arc<Inner>>, key: &str, policy: &Policy) -> Option<R>
where
    S: Shape<R>,
    S::Value: Clone + Send + Sync + 'static,
{
    let inner = inner?;
    if !matches!(inner.backend, AnyBackend::Memory(_)) || directive::pending() {
        return None;
    }
    let value = inner.with_full_key(key, |full| inner.memory_get::<S::Value>(full))?;
    in_process::<S, R>(inner, key, policy, value, Outcome::Hit.as_str())
}

/// The result of a hit in this process (`value`: `None` for a stored
/// absence, which not every result has), counted, and its span made only
/// if someone listens.
fn in_process<S: Shape<R>, R>(
    inner: &Inner,
    key: &str,
    policy: &Policy,
    value: Option<S::Value>,
    outcome: &'static str,
) -> Option<R> {
    let result = match value {
        Some(value) => S::from_value(value),
        None => S::absent()?,
    };
    inner.count(policy.site, Event::hits);
    let span = tracing::debug_span!(
        target: "redis_cached",
        "cached",
        function = policy.site.map_or("", Site::name),
        outcome,
        key = tracing::field::Empty,
    );
    if !span.is_disabled() {
        inner.with_full_key(key, |full| inner.record_key(&span, full));
    }
    Some(result)
}
