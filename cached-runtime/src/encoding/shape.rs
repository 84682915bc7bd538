//! Return-type shapes: which part of a cached function's result is stored.
//!
//! `Result<T, E>` stores `Ok(T)` only; `Option<T>` stores `Some(T)`, and
//! `None` only with `cache_none`; `Result<Option<T>, E>` does both; any other
//! `T` is stored as is. The attribute picks the shape from the written return
//! type; values are serialized by reference, so no `Clone` bound is needed.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A value a cached function may store: serializable both ways, and `Send`
/// so that a computation can hand it to other tasks. Named so that a type
/// that is not gets one error that says what to do (rather than one per
/// missing trait, through the shapes below).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be cached: a cached function's value must implement `Serialize`, `Deserialize` and `Send`",
    label = "this function's value is stored, so `{Self}` must be serializable",
    note = "derive them: `#[derive(serde::Serialize, serde::Deserialize)]` on `{Self}` (and keep it `Send`)"
)]
pub trait Storable: Serialize + DeserializeOwned + Send + 'static {}

#[diagnostic::do_not_recommend]
impl<T: Serialize + DeserializeOwned + Send + 'static> Storable for T {}

/// What a result contributes to the cache.
#[derive(Debug, Clone, Copy)]
pub enum Stored<'a, V> {
    /// A value to store and share.
    Value(&'a V),
    /// A known absence (`None`): stored only with `cache_none`.
    Absent,
    /// Nothing: an error, never stored or shared.
    Skip,
}

/// A result taken apart, so that the cache can keep its stored part across
/// an `.await` without holding the rest (an error type need not be `Send`).
#[derive(Debug)]
pub enum Split<V, R> {
    /// The stored value.
    Value(V),
    /// A known absence, and how to make the result that stands for it.
    Absent(fn() -> R),
    /// Anything else (an error), given back whole.
    Other(R),
}

/// How to take a result `R` apart for the cache and put it back together.
pub trait Shape<R> {
    /// The stored part of `R`.
    type Value: Storable;
    /// The part of `result` to store.
    fn view(result: &R) -> Stored<'_, Self::Value>;
    /// Rebuilds a result from a stored value.
    fn from_value(value: Self::Value) -> R;
    /// The result that a stored absence stands for, if `R` has one.
    fn absent() -> Option<R>;
    /// Takes `result` apart (see `Split`).
    fn split(result: R) -> Split<Self::Value, R>;
}

/// Any type, stored as is.
#[derive(Debug)]
pub struct Plain;
/// `Result<T, E>`: `Ok` stored, `Err` skipped.
#[derive(Debug)]
pub struct ResultOf;
/// `Option<T>`: `Some` stored, `None` an absence.
#[derive(Debug)]
pub struct OptionOf;
/// `Result<Option<T>, E>`: `Ok(Some)` stored, `Ok(None)` an absence, `Err` skipped.
#[derive(Debug)]
pub struct ResultOptionOf;

impl<T: Storable> Shape<T> for Plain {
    type Value = T;
    fn view(result: &T) -> Stored<'_, T> {
        Stored::Value(result)
    }
    fn from_value(value: T) -> T {
        value
    }
    fn absent() -> Option<T> {
        None
    }
    fn split(result: T) -> Split<T, T> {
        Split::Value(result)
    }
}

impl<T: Storable, E> Shape<Result<T, E>> for ResultOf {
    type Value = T;
    fn view(result: &Result<T, E>) -> Stored<'_, T> {
        match result {
            Ok(value) => Stored::Value(value),
            Err(_) => Stored::Skip,
        }
    }
    fn from_value(value: T) -> Result<T, E> {
        Ok(value)
    }
    fn absent() -> Option<Result<T, E>> {
        None
    }
    fn split(result: Result<T, E>) -> Split<T, Result<T, E>> {
        match result {
            Ok(value) => Split::Value(value),
            err => Split::Other(err),
        }
    }
}

impl<T: Storable> Shape<Option<T>> for OptionOf {
    type Value = T;
    fn view(result: &Option<T>) -> Stored<'_, T> {
        match result {
            Some(value) => Stored::Value(value),
            None => Stored::Absent,
        }
    }
    fn from_value(value: T) -> Option<T> {
        Some(value)
    }
    fn absent() -> Option<Option<T>> {
        Some(None)
    }
    fn split(result: Option<T>) -> Split<T, Option<T>> {
        match result {
            Some(value) => Split::Value(value),
            None => Split::Absent(|| None),
        }
    }
}

impl<T: Storable, E> Shape<Result<Option<T>, E>> for ResultOptionOf {
    type Value = T;
    fn view(result: &Result<Option<T>, E>) -> Stored<'_, T> {
        match result {
            Ok(Some(value)) => Stored::Value(value),
            Ok(None) => Stored::Absent,
            Err(_) => Stored::Skip,
        }
    }
    fn from_value(value: T) -> Result<Option<T>, E> {
        Ok(Some(value))
    }
    fn absent() -> Option<Result<Option<T>, E>> {
        Some(Ok(None))
    }
    fn split(result: Result<Option<T>, E>) -> Split<T, Result<Option<T>, E>> {
        match result {
            Ok(Some(value)) => Split::Value(value),
            Ok(None) => Split::Absent(|| Ok(None)),
            err => Split::Other(err),
        }
    }
}
