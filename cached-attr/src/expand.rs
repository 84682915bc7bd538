//! Code generation: the user's function, signature and attributes as
//! written, with its body wrapped in a call to the runtime.
//!
//! ```text
//! async fn get_user(&self, id: u64) -> R {
//!     #![inner attributes of the body]
//!     let __cache = <the cache>;
//!     let __key = <the rendered key>;          // before the body moves the arguments
//!     let __body = async move { let __ret: R = <body>; __ret };
//!     ::redis_cached::__private::cached::<Shape, R, _>(__cache, __key, policy, __body,
//!         /* how a hit in this process is served: see the runtime's `Probe` */).await
//! }
//! ```

use proc_macro2::{Ident, Span, TokenStream};
use quote::{quote, quote_spanned, ToTokens};

use crate::args::Kind;
use crate::model::{Batch, Collection, KeyPart, Model, TypeName};

fn local(name: &str) -> Ident {
    Ident::new(name, Span::mixed_site())
}

pub(crate) fn expand(model: &Model) -> TokenStream {
    if let Some(batch) = &model.batch {
        return expand_batch(model, batch);
    }
    let krate = &model.krate;
    let private = quote!(#krate::__private);
    let func = &model.func;
    let (inner_attrs, block) = (&func.inner_attrs, &func.body);
    let ret = &model.ret;
    let (cache, key, body) = (local("__cache"), local("__key"), local("__body"));
    let ret_local = local("__ret");

    let cache_expr = cache_expr(model, &private);
    let ttl_binding = ttl_binding(model, &private);
    let key_expr = render(&model.key, model.version, &private);
    let tags = local("__tags");
    let tag_exprs = model.tags.iter().map(|tag| render(tag, None, &private));
    let tag_count = model.tags.len();
    let call = match model.kind {
        Kind::Cached | Kind::Put => {
            let shape = Ident::new(model.shape.runtime_name(), model.ret_span);
            let refreshing = model.stale_ms.is_some() || model.early.is_some();
            let entry = match (model.kind, refreshing, model.near_ms.is_some()) {
                // Its body may run as a background refresh.
                (Kind::Cached, true, false) => "cached_refreshing",
                (Kind::Cached, true, true) => "cached_refreshing_near",
                (Kind::Cached, false, false) => "cached",
                (Kind::Cached, false, true) => "cached_near",
                _ => "put",
            };
            // A refreshing call takes a maker and its future.
            let infer = vec![
                quote!(_);
                if refreshing && model.kind == Kind::Cached {
                    2
                } else {
                    1
                }
            ];
            let entry = Ident::new(entry, model.ret_span);
            let policy = policy(model);
            let tags_arg = quote!(&#tags,);
            // Spanned at the return type, path included: an unserializable
            // value is reported there, and only there.
            let private = respan(private.clone(), model.ret_span);
            // How a hit in this process is served: picked by what the value
            // type implements (see the runtime's `Probe`).
            let hit_path = (entry == "cached").then(|| {
                quote_spanned!(model.ret_span=> , {
                    // One of the two is used.
                    #[allow(unused_imports)]
                    use #private::{CloneHit as _, DecodeHit as _};
                    (&&#private::Probe::<#private::#shape, #ret>::new()).hit_path()
                })
            });
            quote_spanned!(model.ret_span=>
                #private::#entry::<#private::#shape, #ret, #(#infer),*>(#cache.get(), #key, #tags_arg #policy, #body #hit_path).await
            )
        }
        Kind::Evict => {
            let succeeded = if model.shape == crate::model::Shape::Plain
                || model.shape == crate::model::Shape::Option
            {
                quote!(#private::always)
            } else {
                quote!(#private::is_ok)
            };
            let key = if model.key.is_empty() {
                quote!(::core::option::Option::None)
            } else {
                quote!(::core::option::Option::Some(#key))
            };
            let site = local("__SITE");
            quote!(#private::evict::<#ret, _>(#cache.get(), &#site, #key, &#tags, #succeeded, #body).await)
        }
    };

    let site = site_static(&private);
    let refreshing =
        model.kind == Kind::Cached && (model.stale_ms.is_some() || model.early.is_some());
    let body_binding = if refreshing {
        refresh_maker(model, &body, &ret_local)
    } else {
        quote! {
            let #body = async move {
                let #ret_local: #ret = #block;
                #ret_local
            };
        }
    };
    let body = quote! {
        #site
        let #cache = #cache_expr;
        #ttl_binding
        let #key = #key_expr;
        let #tags: [::std::string::String; #tag_count] = [#(#tag_exprs),*];
        #body_binding
        #call
    };
    function(model, quote!(#(#inner_attrs)*), body)
}

/// The function as written, around the generated `body`: for a method
/// `#[async_trait]` rewrote, under its rewritten signature and inside
/// `Box::pin(async move { … })`, as `#[async_trait]` made it.
fn function(model: &Model, inner_attrs: TokenStream, body: TokenStream) -> TokenStream {
    let func = &model.func;
    let (attrs, vis) = (&func.attrs, &func.vis);
    match &model.boxed {
        None => {
            let sig = &func.sig;
            quote! {
                #(#attrs)*
                #vis #sig {
                    #inner_attrs
                    #body
                }
            }
        }
        Some(output) => {
            let mut sig = func.sig.clone();
            sig.asyncness = None;
            sig.output = output.clone();
            quote! {
                #(#attrs)*
                #vis #sig {
                    #inner_attrs
                    ::std::boxed::Box::pin(async move {
                        #body
                    })
                }
            }
        }
    }
}

/// The body of a `stale`/`early` function, as a maker of its future: the
/// future must be `'static` (it may run as a background refresh), so the
/// maker clones what the function borrows, `&self` (`Self: Clone`) and
/// each `name: &T` (to `T::Owned`), and the body sees them under the same
/// names and types. Made only when the body runs: a hit that needs no
/// refresh clones nothing.
///
/// ```text
/// let __body = move || {
///     let __this = Clone::clone(self);
///     let __owned_name = ToOwned::to_owned(name);
///     async move {
///         let __self: &Self = &__this;
///         let name: &T = Borrow::borrow(&__owned_name);
///         let __ret: R = <body, `self` read as `__self`>;
///         __ret
///     }
/// };
/// ```
fn refresh_maker(model: &Model, body: &Ident, ret_local: &Ident) -> TokenStream {
    let ret = &model.ret;
    let (this, alias) = (local("__this"), local("__self"));
    let mut clones = Vec::new();
    let mut rebinds = Vec::new();
    let mut rewrite_self = false;
    for input in &model.func.sig.inputs {
        match input {
            syn::FnArg::Receiver(recv) if crate::valid::refresh_clones_receiver(recv) => {
                rewrite_self = true;
                let span = recv.self_token.span;
                let krate = &model.krate;
                clones.push(
                    quote_spanned!(span=> let #this = #krate::__private::refresh_self(self);),
                );
                rebinds.push(quote!(let #alias = &#this;));
            }
            syn::FnArg::Typed(typed) => {
                if let Some((name, elem)) = crate::valid::refresh_owned_param(typed) {
                    let owned = local(&format!("__owned_{}", syn::ext::IdentExt::unraw(name)));
                    let span = syn::spanned::Spanned::span(&typed.ty);
                    clones.push(quote_spanned!(span=> let #owned = ::std::borrow::ToOwned::to_owned(#name);));
                    // Allowed unused: the key may be all that reads it.
                    rebinds.push(quote! {
                        #[allow(unused_variables)]
                        let #name: &#elem = ::core::borrow::Borrow::borrow(&#owned);
                    });
                }
            }
            _ => {}
        }
    }
    let block = model.func.body.to_token_stream();
    let block = if rewrite_self {
        replace_self(block, &alias)
    } else {
        block
    };
    quote! {
        let #body = move || {
            #(#clones)*
            async move {
                #(#rebinds)*
                let #ret_local: #ret = #block;
                #ret_local
            }
        };
    }
}

/// `tokens` with each `self` read as `alias`, but for those that are not
/// the function's: in a path (`self::…`), a `use` declaration (`use
/// std::fmt::{self, Write}`), a visibility (`pub(self)`), and anywhere in a
/// nested item (`fn`, `impl`, `trait`, `mod`), up to its body.
fn replace_self(tokens: TokenStream, alias: &Ident) -> TokenStream {
    use proc_macro2::TokenTree;
    let mut out = Vec::new();
    let mut tokens = tokens.into_iter().peekable();
    while let Some(token) = tokens.next() {
        let verbatim_until = match &token {
            TokenTree::Ident(ident) if ident == "use" => Some(Until::Semicolon),
            TokenTree::Ident(ident) if ident == "pub" => {
                // `pub(self)`, `pub(in self::a)`: the group alone.
                matches!(tokens.peek(), Some(TokenTree::Group(g)) if g.delimiter() == proc_macro2::Delimiter::Parenthesis)
                    .then_some(Until::Group)
            }
            TokenTree::Ident(ident)
                if ident == "fn" || ident == "impl" || ident == "trait" || ident == "mod" =>
            {
                Some(Until::Braces)
            }
            _ => None,
        };
        if let Some(until) = verbatim_until {
            out.push(token);
            for next in tokens.by_ref() {
                let end = match (&next, until) {
                    (TokenTree::Punct(p), Until::Semicolon) => p.as_char() == ';',
                    (TokenTree::Group(_), Until::Group) => true,
                    (TokenTree::Group(g), Until::Braces) => {
                        g.delimiter() == proc_macro2::Delimiter::Brace
                    }
                    (TokenTree::Punct(p), Until::Braces) => p.as_char() == ';',
                    _ => false,
                };
                out.push(next);
                if end {
                    break;
                }
            }
            continue;
        }
        out.push(match token {
            TokenTree::Ident(ident) if ident == "self" => {
                let path = matches!(tokens.peek(), Some(TokenTree::Punct(p)) if p.as_char() == ':');
                if path {
                    TokenTree::Ident(ident)
                } else {
                    let mut alias = alias.clone();
                    alias.set_span(alias.span().located_at(ident.span()));
                    TokenTree::Ident(alias)
                }
            }
            TokenTree::Group(group) => {
                let mut replaced =
                    proc_macro2::Group::new(group.delimiter(), replace_self(group.stream(), alias));
                replaced.set_span(group.span());
                TokenTree::Group(replaced)
            }
            other => other,
        });
    }
    out.into_iter().collect()
}

/// Where a stretch of tokens copied as they are ends.
#[derive(Clone, Copy)]
enum Until {
    Semicolon,
    Group,
    Braces,
}

/// The function's own counters: a `static` in its body, named (at run
/// time) by the type name of a closure in it, which includes the `impl`'s
/// type.
fn site_static(private: &TokenStream) -> TokenStream {
    let site = local("__SITE");
    quote!(static #site: #private::Site = #private::Site::new(|| ::core::any::type_name_of_val(&|| ()));)
}

/// `let __ttl = …;` for `ttl = <expression>`, before the body moves the
/// arguments the expression may read; spanned at the expression, so a value
/// of the wrong type is reported there.
fn ttl_binding(model: &Model, private: &TokenStream) -> TokenStream {
    let Some(expr) = &model.ttl_expr else {
        return TokenStream::new();
    };
    let ttl = local("__ttl");
    let span = syn::spanned::Spanned::span(expr);
    let ttl_fn = respan(quote!(#private::ttl), span);
    quote_spanned!(span=> let #ttl: ::core::time::Duration = #ttl_fn(#expr);)
}

/// The expression of the cache a call uses.
fn cache_expr(model: &Model, private: &TokenStream) -> TokenStream {
    match &model.cache {
        Some(expr) => {
            let span = syn::spanned::Spanned::span(expr);
            if model.cache_borrowable {
                // `&self.cache` is borrowed as the place `self.cache`: a
                // reference to a fresh `&Cache` would not outlive the statement.
                let mut place = expr;
                while let syn::Expr::Reference(r) = place {
                    place = &r.expr;
                }
                quote_spanned!(span=> #private::cache_ref(&(#place)))
            } else {
                quote_spanned!(span=> #private::cache_of(&(#expr)))
            }
        }
        None => quote!(#private::global_cache()),
    }
}

/// A batch function (`<ids[]>`): the elements' keys are rendered before the
/// body moves the arguments; the body becomes a closure of the missing
/// elements, bound to the parameter's name as the parameter's type.
///
/// ```text
/// let __elements: Vec<(K, String)> = ids.iter().map(|__e| (__e.clone(), <key of __e>)).collect();
/// ::redis_cached::__private::cached_batch::<Shape, R, K, V, _, _>(__cache, __elements, tags, policy,
///     move |__missing| async move { let ids: Vec<K> = __missing.into_iter().collect(); <body> }).await
/// ```
fn expand_batch(model: &Model, batch: &Batch) -> TokenStream {
    let krate = &model.krate;
    let private = quote!(#krate::__private);
    let site = site_static(&private);
    let func = &model.func;
    let (inner_attrs, block) = (&func.inner_attrs, &func.body);
    let ret = &model.ret;
    let (cache, tags) = (local("__cache"), local("__tags"));
    let (elements, element, missing) = (local("__elements"), local("__e"), local("__missing"));
    let (owned, ret_local) = (local("__owned"), local("__ret"));
    let cache_expr = cache_expr(model, &private);
    let ttl_binding = ttl_binding(model, &private);
    let key_expr = render(&model.key, model.version, &private);
    let tag_exprs = model.tags.iter().map(|tag| render(tag, None, &private));
    let tag_count = model.tags.len();
    let (param, pat, ty) = (&batch.param, &batch.pat, &batch.ty);
    let (elem, value) = (&batch.element, &batch.value);
    // The reference rebinding carries no type: a named lifetime in the
    // parameter's type (`&'a [u64]`) would outlive the local it borrows.
    let rebind = match &batch.collection {
        Collection::Owned => quote!(
            let #pat: #ty = ::core::iter::FromIterator::from_iter(#missing);
        ),
        Collection::Slice => quote!(
            let #owned: ::std::vec::Vec<#elem> = #missing;
            let #pat = &#owned[..];
        ),
        Collection::Borrowed(inner) => quote!(
            let #owned: #inner = ::core::iter::FromIterator::from_iter(#missing);
            let #pat = &#owned;
        ),
    };
    // The signature's `mut ids` is for the body, which gets its own `ids`.
    let used_mut = match pat {
        syn::Pat::Ident(p) if p.mutability.is_some() => quote!(let _ = &mut #param;),
        _ => TokenStream::new(),
    };
    let shape = Ident::new(
        if batch.result { "ResultMapOf" } else { "MapOf" },
        model.ret_span,
    );
    let policy = policy(model);
    // Spanned at the return type: a value type that cannot be stored is
    // reported there.
    let private_at_ret = respan(private.clone(), model.ret_span);
    // The closure's parameter is typed by `cached_batch`'s bounds, not
    // written: an element type with an elided lifetime (`&str`) would make
    // a written one higher-ranked.
    let call = quote_spanned!(model.ret_span=>
        #private_at_ret::cached_batch::<#private_at_ret::#shape, #ret, #elem, #value, _, _>(
            #cache.get(), #elements, &#tags, #policy,
            move |#missing| async move {
                #rebind
                let #ret_local: #ret = #block;
                #ret_local
            },
        ).await
    );
    let body = quote! {
        #used_mut
        #site
        let #cache = #cache_expr;
        #ttl_binding
        let #tags: [::std::string::String; #tag_count] = [#(#tag_exprs),*];
        let #elements: ::std::vec::Vec<(#elem, ::std::string::String)> = ::core::iter::Iterator::collect(
            ::core::iter::Iterator::map(#param.iter(), |#element| {
                (::core::clone::Clone::clone(#element), #key_expr)
            }),
        );
        #call
    };
    function(model, quote!(#(#inner_attrs)*), body)
}

/// `tokens` with every span set to `span`.
fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut tree| {
            if let proc_macro2::TokenTree::Group(group) = &tree {
                let mut inner =
                    proc_macro2::Group::new(group.delimiter(), respan(group.stream(), span));
                inner.set_span(span);
                tree = proc_macro2::TokenTree::Group(inner);
            } else {
                tree.set_span(span);
            }
            tree
        })
        .collect()
}

/// The expression that renders a key (or tag) template.
fn render(parts: &[KeyPart], version: Option<u32>, private: &TokenStream) -> TokenStream {
    let builder = local("__k");
    let capacity: usize = parts
        .iter()
        .map(|p| match p {
            KeyPart::Literal(text) => text.len(),
            KeyPart::Element(_) => 16,
            KeyPart::ModulePath => 32,
            KeyPart::Value(_) => 16,
            KeyPart::Digest(_) => 17,
        })
        .sum();
    let pushes = parts.iter().map(|part| match part {
        KeyPart::Literal(text) => quote!(#builder.literal(#text);),
        KeyPart::Element(param) => {
            let element = local("__e");
            // Spanned at the parameter: an element type without `CacheKey`
            // is reported there.
            // (`__e` itself is the macro's; the call around it is the
            // parameter's.)
            quote_spanned!(param.span()=> #private::KeyBuilder::value(&mut #builder, ::core::convert::identity(#element));)
        }
        KeyPart::ModulePath => quote!(#builder.literal(::core::module_path!());),
        KeyPart::Value(value) => {
            let root = &value.root;
            let fields = &value.fields;
            let span = root.span();
            // Spanned at the parameter: a type without `CacheKey`, or a
            // field that does not exist, is reported there.
            quote_spanned!(span=> #private::KeyBuilder::value(&mut #builder, &#root #(.#fields)*);)
        }
        KeyPart::Digest(names) => {
            let names = names.iter().map(|name| match name {
                // A closure's type is generic over everything the function
                // is: its name is the function's path, instantiated.
                TypeName::Function => quote!(::core::any::type_name_of_val(&|| ())),
                TypeName::Param(ty) => quote!(::core::any::type_name::<#ty>()),
                TypeName::TypeOf(value) => quote!(#private::KeyBuilder::type_name_of(&#value)),
            });
            quote!(#builder.digest(&[#(#names),*]);)
        }
    });
    let version = match version {
        Some(v) => quote!(::core::option::Option::Some(#v)),
        None => quote!(::core::option::Option::None),
    };
    quote!({
        let mut #builder = #private::KeyBuilder::with_capacity(#capacity);
        #(#pushes)*
        #builder.finish(#version)
    })
}

fn policy(model: &Model) -> TokenStream {
    let krate = &model.krate;
    let duration = |ms: Option<u64>| match ms {
        Some(ms) => quote!(::core::option::Option::Some(::core::time::Duration::from_millis(#ms))),
        None => quote!(::core::option::Option::None),
    };
    let ttl = match &model.ttl_expr {
        Some(_) => {
            let ttl = local("__ttl");
            quote!(::core::option::Option::Some(#ttl))
        }
        None => duration(model.ttl_ms),
    };
    let cache_none = duration(model.cache_none_ms);
    let lock = match &model.lock {
        Some(lock) => {
            let setting = |ms: Option<u64>, default: TokenStream| match ms {
                Some(ms) => quote!(::core::time::Duration::from_millis(#ms)),
                None => quote!(#krate::__private::LockPolicy::#default),
            };
            let ttl = setting(lock.ttl, quote!(DEFAULT_TTL));
            let wait = setting(lock.wait, quote!(DEFAULT_WAIT));
            quote!(::core::option::Option::Some(#krate::__private::LockPolicy {
                ttl: #ttl,
                wait: #wait,
            }))
        }
        None => quote!(::core::option::Option::None),
    };
    let stale = duration(model.stale_ms);
    let near = duration(model.near_ms);
    let early = match model.early {
        Some(beta) => quote!(::core::option::Option::Some(#beta)),
        None => quote!(::core::option::Option::None),
    };
    let site = local("__SITE");
    quote!(#krate::__private::Policy {
        ttl: #ttl,
        cache_none: #cache_none,
        lock: #lock,
        stale: #stale,
        early: #early,
        near: #near,
        site: ::core::option::Option::Some(&#site),
    })
}
