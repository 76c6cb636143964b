//! RFC 6901 JSON Pointer.
//!
//! A [`JsonPointer`] is parsed once from its JSON-string representation and then kept as a
//! list of unescaped reference tokens. Invariants:
//!
//! - `""` is the whole document (zero tokens); every other pointer starts with `/`.
//! - In a token, `~1` decodes to `/` and `~0` to `~`, decoded left to right in one pass (so
//!   `~01` is the literal `~1`). Any other `~` sequence, including a trailing `~`, is a parse
//!   error. Nothing else is special: an empty token (`/`, `//`) is the member named `""`.
//! - Array indices are only interpreted when the value being traversed *is* an array (the
//!   token `01` is a perfectly good object member name). An array index is `0` or a decimal
//!   number without leading zeros (`[1-9][0-9]*`); no sign, no whitespace, no exponent.
//! - `-` names the (nonexistent) element after the last one. It is only meaningful as the
//!   *last* token of the target of an `add` (and so of `move`/`copy` targets, which add);
//!   everywhere else (reads, `remove`, `replace`, `test`, `from`) it is an
//!   [`PointerError::InvalidIndex`] error.
//! - The URI-fragment representation (`#/a%20b`) is not supported: callers pass the JSON
//!   string representation, as JSON Patch does.
//!
//! Errors are typed and always name the whole pointer and the reference token that failed.
//! Nothing here panics.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde_json::Value;

/// Why a pointer could not be parsed or could not be resolved against a document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PointerError {
    /// A non-empty pointer that does not start with `/`.
    #[error("invalid JSON pointer {pointer:?}: must be empty or start with \"/\"")]
    MissingLeadingSlash {
        /// The pointer as given.
        pointer: String,
    },
    /// A `~` not followed by `0` or `1`.
    #[error("invalid JSON pointer {pointer:?}: reference token {token:?} has an invalid \"~\" escape (only ~0 and ~1 are allowed)")]
    InvalidEscape {
        /// The pointer as given.
        pointer: String,
        /// The raw (still escaped) reference token.
        token: String,
    },
    /// A token used on an array that is not a valid index here: not decimal digits, a
    /// leading zero, `-` where no append position is allowed, or (for `add`) an index
    /// greater than the array's length.
    #[error("JSON pointer {pointer:?}: reference token {token:?} is not a valid array index here: {reason}")]
    InvalidIndex {
        /// The pointer as given.
        pointer: String,
        /// The unescaped reference token.
        token: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The token names an object member that does not exist or an array element past the
    /// end.
    #[error("JSON pointer {pointer:?}: reference token {token:?} does not exist")]
    NotFound {
        /// The pointer as given.
        pointer: String,
        /// The unescaped reference token.
        token: String,
    },
    /// The token would descend into a value that is neither an object nor an array.
    #[error("JSON pointer {pointer:?}: reference token {token:?} applied to a {kind}, which has no members")]
    NotAContainer {
        /// The pointer as given.
        pointer: String,
        /// The unescaped reference token.
        token: String,
        /// The JSON type found instead (`"string"`, `"number"`, ...).
        kind: &'static str,
    },
}

impl PointerError {
    /// A stable machine-readable code: `"invalid_pointer"` (syntax), `"invalid_index"`
    /// (array index rules) or `"path_not_found"` (the referenced value does not exist).
    pub fn code(&self) -> &'static str {
        match self {
            PointerError::MissingLeadingSlash { .. } | PointerError::InvalidEscape { .. } => {
                "invalid_pointer"
            }
            PointerError::InvalidIndex { .. } => "invalid_index",
            PointerError::NotFound { .. } | PointerError::NotAContainer { .. } => "path_not_found",
        }
    }

    /// The pointer (as given) this error is about.
    pub fn pointer(&self) -> &str {
        match self {
            PointerError::MissingLeadingSlash { pointer }
            | PointerError::InvalidEscape { pointer, .. }
            | PointerError::InvalidIndex { pointer, .. }
            | PointerError::NotFound { pointer, .. }
            | PointerError::NotAContainer { pointer, .. } => pointer,
        }
    }
}

/// A parsed RFC 6901 JSON Pointer.
///
/// Equality and ordering are by the raw (escaped) string, which is canonical: the escaping
/// of a token list is unique.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JsonPointer {
    raw: String,
    tokens: Vec<String>,
}

/// Where an array-level token points, once interpreted against an array of a known length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArrayPosition {
    /// An existing element or (for `add`) the position `len` itself.
    Index(usize),
    /// The `-` token: the position after the last element.
    End,
}

impl JsonPointer {
    /// Parses the JSON-string representation of a pointer (`""`, `"/a/b~1c"`, ...).
    pub fn parse(s: &str) -> Result<Self, PointerError> {
        if s.is_empty() {
            return Ok(Self::root());
        }
        let Some(rest) = s.strip_prefix('/') else {
            return Err(PointerError::MissingLeadingSlash {
                pointer: s.to_owned(),
            });
        };
        let tokens = rest
            .split('/')
            .map(|raw| {
                unescape_token(raw).ok_or_else(|| PointerError::InvalidEscape {
                    pointer: s.to_owned(),
                    token: raw.to_owned(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            raw: s.to_owned(),
            tokens,
        })
    }

    /// The pointer to the whole document, `""`.
    pub fn root() -> Self {
        Self {
            raw: String::new(),
            tokens: Vec::new(),
        }
    }

    /// Builds a pointer from unescaped reference tokens (escaping them as needed).
    pub fn from_tokens<I, S>(tokens: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let tokens: Vec<String> = tokens.into_iter().map(Into::into).collect();
        let mut raw = String::new();
        for t in &tokens {
            raw.push('/');
            raw.push_str(&escape_token(t));
        }
        Self { raw, tokens }
    }

    /// The JSON-string representation, escaped, exactly as it was parsed.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The unescaped reference tokens.
    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }

    /// Whether this is `""`, the whole document.
    pub fn is_root(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The parent's tokens and the last token, or `None` for the root.
    pub fn split_last(&self) -> Option<(&[String], &str)> {
        self.tokens
            .split_last()
            .map(|(last, parent)| (parent, last.as_str()))
    }

    /// Whether `self` is a proper prefix of `other`, token by token (`/a` is a proper prefix
    /// of `/a/b` but not of `/a` nor of `/ab`). The root is a proper prefix of every other
    /// pointer.
    pub fn is_proper_prefix_of(&self, other: &JsonPointer) -> bool {
        self.tokens.len() < other.tokens.len() && other.tokens.starts_with(&self.tokens)
    }

    /// A new pointer with `token` (unescaped) appended.
    pub fn child(&self, token: &str) -> Self {
        let mut raw = self.raw.clone();
        raw.push('/');
        raw.push_str(&escape_token(token));
        let mut tokens = self.tokens.clone();
        tokens.push(token.to_owned());
        Self { raw, tokens }
    }

    /// Resolves the pointer against `doc`. `-` is never allowed here.
    pub fn get<'a>(&self, doc: &'a Value) -> Result<&'a Value, PointerError> {
        self.get_prefix(doc, self.tokens.len())
    }

    /// Resolves the pointer against `doc` mutably. `-` is never allowed here.
    pub fn get_mut<'a>(&self, doc: &'a mut Value) -> Result<&'a mut Value, PointerError> {
        self.get_prefix_mut(doc, self.tokens.len())
    }

    /// Resolves the first `n` tokens (the parent of the target when `n == len - 1`).
    pub(crate) fn get_prefix<'a>(
        &self,
        doc: &'a Value,
        n: usize,
    ) -> Result<&'a Value, PointerError> {
        let mut cur = doc;
        for token in self.tokens.iter().take(n) {
            cur = match cur {
                Value::Object(map) => map.get(token).ok_or_else(|| self.not_found(token))?,
                Value::Array(arr) => {
                    let i = self.existing_index(token, arr.len())?;
                    // `existing_index` guarantees i < len; `get` keeps this panic-free anyway.
                    arr.get(i).ok_or_else(|| self.not_found(token))?
                }
                other => return Err(self.not_a_container(token, other)),
            };
        }
        Ok(cur)
    }

    /// Mutable counterpart of [`JsonPointer::get_prefix`].
    pub(crate) fn get_prefix_mut<'a>(
        &self,
        doc: &'a mut Value,
        n: usize,
    ) -> Result<&'a mut Value, PointerError> {
        let mut cur = doc;
        for token in self.tokens.iter().take(n) {
            cur = match cur {
                Value::Object(map) => map.get_mut(token).ok_or_else(|| self.not_found(token))?,
                Value::Array(arr) => {
                    let i = self.existing_index(token, arr.len())?;
                    arr.get_mut(i).ok_or_else(|| self.not_found(token))?
                }
                other => return Err(self.not_a_container(token, other)),
            };
        }
        Ok(cur)
    }

    /// Interprets `token` as the index of an *existing* element of an array of length `len`.
    pub(crate) fn existing_index(&self, token: &str, len: usize) -> Result<usize, PointerError> {
        match self.array_position(token)? {
            ArrayPosition::End => Err(self.invalid_index(
                token,
                "\"-\" refers to the nonexistent element after the last one".to_owned(),
            )),
            ArrayPosition::Index(i) if i < len => Ok(i),
            ArrayPosition::Index(_) => Err(self.not_found(token)),
        }
    }

    /// Interprets `token` as an insertion position (`add`) in an array of length `len`:
    /// `0..=len`, or `-` for `len`.
    pub(crate) fn insert_index(&self, token: &str, len: usize) -> Result<usize, PointerError> {
        match self.array_position(token)? {
            ArrayPosition::End => Ok(len),
            ArrayPosition::Index(i) if i <= len => Ok(i),
            ArrayPosition::Index(i) => Err(self.invalid_index(
                token,
                format!("index {i} is greater than the array length {len}"),
            )),
        }
    }

    /// Applies the array index syntax rules to `token` (no length check).
    pub fn array_position(&self, token: &str) -> Result<ArrayPosition, PointerError> {
        parse_array_index(token).map_err(|reason| self.invalid_index(token, reason.to_owned()))
    }

    pub(crate) fn not_found(&self, token: &str) -> PointerError {
        PointerError::NotFound {
            pointer: self.raw.clone(),
            token: token.to_owned(),
        }
    }

    pub(crate) fn not_a_container(&self, token: &str, found: &Value) -> PointerError {
        PointerError::NotAContainer {
            pointer: self.raw.clone(),
            token: token.to_owned(),
            kind: json_kind(found),
        }
    }

    pub(crate) fn invalid_index(&self, token: &str, reason: String) -> PointerError {
        PointerError::InvalidIndex {
            pointer: self.raw.clone(),
            token: token.to_owned(),
            reason,
        }
    }
}

impl FromStr for JsonPointer {
    type Err = PointerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for JsonPointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// Parses an array reference token per RFC 6901 §4: `-`, `0`, or `[1-9][0-9]*`.
///
/// A syntactically valid index too large for `usize` is returned as `usize::MAX`, which is
/// out of range for every array (so it reports as out of range, not as a syntax error).
pub fn parse_array_index(token: &str) -> Result<ArrayPosition, &'static str> {
    if token == "-" {
        return Ok(ArrayPosition::End);
    }
    let bytes = token.as_bytes();
    match bytes {
        [] => Err("an empty token is not an array index"),
        _ if !bytes.iter().all(u8::is_ascii_digit) => {
            Err("an array index must consist of decimal digits only")
        }
        [b'0', _, ..] => Err("an array index must not have leading zeros"),
        _ => Ok(ArrayPosition::Index(token.parse().unwrap_or(usize::MAX))),
    }
}

/// Escapes a reference token: `~` → `~0`, then `/` → `~1`.
pub fn escape_token(token: &str) -> Cow<'_, str> {
    if token.contains(['~', '/']) {
        Cow::Owned(token.replace('~', "~0").replace('/', "~1"))
    } else {
        Cow::Borrowed(token)
    }
}

/// Unescapes one raw token in a single left-to-right pass; `None` on an invalid escape.
fn unescape_token(raw: &str) -> Option<String> {
    if !raw.contains('~') {
        return Some(raw.to_owned());
    }
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '~' {
            match chars.next() {
                Some('0') => out.push('~'),
                Some('1') => out.push('/'),
                _ => return None,
            }
        } else {
            out.push(c);
        }
    }
    Some(out)
}

/// The JSON type name of a value, for messages.
pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(s: &str) -> JsonPointer {
        JsonPointer::parse(s).unwrap()
    }

    /// RFC 6901 §5 example document.
    fn rfc_doc() -> Value {
        json!({
            "foo": ["bar", "baz"],
            "": 0,
            "a/b": 1,
            "c%d": 2,
            "e^f": 3,
            "g|h": 4,
            "i\\j": 5,
            "k\"l": 6,
            " ": 7,
            "m~n": 8
        })
    }

    #[test]
    fn rfc6901_section5_examples() {
        let doc = rfc_doc();
        let cases: &[(&str, Value)] = &[
            ("", doc.clone()),
            ("/foo", json!(["bar", "baz"])),
            ("/foo/0", json!("bar")),
            ("/", json!(0)),
            ("/a~1b", json!(1)),
            ("/c%d", json!(2)),
            ("/e^f", json!(3)),
            ("/g|h", json!(4)),
            ("/i\\j", json!(5)),
            ("/k\"l", json!(6)),
            ("/ ", json!(7)),
            ("/m~0n", json!(8)),
        ];
        for (ptr, expected) in cases {
            assert_eq!(p(ptr).get(&doc).unwrap(), expected, "pointer {ptr:?}");
            // Round trip through tokens gives back the same escaped text.
            assert_eq!(
                JsonPointer::from_tokens(p(ptr).tokens().to_vec()).as_str(),
                *ptr
            );
        }
        let mut doc2 = doc.clone();
        *p("/foo/1").get_mut(&mut doc2).unwrap() = json!("qux");
        assert_eq!(doc2["foo"], json!(["bar", "qux"]));
    }

    #[test]
    fn parsing_and_escapes() {
        assert!(p("").is_root());
        assert_eq!(p("/").tokens(), [""]);
        assert_eq!(p("//").tokens(), ["", ""]);
        assert_eq!(p("/~01").tokens(), ["~1"]); // not "/"
        assert_eq!(p("/~10").tokens(), ["/0"]);
        assert_eq!(p("/a~1b/c~0d").tokens(), ["a/b", "c~d"]);
        assert_eq!(escape_token("~/"), "~0~1");

        let e = JsonPointer::parse("foo").unwrap_err();
        assert_eq!(
            e,
            PointerError::MissingLeadingSlash {
                pointer: "foo".into()
            }
        );
        assert_eq!(e.code(), "invalid_pointer");
        for (bad, token) in [
            ("/a~2", "a~2"),
            ("/x/~", "~"),
            ("/~a", "~a"),
            ("/ok/~~0", "~~0"),
        ] {
            let e = JsonPointer::parse(bad).unwrap_err();
            assert_eq!(
                e,
                PointerError::InvalidEscape {
                    pointer: bad.into(),
                    token: token.into()
                },
                "{bad}"
            );
            assert_eq!(e.code(), "invalid_pointer");
            assert!(e.to_string().contains(token));
        }

        assert!(p("/a").is_proper_prefix_of(&p("/a/b")));
        assert!(!p("/a").is_proper_prefix_of(&p("/a")));
        assert!(!p("/a").is_proper_prefix_of(&p("/ab")));
        assert!(p("").is_proper_prefix_of(&p("/")));
        assert_eq!(p("/a").child("b/c").as_str(), "/a/b~1c");
    }

    #[test]
    fn array_index_rules_and_errors() {
        let doc = json!({"arr": [10, 20, 30], "obj": {"01": "x", "-": "dash"}, "s": "str"});
        assert_eq!(p("/arr/0").get(&doc).unwrap(), &json!(10));
        assert_eq!(p("/arr/2").get(&doc).unwrap(), &json!(30));
        // Index rules only apply to arrays: "01" and "-" are ordinary member names.
        assert_eq!(p("/obj/01").get(&doc).unwrap(), &json!("x"));
        assert_eq!(p("/obj/-").get(&doc).unwrap(), &json!("dash"));

        for (bad, token) in [
            ("/arr/01", "01"),
            ("/arr/-", "-"),
            ("/arr/+1", "+1"),
            ("/arr/ 1", " 1"),
            ("/arr/1e0", "1e0"),
            ("/arr/", ""),
            ("/arr/-1", "-1"),
        ] {
            let e = p(bad).get(&doc).unwrap_err();
            assert_eq!(e.code(), "invalid_index", "{bad}: {e}");
            assert!(
                matches!(&e, PointerError::InvalidIndex { pointer, token: t, .. }
                if pointer == bad && t == token)
            );
        }
        for (missing, token) in [
            ("/arr/3", "3"),
            ("/arr/99999999999999999999999", "99999999999999999999999"),
            ("/nope", "nope"),
            ("/obj/nope/deeper", "nope"),
        ] {
            let e = p(missing).get(&doc).unwrap_err();
            assert_eq!(
                e,
                PointerError::NotFound {
                    pointer: missing.into(),
                    token: token.into()
                }
            );
            assert_eq!(e.code(), "path_not_found");
        }
        let e = p("/s/0").get(&doc).unwrap_err();
        assert_eq!(
            e,
            PointerError::NotAContainer {
                pointer: "/s/0".into(),
                token: "0".into(),
                kind: "string"
            }
        );
        assert_eq!(e.code(), "path_not_found");

        let ptr = p("/arr/x");
        assert_eq!(ptr.insert_index("-", 3).unwrap(), 3);
        assert_eq!(ptr.insert_index("3", 3).unwrap(), 3);
        assert_eq!(
            ptr.insert_index("4", 3).unwrap_err().code(),
            "invalid_index"
        );
        assert_eq!(
            ptr.existing_index("3", 3).unwrap_err().code(),
            "path_not_found"
        );
        assert_eq!(parse_array_index("0"), Ok(ArrayPosition::Index(0)));
        assert_eq!(parse_array_index("10"), Ok(ArrayPosition::Index(10)));
        assert_eq!(parse_array_index("-"), Ok(ArrayPosition::End));
        assert!(parse_array_index("00").is_err());
        assert!(parse_array_index("٣").is_err()); // non-ASCII digit
    }
}
