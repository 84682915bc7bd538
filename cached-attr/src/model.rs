//! The checked, typed description of one annotated function: what `expand`
//! needs. `valid` has found every user error before lowering here resolves
//! placeholders to parameters and builds default keys.

use proc_macro2::{Ident, Span};
use syn::spanned::Spanned;
use syn::{FnArg, Pat, ReturnType, Type};

use crate::args::{Args, Kind, Template};
use crate::batch::batch_model;
pub(crate) use crate::batch::{Batch, Collection};
use crate::errors::Errors;
use crate::item::Func;
use crate::key::Segment;
use crate::valid;

/// Which part of the return type is stored (the runtime's `Shape`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    Plain,
    Result,
    Option,
    ResultOption,
}

impl Shape {
    pub(crate) fn of(ty: &Type) -> Shape {
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

    pub(crate) fn has_absent(self) -> bool {
        matches!(self, Shape::Option | Shape::ResultOption)
    }
}

/// The last path segment's name of `ty` and its first type argument.
pub(crate) fn last_segment(ty: &Type) -> Option<(&'static str, Option<&Type>)> {
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
    /// `lock = true`, with its `lock_ttl` and `lock_wait` if given (the
    /// runtime's defaults otherwise).
    pub(crate) lock: Option<LockMs>,
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
    /// For a method `#[async_trait]` rewrote: its rewritten return type
    /// (`Pin<Box<dyn Future<Output = R> + …>>`), under which the generated
    /// body is put back into `Box::pin(async move { … })`.
    pub(crate) boxed: Option<ReturnType>,
}

/// A lock's settings in ms; `None`: the runtime's default.
pub(crate) struct LockMs {
    pub(crate) ttl: Option<u64>,
    pub(crate) wait: Option<u64>,
}

/// A named parameter of the function.
struct Param {
    ident: Ident,
    is_self: bool,
    /// The declared type; `None` for the receiver.
    ty: Option<Type>,
}

impl Model {
    /// The model of `func` under `args`, once every check passed (`None`
    /// after recording an error).
    pub(crate) fn build(
        kind: Kind,
        args: Args,
        func: Func,
        boxed: Option<ReturnType>,
        errors: &mut Errors,
    ) -> Option<Model> {
        let (ret, ret_span) = match &func.sig.output {
            ReturnType::Default => (syn::parse_quote!(()), func.sig.ident.span()),
            ReturnType::Type(_, ty) => ((**ty).clone(), ty.span()),
        };
        valid::validate(kind, &args, &func, (&ret, ret_span), errors);
        let (params, unnamed) = params(&func);
        let resolved = |template: &Template, errors: &mut Errors| {
            let segments = template.segments.as_ref()?;
            errors.ok(resolve(
                &template.lit,
                segments,
                &params,
                !unnamed.is_empty(),
            ))
        };
        let key = match &args.key {
            Some(template) => {
                resolved(template, errors).map(|parts| with_instantiation(parts, &func, &params))
            }
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
        let tags: Vec<Vec<KeyPart>> = args
            .tags
            .iter()
            .filter_map(|tag| resolved(tag, errors))
            .collect();
        let shape = Shape::of(&ret);
        let batch = args.key.as_ref().and_then(|template| {
            let segments = template.segments.as_ref()?;
            errors
                .ok(batch_model(
                    kind,
                    &args,
                    &template.lit,
                    segments,
                    &func,
                    &ret,
                    ret_span,
                ))
                .flatten()
        });
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
            lock: args.lock.filter(|l| l.value).map(|_| LockMs {
                ttl: args.lock_ttl.map(|d| millis(d.value)),
                wait: args.lock_wait.map(|d| millis(d.value)),
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
            boxed,
        })
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
