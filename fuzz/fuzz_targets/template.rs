//! The key-template parser of the attribute on arbitrary text: it may
//! reject, never panic, and what it accepts renders back to itself.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../cached-attr/src/key.rs"]
#[allow(dead_code)]
mod key;

fuzz_target!(|text: &str| {
    let lit = syn::LitStr::new(text, proc_macro2::Span::call_site());
    if let Ok(segments) = key::parse(&lit) {
        let rendered: String = segments
            .iter()
            .map(|segment| match segment {
                key::Segment::Literal(text) => text.clone(),
                key::Segment::Placeholder { root, fields } => {
                    let mut s = format!("<{root}");
                    for field in fields {
                        s.push('.');
                        s.push_str(field);
                    }
                    s.push('>');
                    s
                }
            })
            .collect();
        assert_eq!(rendered, text);
    }
});
