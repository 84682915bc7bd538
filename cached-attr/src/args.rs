//! Parsing the attribute's arguments: `name = value` pairs, each checked
//! for its kind of value. Every problem is collected, so one compile shows
//! them all.

use std::time::Duration;

use proc_macro2::Span;
use syn::meta::ParseNestedMeta;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, Lit, LitStr};

use crate::errors::Errors;
use crate::key::{self, Segment};

/// Which attribute is being parsed; each accepts its own set of arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Cached,
    Put,
    Evict,
}

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Cached => "redis_cached",
            Kind::Put => "cache_put",
            Kind::Evict => "cache_evict",
        }
    }

    fn valid_args(self) -> &'static [&'static str] {
        match self {
            Kind::Cached => &[
                "key",
                "ttl",
                "lock",
                "lock_ttl",
                "lock_wait",
                "stale",
                "early",
                "near",
                "cache_none",
                "version",
                "tags",
                "skip",
                "cache",
                "crate",
            ],
            Kind::Put => &[
                "key",
                "ttl",
                "cache_none",
                "version",
                "tags",
                "cache",
                "crate",
            ],
            Kind::Evict => &["key", "version", "tags", "cache", "crate"],
        }
    }
}

/// An argument's value with the span of its tokens.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WithSpan<T> {
    pub(crate) value: T,
    pub(crate) span: Span,
}

/// A key or tag template as written, parsed and checked once.
pub(crate) struct Template {
    pub(crate) lit: LitStr,
    /// Its segments; `None` when it is invalid (the error is recorded).
    pub(crate) segments: Option<Vec<Segment>>,
}

impl Template {
    fn parse(lit: LitStr, errors: &mut Errors) -> Template {
        let segments = errors.ok(key::parse(&lit));
        Template { lit, segments }
    }

    /// Whether it names a batch's elements (`<ids[]>`).
    pub(crate) fn is_batch(&self) -> bool {
        self.segments
            .as_ref()
            .is_some_and(|segments| segments.iter().any(Segment::is_batch))
    }
}

/// The parsed arguments of one attribute.
#[derive(Default)]
pub(crate) struct Args {
    pub(crate) key: Option<Template>,
    pub(crate) ttl: Option<WithSpan<Duration>>,
    /// `ttl = <expression>` (a constant, a field): evaluated per call.
    pub(crate) ttl_expr: Option<Expr>,
    pub(crate) cache_none: Option<WithSpan<Duration>>,
    pub(crate) version: Option<u32>,
    pub(crate) lock: Option<WithSpan<bool>>,
    pub(crate) lock_ttl: Option<WithSpan<Duration>>,
    pub(crate) lock_wait: Option<WithSpan<Duration>>,
    pub(crate) stale: Option<WithSpan<Duration>>,
    pub(crate) early: Option<WithSpan<f64>>,
    pub(crate) near: Option<WithSpan<Duration>>,
    pub(crate) cache: Option<Expr>,
    pub(crate) krate: Option<syn::Path>,
    /// Tag templates, each a key template.
    pub(crate) tags: Vec<Template>,
    /// `skip = [db]`: parameters left out of the default key.
    pub(crate) skip: Vec<syn::Ident>,
    pub(crate) skip_span: Option<Span>,
}

impl Args {
    /// Parses `tokens` (the inside of `#[redis_cached(...)]`), recording
    /// every problem in `errors`.
    pub(crate) fn parse(kind: Kind, tokens: proc_macro2::TokenStream, errors: &mut Errors) -> Args {
        let mut args = Args::default();
        let mut seen: Vec<String> = Vec::new();
        let parser = syn::meta::parser(|meta| args.parse_one(kind, meta, &mut seen, errors));
        if let Err(err) = syn::parse::Parser::parse2(parser, tokens) {
            errors.push(err);
        }
        args
    }

    fn parse_one(
        &mut self,
        kind: Kind,
        meta: ParseNestedMeta<'_>,
        seen: &mut Vec<String>,
        errors: &mut Errors,
    ) -> syn::Result<()> {
        let name = meta
            .path
            .get_ident()
            .map(ToString::to_string)
            .unwrap_or_else(|| quote::ToTokens::to_token_stream(&meta.path).to_string());
        let value = ungrouped(meta.value()?.parse()?);
        let valid = kind.valid_args();
        if !valid.contains(&name.as_str()) {
            let hint = format!("unknown argument `{name}` for #[{}]; ", kind.name());
            errors.push(syn::Error::new(
                meta.path.span(),
                format!("{hint}valid arguments are: {}", valid.join(", ")),
            ));
            return Ok(());
        }
        if seen.contains(&name) {
            errors.push(syn::Error::new(
                meta.path.span(),
                format!("argument `{name}` is given twice; give it once"),
            ));
            return Ok(());
        }
        seen.push(name.clone());
        match name.as_str() {
            "key" => {
                let lit = errors.ok(lit_str(&value, "key", "a template such as \"user:<id>\""));
                self.key = lit.map(|lit| Template::parse(lit, errors));
            }
            "ttl" => match &value {
                // Literals are checked here; anything else is an expression
                // of type `Duration` (or whole seconds), evaluated per call.
                Expr::Lit(_) => self.ttl = errors.ok(duration_arg(&value, "ttl")),
                _ => self.ttl_expr = Some(value),
            },
            "cache_none" => self.cache_none = errors.ok(duration_arg(&value, "cache_none")),
            "version" => self.version = errors.ok(version_arg(&value)),
            "lock" => self.lock = errors.ok(bool_arg(&value, "lock")),
            "lock_ttl" => self.lock_ttl = errors.ok(duration_arg(&value, "lock_ttl")),
            "lock_wait" => self.lock_wait = errors.ok(duration_arg(&value, "lock_wait")),
            "stale" => self.stale = errors.ok(duration_arg(&value, "stale")),
            "early" => self.early = errors.ok(beta_arg(&value)),
            "near" => self.near = errors.ok(duration_arg(&value, "near")),
            "skip" => {
                self.skip_span = Some(value.span());
                self.skip = errors.ok(skip_arg(&value)).unwrap_or_default();
            }
            "cache" => self.cache = Some(value),
            "tags" => {
                let lits = errors.ok(tags_arg(&value)).unwrap_or_default();
                self.tags = lits
                    .into_iter()
                    .map(|lit| Template::parse(lit, errors))
                    .collect();
            }
            "crate" => {
                self.krate = errors.ok(lit_str(&value, "crate", "a path such as \"my_cache\"")
                    .and_then(|lit| lit.parse::<syn::Path>()));
            }
            _ => unreachable!("every valid argument is matched above"),
        }
        Ok(())
    }
}

/// `value` without the invisible group a `macro_rules!` fragment
/// (`$k:literal`, `$t:expr`) wraps it in, nor parentheses around a literal.
fn ungrouped(value: Expr) -> Expr {
    match value {
        Expr::Group(group) => ungrouped(*group.expr),
        Expr::Paren(paren) if matches!(*paren.expr, Expr::Lit(_)) => ungrouped(*paren.expr),
        other => other,
    }
}

fn lit_str(value: &Expr, name: &str, example: &str) -> syn::Result<LitStr> {
    match value {
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => Ok(lit.clone()),
        _ => Err(syn::Error::new(
            value.span(),
            format!("`{name}` takes a string literal: {example}"),
        )),
    }
}

fn skip_arg(value: &Expr) -> syn::Result<Vec<syn::Ident>> {
    let err = || {
        syn::Error::new(
            value.span(),
            "`skip` takes an array of parameter names, e.g. `skip = [db, pool]`",
        )
    };
    let Expr::Array(array) = value else {
        return Err(err());
    };
    array
        .elems
        .iter()
        .map(|elem| match ungrouped(elem.clone()) {
            Expr::Path(path) => path.path.get_ident().cloned().ok_or_else(err),
            _ => Err(err()),
        })
        .collect()
}

fn tags_arg(value: &Expr) -> syn::Result<Vec<LitStr>> {
    let Expr::Array(array) = value else {
        return Err(syn::Error::new(
            value.span(),
            "`tags` takes an array of templates, e.g. `tags = [\"tenant:<tenant_id>\"]`",
        ));
    };
    array
        .elems
        .iter()
        .map(|elem| {
            lit_str(
                &ungrouped(elem.clone()),
                "each tag",
                "a template such as \"tenant:<tenant_id>\"",
            )
        })
        .collect()
}

fn bool_arg(value: &Expr, name: &str) -> syn::Result<WithSpan<bool>> {
    match value {
        Expr::Lit(ExprLit {
            lit: Lit::Bool(lit),
            ..
        }) => Ok(WithSpan {
            value: lit.value,
            span: lit.span,
        }),
        _ => Err(syn::Error::new(
            value.span(),
            format!("`{name}` takes `true` or `false`"),
        )),
    }
}

fn beta_arg(value: &Expr) -> syn::Result<WithSpan<f64>> {
    let beta = match value {
        Expr::Lit(ExprLit {
            lit: Lit::Float(lit),
            ..
        }) => lit.base10_parse::<f64>()?,
        Expr::Lit(ExprLit {
            lit: Lit::Int(lit), ..
        }) => lit.base10_parse::<f64>()?,
        _ => f64::NAN,
    };
    if beta.is_finite() && beta > 0.0 {
        Ok(WithSpan {
            value: beta,
            span: value.span(),
        })
    } else {
        Err(syn::Error::new(
            value.span(),
            "`early` takes a positive number, the XFetch beta (1.0 is the usual choice)",
        ))
    }
}

fn version_arg(value: &Expr) -> syn::Result<u32> {
    match value {
        Expr::Lit(ExprLit {
            lit: Lit::Int(lit), ..
        }) => lit.base10_parse::<u32>(),
        _ => Err(syn::Error::new(
            value.span(),
            "`version` takes an integer literal, e.g. `version = 2`",
        )),
    }
}

const DURATION_HELP: &str =
    "an integer number of seconds (`3600`) or a duration string such as \"90s\", \"5m\", \"1h30m\", \"500ms\" (units: ms, s, m, h, d)";

fn duration_arg(value: &Expr, name: &str) -> syn::Result<WithSpan<Duration>> {
    let span = value.span();
    let duration = match value {
        Expr::Lit(ExprLit {
            lit: Lit::Int(lit), ..
        }) => Duration::from_secs(lit.base10_parse::<u64>()?),
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => parse_duration(&lit.value()).ok_or_else(|| {
            syn::Error::new(
                span,
                format!(
                    "invalid duration {:?} for `{name}`: expected {DURATION_HELP}",
                    lit.value()
                ),
            )
        })?,
        _ => {
            return Err(syn::Error::new(
                span,
                format!("`{name}` takes {DURATION_HELP}"),
            ))
        }
    };
    if duration.is_zero() {
        return Err(syn::Error::new(
            span,
            format!("`{name}` must be greater than zero; omit it to use the cache's default"),
        ));
    }
    Ok(WithSpan {
        value: duration,
        span,
    })
}

/// Parses `1h30m`, `90s`, `500ms`, `2d`: one or more `<digits><unit>`.
pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let number: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let part = match &rest[..unit_len] {
            "ms" => Duration::from_millis(number),
            "s" => Duration::from_secs(number),
            "m" => Duration::from_secs(number.checked_mul(60)?),
            "h" => Duration::from_secs(number.checked_mul(3600)?),
            "d" => Duration::from_secs(number.checked_mul(86_400)?),
            _ => return None,
        };
        rest = &rest[unit_len..];
        total = total.checked_add(part)?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2d"), Some(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        for bad in [
            "",
            "10",
            "s",
            "1x",
            "1h 30m",
            "-1s",
            "1.5s",
            "99999999999999999999d",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
