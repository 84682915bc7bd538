//! A bound on how deeply a decoded value nests, for formats that have none
//! of their own (postcard; JSON stops at 128 levels by itself).
//!
//! Stored values are input: a recursive type (`struct Node { children:
//! Vec<Node> }`) decoded from an entry that nests a few hundred thousand
//! levels would overflow the stack of every reader. [`Limited`] wraps a
//! deserializer and counts how deep the value being built is (every
//! sequence, map, enum, `Some` and newtype nests one level), refusing to go
//! past [`MAX_DEPTH`] with an ordinary decode error.

use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};

/// How deeply a decoded value may nest (as serde_json's default).
pub(crate) const MAX_DEPTH: usize = 128;

/// A deserializer that refuses values nested deeper than it allows.
pub(crate) struct Limited<D> {
    inner: D,
    /// Levels the value may still nest.
    left: usize,
}

impl<D> Limited<D> {
    pub(crate) fn new(inner: D) -> Self {
        Limited {
            inner,
            left: MAX_DEPTH,
        }
    }
}

/// A visitor that hands the levels below it a smaller allowance.
struct LimitedVisitor<V> {
    inner: V,
    left: usize,
}

/// A seed whose value is decoded with the allowance of its level.
struct LimitedSeed<S> {
    inner: S,
    left: usize,
}

/// A sequence, map or enum whose elements are decoded with the allowance
/// of the level below it.
struct LimitedAccess<A> {
    inner: A,
    left: usize,
}

/// The allowance of the level below, or an error if there is none.
fn below<E: de::Error>(left: usize) -> Result<usize, E> {
    left.checked_sub(1).ok_or_else(|| {
        E::custom(format_args!(
            "the value nests deeper than {MAX_DEPTH} levels"
        ))
    })
}

macro_rules! forward_deserialize {
    ($($method:ident($($arg:ident: $ty:ty),*);)*) => {$(
        fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, Self::Error> {
            let visitor = LimitedVisitor { inner: visitor, left: self.left };
            self.inner.$method($($arg,)* visitor)
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Limited<D> {
    type Error = D::Error;

    forward_deserialize! {
        deserialize_any();
        deserialize_bool();
        deserialize_i8();
        deserialize_i16();
        deserialize_i32();
        deserialize_i64();
        deserialize_i128();
        deserialize_u8();
        deserialize_u16();
        deserialize_u32();
        deserialize_u64();
        deserialize_u128();
        deserialize_f32();
        deserialize_f64();
        deserialize_char();
        deserialize_str();
        deserialize_string();
        deserialize_bytes();
        deserialize_byte_buf();
        deserialize_option();
        deserialize_unit();
        deserialize_unit_struct(name: &'static str);
        deserialize_newtype_struct(name: &'static str);
        deserialize_seq();
        deserialize_tuple(len: usize);
        deserialize_tuple_struct(name: &'static str, len: usize);
        deserialize_map();
        deserialize_struct(name: &'static str, fields: &'static [&'static str]);
        deserialize_enum(name: &'static str, variants: &'static [&'static str]);
        deserialize_identifier();
        deserialize_ignored_any();
    }

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

macro_rules! forward_visit {
    ($($method:ident($ty:ty);)*) => {$(
        fn $method<E: de::Error>(self, value: $ty) -> Result<Self::Value, E> {
            self.inner.$method(value)
        }
    )*};
}

impl<'de, V: Visitor<'de>> Visitor<'de> for LimitedVisitor<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(f)
    }

    forward_visit! {
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
        visit_str(&str);
        visit_borrowed_str(&'de str);
        visit_string(String);
        visit_bytes(&[u8]);
        visit_borrowed_bytes(&'de [u8]);
        visit_byte_buf(Vec<u8>);
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.inner.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.inner.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        let left = below(self.left)?;
        self.inner.visit_some(Limited {
            inner: deserializer,
            left,
        })
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        let left = below(self.left)?;
        self.inner.visit_newtype_struct(Limited {
            inner: deserializer,
            left,
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        let left = below(self.left)?;
        self.inner.visit_seq(LimitedAccess { inner: seq, left })
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let left = below(self.left)?;
        self.inner.visit_map(LimitedAccess { inner: map, left })
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Self::Value, A::Error> {
        let left = below(self.left)?;
        self.inner.visit_enum(LimitedAccess { inner: data, left })
    }
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for LimitedSeed<S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        self.inner.deserialize(Limited {
            inner: deserializer,
            left: self.left,
        })
    }
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for LimitedAccess<A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        self.inner.next_element_seed(LimitedSeed {
            inner: seed,
            left: self.left,
        })
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for LimitedAccess<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        self.inner.next_key_seed(LimitedSeed {
            inner: seed,
            left: self.left,
        })
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.inner.next_value_seed(LimitedSeed {
            inner: seed,
            left: self.left,
        })
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for LimitedAccess<A> {
    type Error = A::Error;
    type Variant = LimitedAccess<A::Variant>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Self::Variant), A::Error> {
        let left = self.left;
        let (value, variant) = self.inner.variant_seed(LimitedSeed { inner: seed, left })?;
        Ok((
            value,
            LimitedAccess {
                inner: variant,
                left,
            },
        ))
    }
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for LimitedAccess<A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.inner.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        self.inner.newtype_variant_seed(LimitedSeed {
            inner: seed,
            left: self.left,
        })
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        let visitor = LimitedVisitor {
            inner: visitor,
            left: self.left,
        };
        self.inner.tuple_variant(len, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        let visitor = LimitedVisitor {
            inner: visitor,
            left: self.left,
        };
        self.inner.struct_variant(fields, visitor)
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Node {
        name: String,
        children: Vec<Node>,
        next: Option<Box<Node>>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Shape {
        Leaf(u32),
        Pair { left: Box<Shape>, right: Box<Shape> },
    }

    fn decode<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_str(text);
        T::deserialize(Limited::new(&mut de))
    }

    #[test]
    fn shallow_values_decode_as_without_it() {
        let text = r#"{"name":"a","children":[{"name":"b","children":[],"next":null}],"next":{"name":"c","children":[],"next":null}}"#;
        let plain: Node = serde_json::from_str(text).expect("valid");
        assert_eq!(decode::<Node>(text).expect("valid"), plain);
        let shape = r#"{"Pair":{"left":{"Leaf":1},"right":{"Pair":{"left":{"Leaf":2},"right":{"Leaf":3}}}}}"#;
        let plain: Shape = serde_json::from_str(shape).expect("valid");
        assert_eq!(decode::<Shape>(shape).expect("valid"), plain);
    }

    #[test]
    fn values_nested_past_the_bound_are_an_error() {
        // A deserializer with no bound of its own: a JSON document tree.
        let mut value = serde_json::json!({"name": "leaf", "children": [], "next": null});
        for _ in 0..200 {
            value = serde_json::json!({"name": "x", "children": [value], "next": null});
        }
        let err = Node::deserialize(Limited::new(value)).expect_err("too deep");
        assert!(err.to_string().contains("deeper than 128"), "{err}");
    }

    #[cfg(feature = "postcard")]
    #[test]
    fn a_hostile_entry_nested_100_000_levels_is_an_error_not_a_stack_overflow() {
        // `Option<Box<Node>>` in postcard: 1 for `Some`, each level a few
        // bytes (an empty name, no children), as an attacker would write it.
        let mut payload = Vec::new();
        for _ in 0..100_000 {
            payload.extend_from_slice(&[0, 0, 1]);
        }
        payload.extend_from_slice(&[0, 0, 0]);
        let entry = [&[0xCA, 1, 2, 0][..], &payload].concat();
        assert!(crate::encoding::codec::Codec::Postcard
            .decode::<Node>(&entry)
            .is_err());
    }
}
