//! [`Secret`]: a value that is handed to a client library but never printed.
//!
//! Invariants: neither `Debug` nor `Display` shows the wrapped value; serialized inside
//! [`redacting`] (how `weir config` prints the configuration) it is [`REDACTED`], and only
//! outside it (the layering's defaults, tests) is the value itself serialized.

use std::cell::Cell;
use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

/// What a secret serializes as inside [`redacting`]. Control characters keep it apart from any
/// value an operator would configure, so the printer can find the lines to hide.
pub(super) const REDACTED: &str = "\u{1}weir:secret\u{1}";

thread_local! {
    /// Whether [`redacting`] is running on this thread.
    static REDACTING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every [`Secret`] (and every secret-looking key of the Kafka maps, see
/// [`super::is_secret_key`]) serializing as [`REDACTED`]. Being structural, a secret field
/// added later is hidden without anyone listing it.
pub(super) fn redacting<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            REDACTING.set(self.0);
        }
    }
    let _restore = Restore(REDACTING.replace(true));
    f()
}

/// Whether secrets serialize as [`REDACTED`] right now.
pub(super) fn is_redacting() -> bool {
    REDACTING.get()
}

/// A value that must never be printed (passwords, keys, URLs that embed credentials).
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a value.
    pub fn new(value: T) -> Self {
        Self(value)
    }
    /// The wrapped value; call only where it is handed to a client library.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<T: Serialize> Serialize for Secret<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if is_redacting() {
            serializer.serialize_str(REDACTED)
        } else {
            self.0.serialize(serializer)
        }
    }
}
