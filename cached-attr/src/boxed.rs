//! Methods that `#[async_trait]` rewrote before this attribute saw them:
//! `async fn user(&self, id: u64) -> R` arrives as
//! `fn user<'life0, 'async_trait>(&'life0 self, id: u64) ->
//! Pin<Box<dyn Future<Output = R> + Send + 'async_trait>>` whose body is
//! `Box::pin(async move { … })`. Recognised as tracing's `#[instrument]`
//! does: the attribute works on the `async fn` it was (return type `R`,
//! body the async block's), and puts its code back inside `Box::pin(async
//! move { … })` under the rewritten signature.

use proc_macro2::{Delimiter, Group, TokenStream, TokenTree};
use syn::{GenericArgument, PathArguments, ReturnType, Type, TypeParamBound};

use crate::item::Func;

/// Turns `func` back into the `async fn` that `#[async_trait]` rewrote,
/// if it is one: its rewritten return type, to put back at expansion.
pub(crate) fn unbox(func: &mut Func) -> Option<ReturnType> {
    if func.sig.asyncness.is_some() {
        return None;
    }
    let rewritten = func
        .sig
        .generics
        .lifetimes()
        .any(|lifetime| lifetime.lifetime.ident == "async_trait");
    if !rewritten {
        return None;
    }
    let ReturnType::Type(arrow, boxed) = &func.sig.output else {
        return None;
    };
    let output = future_output(boxed)?.clone();
    let block = async_block(func.body.stream())?;
    let original = func.sig.output.clone();
    func.sig.output = ReturnType::Type(*arrow, Box::new(output));
    func.sig.asyncness = Some(syn::token::Async(func.sig.fn_token.span));
    func.body = block;
    Some(original)
}

/// `R` of `Pin<Box<dyn Future<Output = R> + …>>`.
fn future_output(ty: &Type) -> Option<&Type> {
    let pinned = only_type_arg(ty, "Pin")?;
    let Type::TraitObject(object) = only_type_arg(pinned, "Box")? else {
        return None;
    };
    object.bounds.iter().find_map(|bound| {
        let TypeParamBound::Trait(bound) = bound else {
            return None;
        };
        let last = bound.path.segments.last()?;
        if last.ident != "Future" {
            return None;
        }
        let PathArguments::AngleBracketed(args) = &last.arguments else {
            return None;
        };
        args.args.iter().find_map(|arg| match arg {
            GenericArgument::AssocType(assoc) if assoc.ident == "Output" => Some(&assoc.ty),
            _ => None,
        })
    })
}

/// The one type argument of `ty` if its last path segment is `name`.
fn only_type_arg<'t>(ty: &'t Type, name: &str) -> Option<&'t Type> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    if last.ident != name {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.first()? {
        GenericArgument::Type(inner) => Some(inner),
        _ => None,
    }
}

/// The block of a body that is exactly `Box::pin(async move { … })`.
fn async_block(body: TokenStream) -> Option<Group> {
    let tokens: Vec<TokenTree> = body.into_iter().collect();
    let [TokenTree::Ident(boxed), TokenTree::Punct(c1), TokenTree::Punct(c2), TokenTree::Ident(pin), TokenTree::Group(call)] =
        tokens.as_slice()
    else {
        return None;
    };
    if boxed != "Box" || c1.as_char() != ':' || c2.as_char() != ':' || pin != "pin" {
        return None;
    }
    if call.delimiter() != Delimiter::Parenthesis {
        return None;
    }
    let inner: Vec<TokenTree> = call.stream().into_iter().collect();
    let [TokenTree::Ident(asyncness), TokenTree::Ident(moved), TokenTree::Group(block)] =
        inner.as_slice()
    else {
        return None;
    };
    (asyncness == "async" && moved == "move" && block.delimiter() == Delimiter::Brace)
        .then(|| block.clone())
}
