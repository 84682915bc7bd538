//! Imports run one way: each part of `src/` (a folder, or one of the files
//! at its top) may import only its own layer and the layers below it, in
//! the order `lib.rs` states. This test reads the sources as text, finds
//! every `crate::…` and `super::…` path outside comments, and fails on an
//! import against the order, or on a part of `src/` the order does not
//! name (a new folder must be given its place).

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

/// The layers, top first. A part may import its own layer and the ones
/// after it. `lib` (the crate root, which declares and re-exports) is
/// exempt.
const LAYERS: &[&[&str]] = &[
    &["write_behind"],
    &["cache", "builder", "global", "private"],
    &["call"],
    &["engine"],
    &["backend"],
    &["near"],
    &["encoding"],
    &["observe"],
    &["error", "failpoint", "sync", "token"],
];

fn layer_of(part: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&part))
}

/// The module path of a source file, relative to `src/`: `call/hit.rs` is
/// `["call", "hit"]`, `near/mod.rs` is `["near"]`.
fn module_path(relative: &Path) -> Vec<String> {
    let mut path: Vec<String> = relative
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if path.last().is_some_and(|last| last == "mod") {
        path.pop();
    }
    path
}

/// The text with its `//` and `/* */` comments blanked (doc links name
/// paths without importing them). String literals are rare enough here
/// not to matter.
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("//") {
            rest = after.find('\n').map_or("", |end| &after[end..]);
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.find("*/").map_or("", |end| &after[end + 2..]);
        } else {
            let mut chars = rest.chars();
            if let Some(c) = chars.next() {
                out.push(c);
            }
            rest = chars.as_str();
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The top-level names of the crate that `text`, the source of module
/// `module`, imports: `crate::a::…` and `crate::{a, b::…}` (`false`), and
/// `super::` chains that may climb to the crate root (`true`: an inline
/// `mod` in the file makes the chain one step shorter, so such a name
/// counts only if the root has it).
fn imported_parts(module: &[String], text: &str) -> BTreeSet<(String, bool)> {
    let text = strip_comments(text);
    let mut parts = BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("crate::") {
        let preceded = rest[..at].chars().next_back();
        let after = &rest[at + "crate::".len()..];
        rest = after;
        if preceded.is_some_and(|c| is_ident(c) || c == '$') {
            continue;
        }
        if let Some(group) = after.strip_prefix('{') {
            // Only the first segment of each item in the group.
            let mut depth = 0usize;
            let mut item_start = true;
            let mut word = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if is_ident(c) && item_start => word.push(c),
                    _ => {
                        if !word.is_empty() {
                            parts.insert((std::mem::take(&mut word), false));
                            item_start = false;
                        }
                    }
                }
            }
            if !word.is_empty() {
                parts.insert((word, false));
            }
        } else {
            let word: String = after.chars().take_while(|&c| is_ident(c)).collect();
            if !word.is_empty() {
                parts.insert((word, false));
            }
        }
    }
    // `super::super::x` from `a::b::c` is `a::x`: only a chain that climbs
    // to the root leaves this part.
    let mut rest = text.as_str();
    while let Some(at) = rest.find("super::") {
        let preceded = rest[..at].chars().next_back();
        let tail = &rest[at..];
        rest = &rest[at + "super::".len()..];
        if preceded.is_some_and(|c| is_ident(c) || c == ':') {
            continue;
        }
        let mut supers = 0;
        let mut after = tail;
        while let Some(next) = after.strip_prefix("super::") {
            supers += 1;
            after = next;
        }
        if supers >= module.len() {
            let word: String = after.chars().take_while(|&c| is_ident(c)).collect();
            if !word.is_empty() {
                parts.insert((word, true));
            }
        }
    }
    parts
}

/// What the crate root re-exports, by name, and the part each comes
/// from: `pub use encoding::key::{tag, KeyBuilder};` gives `tag` and
/// `KeyBuilder`, both of `encoding`.
fn root_items(lib: &str) -> HashMap<String, String> {
    let mut items = HashMap::new();
    for statement in strip_comments(lib).split(';') {
        let Some(path) = statement.trim().strip_prefix("pub use ") else {
            continue;
        };
        let part: String = path.chars().take_while(|&c| is_ident(c)).collect();
        let names = path.rsplit("::").next().unwrap_or_default();
        for name in names
            .split(|c: char| !is_ident(c))
            .filter(|n| !n.is_empty())
        {
            items.insert(name.to_owned(), part.clone());
        }
    }
    items
}

/// Every import against the order in the sources under `src`, and every
/// part the order does not name, as readable lines.
fn violations(src: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let lib = fs::read_to_string(src.join("lib.rs")).unwrap_or_default();
    let mut roots = root_items(&lib);
    roots.insert("__private".to_owned(), "private".to_owned());
    let mut files = Vec::new();
    collect_rs(src, &mut files);
    files.sort();
    for file in files {
        let relative = file.strip_prefix(src).unwrap_or(&file).to_path_buf();
        let module = module_path(&relative);
        let Some(part) = module.first() else {
            continue;
        };
        if part == "lib" {
            continue;
        }
        let Some(own) = layer_of(part) else {
            found.push(format!(
                "{}: `{part}` has no place in the layers",
                relative.display()
            ));
            continue;
        };
        let text = fs::read_to_string(&file).unwrap_or_default();
        found.extend(check(
            &relative.display().to_string(),
            &module,
            own,
            &text,
            &roots,
        ));
    }
    found
}

/// The imports of one source against the order. A root item
/// (`crate::Cache`) counts as an import of the part it is re-exported from.
fn check(
    name: &str,
    module: &[String],
    own: usize,
    text: &str,
    roots: &HashMap<String, String>,
) -> Vec<String> {
    imported_parts(module, text)
        .into_iter()
        .filter_map(|(target, by_super)| {
            let part = if layer_of(&target).is_some() {
                target.as_str()
            } else if let Some(part) = roots.get(&target) {
                part.as_str()
            } else if by_super {
                return None;
            } else {
                return Some(format!(
                    "{name} imports `crate::{target}`, which has no place"
                ));
            };
            match layer_of(part) {
                Some(layer) if layer >= own => None,
                _ if target == part => Some(format!("{name} imports `{part}`, above its layer")),
                _ => Some(format!(
                    "{name} imports `{target}` of `{part}`, above its layer"
                )),
            }
        })
        .collect()
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_part_of_the_runtime_imports_a_layer_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect_rs(&src, &mut files);
    assert!(
        files.len() > 20,
        "found only {} sources under {}",
        files.len(),
        src.display()
    );
    let found = violations(&src);
    assert!(
        found.is_empty(),
        "imports against the layers:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_sees_each_way_of_naming_a_layer_above() {
    let module = |path: &str| path.split("::").map(String::from).collect::<Vec<_>>();
    let engine = layer_of("engine").unwrap_or(usize::MAX);
    let roots = root_items("pub use cache::Cache;\npub use error::{Error, Result};");
    let check = |text: &str| check("store.rs", &module("engine::store"), engine, text, &roots);
    let below = "use crate::backend::Bytes;\nuse crate::encoding::{codec::Codec, key};\n\
        fn f() -> crate::Result<()> { Err(crate::Error::Closed) }";
    assert!(check(below).is_empty(), "{:?}", check(below));
    for above in [
        "use crate::call::hit::Body;",
        "use crate::{backend::Bytes, call::miss};",
        "fn f() { crate::cache::Cache::memory(); }",
        "fn f() -> crate::Cache { todo!() }",
        "use super::super::call::lock;",
        "use crate::nowhere::Thing;",
    ] {
        let found = check(above);
        assert_eq!(found.len(), 1, "{above:?} gave {found:?}");
    }
    // In a comment, or a path that merely ends in `crate::`, it is no import.
    for harmless in [
        "// see crate::call::hit",
        "/// [`crate::Cache`]",
        "$crate::call::x",
        "super::call::x",
    ] {
        let found = check(harmless);
        assert!(found.is_empty(), "{harmless:?} gave {found:?}");
    }
}
