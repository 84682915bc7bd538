//! Key encoding: how argument values become Redis key text.
//!
//! The encoding is injective. A value's encoding uses only the *safe* bytes
//! `A-Z a-z 0-9 - _ .` and `%`; every other byte of a string is written as
//! `%XX` (upper-case hex), and the few structural marks (`%N` for `None`,
//! `%[`, `%,`, `%]` for sequences) are `%` followed by a byte that is never a
//! hex digit, so they cannot be confused with an escape. A key template puts a
//! byte outside that alphabet (such as `:`) between any two placeholders, so
//! the rendered key can be split back into its values: two different argument
//! lists never give the same key, and no value can inject `:`, `*`, `{`, `}`,
//! spaces or control bytes.
//!
//! Keys longer than [`MAX_KEY_LEN`] are shortened to a readable prefix plus
//! the SHA-256 of the whole key.
//!
//! The byte `~` is reserved: no user key contains it (a template's literal
//! text may not, placeholder values escape it, and the runtime API refuses
//! it), so that the keys the runtime keeps for itself (`<ns>:~lock{<key>}`,
//! `<ns>:~tag:<tag>`) and the marker of a shortened key (`<prefix>~<digest>`)
//! can never be named by a user. Every key starts with `<namespace>:`, so a
//! Redis user confined to `~<namespace>:*` can use every feature.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};

use sha2::{Digest, Sha256};

/// The longest key sent to Redis, in bytes. Longer keys are shortened.
pub const MAX_KEY_LEN: usize = 256;
/// The longest namespace, in bytes: short enough that a shortened key
/// keeps all of it (and stays inside an ACL user's `~<namespace>:*`).
pub(crate) const MAX_NAMESPACE_LEN: usize = 64;
/// How much of a shortened key is kept as a readable prefix.
const SHORTENED_PREFIX_LEN: usize = MAX_KEY_LEN - 1 - 64;

/// A value that can stand in a key placeholder.
///
/// Implementations must be injective (different values, different text) and
/// write only the bytes `A-Z a-z 0-9 - _ . %`; [`escape_into`] does both for
/// any text. Implemented for integers, `bool`, `char`, strings, floats,
/// `Option` of those, sequences and references, and derived for your
/// structs and enums with `#[derive(CacheKey)]`.
///
/// Whatever an implementation writes, the key stays well formed: any other
/// byte it writes (a `:`, a brace, a space) is escaped as `%XX` before it
/// reaches the key, so a value can never forge the template's separators,
/// a hash tag, the version or the runtime's own keys.
///
/// ```
/// # extern crate cached_runtime as redis_cached;
/// use redis_cached::{escape_into, CacheKey};
///
/// struct Email(String);
///
/// impl CacheKey for Email {
///     fn write_key(&self, out: &mut String) {
///         escape_into(self.0.to_ascii_lowercase().as_bytes(), out);
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be used in a cache key",
    label = "this value goes into the cache key, but its type `{Self}` does not implement `CacheKey`",
    note = "derive or implement `redis_cached::CacheKey` for it, or use a field that does (integers, strings, bool, char, Option, Vec)",
    note = "with no `key = …`, every argument is in the key: leave this one out with `skip = [name]`, or name the arguments that identify the value with `key = \"…\"`"
)]
pub trait CacheKey {
    /// Appends this value's key encoding to `out`.
    fn write_key(&self, out: &mut String);
}

/// A key value that is not itself an `Option`; lets `Option<T>` be a key
/// without `Option<Option<T>>`, whose `None` and `Some(None)` would collide.
pub trait KeyAtom: CacheKey {}

fn is_safe(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

/// The bytes of encoded values: the safe bytes, `%` escapes, and the `[`,
/// `,` and `]` that sequences write after a `%`.
fn in_encoding(b: u8) -> bool {
    is_safe(b) || matches!(b, b'%' | b'[' | b',' | b']')
}

/// Appends `text`, escaping the bytes that no encoding holds.
fn escape_outside_encoding(text: &str, out: &mut String) {
    for &b in text.as_bytes() {
        if in_encoding(b) {
            out.push(b as char);
        } else {
            escape_into(&[b], out);
        }
    }
}

/// Appends `bytes` to `out`, escaping every byte outside `A-Z a-z 0-9 - _ .`
/// as `%XX`.
pub fn escape_into(bytes: &[u8], out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.reserve(bytes.len());
    for &b in bytes {
        if is_safe(b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xf)] as char);
        }
    }
}

macro_rules! display_keys {
    ($($t:ty),*) => {$(
        impl CacheKey for $t {
            fn write_key(&self, out: &mut String) {
                // Writing to a String cannot fail.
                let _ = write!(out, "{}", self);
            }
        }
        impl KeyAtom for $t {}
    )*};
}
// Integers and bools print only safe bytes (digits, `-`, letters).
display_keys!(u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize, bool);

macro_rules! float_keys {
    ($($t:ty),*) => {$(
        impl CacheKey for $t {
            fn write_key(&self, out: &mut String) {
                // Rust prints the shortest text that reads back to the same
                // float, so distinct values give distinct text; `inf` and
                // `NaN` are letters. All NaNs share one key.
                let mut text = String::new();
                let _ = write!(text, "{:?}", self);
                escape_into(text.as_bytes(), out);
            }
        }
        impl KeyAtom for $t {}
    )*};
}
float_keys!(f32, f64);

impl CacheKey for str {
    fn write_key(&self, out: &mut String) {
        escape_into(self.as_bytes(), out);
    }
}
impl KeyAtom for str {}

impl CacheKey for String {
    fn write_key(&self, out: &mut String) {
        escape_into(self.as_bytes(), out);
    }
}
impl KeyAtom for String {}

impl CacheKey for char {
    fn write_key(&self, out: &mut String) {
        let mut buf = [0u8; 4];
        escape_into(self.encode_utf8(&mut buf).as_bytes(), out);
    }
}
impl KeyAtom for char {}

impl CacheKey for Cow<'_, str> {
    fn write_key(&self, out: &mut String) {
        escape_into(self.as_bytes(), out);
    }
}
impl KeyAtom for Cow<'_, str> {}

macro_rules! forward_keys {
    ($($wrapper:ident),*) => {$(
        impl<T: CacheKey + ?Sized> CacheKey for $wrapper<T> {
            fn write_key(&self, out: &mut String) {
                (**self).write_key(out);
            }
        }
        impl<T: KeyAtom + ?Sized> KeyAtom for $wrapper<T> {}
    )*};
}
forward_keys!(Box, Rc, Arc);

impl<T: CacheKey + ?Sized> CacheKey for &T {
    fn write_key(&self, out: &mut String) {
        (**self).write_key(out);
    }
}
impl<T: KeyAtom + ?Sized> KeyAtom for &T {}

impl<T: CacheKey + ?Sized> CacheKey for &mut T {
    fn write_key(&self, out: &mut String) {
        (**self).write_key(out);
    }
}
impl<T: KeyAtom + ?Sized> KeyAtom for &mut T {}

impl<T: KeyAtom> CacheKey for Option<T> {
    fn write_key(&self, out: &mut String) {
        match self {
            Some(value) => value.write_key(out),
            None => out.push_str("%N"),
        }
    }
}

impl<T: CacheKey> CacheKey for [T] {
    fn write_key(&self, out: &mut String) {
        // Every element is introduced by `%,`, so `[]` and `[""]` differ.
        out.push_str("%[");
        for item in self {
            out.push_str("%,");
            item.write_key(out);
        }
        out.push_str("%]");
    }
}
impl<T: CacheKey> KeyAtom for [T] {}

impl<T: CacheKey, const N: usize> CacheKey for [T; N] {
    fn write_key(&self, out: &mut String) {
        self.as_slice().write_key(out);
    }
}
impl<T: CacheKey, const N: usize> KeyAtom for [T; N] {}

impl<T: CacheKey> CacheKey for Vec<T> {
    fn write_key(&self, out: &mut String) {
        self.as_slice().write_key(out);
    }
}
impl<T: CacheKey> KeyAtom for Vec<T> {}

/// Renders a key template: literal text and encoded values, then the version.
///
/// Generated code builds one per call; the attribute has checked the
/// template at compile time.
#[derive(Debug)]
pub struct KeyBuilder {
    buf: String,
}

impl KeyBuilder {
    /// Starts a key with room for `capacity` bytes: in the buffer of the
    /// last key a hit of this thread gave back, if there is one, so that a
    /// hit allocates no key.
    pub fn with_capacity(capacity: usize) -> Self {
        let mut buf = SPARE_KEY.try_with(|spare| spare.take()).unwrap_or_default();
        buf.reserve(capacity);
        KeyBuilder { buf }
    }

    /// Appends literal template text as written.
    pub fn literal(&mut self, text: &str) {
        self.buf.push_str(text);
    }

    /// Appends a placeholder's value in its key encoding.
    pub fn value<K: CacheKey + ?Sized>(&mut self, value: &K) {
        let start = self.buf.len();
        value.write_key(&mut self.buf);
        // A hand-written impl may write what encodings never hold: escape it.
        if !self.buf.as_bytes()[start..].iter().all(|b| in_encoding(*b)) {
            let written = self.buf.split_off(start);
            escape_outside_encoding(&written, &mut self.buf);
        }
    }

    /// Ends the key, appending `@v<version>` when a version is given.
    pub fn finish(mut self, version: Option<u32>) -> String {
        if let Some(version) = version {
            let _ = write!(self.buf, "@v{version}");
        }
        self.buf
    }

    /// Appends `#` and 16 hex digits, the 64-bit FNV-1a digest of `names`.
    ///
    /// Generated code uses it to tell apart functions, and instantiations
    /// of a generic function, whose keys would otherwise read the same:
    /// `names` are type names (`core::any::type_name`). They are written by
    /// the program's authors, not chosen by callers, so a fast
    /// non-cryptographic hash suffices; it runs on every call, hits
    /// included, and allocates nothing. No encoded value contains `#`, so
    /// the digest cannot be confused with a placeholder's value.
    ///
    /// ```
    /// # extern crate cached_runtime as redis_cached;
    /// use redis_cached::KeyBuilder;
    ///
    /// let mut k = KeyBuilder::with_capacity(32);
    /// k.literal("gen:a");
    /// k.digest(&["char"]);
    /// let key = k.finish(None);
    /// assert!(key.starts_with("gen:a#") && key.len() == "gen:a#".len() + 16);
    /// ```
    pub fn digest(&mut self, names: &[&str]) {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut hash = OFFSET;
        for name in names {
            // 0xFF never occurs in UTF-8: it ends each name, so that
            // ["ab", "c"] and ["a", "bc"] differ.
            for &byte in name.as_bytes().iter().chain(&[0xff]) {
                hash ^= u64::from(byte);
                hash = hash.wrapping_mul(PRIME);
            }
        }
        let _ = write!(self.buf, "#{hash:016x}");
    }

    /// The name of `value`'s type without leading references (`&&str` is
    /// `str`): a reference encodes as the value it points to, so both name
    /// one instantiation. Generated code digests it for `impl Trait`
    /// arguments, whose types it cannot name.
    pub fn type_name_of<K: ?Sized>(_value: &K) -> &'static str {
        let mut name = std::any::type_name::<K>();
        while let Some(rest) = name.strip_prefix('&') {
            name = rest.strip_prefix("mut ").unwrap_or(rest);
        }
        name
    }
}

/// Renders a key or tag template the way the attributes do: the literal
/// text as written, each `<…>` placeholder replaced, in order, by the key
/// encoding of the next value, escaped exactly as the attribute escapes it
/// (a hand-written [`CacheKey`] impl's stray bytes included). The
/// placeholder names are not read.
///
/// ```
/// # extern crate cached_runtime as redis_cached;
/// let tag = redis_cached::tag("tenant:<t>:region:<r>", &[&"acme corp", &7u32])?;
/// assert_eq!(tag, "tenant:acme%20corp:region:7");
/// # Ok::<(), redis_cached::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidKey`](crate::Error::InvalidKey) when the template is
/// one the attribute would refuse (an unclosed `<`, a stray `>`, an empty
/// placeholder, the reserved `~`, whitespace, two placeholders with no
/// separator between them, an unclosed hash tag), or has not as many
/// placeholders as values.
pub fn tag(template: &str, values: &[&dyn CacheKey]) -> crate::Result<String> {
    let parsed = Template::parse(template)
        .map_err(|why| crate::Error::InvalidKey(format!("tag template: {why}")))?;
    if parsed.placeholders() != values.len() {
        return Err(crate::Error::InvalidKey(format!(
            "tag template: {} placeholders for {} values",
            parsed.placeholders(),
            values.len()
        )));
    }
    Ok(parsed.render_with(None, |n, key| key.value(values[n])))
}

/// The values that fill a key template's placeholders, in order: one
/// [`CacheKey`] value for a template with one placeholder, a tuple of up
/// to four for more (`(tenant, id)` for `"order:<tenant>:<id>"`).
pub trait KeyParts {
    /// How many placeholders these values fill.
    const COUNT: usize;

    /// Appends the `n`-th value (from 0) to `key`.
    fn write_part(&self, n: usize, key: &mut KeyBuilder);
}

impl<T: CacheKey + ?Sized> KeyParts for T {
    const COUNT: usize = 1;

    fn write_part(&self, _n: usize, key: &mut KeyBuilder) {
        key.value(self);
    }
}

macro_rules! tuple_parts {
    ($count:literal: $($name:ident $index:tt),+) => {
        impl<$($name: CacheKey),+> KeyParts for ($($name,)+) {
            const COUNT: usize = $count;

            fn write_part(&self, n: usize, key: &mut KeyBuilder) {
                match n {
                    $($index => key.value(&self.$index),)+
                    _ => {}
                }
            }
        }
    };
}
tuple_parts!(2: A 0, B 1);
tuple_parts!(3: A 0, B 1, C 2);
tuple_parts!(4: A 0, B 1, C 2, D 3);

/// A key or tag template, checked once with the attribute's rules and
/// rendered many times exactly as the attribute renders it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    segments: Vec<Segment>,
    placeholders: usize,
    /// The length of the literal text: a capacity hint.
    literal_len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Value,
}

impl Template {
    /// Checks `text` as the attribute checks a `key = "…"`: placeholders
    /// are closed and named, literal text holds neither `~`, whitespace
    /// nor control characters, hash tags are closed and non-empty, and
    /// two placeholders are separated by a byte that no encoded value
    /// holds. The error says what is wrong.
    pub(crate) fn parse(text: &str) -> std::result::Result<Template, String> {
        if text.is_empty() {
            return Err("the template is empty".into());
        }
        let mut segments = Vec::new();
        let mut literal = String::new();
        let mut separated = true;
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            let at = text.len() - rest.len();
            rest = &rest[c.len_utf8()..];
            match c {
                '<' => {
                    let Some(close) = rest
                        .find(['<', '>'])
                        .filter(|&n| rest.as_bytes()[n] == b'>')
                    else {
                        return Err(format!("unclosed `<` at byte {at}"));
                    };
                    if close == 0 {
                        return Err(format!("empty placeholder `<>` at byte {at}"));
                    }
                    if !separated {
                        return Err(format!(
                            "the placeholder at byte {at} has no separator before it: put a \
                             character other than letters, digits, `-`, `_`, `.`, `%`, `[`, `,` \
                             and `]` between two placeholders"
                        ));
                    }
                    rest = &rest[close + 1..];
                    if !literal.is_empty() {
                        segments.push(Segment::Literal(std::mem::take(&mut literal)));
                    }
                    segments.push(Segment::Value);
                    separated = false;
                }
                '>' => return Err(format!("a `>` without its `<` at byte {at}")),
                RESERVED => return Err(format!("`~` at byte {at} is reserved")),
                c if c.is_whitespace() || c.is_control() => {
                    return Err(format!("whitespace or a control character at byte {at}"))
                }
                c => {
                    separated |= !c.is_ascii() || !in_encoding(c as u8);
                    literal.push(c);
                }
            }
        }
        if !literal.is_empty() {
            segments.push(Segment::Literal(literal));
        }
        check_hash_tags(text)?;
        let placeholders = segments.iter().filter(|s| **s == Segment::Value).count();
        let literal_len = segments
            .iter()
            .map(|s| match s {
                Segment::Literal(text) => text.len(),
                Segment::Value => 0,
            })
            .sum();
        Ok(Template {
            segments,
            placeholders,
            literal_len,
        })
    }

    /// How many values the template takes.
    pub(crate) fn placeholders(&self) -> usize {
        self.placeholders
    }

    /// Renders the template with `parts`' values, then the version.
    pub(crate) fn render<P: KeyParts + ?Sized>(&self, parts: &P, version: Option<u32>) -> String {
        self.render_with(version, |n, key| parts.write_part(n, key))
    }

    /// Renders the template, `value(n, key)` appending the `n`-th value.
    fn render_with(
        &self,
        version: Option<u32>,
        mut value: impl FnMut(usize, &mut KeyBuilder),
    ) -> String {
        let mut key = KeyBuilder::with_capacity(self.literal_len + 8 * self.placeholders);
        let mut n = 0;
        for segment in &self.segments {
            match segment {
                Segment::Literal(text) => key.literal(text),
                Segment::Value => {
                    value(n, &mut key);
                    n += 1;
                }
            }
        }
        key.finish(version)
    }
}

/// `{…}` is a Redis Cluster hash tag: it must close, hold something, and
/// not nest.
fn check_hash_tags(text: &str) -> std::result::Result<(), String> {
    let mut open: Option<usize> = None;
    for (at, c) in text.char_indices() {
        match (c, open) {
            ('{', None) => open = Some(at),
            ('{', Some(_)) => return Err(format!("a `{{` inside a hash tag at byte {at}")),
            ('}', None) => return Err(format!("a `}}` that closes no `{{` at byte {at}")),
            ('}', Some(start)) if at == start + 1 => {
                return Err(format!("an empty hash tag `{{}}` at byte {start}"))
            }
            ('}', Some(_)) => open = None,
            _ => {}
        }
    }
    match open {
        Some(start) => Err(format!("an unclosed `{{` at byte {start}")),
        None => Ok(()),
    }
}

/// The byte that marks the runtime's own keys and shortened keys.
pub(crate) const RESERVED: char = '~';

/// Refuses a runtime-API key that holds the reserved byte.
pub(crate) fn check_user_key(key: &str) -> crate::Result<()> {
    if key.contains(RESERVED) {
        return Err(crate::Error::InvalidKey(format!(
            "`{RESERVED}` is reserved for the cache's own keys"
        )));
    }
    Ok(())
}

thread_local! {
    /// A key's buffer, given back by the hit that used it, for the next
    /// key rendered on this thread.
    static SPARE_KEY: std::cell::Cell<String> = const { std::cell::Cell::new(String::new()) };
}

/// Keeps `key`'s buffer for the next key this thread renders (see
/// [`KeyBuilder::with_capacity`]); a large one is freed instead.
pub(crate) fn recycle(mut key: String) {
    if key.capacity() <= 4 * MAX_KEY_LEN {
        key.clear();
        let _ = SPARE_KEY.try_with(|spare| spare.set(key));
    }
}

/// Runs `with` on the full key of `key` ([`full_key`]), built in a buffer
/// this thread reuses rather than in a new `String`.
pub(crate) fn with_full_key<T>(
    namespace: Option<&str>,
    key: &str,
    with: impl FnOnce(&str) -> T,
) -> T {
    thread_local! {
        static FULL: std::cell::Cell<String> = const { std::cell::Cell::new(String::new()) };
    }
    let len = namespace.map_or(0, |ns| ns.len() + 1) + key.len();
    let Some(namespace) = namespace.filter(|_| len <= MAX_KEY_LEN) else {
        return if len <= MAX_KEY_LEN {
            with(key)
        } else {
            with(&full_key(namespace, key.to_owned()))
        };
    };
    // Taken, not borrowed: `with` may build a full key of its own.
    let mut full = FULL.try_with(|full| full.take()).unwrap_or_default();
    full.clear();
    full.push_str(namespace);
    full.push(':');
    full.push_str(key);
    let result = with(&full);
    let _ = FULL.try_with(|spare| spare.set(full));
    result
}

/// The key sent to Redis for `key` under `namespace`: `<namespace>:<key>`,
/// shortened when longer than [`MAX_KEY_LEN`].
pub(crate) fn full_key(namespace: Option<&str>, key: String) -> String {
    let mut full = match namespace {
        Some(ns) => {
            let mut s = String::with_capacity(ns.len() + 1 + key.len());
            s.push_str(ns);
            s.push(':');
            s.push_str(&key);
            s
        }
        None => key,
    };
    if full.len() > MAX_KEY_LEN {
        full = shorten(&full);
    }
    full
}

/// The key of `kind` (`lock`, …) that the runtime keeps beside the full
/// key `key`, in the same Redis Cluster hash slot:
/// `<namespace>:~<kind>{<key>}`; when `key` has a hash tag of its own,
/// `<namespace>:~<kind>:<key without the namespace>`; when it has braces
/// but no tag, `<namespace>:~<kind>{<a tag of its slot>}:<key without the
/// namespace>`.
pub(crate) fn companion_key(namespace: Option<&str>, key: &str, kind: &str) -> String {
    let prefix_len = namespace.map_or(0, |ns| ns.len() + 1);
    let prefix = &key[..prefix_len.min(key.len())];
    let rest = &key[prefix.len()..];
    let has_tag = key
        .find('{')
        .and_then(|open| key[open + 1..].find('}'))
        .is_some_and(|len| len > 0);
    if has_tag {
        // Hashed on the key's own tag, which stays the first one.
        format!("{prefix}{RESERVED}{kind}:{rest}")
    } else if key.contains(['{', '}']) {
        // Braces but no tag (`{}`, a lone `}`, a tag cut by shortening):
        // the key hashes whole, and cannot sit inside braces; a tag of its
        // slot, first, sends the companion there.
        let tag = slot_tag(slot(key.as_bytes()));
        format!("{prefix}{RESERVED}{kind}{{{tag}}}:{rest}")
    } else {
        format!("{prefix}{RESERVED}{kind}{{{key}}}")
    }
}

/// A key of the runtime's own, with no value key beside it:
/// `<namespace>:~<kind>:<name>`, shortened as value keys are when longer
/// than [`MAX_KEY_LEN`] (a tag holds placeholder values of any length).
pub(crate) fn internal_key(namespace: Option<&str>, kind: &str, name: &str) -> String {
    let key = match namespace {
        Some(ns) => format!("{ns}:{RESERVED}{kind}:{name}"),
        None => format!("{RESERVED}{kind}:{name}"),
    };
    if key.len() > MAX_KEY_LEN {
        return shorten(&key);
    }
    key
}

/// The cluster hash slot of `key` (CRC16/XMODEM of its hash tag, or of the
/// whole key without one, mod 16384), as Redis computes it.
pub(crate) fn slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16_xmodem(hashed) % 16384
}

fn crc16_xmodem(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, &byte| {
        (crc << 8) ^ CRC16_TABLE[usize::from((crc >> 8) as u8 ^ byte)]
    })
}

/// CRC16/XMODEM (polynomial 0x1021) of every byte value.
const CRC16_TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// A short text whose slot is `slot`: put in braces in a name, it sends the
/// name to that slot. The smallest decimal number that hashes there, so the
/// same on every process. The table of all slots is built once (about
/// 200,000 CRCs of at most 6 bytes, a few milliseconds), when a cluster
/// cache is built.
pub(crate) fn slot_tag(slot: u16) -> &'static str {
    /// Per slot: the tag's length, then its digits.
    static TAGS: OnceLock<Box<[[u8; 7]]>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = vec![[0u8; 7]; 16384].into_boxed_slice();
        let mut missing = tags.len();
        let mut n = 0u32;
        while missing > 0 {
            let mut digits = [0u8; 6];
            let mut len = 0;
            let mut rest = n;
            loop {
                digits[len] = b'0' + (rest % 10) as u8;
                len += 1;
                rest /= 10;
                if rest == 0 {
                    break;
                }
            }
            digits[..len].reverse();
            let tag = &mut tags[usize::from(crc16_xmodem(&digits[..len]) % 16384)];
            if tag[0] == 0 {
                tag[0] = len as u8;
                tag[1..=len].copy_from_slice(&digits[..len]);
                missing -= 1;
            }
            n += 1;
        }
        tags
    });
    let tag = &tags[usize::from(slot % 16384)];
    std::str::from_utf8(&tag[1..=usize::from(tag[0])]).unwrap_or_default()
}

/// A readable prefix of `key`, then `~` and the hex SHA-256 of the whole key.
fn shorten(key: &str) -> String {
    let mut cut = SHORTENED_PREFIX_LEN;
    while !key.is_char_boundary(cut) {
        cut -= 1;
    }
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(MAX_KEY_LEN);
    out.push_str(&key[..cut]);
    out.push(RESERVED);
    for byte in digest {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc<K: CacheKey + ?Sized>(value: &K) -> String {
        let mut out = String::new();
        value.write_key(&mut out);
        out
    }

    /// An impl that writes raw text: separators, braces, `@`, `~`.
    struct Careless(&'static str);

    impl CacheKey for Careless {
        fn write_key(&self, out: &mut String) {
            out.push_str(self.0);
        }
    }

    #[test]
    fn what_a_careless_impl_writes_cannot_forge_the_key() {
        let key = |a: &'static str, b: &'static str| {
            let mut k = KeyBuilder::with_capacity(16);
            k.literal("p:");
            k.value(&Careless(a));
            k.literal(":");
            k.value(&Careless(b));
            k.finish(Some(2))
        };
        assert_eq!(key("a:b", "c"), "p:a%3Ab:c@v2");
        assert_ne!(key("a:b", "c"), key("a", "b:c"));
        assert_eq!(key("{x} ~y@v1", "z"), "p:%7Bx%7D%20%7Ey%40v1:z@v2");
        // What impls may write stays as written.
        assert_eq!(key("a-b_c.d%2F", "%[%,1%]"), "p:a-b_c.d%2F:%[%,1%]@v2");
    }

    #[test]
    fn plain_values_are_readable() {
        assert_eq!(enc(&42u64), "42");
        assert_eq!(enc(&-7i32), "-7");
        assert_eq!(enc("alice"), "alice");
        assert_eq!(enc(&true), "true");
        assert_eq!(enc(&1.5f64), "1.5");
    }

    #[test]
    fn unsafe_bytes_are_escaped() {
        assert_eq!(enc("a:b"), "a%3Ab");
        assert_eq!(enc("*{x} %"), "%2A%7Bx%7D%20%25");
        assert_eq!(enc("é"), "%C3%A9");
        assert_eq!(enc("\n"), "%0A");
    }

    #[test]
    fn structure_marks_do_not_collide() {
        assert_ne!(enc(&None::<String>), enc(&Some("%N".to_owned())));
        assert_eq!(enc(&Some("%N".to_owned())), "%25N");
        let empty: Vec<String> = vec![];
        assert_ne!(enc(&empty), enc(&vec![String::new()]));
        assert_ne!(
            enc(&vec![vec![1u8], vec![2, 3]]),
            enc(&vec![vec![1u8, 2], vec![3]])
        );
    }

    #[test]
    fn builder_renders_template_and_version() {
        let mut k = KeyBuilder::with_capacity(16);
        k.literal("user:");
        k.value(&42u64);
        assert_eq!(k.finish(None), "user:42");
        let mut k = KeyBuilder::with_capacity(16);
        k.literal("user:");
        k.value(&42u64);
        assert_eq!(k.finish(Some(2)), "user:42@v2");
    }

    #[test]
    fn tags_render_like_the_attribute() {
        assert_eq!(tag("t:<a>/<b>", &[&"x y", &1u8]).unwrap(), "t:x%20y/1");
        assert_eq!(tag("plain", &[]).unwrap(), "plain");
        for bad in [
            "t:<a",
            "t:a>",
            "t:<a>~",
            "t:<>",
            "t:<a><b>",
            "t:<a>.<b>",
            "t:<a>,<b>",
            "t:<a>[<b>",
            "t:<a> x",
            "{t:<a>",
            "t:}<a>",
            "{}:<a>",
            "",
        ] {
            assert!(tag(bad, &[&1u8, &2u8]).is_err(), "{bad}");
            assert!(tag(bad, &[&1u8]).is_err(), "{bad}");
        }
        assert!(tag("t:<a>", &[]).is_err());
        assert!(tag("t", &[&1u8]).is_err());
        // What a careless impl writes is escaped as in a key.
        let mut k = KeyBuilder::with_capacity(16);
        k.literal("p:");
        k.value(&Careless("a:b{c}"));
        assert_eq!(
            tag("p:<x>", &[&Careless("a:b{c}")]).unwrap(),
            k.finish(None)
        );
    }

    #[test]
    fn templates_render_one_value_or_a_tuple_as_the_attribute() {
        let one = Template::parse("user:<id>").expect("valid");
        assert_eq!(one.placeholders(), 1);
        assert_eq!(one.render(&42u64, None), "user:42");
        assert_eq!(one.render("/p/0", Some(3)), "user:%2Fp%2F0@v3");
        let two = Template::parse("{order:<tenant>}:<id>").expect("valid");
        assert_eq!(two.placeholders(), 2);
        assert_eq!(
            two.render(&("acme corp", 7u32), None),
            "{order:acme%20corp}:7"
        );
        let mut k = KeyBuilder::with_capacity(16);
        k.literal("c:");
        k.value(&Careless("x~y"));
        k.literal("/");
        k.value(&9u8);
        let attribute = k.finish(Some(1));
        let template = Template::parse("c:<a>/<b>").expect("valid");
        assert_eq!(template.render(&(Careless("x~y"), 9u8), Some(1)), attribute);
        assert_eq!(<(u8, u8, u8, u8) as KeyParts>::COUNT, 4);
        assert!(Template::parse("a:<b>").is_ok());
        assert!(Template::parse("a:<b").unwrap_err().contains("unclosed"));
    }

    #[test]
    fn slots_match_redis() {
        // Values from the Redis Cluster specification and CLUSTER KEYSLOT.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), crc16_xmodem(b"foo{}{bar}") % 16384);
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
    }

    #[test]
    fn slot_tags_land_in_their_slot() {
        for wanted in 0..16384 {
            let tag = slot_tag(wanted);
            assert!(!tag.is_empty() && tag.len() <= 6, "{tag}");
            assert_eq!(slot(format!("ns:chan{{{tag}}}").as_bytes()), wanted);
        }
    }

    #[test]
    fn every_companion_shares_its_keys_slot() {
        // Shortening keeps 191 bytes: this one is cut inside its tag.
        let long = format!("order:{}:{{tenant:{}}}", "x".repeat(180), "y".repeat(80));
        for raw in [
            "user:42",
            "{t}:user:42",
            "user:{}",
            "user:}{",
            "a{b",
            "a}b",
            "{}{x}",
            long.as_str(),
        ] {
            for ns in [None, Some("shop")] {
                let key = full_key(ns, raw.to_owned());
                let lock = companion_key(ns, &key, "lock");
                assert_eq!(
                    slot(lock.as_bytes()),
                    slot(key.as_bytes()),
                    "{key} / {lock}"
                );
                assert!(lock.starts_with(ns.map_or("~", |_| "shop:~")), "{lock}");
            }
        }
    }

    #[test]
    fn companions_share_the_slot_and_the_namespace() {
        assert_eq!(companion_key(None, "user:42", "lock"), "~lock{user:42}");
        assert_eq!(
            companion_key(Some("shop"), "shop:user:42", "lock"),
            "shop:~lock{shop:user:42}"
        );
        assert_eq!(
            companion_key(Some("shop"), "shop:t:{7}:user:42", "lock"),
            "shop:~lock:t:{7}:user:42"
        );
        assert_eq!(
            companion_key(None, "odd{}key", "lock"),
            format!("~lock{{{}}}:odd{{}}key", slot_tag(slot(b"odd{}key")))
        );
        assert_eq!(internal_key(Some("shop"), "tag", "t 1"), "shop:~tag:t 1");
        assert!(check_user_key("~lock{user:42}").is_err());
        assert!(check_user_key("user:42").is_ok());
    }

    #[test]
    fn long_internal_keys_are_shortened_inside_their_namespace() {
        let ns = "n".repeat(MAX_NAMESPACE_LEN);
        let long = "q".repeat(1 << 20);
        let key = internal_key(Some(&ns), "tag", &long);
        assert_eq!(key.len(), MAX_KEY_LEN);
        assert!(key.starts_with(&format!("{ns}:~tag:qqq")));
        assert_ne!(key, internal_key(Some(&ns), "tag", &format!("{long}r")));
        assert_eq!(internal_key(Some("ns"), "tag", "t:1"), "ns:~tag:t:1");
    }

    #[test]
    fn namespace_is_a_prefix() {
        assert_eq!(full_key(None, "user:42".into()), "user:42");
        assert_eq!(full_key(Some("app"), "user:42".into()), "app:user:42");
    }

    #[test]
    fn long_keys_are_shortened_with_a_digest() {
        let long_a = format!("user:{}", "a".repeat(400));
        let long_b = format!("user:{}b", "a".repeat(399));
        let a = full_key(None, long_a);
        let b = full_key(None, long_b);
        assert_eq!(a.len(), MAX_KEY_LEN);
        assert_eq!(b.len(), MAX_KEY_LEN);
        assert!(a.starts_with("user:aaaa"));
        assert_ne!(a, b);
        // Multi-byte text is cut on a character boundary.
        let wide = "é".repeat(300);
        assert!(full_key(None, wide).len() <= MAX_KEY_LEN);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

            #[test]
            fn keys_stay_bounded_and_distinct(
                prefix in "[a-z:]{0,300}",
                a in ".{0,40}",
                b in ".{0,40}",
            ) {
                let (ka, kb) = (format!("{prefix}{a}"), format!("{prefix}{b}"));
                let (fa, fb) = (full_key(Some("ns"), ka.clone()), full_key(Some("ns"), kb.clone()));
                prop_assert!(fa.len() <= MAX_KEY_LEN && fb.len() <= MAX_KEY_LEN);
                prop_assert_eq!(fa == fb, ka == kb);
            }
        }
    }
}
