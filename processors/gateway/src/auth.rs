//! API keys: `Authorization: Bearer weir_<key_id>_<secret>` → (workspace, permission).
//!
//! Only the sha256 of a key is stored (`weir_api_keys`). Lookups are cached in memory for
//! `gateway.key_cache_ttl_ms` (unknown keys too, for a fifth of that), so the request path
//! touches Postgres about once per key per TTL; a revoked key keeps working at most that long.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

/// What a key may do. Ordered: `Read < Write < Admin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// GET everything in the workspace, cache lookups.
    Read,
    /// Also submit patches, runs, cancellations, completions and cache entries.
    Write,
    /// Everything (and future administrative endpoints).
    Admin,
}

impl Permission {
    /// `read`, `write` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Write => "write",
            Permission::Admin => "admin",
        }
    }
    /// Parses `read`, `write` or `admin`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "read" => Some(Permission::Read),
            "write" => Some(Permission::Write),
            "admin" => Some(Permission::Admin),
            _ => None,
        }
    }
}

/// Who is calling: the key's id, workspace and permission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Public id of the key (the part of the key before the secret); used as author and
    /// requester in events.
    pub key_id: String,
    /// The workspace every request of this key is confined to.
    pub workspace_id: String,
    /// What the key may do.
    pub permission: Permission,
}

/// A freshly created key; `key` is shown once and never stored.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// Public id.
    pub key_id: String,
    /// The bearer token.
    pub key: String,
}

/// The stored hash of a key.
pub fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Creates a key for `workspace_id` with `permission`; returns it (the only time it is seen).
pub async fn create_key(
    pool: &PgPool,
    workspace_id: &str,
    permission: Permission,
) -> Result<NewKey, sqlx::Error> {
    let key_id = hex::encode(rand::random::<[u8; 6]>());
    let secret = hex::encode(rand::random::<[u8; 24]>());
    let key = format!("weir_{key_id}_{secret}");
    sqlx::query!(
        "INSERT INTO weir_api_keys (key_sha256, key_id, workspace_id, permission)
         VALUES ($1, $2, $3, $4)",
        key_hash(&key),
        key_id,
        workspace_id,
        permission.as_str(),
    )
    .execute(pool)
    .await?;
    Ok(NewKey { key_id, key })
}

#[derive(Debug, Clone)]
struct Cached {
    caller: Option<Caller>,
    until: Instant,
}

/// Most cached keys before the cache is emptied (a flood of random keys cannot grow memory).
const MAX_CACHED: usize = 100_000;

/// Key lookups with an in-memory TTL cache.
#[derive(Debug)]
pub struct KeyStore {
    pool: PgPool,
    ttl: Duration,
    cache: RwLock<HashMap<String, Cached>>,
}

/// Looking up a key failed for a reason other than the key.
#[derive(Debug, thiserror::Error)]
#[error("looking up an API key: {0}")]
pub struct KeyLookupError(#[from] sqlx::Error);

impl KeyStore {
    /// A store over `pool`, trusting lookups for `ttl`.
    pub fn new(pool: PgPool, ttl: Duration) -> Self {
        Self {
            pool,
            ttl,
            cache: RwLock::new(HashMap::new()),
        }
    }

    /// The caller a bearer key belongs to; `None` for an unknown or revoked key.
    pub async fn resolve(&self, key: &str) -> Result<Option<Caller>, KeyLookupError> {
        let hash = key_hash(key);
        let now = Instant::now();
        if let Some(c) = self
            .cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&hash)
        {
            if c.until > now {
                return Ok(c.caller.clone());
            }
        }
        ::metrics::counter!(crate::metrics::KEY_LOOKUPS).increment(1);
        let row = sqlx::query!(
            "SELECT key_id, workspace_id, permission FROM weir_api_keys
             WHERE key_sha256 = $1 AND revoked_at IS NULL",
            hash
        )
        .fetch_optional(&self.pool)
        .await?;
        let caller = row.and_then(|r| {
            Some(Caller {
                key_id: r.key_id,
                workspace_id: r.workspace_id,
                permission: Permission::parse(&r.permission)?,
            })
        });
        let ttl = if caller.is_some() {
            self.ttl
        } else {
            self.ttl / 5
        };
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(
            hash,
            Cached {
                caller: caller.clone(),
                until: now + ttl,
            },
        );
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_are_ordered_and_round_trip() {
        assert!(Permission::Read < Permission::Write && Permission::Write < Permission::Admin);
        for p in [Permission::Read, Permission::Write, Permission::Admin] {
            assert_eq!(Permission::parse(p.as_str()), Some(p));
        }
        assert_eq!(Permission::parse("root"), None);
        assert_eq!(key_hash("a").len(), 64);
        assert_ne!(key_hash("a"), key_hash("b"));
    }
}
