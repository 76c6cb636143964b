//! [`Secret`]: a value that is handed to a client library but never printed.
//!
//! Invariant: neither `Debug` nor `Display` shows the wrapped value.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A value that must never be printed (passwords, keys, URLs that embed credentials).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
