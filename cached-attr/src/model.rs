//! The checked, typed description of one annotated function: what `expand`
//! needs, with every user error found before any code is written.

use proc_macro2::{Ident, Span};
use syn::spanned::Spanned;
use syn::{FnArg, Pat, ReturnType, Type};

use crate::args::{Args, Kind};
use crate::errors::Errors;
use crate::item::Func;
use crate::key::{self, Segment};

/// Which part of the return type is stored (the runtime's `Shape`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    Plain,
    Result,
    Option,
    ResultOption,
}

impl Shape {
    fn of(ty: &Type) -> Shape {
        match last_segment(ty) {
            Some(("Result", first_arg)) => match first_arg.and_then(last_segment) {
                Some(("Option", _)) => Shape::ResultOption,
                _ => Shape::Result,
            },
            Some(("Option", _)) => Shape::Option,
            _ => Shape::Plain,
        }
    }

    pub(crate) fn runtime_name(self) -> &'static str {
        match self {
            Shape::Plain => "Plain",
            Shape::Result => "ResultOf",
            Shape::Option => "OptionOf",
            Shape::ResultOption => "ResultOptionOf",
        }
    }

    fn has_absent(self) -> bool {
        matches!(self, Shape::Option | Shape::ResultOption)
    }
}

/// The last path segment's name of `ty` and its first type argument.
fn last_segment(ty: &Type) -> Option<(&'static str, Option<&Type>)> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    let name = if last.ident == "Result" {
        "Result"
    } else if last.ident == "Option" {
        "Option"
    } else {
        return None;
    };
    let first = match &last.arguments {
        syn::PathArguments::AngleBracketed(args) => args.args.iter().find_map(|a| match a {
            syn::GenericArgument::Type(t) => Some(t),
            _ => None,
        }),
        _ => None,
    };
    Some((name, first))
}

/// A placeholder resolved to the parameter it reads.
pub(crate) struct KeyValue {
    /// The parameter's (or `self`'s) identifier, spanned at the parameter.
    pub(crate) root: Ident,
    pub(crate) fields: Vec<syn::Member>,
}

pub(crate) enum KeyPart {
    Literal(String),
    /// The element of a batch (`<ids[]>`), one key per element; the
    /// parameter, for spans.
    Element(Ident),
    /// Literal text computed at the call site: the default key's module path.
    ModulePath,
    Value(KeyValue),
    /// `#` and a digest of these type names, computed per call: what tells
    /// apart keys that would otherwise read the same (the runtime's
    /// `KeyBuilder::digest`).
    Digest(Vec<TypeName>),
}

/// A type name that goes into a key's digest.
pub(crate) enum TypeName {
    /// The function itself, instantiated: the type name of a closure in its
    /// body, a path such as `app::m::<X as app::m::Named>::name::{{closure}}`
    /// or `app::m::Table<u8>::load::{{closure}}` that names the impl block
    /// or trait impl and every generic argument, the impl's included.
    Function,
    /// A type parameter of the function.
    Param(Ident),
    /// The type of an `impl Trait` argument, which has no name to write.
    TypeOf(Ident),
}

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

pub(crate) struct Model {
    pub(crate) kind: Kind,
    pub(crate) batch: Option<Batch>,
    pub(crate) func: Func,
    pub(crate) key: Vec<KeyPart>,
    /// The rendered parts of each tag template.
    pub(crate) tags: Vec<Vec<KeyPart>>,
    pub(crate) version: Option<u32>,
    pub(crate) ttl_ms: Option<u64>,
    /// `ttl = <expression>`, evaluated per call instead of `ttl_ms`.
    pub(crate) ttl_expr: Option<syn::Expr>,
    pub(crate) cache_none_ms: Option<u64>,
    /// `(lock_ttl, lock_wait)` in ms, for `lock = true`.
    pub(crate) lock_ms: Option<(u64, u64)>,
    pub(crate) stale_ms: Option<u64>,
    pub(crate) early: Option<f64>,
    /// `near`: how long a value may be kept in the near tier.
    pub(crate) near_ms: Option<u64>,
    pub(crate) cache: Option<syn::Expr>,
    /// Whether the `cache` expression can be borrowed for the whole call
    /// rather than cloned (see [`borrowable`]).
    pub(crate) cache_borrowable: bool,
    pub(crate) krate: syn::Path,
    pub(crate) ret: Type,
    pub(crate) ret_span: Span,
    pub(crate) shape: Shape,
}

/// A named parameter of the function.
struct Param {
    ident: Ident,
    is_self: bool,
    /// The declared type; `None` for the receiver.
    ty: Option<Type>,
}

impl Model {
    pub(crate) fn build(kind: Kind, args: Args, func: Func, errors: &mut Errors) -> Option<Model> {
        let not_async = func.sig.asyncness.is_none();
        if not_async {
            errors.push(not_async_error(kind, &func));
        }
        let (params, unnamed) = params(&func);
        let key = match &args.key {
            Some(lit) => errors
                .ok(key::parse(lit))
                .and_then(|segments| {
                    errors.ok(resolve(lit, &segments, &params, !unnamed.is_empty()))
                })
                .map(|parts| with_instantiation(parts, &func, &params)),
            // An eviction of tags alone deletes no key.
            None if kind == Kind::Evict && !args.tags.is_empty() => Some(Vec::new()),
            None => {
                // The cache itself, when a parameter gives it, is no part
                // of the value's identity.
                let mut skip = args.skip.clone();
                if let Some(root) = args.cache.as_ref().and_then(place_root) {
                    if let Some(param) = params.iter().find(|p| !p.is_self && p.ident == root) {
                        skip.push(param.ident.clone());
                    }
                }
                errors.ok(default_key(&func, &params, &unnamed, &skip))
            }
        };
        if let (Some(span), Some(_)) = (args.skip_span, &args.key) {
            errors.push(syn::Error::new(
                span,
                "`skip` leaves parameters out of the default key, but this function gives `key = …`, which names the parameters it uses: remove `skip`",
            ));
        }
        let tags: Vec<Vec<KeyPart>> = args
            .tags
            .iter()
            .filter_map(|lit| {
                errors.ok(key::parse(lit)).and_then(|segments| {
                    errors.ok(resolve(lit, &segments, &params, !unnamed.is_empty()))
                })
            })
            .collect();
        let (ret, ret_span) = match &func.sig.output {
            ReturnType::Default => (syn::parse_quote!(()), func.sig.ident.span()),
            ReturnType::Type(_, ty) => ((**ty).clone(), ty.span()),
        };
        if matches!(ret, Type::ImplTrait(_)) && !not_async {
            errors.push(syn::Error::new(
                ret_span,
                "a cached function must return a concrete type that implements Serialize and Deserialize, not `impl Trait`",
            ));
        }
        check_freshness_args(&args, errors);
        // A batch stores its map's values only; its keys are the elements.
        let batched_key = args
            .key
            .as_ref()
            .and_then(|lit| key::parse(lit).ok())
            .is_some_and(|segments| segments.iter().any(is_batch));
        if !batched_key {
            check_owned(&ret, ret_span, kind, errors);
        }
        check_refresh_ownership(&args, &func, errors);
        let shape = Shape::of(&ret);
        let batched = args
            .key
            .as_ref()
            .and_then(|lit| key::parse(lit).ok())
            .is_some_and(|segments| segments.iter().any(is_batch));
        if let Some(cache_none) = &args.cache_none {
            // A batch's absent elements are those missing from its map.
            if !shape.has_absent() && !batched {
                errors.push(syn::Error::new(
                    cache_none.span,
                    "`cache_none` caches `None` results, but this function does not return an `Option` or `Result<Option<_>, _>`",
                ));
            }
        }
        let batch = args.key.as_ref().and_then(|lit| {
            let segments = key::parse(lit).ok()?;
            errors
                .ok(batch_model(
                    kind, &args, lit, &segments, &func, &ret, ret_span,
                ))
                .flatten()
        });
        for lit in &args.tags {
            if key::parse(lit).is_ok_and(|s| s.iter().any(is_batch)) {
                errors.push(syn::Error::new(
                    lit.span(),
                    "a tag cannot name a batch's elements (`<…[]>`): tag a batch by what its elements share, e.g. `tenant:<tenant>`",
                ));
            }
        }
        let key = key?;
        Some(Model {
            kind,
            batch,
            key,
            tags,
            version: args.version,
            ttl_ms: args.ttl.map(|d| millis(d.value)),
            ttl_expr: args.ttl_expr.clone(),
            cache_none_ms: args.cache_none.map(|d| millis(d.value)),
            stale_ms: args.stale.map(|d| millis(d.value)),
            early: args.early.map(|b| b.value),
            near_ms: args.near.map(|d| millis(d.value)),
            lock_ms: args.lock.filter(|l| l.value).map(|_| {
                (
                    args.lock_ttl.map_or(10_000, |d| millis(d.value)),
                    args.lock_wait.map_or(5_000, |d| millis(d.value)),
                )
            }),
            cache_borrowable: args.cache.as_ref().is_some_and(|e| borrowable(e, &func)),
            cache: args.cache,
            krate: args
                .krate
                .unwrap_or_else(|| syn::parse_quote!(::redis_cached)),
            ret,
            ret_span,
            shape,
            func,
        })
    }
}

fn is_batch(segment: &Segment) -> bool {
    matches!(segment, Segment::Placeholder { batch: true, .. })
}

/// The batch parameter of a key with `<ids[]>`, checked: one such
/// placeholder, on `#[redis_cached]`, naming a collection parameter, with a
/// return type that is a map (or a `Result` of one) keyed by its element.
fn batch_model(
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
            "#[{}] sees `{name}` after #[async_trait] rewrote it into a boxed future, and it caches `async fn`s only: \
             use a native `async fn` in the trait (Rust 1.75+) where you can; for a `dyn` trait, put the cached \
             `async fn` in an inherent impl and call it from the trait method",
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

/// Whether `expr` names a place that stays borrowed-valid while the body,
/// which moves every argument, runs: a field path of `self` under a `&self`
/// receiver, or of a parameter whose type is a shared reference. Moving a
/// shared reference copies it, so the borrow survives. Anything else (a
/// method call's temporary, `self: Arc<Self>`, an owned parameter) is
/// cloned instead.
fn borrowable(expr: &syn::Expr, func: &Func) -> bool {
    let root = match place_root(expr) {
        Some(root) => root,
        None => return false,
    };
    func.sig.inputs.iter().any(|input| match input {
        FnArg::Receiver(recv) => {
            root == "self"
                && recv.colon_token.is_none()
                && recv.reference.is_some()
                && recv.mutability.is_none()
        }
        FnArg::Typed(typed) => {
            matches!(&*typed.pat, Pat::Ident(p) if p.ident == root)
                && matches!(&*typed.ty, Type::Reference(r) if r.mutability.is_none())
        }
    })
}

/// The variable a place expression (`a`, `a.b.c`, `(a.b)`, `&a.b`) starts at.
fn place_root(expr: &syn::Expr) -> Option<String> {
    match expr {
        syn::Expr::Path(p) => p.path.get_ident().map(ToString::to_string).or_else(|| {
            (p.path.segments.len() == 1 && p.path.segments[0].ident == "self")
                .then(|| "self".to_owned())
        }),
        syn::Expr::Field(f) => place_root(&f.base),
        syn::Expr::Paren(p) => place_root(&p.expr),
        syn::Expr::Reference(r) if r.mutability.is_none() => place_root(&r.expr),
        _ => None,
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

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The named parameters, and the spans of those without a plain name.
fn params(func: &Func) -> (Vec<Param>, Vec<Span>) {
    let mut named = Vec::new();
    let mut unnamed = Vec::new();
    for input in &func.sig.inputs {
        match input {
            FnArg::Receiver(recv) => named.push(Param {
                ident: Ident::new("self", recv.self_token.span),
                is_self: true,
                ty: None,
            }),
            FnArg::Typed(typed) => match &*typed.pat {
                Pat::Ident(p) if p.subpat.is_none() => named.push(Param {
                    ident: p.ident.clone(),
                    is_self: false,
                    ty: Some((*typed.ty).clone()),
                }),
                other => unnamed.push(other.span()),
            },
        }
    }
    (named, unnamed)
}

fn resolve(
    lit: &syn::LitStr,
    segments: &[Segment],
    params: &[Param],
    patterns: bool,
) -> syn::Result<Vec<KeyPart>> {
    let mut parts = Vec::new();
    let mut errors = Errors::new();
    for segment in segments {
        match segment {
            Segment::Literal(text) => parts.push(KeyPart::Literal(text.clone())),
            Segment::Placeholder {
                root,
                fields,
                batch,
            } => {
                let Some(param) = params.iter().find(|p| p.ident == root) else {
                    let names: Vec<String> =
                        params.iter().map(|p| format!("`{}`", p.ident)).collect();
                    let mut listed = if names.is_empty() {
                        "the function has no parameters".to_owned()
                    } else {
                        format!("parameters are {}", names.join(", "))
                    };
                    if patterns {
                        listed.push_str(
                            "; a parameter written as a pattern (`(a, b): (u32, u32)`) has no name a template can use: bind it to a name (`pair: (u32, u32)`) and write `<pair.0>`",
                        );
                    }
                    if params.iter().any(|p| p.is_self) {
                        listed.push_str(&format!("; a field of `self` is written `<self.{root}>`"));
                    }
                    errors.push(syn::Error::new(
                        lit.span(),
                        format!("unknown placeholder `<{root}>` in the key template: {listed}"),
                    ));
                    continue;
                };
                if *batch {
                    if param.is_self {
                        errors.push(syn::Error::new(
                            lit.span(),
                            "`<self[]>`: a batch placeholder names a collection parameter, e.g. `<ids[]>`",
                        ));
                    } else {
                        parts.push(KeyPart::Element(param.ident.clone()));
                    }
                    continue;
                }
                if param.is_self && fields.is_empty() {
                    errors.push(syn::Error::new(
                        lit.span(),
                        "placeholder `<self>` needs a field, e.g. `<self.tenant>`",
                    ));
                    continue;
                }
                let span = param.ident.span();
                parts.push(KeyPart::Value(KeyValue {
                    root: param.ident.clone(),
                    fields: fields.iter().map(|f| field_ident(f, span)).collect(),
                }));
            }
        }
    }
    errors.finish(parts)
}

/// A field of a placeholder's path (`id`, or `0` of a tuple), spanned at
/// the parameter so that rustc's errors about it point there.
fn field_ident(field: &str, span: Span) -> syn::Member {
    match field.parse::<u32>() {
        Ok(index) => syn::Member::Unnamed(syn::Index { index, span }),
        Err(_) => syn::Member::Named(Ident::new(field, span)),
    }
}

/// `<module path>::<fn>#<digest>` then `:<arg>` for every non-self
/// argument. The digest is that of [`TypeName::Function`]: the module path
/// and name alone are shared by methods of two impl blocks, two trait impls
/// of one type, and every instantiation of a generic function.
fn default_key(
    func: &Func,
    params: &[Param],
    unnamed: &[Span],
    skip: &[Ident],
) -> syn::Result<Vec<KeyPart>> {
    for name in skip {
        if !params.iter().any(|p| !p.is_self && p.ident == *name) {
            let names: Vec<String> = params
                .iter()
                .filter(|p| !p.is_self)
                .map(|p| format!("`{}`", p.ident))
                .collect();
            return Err(syn::Error::new(
                name.span(),
                format!(
                    "`skip` names `{name}`, which is not a parameter; parameters are {}",
                    names.join(", ")
                ),
            ));
        }
    }
    if let Some(span) = unnamed.first() {
        return Err(syn::Error::new(
            *span,
            "the default key needs every argument to have a plain name: bind it to a name, or give a `key = \"…\"` template",
        ));
    }
    let mut parts = vec![
        KeyPart::ModulePath,
        KeyPart::Literal(format!("::{}", func.sig.ident)),
        KeyPart::Digest(vec![TypeName::Function]),
    ];
    for param in params
        .iter()
        .filter(|p| !p.is_self && !skip.contains(&p.ident))
    {
        parts.push(KeyPart::Literal(":".into()));
        parts.push(KeyPart::Value(KeyValue {
            root: param.ident.clone(),
            fields: Vec::new(),
        }));
    }
    Ok(parts)
}

/// An explicit key whose placeholders read a parameter of generic type (a
/// type parameter of the function, or `impl Trait`) gets a digest of the
/// instantiation's type names, at its end: `'a'` and `"a"` encode alike, so
/// without it `gen::<char>` and `gen::<String>` would share entries. Other
/// keys stay exactly as the template renders them.
///
/// Only the function's own generics can be seen here; the type parameters
/// of an enclosing `impl<T>` cannot be told from concrete types.
fn with_instantiation(mut parts: Vec<KeyPart>, func: &Func, params: &[Param]) -> Vec<KeyPart> {
    let type_params: Vec<&Ident> = func.sig.generics.type_params().map(|p| &p.ident).collect();
    let mut used: Vec<&Ident> = Vec::new();
    let mut impl_trait: Vec<&Ident> = Vec::new();
    for part in &parts {
        let KeyPart::Value(value) = part else {
            continue;
        };
        let Some(param) = params.iter().find(|p| p.ident == value.root) else {
            continue;
        };
        let Some(ty) = &param.ty else { continue };
        let mut idents = Vec::new();
        collect_idents(quote::ToTokens::to_token_stream(ty), &mut idents);
        for ident in &idents {
            if let Some(t) = type_params.iter().find(|t| **t == ident) {
                if !used.contains(t) {
                    used.push(t);
                }
            }
        }
        if idents.iter().any(|i| i == "impl") && !impl_trait.contains(&&param.ident) {
            impl_trait.push(&param.ident);
        }
    }
    // Declaration order, so the digest does not depend on the template.
    used.sort_by_key(|t| type_params.iter().position(|p| p == t));
    let names: Vec<TypeName> = used
        .into_iter()
        .map(|t| TypeName::Param(t.clone()))
        .chain(impl_trait.into_iter().map(|i| TypeName::TypeOf(i.clone())))
        .collect();
    if !names.is_empty() {
        parts.push(KeyPart::Digest(names));
    }
    parts
}

/// Every identifier in `tokens`, nested groups included.
fn collect_idents(tokens: proc_macro2::TokenStream, out: &mut Vec<Ident>) {
    for tree in tokens {
        match tree {
            proc_macro2::TokenTree::Ident(ident) => out.push(ident),
            proc_macro2::TokenTree::Group(group) => collect_idents(group.stream(), out),
            _ => {}
        }
    }
}
