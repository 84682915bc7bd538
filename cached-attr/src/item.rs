//! The annotated item, parsed only as far as the attribute needs: outer
//! attributes, visibility and signature. The body stays tokens, as
//! `#[tokio::main]` and `#[instrument]` keep it: a syntax error inside it is
//! rustc's to report at the bad token, and parsing it would only cost time.

use proc_macro2::{Group, TokenStream};
use syn::parse::{Parse, ParseStream};
use syn::{Attribute, Signature, Visibility};

/// A function whose body has not been parsed.
pub(crate) struct Func {
    pub(crate) attrs: Vec<Attribute>,
    pub(crate) vis: Visibility,
    pub(crate) sig: Signature,
    /// The body's leading inner attributes (`#![allow(…)]`). The generated
    /// function puts them at the start of its own body, where they apply to
    /// the whole function as they did before.
    pub(crate) inner_attrs: Vec<Attribute>,
    /// The body after its inner attributes, braces included, spans kept.
    pub(crate) body: Group,
}

impl Parse for Func {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let attrs = input.call(Attribute::parse_outer)?;
        let vis = input.parse()?;
        let sig = input.parse()?;
        let content;
        let brace = syn::braced!(content in input);
        let inner_attrs = content.call(Attribute::parse_inner)?;
        let rest: TokenStream = content.parse()?;
        let mut body = Group::new(proc_macro2::Delimiter::Brace, rest);
        body.set_span(brace.span.join());
        Ok(Func {
            attrs,
            vis,
            sig,
            inner_attrs,
            body,
        })
    }
}
