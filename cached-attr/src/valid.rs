//! Checks of an annotated function that involve more than one argument,
//! or its signature and return type: each error says what is wrong and
//! what would be right. All of them run, so one compile shows every
//! problem; lowering (`model`) only resolves what they let through.

use proc_macro2::{Ident, Span};
use syn::spanned::Spanned;
use syn::{FnArg, Pat, ReturnType, Type};

use crate::args::{Args, Kind};
use crate::errors::Errors;
use crate::item::Func;
use crate::model::{last_segment, Shape};

/// Runs every check of `func` under `args`; `ret` is its return type.
pub(crate) fn validate(
    kind: Kind,
    args: &Args,
    func: &Func,
    (ret, ret_span): (&Type, Span),
    errors: &mut Errors,
) {
    let not_async = func.sig.asyncness.is_none();
    if not_async {
        errors.push(not_async_error(kind, func));
    }
    if let (Some(span), Some(_)) = (args.skip_span, &args.key) {
        errors.push(syn::Error::new(
            span,
            "`skip` leaves parameters out of the default key, but this function gives `key = …`, which names the parameters it uses: remove `skip`",
        ));
    }
    if matches!(ret, Type::ImplTrait(_)) && !not_async {
        errors.push(syn::Error::new(
            ret_span,
            "a cached function must return a concrete type that implements Serialize and Deserialize, not `impl Trait`",
        ));
    }
    check_freshness_args(args, errors);
    // A batch stores its map's values only; its keys are the elements.
    let batched = args.key.as_ref().is_some_and(|key| key.is_batch());
    if !batched {
        check_owned(ret, ret_span, kind, errors);
    }
    check_refresh_ownership(args, func, errors);
    if let Some(cache_none) = &args.cache_none {
        // A batch's absent elements are those missing from its map.
        if !Shape::of(ret).has_absent() && !batched {
            errors.push(syn::Error::new(
                cache_none.span,
                "`cache_none` caches `None` results, but this function does not return an `Option` or `Result<Option<_>, _>`",
            ));
        }
    }
    for tag in args.tags.iter().filter(|tag| tag.is_batch()) {
        errors.push(syn::Error::new(
            tag.lit.span(),
            "a tag cannot name a batch's elements (`<…[]>`): tag a batch by what its elements share, e.g. `tenant:<tenant>`",
        ));
    }
}

/// Why a function that is not an `async fn` cannot be cached, and what to
/// write instead: for a function returning `impl Future`, and for a method
/// that `#[async_trait]` rewrote into a boxed future before this attribute
/// saw it, a message of its own.
fn not_async_error(kind: Kind, func: &Func) -> syn::Error {
    let name = &func.sig.ident;
    let output = match &func.sig.output {
        ReturnType::Type(_, ty) => quote::ToTokens::to_token_stream(ty).to_string(),
        ReturnType::Default => String::new(),
    };
    let generics = quote::ToTokens::to_token_stream(&func.sig.generics).to_string();
    let message = if generics.contains("'async_trait") || output.contains("'async_trait") {
        format!(
            "#[{}] sees `{name}` after #[async_trait] rewrote it, in a form it does not recognise (a body other \
             than `Box::pin(async move {{ … }})`): put #[{}] on the `async fn` itself, inside the #[async_trait] \
             impl, with no other attribute rewriting it first",
            kind.name(),
            kind.name()
        )
    } else if output.contains("Future") {
        format!(
            "#[{}] caches `async fn`s: write `async fn {name}(…) -> T` rather than returning `impl Future<Output = T>`",
            kind.name()
        )
    } else {
        format!(
            "#[{}] applies to `async fn` only: write `async fn {name}`",
            kind.name()
        )
    };
    syn::Error::new(func.sig.fn_token.span(), message)
}

/// Cached values are stored and read back, so they cannot borrow: a `&`
/// in the stored part of the return type is an error that says so (rustc
/// would only say that `Deserialize` is not general enough).
fn check_owned(ret: &Type, span: Span, kind: Kind, errors: &mut Errors) {
    if kind == Kind::Evict {
        return;
    }
    let stored = match last_segment(ret) {
        Some(("Result", Some(ok))) => match last_segment(ok) {
            Some(("Option", Some(inner))) => inner,
            _ => ok,
        },
        Some(("Option", Some(inner))) => inner,
        _ => ret,
    };
    let tokens = quote::ToTokens::to_token_stream(stored)
        .to_string()
        .replace("& '", "&'");
    if tokens.contains('&') {
        errors.push(syn::Error::new(
            span,
            format!(
                "a cached value is stored and read back, so it must be owned: `{tokens}` borrows; return an owned type (`String` for `&str`, `Vec<T>` for `&[T]`)"
            ),
        ));
    }
}

/// `lock_ttl` and `lock_wait` need `lock = true`.
fn check_freshness_args(args: &Args, errors: &mut Errors) {
    let locked = args.lock.is_some_and(|l| l.value);
    for (name, arg) in [("lock_ttl", args.lock_ttl), ("lock_wait", args.lock_wait)] {
        if let (Some(arg), false) = (arg, locked) {
            errors.push(syn::Error::new(
                arg.span,
                format!("`{name}` only applies with `lock = true`: add `lock = true` or remove `{name}`"),
            ));
        }
    }
}

/// With `stale` or `early` the body may run as a background refresh after
/// the call returned, so what it borrows is cloned when it runs: `&self`
/// (for `Self: Clone`) and `name: &T` (to `T::Owned`, through `ToOwned`).
/// What cannot be cloned so is caught here, with a message that says what
/// to do, before rustc reports a lifetime.
fn check_refresh_ownership(args: &Args, func: &Func, errors: &mut Errors) {
    let Some(span) = args.stale.map(|s| s.span).or(args.early.map(|e| e.span)) else {
        return;
    };
    let borrowed: Vec<String> = func
        .sig
        .inputs
        .iter()
        .filter_map(|input| match input {
            FnArg::Receiver(recv) if !refresh_clones_receiver(recv) && recv.reference.is_some() => {
                Some("`self`".to_owned())
            }
            FnArg::Receiver(recv)
                if recv.colon_token.is_some() && matches!(*recv.ty, Type::Reference(_)) =>
            {
                Some("`self`".to_owned())
            }
            FnArg::Typed(typed)
                if matches!(&*typed.ty, Type::Reference(r) if !is_static(r))
                    && refresh_owned_param(typed).is_none() =>
            {
                Some(format!(
                    "`{}`",
                    quote::ToTokens::to_token_stream(&typed.pat)
                ))
            }
            _ => None,
        })
        .collect();
    if !borrowed.is_empty() {
        errors.push(syn::Error::new(
            span,
            format!(
                "`stale` and `early` refresh in the background, after the call has returned, so what the function borrows is cloned when its body runs, which {} cannot be (borrowed mutably, through a pattern or `mut`, or as a type holding references, `impl` or `dyn`); take `&self` (with `Self: Clone`) or `self: Arc<Self>`, and `name: &T` (`T: ToOwned`, `'static` once owned) or owned values instead",
                borrowed.join(", ")
            ),
        ));
    }
}

/// Whether a refresh clones this receiver: `&self`.
pub(crate) fn refresh_clones_receiver(recv: &syn::Receiver) -> bool {
    recv.reference.is_some() && recv.mutability.is_none() && recv.colon_token.is_none()
}

/// The name and borrowed type of a parameter `name: &T` that a refresh
/// clones to `T::Owned`: a plain name (not `mut`), and a `T` that is a
/// type of its own (no `impl`, `dyn`, reference or lifetime inside, which
/// its owned form could not outlive the call with). A `&'static T` needs
/// no clone: `None`, and it is not reported either.
pub(crate) fn refresh_owned_param(typed: &syn::PatType) -> Option<(&Ident, &Type)> {
    match (&*typed.pat, &*typed.ty) {
        (Pat::Ident(pat), Type::Reference(reference))
            if reference.mutability.is_none()
                && pat.by_ref.is_none()
                && pat.mutability.is_none()
                && pat.subpat.is_none()
                && !is_static(reference)
                && self_contained(&reference.elem) =>
        {
            Some((&pat.ident, &reference.elem))
        }
        _ => None,
    }
}

fn is_static(reference: &syn::TypeReference) -> bool {
    reference
        .lifetime
        .as_ref()
        .is_some_and(|lifetime| lifetime.ident == "static")
}

/// Whether `ty` names no lifetime, reference, `impl` or `dyn` inside.
fn self_contained(ty: &Type) -> bool {
    use proc_macro2::TokenTree;
    fn clean(tokens: proc_macro2::TokenStream) -> bool {
        tokens.into_iter().all(|token| match token {
            TokenTree::Punct(p) => p.as_char() != '&' && p.as_char() != '\'',
            TokenTree::Ident(i) => i != "impl" && i != "dyn",
            TokenTree::Group(g) => clean(g.stream()),
            TokenTree::Literal(_) => true,
        })
    }
    clean(quote::ToTokens::to_token_stream(ty))
}
