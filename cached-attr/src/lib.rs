//! The attributes of `redis-cached`. Use them through the `redis-cached`
//! crate, which re-exports them and pins this crate's exact version; their
//! reference is on each attribute below.
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

#[doc = include_str!("../doc/redis_cached.md")]
#[proc_macro_attribute]
pub fn redis_cached(args: TokenStream, item: TokenStream) -> TokenStream {
    entry(Kind::Cached, args, item)
}

#[doc = include_str!("../doc/cache_put.md")]
#[proc_macro_attribute]
pub fn cache_put(args: TokenStream, item: TokenStream) -> TokenStream {
    entry(Kind::Put, args, item)
}

#[doc = include_str!("../doc/cache_evict.md")]
#[proc_macro_attribute]
pub fn cache_evict(args: TokenStream, item: TokenStream) -> TokenStream {
    entry(Kind::Evict, args, item)
}

#[doc = include_str!("../doc/cache_key.md")]
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
