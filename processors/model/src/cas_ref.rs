//! The address of a blob in the content-addressed store: `sha256:<64 lowercase hex>` of its
//! uncompressed content.
//!
//! Invariants: a [`CasRef`] always holds a full SHA-256 digest; its only text form is
//! `sha256:` followed by 64 lowercase hex digits (on the wire, in Postgres, in JSON), and
//! anything else fails to parse with a [`ParseRefError`] that names the reason and echoes at
//! most [`MAX_REF_ECHO`] characters of the input. How a bad ref is handled (the record's
//! fault: dead-lettered or rejected, never retried) is the runtime's classification of
//! [`ParseRefError`], the same for every processor.

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
}
