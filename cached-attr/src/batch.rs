//! Lowering a batch function, one with `<ids[]>` in its key: its
//! collection parameter, element and map, each checked against the others.

use proc_macro2::{Ident, Span};
use syn::spanned::Spanned;
use syn::{FnArg, Pat, Type};

use crate::args::{Args, Kind};
use crate::errors::Errors;
use crate::item::Func;
use crate::key::Segment;
use crate::model::last_segment;

/// A batch function: `<ids[]>` in its key.
pub(crate) struct Batch {
    /// The collection parameter, as the body names it.
    pub(crate) param: Ident,
    /// Its pattern (`ids`, `mut ids`) and type, to bind the missing
    /// elements as the body expects them.
    pub(crate) pat: syn::Pat,
    pub(crate) ty: Type,
    pub(crate) collection: Collection,
    pub(crate) element: Type,
    /// The map's value type.
    pub(crate) value: Type,
    /// `Result<map, E>` rather than the map.
    pub(crate) result: bool,
}

/// How a batch parameter holds its elements.
pub(crate) enum Collection {
    /// `Vec<K>`, `HashSet<K>`, `BTreeSet<K>`, `VecDeque<K>`: built from the
    /// missing elements.
    Owned,
    /// `&[K]`: a slice of a vector of the missing elements.
    Slice,
    /// `&Vec<K>` and the like: a reference to one built from them.
    Borrowed(Box<Type>),
}

/// The batch parameter of a key with `<ids[]>`, checked: one such
/// placeholder, on `#[redis_cached]`, naming a collection parameter, with a
/// return type that is a map (or a `Result` of one) keyed by its element.
pub(crate) fn batch_model(
    kind: Kind,
    args: &Args,
    lit: &syn::LitStr,
    segments: &[Segment],
    func: &Func,
    ret: &Type,
    ret_span: Span,
) -> syn::Result<Option<Batch>> {
    let roots: Vec<&String> = segments
        .iter()
        .filter_map(|s| match s {
            Segment::Placeholder {
                root, batch: true, ..
            } => Some(root),
            _ => None,
        })
        .collect();
    let root = match roots.as_slice() {
        [] => return Ok(None),
        [root] => *root,
        _ => {
            return Err(syn::Error::new(
                lit.span(),
                "a key template can have one batch placeholder (`<…[]>`): a batch is over one collection",
            ))
        }
    };
    if kind != Kind::Cached {
        return Err(syn::Error::new(
            lit.span(),
            format!(
                "#[{}] writes one key: name one element, e.g. `key = \"user:<user.id>\"`; a batch placeholder (`<{root}[]>`) applies to #[redis_cached]",
                kind.name()
            ),
        ));
    }
    let mut errors = Errors::new();
    for (name, given) in [
        ("lock", args.lock.is_some_and(|l| l.value).then_some(())),
        ("stale", args.stale.map(|_| ())),
        ("early", args.early.map(|_| ())),
        ("near", args.near.map(|_| ())),
    ] {
        if given.is_some() {
            errors.push(syn::Error::new(
                lit.span(),
                format!(
                    "`{name}` is not available on a batch (`<{root}[]>`): {}",
                    match name {
                        "lock" => "a batch would hold one lock per element and wait for other processes element by element; concurrent calls in this process still share each element's computation",
                        "near" => "the near tier keeps single values; a batch reads its elements in one round trip already",
                        _ => "a batch has no single value to refresh in the background",
                    }
                ),
            ));
        }
    }
    let typed = func.sig.inputs.iter().find_map(|input| match input {
        FnArg::Typed(typed) => match &*typed.pat {
            Pat::Ident(p) if p.ident == root => Some(typed),
            _ => None,
        },
        FnArg::Receiver(_) => None,
    });
    let Some(typed) = typed else {
        // `resolve` reports the unknown placeholder.
        return errors.finish(None);
    };
    let Some((collection, element)) = collection_of(&typed.ty) else {
        errors.push(syn::Error::new(
            typed.ty.span(),
            format!(
                "`<{root}[]>` marks a batch parameter, so `{root}` must be a collection of elements: `Vec<K>`, `&[K]`, `HashSet<K>`, `BTreeSet<K>` or `VecDeque<K>`"
            ),
        ));
        return errors.finish(None);
    };
    let (result, map) = match last_segment(ret) {
        Some(("Result", Some(map))) => (true, map),
        _ => (false, ret),
    };
    let Some((map_key, value)) = map_types(map) else {
        errors.push(syn::Error::new(
            ret_span,
            format!(
                "a batch function returns a map from each element to its value: `HashMap<{}, V>` or `BTreeMap<{}, V>`, or a `Result` of one",
                tokens(&element),
                tokens(&element)
            ),
        ));
        return errors.finish(None);
    };
    // Compared by their last path segment (`crate::UserId` is `UserId`);
    // rustc checks the rest.
    if last_name(map_key) != last_name(&element) {
        errors.push(syn::Error::new(
            ret_span,
            format!(
                "the map's key type `{}` must be the element type of `{root}`: `{}`",
                tokens(map_key),
                tokens(&element)
            ),
        ));
    }
    let batch = Batch {
        param: match &*typed.pat {
            Pat::Ident(p) => p.ident.clone(),
            _ => unreachable!("matched above"),
        },
        pat: (*typed.pat).clone(),
        ty: (*typed.ty).clone(),
        collection,
        element,
        value: value.clone(),
        result,
    };
    errors.finish(Some(batch))
}

fn last_name(ty: &Type) -> String {
    match ty {
        Type::Path(path) => path
            .path
            .segments
            .last()
            .map(|last| quote::ToTokens::to_token_stream(last).to_string())
            .unwrap_or_default(),
        other => tokens(other),
    }
}

fn tokens(ty: &Type) -> String {
    quote::ToTokens::to_token_stream(ty).to_string()
}

/// The collection kind and element type of a batch parameter's type.
fn collection_of(ty: &Type) -> Option<(Collection, Type)> {
    match ty {
        Type::Reference(r) if r.mutability.is_none() => match &*r.elem {
            Type::Slice(slice) => Some((Collection::Slice, (*slice.elem).clone())),
            owned => {
                let element = owned_element(owned)?;
                Some((Collection::Borrowed(Box::new(owned.clone())), element))
            }
        },
        Type::Paren(p) => collection_of(&p.elem),
        owned => Some((Collection::Owned, owned_element(owned)?)),
    }
}

/// `K` of `Vec<K>`, `HashSet<K, S>`, `BTreeSet<K>`, `VecDeque<K>`.
fn owned_element(ty: &Type) -> Option<Type> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    if !["Vec", "HashSet", "BTreeSet", "VecDeque"]
        .iter()
        .any(|name| last.ident == name)
    {
        return None;
    }
    first_type_args(&last.arguments).into_iter().next()
}

/// `(K, V)` of `HashMap<K, V, S>` or `BTreeMap<K, V>`.
fn map_types(ty: &Type) -> Option<(&Type, &Type)> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    if last.ident != "HashMap" && last.ident != "BTreeMap" {
        return None;
    }
    let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    let mut types = args.args.iter().filter_map(|a| match a {
        syn::GenericArgument::Type(t) => Some(t),
        _ => None,
    });
    Some((types.next()?, types.next()?))
}

fn first_type_args(arguments: &syn::PathArguments) -> Vec<Type> {
    match arguments {
        syn::PathArguments::AngleBracketed(args) => args
            .args
            .iter()
            .filter_map(|a| match a {
                syn::GenericArgument::Type(t) => Some(t.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}
