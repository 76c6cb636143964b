//! Serde for a `Uuid` in an Avro `string`/`uuid` field: always the hyphenated text; accepts
//! text or 16 raw bytes back.

use serde::de::{Error, Visitor};
use serde::{Deserializer, Serializer};
use uuid::Uuid;

pub fn serialize<S: Serializer>(u: &Uuid, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(u.hyphenated().encode_lower(&mut Uuid::encode_buffer()))
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Uuid, D::Error> {
    d.deserialize_str(UuidVisitor)
}

pub(super) struct UuidVisitor;

impl Visitor<'_> for UuidVisitor {
    type Value = Uuid;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a UUID as text or 16 bytes")
    }
    fn visit_str<E: Error>(self, v: &str) -> Result<Uuid, E> {
        Uuid::parse_str(v).map_err(E::custom)
    }
    fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Uuid, E> {
        Uuid::from_slice(v).map_err(E::custom)
    }
}

/// The same for `Vec<Uuid>` (an Avro array of uuid strings).
pub mod vec {
    use serde::de::{Deserializer, SeqAccess, Visitor};
    use serde::ser::{SerializeSeq, Serializer};
    use uuid::Uuid;

    struct Text<'a>(&'a Uuid);
    impl serde::Serialize for Text<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            super::serialize(self.0, s)
        }
    }
    struct Owned(Uuid);
    impl<'de> serde::Deserialize<'de> for Owned {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            super::deserialize(d).map(Owned)
        }
    }

    pub fn serialize<S: Serializer>(v: &[Uuid], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for u in v {
            seq.serialize_element(&Text(u))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Uuid>, D::Error> {
        struct SeqVisitor;
        impl<'de> Visitor<'de> for SeqVisitor {
            type Value = Vec<Uuid>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of UUIDs")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Vec<Uuid>, A::Error> {
                let mut out = Vec::with_capacity(a.size_hint().unwrap_or(0));
                while let Some(Owned(u)) = a.next_element()? {
                    out.push(u);
                }
                Ok(out)
            }
        }
        d.deserialize_seq(SeqVisitor)
    }
}
