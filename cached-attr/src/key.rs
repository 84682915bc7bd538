//! Parsing and checking key templates: `"user:<id>"`, `"order:<o.id>:{tenant:<t>}"`.
//!
//! A template is literal text and `<path>` placeholders. The checks here make
//! the rendered key injective and well formed: placeholders are non-empty
//! paths, every pair of placeholders is separated by a byte that no encoded
//! value contains, literal text has no whitespace or control characters, and
//! `{…}` hash tags are closed and non-empty. `~` is the runtime's: its own
//! keys (locks, tag bookkeeping, shortened keys) carry it, so templates may
//! not.

use syn::LitStr;

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    Literal(String),
    /// `<root.field.field>`: a parameter (or `self`) and a field path;
    /// `<root[]>` (`batch`): each element of a collection parameter.
    Placeholder {
        root: String,
        fields: Vec<String>,
        batch: bool,
    },
}

impl Segment {
    /// Whether it is a batch placeholder (`<ids[]>`).
    pub(crate) fn is_batch(&self) -> bool {
        matches!(self, Segment::Placeholder { batch: true, .. })
    }
}

/// Bytes an encoded placeholder value may contain (see the runtime's key
/// encoding: the safe bytes, `%` escapes, and the `[`, `,` and `]` that
/// sequences write, which a hand-written `CacheKey` impl may write bare);
/// a separator needs a byte outside this set.
fn in_value_alphabet(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '%' | '[' | ',' | ']')
}

/// Parses the template in `lit`; errors point at the literal.
pub(crate) fn parse(lit: &LitStr) -> syn::Result<Vec<Segment>> {
    let text = lit.value();
    let err = |msg: String| syn::Error::new(lit.span(), msg);
    if text.is_empty() {
        return Err(err(
            "empty key template: write e.g. `key = \"user:<id>\"`".into()
        ));
    }
    let mut segments = Vec::new();
    let mut literal = String::new();
    let mut chars = text.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            '<' => {
                let mut inner = String::new();
                let closed = loop {
                    match chars.next() {
                        Some((_, '>')) => break true,
                        Some((_, '<')) | None => break false,
                        Some((_, c)) => inner.push(c),
                    }
                };
                if !closed {
                    return Err(err(format!(
                        "unclosed `<` at byte {at} of the key template: write placeholders as `<name>`"
                    )));
                }
                if inner.is_empty() {
                    return Err(err(format!(
                        "empty placeholder `<>` at byte {at} of the key template: name a parameter, e.g. `<id>`"
                    )));
                }
                if !literal.is_empty() {
                    segments.push(Segment::Literal(std::mem::take(&mut literal)));
                }
                segments.push(placeholder(&inner).ok_or_else(|| {
                    err(format!(
                        "placeholder `<{inner}>` is not a parameter name, a field path such as `<user.id>`, or a batch parameter such as `<ids[]>`"
                    ))
                })?);
            }
            '>' => {
                return Err(err(format!(
                    "stray `>` at byte {at} of the key template: placeholders are written `<name>`"
                )))
            }
            '~' => {
                return Err(err(format!(
                    "`~` at byte {at} of the template is reserved for the runtime's own keys (locks, tag bookkeeping, shortened keys), so that no template can reach them: use another separator such as `:`, `/` or `|`"
                )))
            }
            c if c.is_whitespace() || c.is_control() => {
                return Err(err(format!(
                    "the key template has whitespace or a control character at byte {at}: keys use printable text such as `user:<id>`"
                )))
            }
            c => literal.push(c),
        }
    }
    if !literal.is_empty() {
        segments.push(Segment::Literal(literal));
    }
    check_separators(&segments).map_err(err)?;
    check_hash_tags(&text).map_err(err)?;
    Ok(segments)
}

fn placeholder(inner: &str) -> Option<Segment> {
    if let Some(root) = inner.strip_suffix("[]") {
        return is_ident(root).then(|| Segment::Placeholder {
            root: root.to_owned(),
            fields: Vec::new(),
            batch: true,
        });
    }
    let mut parts = inner.split('.');
    let root = parts.next().filter(|r| is_ident(r))?.to_owned();
    let fields: Vec<String> = parts.map(str::to_owned).collect();
    let field_ok =
        |f: &String| is_ident(f) || (!f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()));
    fields.iter().all(field_ok).then_some(Segment::Placeholder {
        root,
        fields,
        batch: false,
    })
}

fn is_ident(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && s != "_"
}

/// Between any two placeholders there must be literal text with a byte that
/// no encoded value contains, so the key can be split back into its values.
fn check_separators(segments: &[Segment]) -> Result<(), String> {
    let mut previous: Option<&Segment> = None;
    let mut separated = true;
    for segment in segments {
        match segment {
            Segment::Literal(text) => {
                separated |= text.chars().any(|c| !in_value_alphabet(c));
            }
            Segment::Placeholder { .. } => {
                if let (Some(prev), false) = (previous, separated) {
                    return Err(format!(
                        "placeholders {} and {} have no separator between them: put literal text with a character other than letters, digits, `-`, `_`, `.`, `%`, `[`, `,` and `]` between them, e.g. `{}:{}`",
                        display(prev),
                        display(segment),
                        display(prev),
                        display(segment),
                    ));
                }
                previous = Some(segment);
                separated = false;
            }
        }
    }
    Ok(())
}

fn display(segment: &Segment) -> String {
    match segment {
        Segment::Literal(text) => text.clone(),
        Segment::Placeholder {
            root,
            fields,
            batch,
        } => {
            let mut s = format!("<{root}");
            for f in fields {
                s.push('.');
                s.push_str(f);
            }
            if *batch {
                s.push_str("[]");
            }
            s.push('>');
            s
        }
    }
}

/// `{…}` is a Redis Cluster hash tag: it must close, hold something, and not nest.
fn check_hash_tags(text: &str) -> Result<(), String> {
    let mut open: Option<usize> = None;
    for (at, c) in text.char_indices() {
        match (c, open) {
            ('{', None) => open = Some(at),
            ('{', Some(_)) => return Err(format!("nested `{{` at byte {at}: a hash tag `{{…}}` cannot contain another")),
            ('}', None) => return Err(format!("`}}` at byte {at} closes no `{{`: a hash tag is written `{{…}}`")),
            ('}', Some(start)) if at == start + 1 => {
                return Err(format!("empty hash tag `{{}}` at byte {start}: put the shared part inside, e.g. `{{user:<id>}}`"))
            }
            ('}', Some(_)) => open = None,
            _ => {}
        }
    }
    match open {
        Some(start) => Err(format!(
            "unclosed `{{` at byte {start}: a hash tag is written `{{…}}`"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lit(s: &str) -> LitStr {
        LitStr::new(s, proc_macro2::Span::call_site())
    }

    fn ph(root: &str, fields: &[&str]) -> Segment {
        Segment::Placeholder {
            root: root.into(),
            fields: fields.iter().map(|f| (*f).to_owned()).collect(),
            batch: false,
        }
    }

    #[test]
    fn parses_literals_and_placeholders() {
        assert_eq!(
            parse(&lit("user:<id>")).unwrap(),
            vec![Segment::Literal("user:".into()), ph("id", &[])]
        );
        assert_eq!(
            parse(&lit("{t:<self.tenant>}:<user.id>:<pair.0>")).unwrap(),
            vec![
                Segment::Literal("{t:".into()),
                ph("self", &["tenant"]),
                Segment::Literal("}:".into()),
                ph("user", &["id"]),
                Segment::Literal(":".into()),
                ph("pair", &["0"]),
            ]
        );
    }

    #[test]
    fn rejects_malformed_templates() {
        for (bad, needle) in [
            ("", "empty key template"),
            ("user:<id", "unclosed `<`"),
            ("user:<>", "empty placeholder"),
            ("user:id>", "stray `>`"),
            ("<a><b>", "no separator"),
            ("<a>-<b>", "no separator"),
            ("<a>x%<b>", "no separator"),
            ("<a b>", "not a parameter name"),
            ("<1a>", "not a parameter name"),
            ("<a.>", "not a parameter name"),
            ("user {x}", "whitespace"),
            ("{user:<id>", "unclosed `{`"),
            ("user}", "closes no"),
            ("{}:<id>", "empty hash tag"),
            ("{{a}}", "nested"),
            ("user~<id>", "reserved"),
            ("<id>:~", "reserved"),
        ] {
            let err = parse(&lit(bad)).expect_err(bad).to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn separators_with_a_non_value_byte_pass() {
        for ok in ["<a>:<b>", "<a>-x:<b>", "<a>/<b>", "<a>|<b>.json"] {
            assert!(parse(&lit(ok)).is_ok(), "{ok}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn render(segments: &[Segment]) -> String {
            segments.iter().map(display).collect()
        }

        /// Template-like text: mostly the characters that matter to the parser.
        fn template_text() -> impl Strategy<Value = String> {
            prop::collection::vec(
                prop_oneof![
                    Just('<'),
                    Just('>'),
                    Just('{'),
                    Just('}'),
                    Just(':'),
                    Just('.'),
                    Just('a'),
                    Just('b'),
                    Just('_'),
                    Just('1'),
                    Just('%'),
                    Just('~'),
                    Just(' '),
                    any::<char>(),
                ],
                0..24,
            )
            .prop_map(|chars| chars.into_iter().collect())
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

            #[test]
            fn never_panics_and_accepted_templates_round_trip(text in template_text()) {
                if let Ok(segments) = parse(&lit(&text)) {
                    prop_assert_eq!(render(&segments), text.clone());
                    prop_assert!(check_separators(&segments).is_ok());
                    prop_assert!(!text.chars().any(|c| c.is_whitespace() || c.is_control()));
                    prop_assert!(!text.contains('~'));
                }
            }

            #[test]
            fn arbitrary_unicode_never_panics(text in any::<String>()) {
                let _ = parse(&lit(&text));
            }
        }
    }
}
