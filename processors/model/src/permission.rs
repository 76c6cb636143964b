//! What an API key, a run's requester or a cache entry may do: `read < write < admin`.
//!
//! Invariants: the three names (`read`, `write`, `admin`) are the only spellings, on the wire
//! (events, JSON bodies), in Postgres (`weir_api_keys.permission`) and on the command line;
//! the numeric level (1, 2, 3) is what the cache stores and compares in SQL. Anything else
//! parses to an error, never to a default level.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Permission levels, ordered: `Read < Write < Admin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// Read everything in the workspace, look up the cache.
    Read = 1,
    /// Also submit patches, runs, cancellations, completions and cache entries.
    Write = 2,
    /// Everything (and administrative endpoints).
    Admin = 3,
}

/// A string that names no [`Permission`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("permission must be read, write or admin, not {0:?}")]
pub struct UnknownPermission(
    /// The rejected text (its first 40 characters).
    pub String,
);

impl Permission {
    /// Every level, lowest first.
    pub const ALL: [Permission; 3] = [Permission::Read, Permission::Write, Permission::Admin];

    /// The level as stored in Postgres (1, 2, 3).
    pub fn level(self) -> i16 {
        self as i16
    }

    /// `read`, `write` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Write => "write",
            Permission::Admin => "admin",
        }
    }

    /// Parses `read`, `write` or `admin` (exactly: no other case, no whitespace).
    pub fn parse(s: &str) -> Result<Permission, UnknownPermission> {
        match s {
            "read" => Ok(Permission::Read),
            "write" => Ok(Permission::Write),
            "admin" => Ok(Permission::Admin),
            other => Err(UnknownPermission(other.chars().take(40).collect())),
        }
    }

    /// This level and every lower one: the levels of entries a requester may be served.
    pub fn and_below(self) -> impl Iterator<Item = Permission> {
        Permission::ALL.into_iter().filter(move |p| *p <= self)
    }
}

impl FromStr for Permission {
    type Err = UnknownPermission;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Permission::parse(s)
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_levels_and_order() {
        assert!(Permission::Read < Permission::Write && Permission::Write < Permission::Admin);
        for p in Permission::ALL {
            assert_eq!(Permission::parse(p.as_str()), Ok(p));
            assert_eq!(p.to_string().parse::<Permission>(), Ok(p));
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
        assert_eq!(
            Permission::ALL.map(Permission::level),
            [1, 2, 3],
            "levels are stored in Postgres"
        );
        for bad in ["root", "", "Read", " read", "read "] {
            assert!(Permission::parse(bad).is_err(), "{bad:?}");
        }
        let long = "x".repeat(1000);
        assert_eq!(Permission::parse(&long).unwrap_err().0.len(), 40);
        assert_eq!(
            Permission::Write.and_below().collect::<Vec<_>>(),
            vec![Permission::Read, Permission::Write]
        );
    }
}
