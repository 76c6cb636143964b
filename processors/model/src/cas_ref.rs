//! The address of a blob in the content-addressed store: `sha256:<64 lowercase hex>` of its
//! uncompressed content.
//!
//! Invariants: a [`CasRef`] always holds a full SHA-256 digest; its only text form is
//! `sha256:` followed by 64 lowercase hex digits (on the wire, in Postgres, in JSON), and
//! anything else fails to parse with a [`ParseRefError`] that names the reason and echoes at
//! most [`MAX_REF_ECHO`] characters of the input. How a bad ref is handled (the record's
//! fault: dead-lettered or rejected, never retried) is the runtime's classification of
//! [`ParseRefError`], the same for every processor.
//!
//! A ref carried in an event is a [`WireRef`]: it decodes from any string, so a malformed ref
//! stays the one record's fault at the site that needs the blob (a rejection or dead letter
//! with that site's reason), never a decode failure of the whole record, and it re-encodes to
//! exactly the text it was decoded from, so the wire format is that of a plain string.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// Longest excerpt of a rejected ref string kept in the error.
pub const MAX_REF_ECHO: usize = 80;

/// The address of a blob: `sha256:<64 lowercase hex>` of its uncompressed content.
///
/// Serialized (serde) as that string.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CasRef([u8; 32]);

impl CasRef {
    /// The scheme in front of the hex digest.
    pub const SCHEME: &'static str = "sha256:";

    /// The ref of `content`.
    pub fn of(content: &[u8]) -> CasRef {
        CasRef(Sha256::digest(content).into())
    }

    /// The ref whose digest is `digest`.
    pub fn from_digest(digest: [u8; 32]) -> CasRef {
        CasRef(digest)
    }

    /// The raw SHA-256 digest.
    pub fn digest(&self) -> &[u8; 32] {
        &self.0
    }

    /// The digest as 64 lowercase hex characters.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The object key under `prefix`: `<prefix><hex[0..2]>/<hex>`.
    pub fn key(&self, prefix: &str) -> String {
        let hex = self.hex();
        format!("{prefix}{}/{hex}", &hex[..2])
    }
}

impl fmt::Display for CasRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::SCHEME, hex::encode(self.0))
    }
}

impl fmt::Debug for CasRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CasRef({self})")
    }
}

/// A string that is not a valid [`CasRef`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid CAS ref {input:?}: {reason}; expected sha256:<64 lowercase hex digits>")]
pub struct ParseRefError {
    /// The rejected string (its first 80 characters).
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl FromStr for CasRef {
    type Err = ParseRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason| {
            let input = match s.char_indices().nth(MAX_REF_ECHO) {
                Some((end, _)) => format!("{}…", &s[..end]),
                None => s.to_owned(),
            };
            ParseRefError { input, reason }
        };
        let Some(hex) = s.strip_prefix(Self::SCHEME) else {
            return Err(fail("missing the `sha256:` scheme"));
        };
        if hex.len() != 64 {
            return Err(fail("the digest must be exactly 64 hex digits"));
        }
        if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(fail("the digest must be lowercase hex (0-9, a-f)"));
        }
        let mut digest = [0u8; 32];
        hex::decode_to_slice(hex, &mut digest).map_err(|_| fail("the digest is not hex"))?;
        Ok(CasRef(digest))
    }
}

impl TryFrom<&str> for CasRef {
    type Error = ParseRefError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl Serialize for CasRef {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CasRef {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A CAS ref as an event carries it: the text exactly as written, and the typed [`CasRef`]
/// when that text is a valid ref.
///
/// Invariants: any string decodes (serde: a string, as in Avro and JSON); encoding writes back
/// the same text byte for byte; [`WireRef::get`] is `Ok` exactly when the text parses as a
/// [`CasRef`]. Equality and hashing are those of the text.
#[derive(Clone)]
pub struct WireRef {
    text: String,
    parsed: Result<CasRef, ParseRefError>,
}

impl WireRef {
    /// The typed ref, or why the text is not one.
    pub fn get(&self) -> Result<CasRef, ParseRefError> {
        self.parsed.clone()
    }

    /// The text as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The text as written.
    pub fn into_string(self) -> String {
        self.text
    }
}

impl From<String> for WireRef {
    fn from(text: String) -> Self {
        let parsed = text.parse();
        WireRef { text, parsed }
    }
}

impl From<&str> for WireRef {
    fn from(text: &str) -> Self {
        WireRef::from(text.to_owned())
    }
}

impl From<CasRef> for WireRef {
    fn from(r: CasRef) -> Self {
        WireRef {
            text: r.to_string(),
            parsed: Ok(r),
        }
    }
}

impl From<&CasRef> for WireRef {
    fn from(r: &CasRef) -> Self {
        WireRef::from(*r)
    }
}

impl std::ops::Deref for WireRef {
    type Target = str;

    fn deref(&self) -> &str {
        &self.text
    }
}

impl AsRef<str> for WireRef {
    fn as_ref(&self) -> &str {
        &self.text
    }
}

impl PartialEq for WireRef {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for WireRef {}

impl std::hash::Hash for WireRef {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.text.hash(state);
    }
}

impl PartialEq<CasRef> for WireRef {
    fn eq(&self, other: &CasRef) -> bool {
        self.parsed.as_ref().is_ok_and(|r| r == other)
    }
}

impl fmt::Display for WireRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for WireRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

impl Serialize for WireRef {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for WireRef {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(WireRef::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ref_of_known_content() {
        // sha256("abc") from FIPS 180-2.
        let r = CasRef::of(b"abc");
        let s = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(r.to_string(), s);
        assert_eq!(s.parse::<CasRef>().unwrap(), r);
        assert_eq!(
            r.key("cas/"),
            "cas/ba/ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(format!("{r:?}"), format!("CasRef({s})"));
    }

    #[test]
    fn ref_serde_is_a_string() {
        let r = CasRef::of(b"abc");
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, format!("\"{r}\""));
        assert_eq!(serde_json::from_str::<CasRef>(&json).unwrap(), r);
        let err = serde_json::from_str::<CasRef>("\"sha256:xyz\"").unwrap_err();
        assert!(err.to_string().contains("invalid CAS ref"), "{err}");
        assert!(serde_json::from_str::<CasRef>("42").is_err());
    }

    #[test]
    fn wire_ref_of_a_valid_ref_is_typed() {
        let r = CasRef::of(b"abc");
        let w = WireRef::from(r.to_string());
        assert_eq!(w.get(), Ok(r));
        assert_eq!(w, WireRef::from(r));
        assert_eq!(w, r);
        assert_eq!(w.as_str(), r.to_string());
        assert_eq!(serde_json::to_string(&w).unwrap(), format!("\"{r}\""));
        let bad = WireRef::from("sha256:ABC");
        assert_eq!(bad.get(), Err("sha256:ABC".parse::<CasRef>().unwrap_err()));
        assert_ne!(bad, r);
        assert!(serde_json::from_str::<WireRef>("42").is_err());
    }

    proptest::proptest! {
        /// Any text decodes and re-encodes byte for byte; it is typed exactly when it parses.
        #[test]
        fn wire_ref_round_trips_any_text(text in proptest::prelude::any::<String>()) {
            let json = serde_json::to_string(&text).unwrap();
            let w: WireRef = serde_json::from_str(&json).unwrap();
            proptest::prop_assert_eq!(serde_json::to_string(&w).unwrap(), json);
            proptest::prop_assert_eq!(w.as_str(), text.as_str());
            proptest::prop_assert_eq!(w.get(), text.parse::<CasRef>());
            proptest::prop_assert_eq!(w.clone().into_string(), text);
        }

        /// Every valid ref, written by any producer, comes out typed.
        #[test]
        fn wire_ref_types_valid_refs(digest in proptest::prelude::any::<[u8; 32]>()) {
            let r = CasRef::from_digest(digest);
            let w: WireRef = serde_json::from_str(&format!("\"{r}\"")).unwrap();
            proptest::prop_assert_eq!(w.get(), Ok(r));
        }
    }
}
