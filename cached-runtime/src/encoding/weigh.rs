//! An estimate of the memory a value holds, made while it is decoded: the
//! near tier weighs its entries by it, so that its byte bound bounds
//! memory however much larger a decoded value is than its stored bytes (a
//! one-letter string is 4 bytes of JSON, and 24 bytes plus an allocation
//! in a `Vec<String>`).
//!
//! The estimate follows what serde shows of the value's shape: a string or
//! byte buffer holds its length; a sequence holds its elements inline,
//! each the size of its Rust type; a map its keys and values, twice over
//! (a hash table's or a B-tree's slack). Each of these is one allocation,
//! counted as a typical allocator rounds it. Struct fields, tuples, options
//! and enum variants live inside their parent, and field and variant names
//! are not kept. What serde does not show is not counted (a `Box`'s own
//! allocation, a collection's spare capacity): an estimate, not a measure.

use std::cell::Cell;
use std::fmt;

use serde::de::{
    DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};

/// What a heap allocation of `bytes` costs: a header and rounding to 16
/// bytes, 32 at least (as glibc's malloc does); nothing for no bytes.
pub(crate) fn allocation(bytes: usize) -> usize {
    if bytes == 0 {
        return 0;
    }
    (bytes.saturating_add(8 + 15) & !15).max(32)
}

/// Deserializes a `T` from `de`, adding to `tally` an estimate of the heap
/// bytes the value holds (not counting the `T` itself).
pub(crate) fn deserialize<'de, T, D>(de: D, tally: &Cell<usize>) -> Result<T, D::Error>
where
    T: serde::Deserialize<'de>,
    D: Deserializer<'de>,
{
    T::deserialize(Weigh { de, tally })
}

fn add(tally: &Cell<usize>, bytes: usize) {
    tally.set(tally.get().saturating_add(bytes));
}

/// Where the value a visitor builds keeps what it is given.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Holds {
    /// In an allocation of its own (a string, a `Vec`, a map).
    Heap,
    /// Inside its parent (a struct, a tuple, an option, an enum).
    Inline,
    /// Nowhere (a field or variant name, an ignored value).
    Nothing,
}

/// A deserializer that weighs what it deserializes.
struct Weigh<'t, D> {
    de: D,
    tally: &'t Cell<usize>,
}

impl<'t, D> Weigh<'t, D> {
    fn visitor<V>(&self, visitor: V, holds: Holds) -> Counted<'t, V> {
        Counted {
            visitor,
            tally: self.tally,
            holds,
        }
    }
}

macro_rules! forward {
    ($($method:ident($($arg:ident: $ty:ty),*) => $holds:expr;)*) => {$(
        fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, D::Error> {
            let visitor = self.visitor(visitor, $holds);
            self.de.$method($($arg,)* visitor)
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Weigh<'_, D> {
    type Error = D::Error;

    forward! {
        // Self-describing input: a sequence or map found this way is taken
        // to be a collection of its own.
        deserialize_any() => Holds::Heap;
        deserialize_bool() => Holds::Inline;
        deserialize_i8() => Holds::Inline;
        deserialize_i16() => Holds::Inline;
        deserialize_i32() => Holds::Inline;
        deserialize_i64() => Holds::Inline;
        deserialize_i128() => Holds::Inline;
        deserialize_u8() => Holds::Inline;
        deserialize_u16() => Holds::Inline;
        deserialize_u32() => Holds::Inline;
        deserialize_u64() => Holds::Inline;
        deserialize_u128() => Holds::Inline;
        deserialize_f32() => Holds::Inline;
        deserialize_f64() => Holds::Inline;
        deserialize_char() => Holds::Inline;
        deserialize_str() => Holds::Heap;
        deserialize_string() => Holds::Heap;
        deserialize_bytes() => Holds::Heap;
        deserialize_byte_buf() => Holds::Heap;
        deserialize_option() => Holds::Inline;
        deserialize_unit() => Holds::Inline;
        deserialize_unit_struct(name: &'static str) => Holds::Inline;
        deserialize_newtype_struct(name: &'static str) => Holds::Inline;
        deserialize_seq() => Holds::Heap;
        deserialize_tuple(len: usize) => Holds::Inline;
        deserialize_tuple_struct(name: &'static str, len: usize) => Holds::Inline;
        deserialize_map() => Holds::Heap;
        deserialize_struct(name: &'static str, fields: &'static [&'static str]) => Holds::Inline;
        deserialize_enum(name: &'static str, variants: &'static [&'static str]) => Holds::Inline;
        deserialize_identifier() => Holds::Nothing;
        deserialize_ignored_any() => Holds::Nothing;
    }

    fn is_human_readable(&self) -> bool {
        self.de.is_human_readable()
    }
}

/// A visitor that weighs what it is given, then hands it on.
struct Counted<'t, V> {
    visitor: V,
    tally: &'t Cell<usize>,
    holds: Holds,
}

impl<V> Counted<'_, V> {
    /// A buffer of `len` bytes, if this value keeps it.
    fn buffer(&self, len: usize) {
        if self.holds == Holds::Heap {
            add(self.tally, allocation(len));
        }
    }
}

macro_rules! visit {
    ($($method:ident($ty:ty);)*) => {$(
        fn $method<E: serde::de::Error>(self, v: $ty) -> Result<V::Value, E> {
            self.visitor.$method(v)
        }
    )*};
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Counted<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.visitor.expecting(f)
    }

    visit! {
        visit_bool(bool);
        visit_i8(i8);
        visit_i16(i16);
        visit_i32(i32);
        visit_i64(i64);
        visit_i128(i128);
        visit_u8(u8);
        visit_u16(u16);
        visit_u32(u32);
        visit_u64(u64);
        visit_u128(u128);
        visit_f32(f32);
        visit_f64(f64);
        visit_char(char);
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<V::Value, E> {
        self.buffer(v.len());
        self.visitor.visit_str(v)
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<V::Value, E> {
        self.buffer(v.len());
        self.visitor.visit_borrowed_str(v)
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<V::Value, E> {
        self.buffer(v.len());
        self.visitor.visit_string(v)
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<V::Value, E> {
        self.buffer(v.len());
        self.visitor.visit_bytes(v)
    }

    fn visit_borrowed_bytes<E: serde::de::Error>(self, v: &'de [u8]) -> Result<V::Value, E> {
        self.buffer(v.len());
        self.visitor.visit_borrowed_bytes(v)
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<V::Value, E> {
        self.buffer(v.len());
        self.visitor.visit_byte_buf(v)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<V::Value, E> {
        self.visitor.visit_none()
    }

    fn visit_some<D: Deserializer<'de>>(self, de: D) -> Result<V::Value, D::Error> {
        let tally = self.tally;
        self.visitor.visit_some(Weigh { de, tally })
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<V::Value, E> {
        self.visitor.visit_unit()
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, de: D) -> Result<V::Value, D::Error> {
        let tally = self.tally;
        self.visitor.visit_newtype_struct(Weigh { de, tally })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        let held = Cell::new(0);
        let elements = Elements {
            seq,
            tally: self.tally,
            held: (self.holds == Holds::Heap).then_some(&held),
        };
        let value = self.visitor.visit_seq(elements);
        add(self.tally, allocation(held.get()));
        value
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        let held = Cell::new(0);
        let entries = Entries {
            map,
            tally: self.tally,
            held: (self.holds == Holds::Heap).then_some(&held),
        };
        let value = self.visitor.visit_map(entries);
        add(self.tally, allocation(held.get().saturating_mul(2)));
        value
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        let tally = self.tally;
        self.visitor.visit_enum(Variants { data, tally })
    }
}

/// A seed whose value is deserialized through [`Weigh`].
struct Seeded<'t, S> {
    seed: S,
    tally: &'t Cell<usize>,
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Seeded<'_, S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<S::Value, D::Error> {
        let tally = self.tally;
        self.seed.deserialize(Weigh { de, tally })
    }
}

/// The elements of a sequence; `held` sums their sizes when the sequence
/// keeps them in a buffer of its own.
struct Elements<'t, A> {
    seq: A,
    tally: &'t Cell<usize>,
    held: Option<&'t Cell<usize>>,
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Elements<'_, A> {
    type Error = A::Error;

    fn next_element_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, A::Error> {
        let tally = self.tally;
        let element = self.seq.next_element_seed(Seeded { seed, tally })?;
        if let (Some(held), Some(_)) = (self.held, &element) {
            add(held, size_of::<S::Value>());
        }
        Ok(element)
    }

    fn size_hint(&self) -> Option<usize> {
        self.seq.size_hint()
    }
}

/// The entries of a map; `held` sums their sizes when the map keeps them
/// in a table of its own.
struct Entries<'t, A> {
    map: A,
    tally: &'t Cell<usize>,
    held: Option<&'t Cell<usize>>,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Entries<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let tally = self.tally;
        let key = self.map.next_key_seed(Seeded { seed, tally })?;
        if let (Some(held), Some(_)) = (self.held, &key) {
            add(held, size_of::<K::Value>());
        }
        Ok(key)
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        let tally = self.tally;
        let value = self.map.next_value_seed(Seeded { seed, tally })?;
        if let Some(held) = self.held {
            add(held, size_of::<S::Value>());
        }
        Ok(value)
    }

    fn size_hint(&self) -> Option<usize> {
        self.map.size_hint()
    }
}

/// An enum's variant, whose contents live inside the enum.
struct Variants<'t, A> {
    data: A,
    tally: &'t Cell<usize>,
}

impl<'t, 'de, A: EnumAccess<'de>> EnumAccess<'de> for Variants<'t, A> {
    type Error = A::Error;
    type Variant = Variant<'t, A::Variant>;

    fn variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Self::Variant), A::Error> {
        let tally = self.tally;
        let (value, variant) = self.data.variant_seed(Seeded { seed, tally })?;
        Ok((value, Variant { variant, tally }))
    }
}

/// What a variant holds: inside the enum.
struct Variant<'t, A> {
    variant: A,
    tally: &'t Cell<usize>,
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Variant<'_, A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.variant.unit_variant()
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, A::Error> {
        let tally = self.tally;
        self.variant.newtype_variant_seed(Seeded { seed, tally })
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        let visitor = Counted {
            visitor,
            tally: self.tally,
            holds: Holds::Inline,
        };
        self.variant.tuple_variant(len, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        let visitor = Counted {
            visitor,
            tally: self.tally,
            holds: Holds::Inline,
        };
        self.variant.struct_variant(fields, visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    use serde::Deserialize;

    fn weigh<T: for<'de> Deserialize<'de>>(json: &str) -> (T, usize) {
        let tally = Cell::new(0);
        let mut de = serde_json::Deserializer::from_str(json);
        let value = deserialize::<T, _>(&mut de, &tally).unwrap();
        (value, tally.get())
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct User {
        id: u64,
        name: String,
        tags: Vec<String>,
        kind: Kind,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    enum Kind {
        Plain,
        Named(String),
        Pair(u8, String),
        Full { note: String },
    }

    #[test]
    fn strings_and_sequences_weigh_their_buffers() {
        assert_eq!(weigh::<u64>("7"), (7, 0));
        assert_eq!(
            weigh::<String>(r#""""#).1,
            0,
            "an empty string holds nothing"
        );
        assert_eq!(weigh::<String>(r#""abc""#).1, allocation(3));
        let (letters, weight) = weigh::<Vec<String>>(r#"["a","b","c"]"#);
        assert_eq!(letters.len(), 3);
        assert_eq!(weight, allocation(3 * 24) + 3 * allocation(1));
        let (numbers, weight) = weigh::<Vec<u64>>("[1,2,3,4]");
        assert_eq!(numbers.len(), 4);
        assert_eq!(weight, allocation(32));
        // 3 bytes of JSON each: over 8 times as large decoded.
        let json = format!("[{}]", vec![r#""x""#; 1000].join(","));
        let (_, weight) = weigh::<Vec<String>>(&json);
        assert!(weight > 8 * json.len(), "{weight} for {} bytes", json.len());
    }

    #[test]
    fn fields_options_and_variants_live_inside_their_parent() {
        let json = r#"{"id":1,"name":"Ada","tags":["x"],"kind":"Plain"}"#;
        let (user, weight) = weigh::<User>(json);
        assert_eq!(user.kind, Kind::Plain);
        let parts = allocation(3) + allocation(24) + allocation(1);
        assert_eq!(weight, parts, "field names are not kept");
        let json = r#"{"id":1,"name":"","tags":[],"kind":{"Named":"abcd"}}"#;
        assert_eq!(weigh::<User>(json).1, allocation(4));
        let json = r#"{"id":1,"name":"","tags":[],"kind":{"Pair":[1,"ab"]}}"#;
        assert_eq!(weigh::<User>(json).1, allocation(2));
        let json = r#"{"id":1,"name":"","tags":[],"kind":{"Full":{"note":"abc"}}}"#;
        assert_eq!(weigh::<User>(json).1, allocation(3));
        assert_eq!(weigh::<Option<String>>(r#""abc""#).1, allocation(3));
        assert_eq!(weigh::<Option<String>>("null").1, 0);
    }

    /// A format that is not self-describing weighs alike.
    #[cfg(feature = "postcard")]
    #[test]
    fn postcard_values_weigh_as_json_ones() {
        let letters = vec!["a".to_owned(); 3];
        let bytes = postcard::to_allocvec(&letters).unwrap();
        let tally = Cell::new(0);
        let mut de = postcard::Deserializer::from_bytes(&bytes);
        let value: Vec<String> = deserialize(&mut de, &tally).unwrap();
        assert_eq!(value, letters);
        assert_eq!(tally.get(), weigh::<Vec<String>>(r#"["a","a","a"]"#).1);
    }

    #[test]
    fn maps_weigh_their_entries_with_slack() {
        let (map, weight) = weigh::<HashMap<String, u64>>(r#"{"a":1,"bb":2}"#);
        assert_eq!(map.len(), 2);
        let entry = size_of::<String>() + size_of::<u64>();
        assert_eq!(
            weight,
            allocation(2 * 2 * entry) + allocation(1) + allocation(2)
        );
        // A self-describing value: every collection counts.
        let (_, weight) = weigh::<serde_json::Value>(r#"{"a":[1,2]}"#);
        assert!(weight >= allocation(1) + allocation(2 * size_of::<serde_json::Value>()));
    }
}
