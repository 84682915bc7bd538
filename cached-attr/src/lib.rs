//! The attributes of `redis-cached`. Use them through the `redis-cached`
//! crate, which documents them in full; this crate only generates code.
//!
//! Each attribute runs one chain: parse the arguments, key and tag
//! templates included, each once (`args`, `key`); parse the function up to
//! its body, which stays tokens (`item`); check everything that involves
//! more than one argument (`valid`); lower it to the typed model of the
//! function (`model`, and `batch` for `<ids[]>`); generate code
//! (`expand`). Errors from every phase are reported together, next to the
//! user's function left unchanged.

mod args;
mod batch;
mod boxed;
mod derive;
mod errors;
mod expand;
mod item;
mod key;
mod model;
mod valid;

use proc_macro::TokenStream;

use args::{Args, Kind};
use errors::Errors;

/// Caches an `async fn`'s result: cache-aside on Redis or in memory.
///
/// ```text
/// #[redis_cached(key = "user:<id>", ttl = "1h", lock = true)]
/// async fn get_user(&self, id: u64) -> Result<Option<User>, DbError> { … }
/// ```
///
/// Arguments, all optional. The full reference, with every default and
/// example, is in one place: the `redis-cached` crate's documentation,
/// section [The attribute](https://docs.rs/redis-cached/latest/redis_cached/#the-attribute)
/// (the same text as its README). In short:
///
/// - `key = "user:<id>"`: the key template; `<param>`, `<param.field>`,
///   `<self.field>` placeholders, `<ids[]>` for each element of a batch.
///   Default: module path, function, a digest of the impl and generics,
///   then every argument.
/// - `skip = [db]`: parameters left out of the default key.
/// - `ttl = 3600`, `ttl = "1h30m"`, `ttl = USER_TTL`, `ttl = self.ttl`.
/// - `cache_none = "1m"`: also cache `None` for this long.
/// - `lock = true`, `lock_ttl = "10s"`, `lock_wait = "5s"`: one computation
///   in all processes on a miss.
/// - `stale = "5m"`, `early = 1.0`: refresh in the background.
/// - `version = 2`, `tags = ["tenant:<t>"]`.
/// - `cache = self.cache` (anything that dereferences to a `Cache`;
///   default: the global cache), `crate = "path"`.
///
/// Return types: `Result<T, E>` caches `Ok`, `Option<T>` caches `Some` (and
/// `None` with `cache_none`), `Result<Option<T>, E>` both, anything else as
/// is; a batch returns a map (or a `Result` of one) keyed by its element.
#[proc_macro_attribute]
pub fn redis_cached(args: TokenStream, item: TokenStream) -> TokenStream {
    entry(Kind::Cached, args, item)
}

/// Writes an `async fn`'s returned value to the cache after it succeeds
/// (write-through): `#[cache_put(key = "user:<user.id>", ttl = 3600)]`.
///
/// Takes `key`, `ttl`, `cache_none`, `version`, `tags`, `cache` and
/// `crate` as `#[redis_cached]` does; give the same `version` and `tags` as
/// the getter whose entries it writes. A value it cannot store invalidates
/// the key instead.
#[proc_macro_attribute]
pub fn cache_put(args: TokenStream, item: TokenStream) -> TokenStream {
    entry(Kind::Put, args, item)
}

/// Deletes a key after an `async fn` succeeds:
/// `#[cache_evict(key = "user:<user.id>")]`, and with `tags = ["team:<t>"]`
/// every key of those tags (with or without a `key`). Also takes
/// `version`, `cache` and `crate`.
#[proc_macro_attribute]
pub fn cache_evict(args: TokenStream, item: TokenStream) -> TokenStream {
    entry(Kind::Evict, args, item)
}

/// A key encoding for a struct or an enum (`CacheKey`), from its fields'
/// encodings: `#[derive(CacheKey)]`; `#[cache_key(crate = "path")]` if the
/// `redis-cached` dependency is renamed.
#[proc_macro_derive(CacheKey, attributes(cache_key))]
pub fn derive_cache_key(input: TokenStream) -> TokenStream {
    syn::parse::<syn::DeriveInput>(input)
        .and_then(derive::expand)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

fn entry(kind: Kind, args: TokenStream, item: TokenStream) -> TokenStream {
    let item = proc_macro2::TokenStream::from(item);
    run(kind, args.into(), item.clone())
        .unwrap_or_else(|err| {
            let mut out = err.into_compile_error();
            out.extend(item);
            out
        })
        .into()
}

fn run(
    kind: Kind,
    args: proc_macro2::TokenStream,
    item: proc_macro2::TokenStream,
) -> syn::Result<proc_macro2::TokenStream> {
    let mut errors = Errors::new();
    let args = Args::parse(kind, args, &mut errors);
    let mut func: item::Func = syn::parse2(item).map_err(|err| {
        syn::Error::new(
            err.span(),
            format!("#[{}] applies to an `async fn`: {err}", kind.name()),
        )
    })?;
    let boxed = boxed::unbox(&mut func);
    let model = model::Model::build(kind, args, func, boxed, &mut errors);
    let model = errors.finish(model)?;
    // `build` returns no model only after recording an error.
    let model = model
        .ok_or_else(|| syn::Error::new(proc_macro2::Span::call_site(), "invalid attribute"))?;
    Ok(expand::expand(&model))
}
