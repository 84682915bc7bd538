//! `#[derive(CacheKey)]`: a key encoding for a struct or an enum, built
//! from its fields' encodings so that it is injective whenever theirs are.
//!
//! A struct is written like a sequence of its fields (`%[%,<a>%,<b>%]`), an
//! enum as its variant's name followed by its fields, if it has any
//! (`Active`, `Suspended%[%,<until>%]`): a variant's name (written without
//! `r#`) holds no `%`, so it cannot run into the `%[` that follows. With
//! `#[cache_key(transparent)]`, a struct of one field is written as that
//! field (`PlanId(7)` as `7`), as serde's `transparent` does.

use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::ext::IdentExt;
use syn::{Data, DeriveInput, Fields};

pub(crate) fn expand(input: DeriveInput) -> syn::Result<TokenStream> {
    let Options { krate, transparent } = options(&input)?;
    let name = &input.ident;
    let mut generics = input.generics.clone();
    for param in generics.type_params_mut() {
        param.bounds.push(syn::parse_quote!(#krate::CacheKey));
    }
    let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
    let out = format_ident!("__out", span = proc_macro2::Span::mixed_site());
    let body = match &input.data {
        Data::Struct(data) if transparent => {
            if data.fields.len() != 1 {
                return Err(syn::Error::new_spanned(
                    &input.ident,
                    "#[cache_key(transparent)] needs a struct of exactly one field: it is written as that field",
                ));
            }
            let field = match data.fields.iter().next().and_then(|f| f.ident.as_ref()) {
                Some(name) => quote!(#name),
                None => quote!(0),
            };
            quote!(#krate::CacheKey::write_key(&self.#field, #out);)
        }
        Data::Struct(data) => {
            let (pattern, writes) = fields(&data.fields, &krate, &out);
            quote!(let Self #pattern = self; #writes)
        }
        Data::Enum(enumeration) if transparent => {
            return Err(syn::Error::new(
                enumeration.enum_token.span,
                "#[cache_key(transparent)] applies to a struct of one field, not to an enum",
            ))
        }
        Data::Enum(data) => {
            let arms = data.variants.iter().map(|variant| {
                let ident = &variant.ident;
                let text = ident.unraw().to_string();
                if matches!(variant.fields, Fields::Unit) {
                    return quote!(Self::#ident => #out.push_str(#text),);
                }
                let (pattern, writes) = fields(&variant.fields, &krate, &out);
                quote!(Self::#ident #pattern => { #out.push_str(#text); #writes })
            });
            quote!(match self { #(#arms)* })
        }
        Data::Union(union) => {
            return Err(syn::Error::new(
                union.union_token.span,
                "#[derive(CacheKey)] applies to structs and enums: a union's value cannot be read safely",
            ))
        }
    };
    Ok(quote! {
        impl #impl_generics #krate::CacheKey for #name #ty_generics #where_clause {
            fn write_key(&self, #out: &mut ::std::string::String) {
                #body
            }
        }
        impl #impl_generics #krate::KeyAtom for #name #ty_generics #where_clause {}
    })
}

/// The pattern binding `fields` and the code writing them as a sequence.
fn fields(fields: &Fields, krate: &syn::Path, out: &syn::Ident) -> (TokenStream, TokenStream) {
    let bindings: Vec<syn::Ident> = (0..fields.len())
        .map(|n| format_ident!("__f{}", n, span = proc_macro2::Span::mixed_site()))
        .collect();
    let pattern = match fields {
        Fields::Named(named) => {
            let names = named.named.iter().map(|f| &f.ident);
            quote!({ #(#names: #bindings),* })
        }
        Fields::Unnamed(_) => quote!(( #(#bindings),* )),
        Fields::Unit => quote!(),
    };
    let writes = quote! {
        #out.push_str("%[");
        #(
            #out.push_str("%,");
            #krate::CacheKey::write_key(#bindings, #out);
        )*
        #out.push_str("%]");
    };
    (pattern, writes)
}

/// What `#[cache_key(…)]` says.
struct Options {
    /// The facade's path: `crate = "path"`, or `::redis_cached`.
    krate: syn::Path,
    /// `transparent`: a one-field struct is written as its field.
    transparent: bool,
}

fn options(input: &DeriveInput) -> syn::Result<Options> {
    let mut krate: syn::Path = syn::parse_quote!(::redis_cached);
    let mut transparent = false;
    for attr in input
        .attrs
        .iter()
        .filter(|a| a.path().is_ident("cache_key"))
    {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("crate") {
                let lit: syn::LitStr = meta.value()?.parse()?;
                krate = lit.parse()?;
                Ok(())
            } else if meta.path.is_ident("transparent") {
                transparent = true;
                Ok(())
            } else {
                Err(meta.error(
                    "unknown argument; `#[cache_key(crate = \"path\")]` and `#[cache_key(transparent)]` are the valid ones",
                ))
            }
        })?;
    }
    Ok(Options { krate, transparent })
}
