//! API keys: `Authorization: Bearer weir_<key_id>_<secret>` → (workspace, permission).
//!
//! Only the sha256 of a key is stored (`weir_api_keys`). Found keys are cached in memory for
//! `gateway.key_cache_ttl_ms`, so the request path touches Postgres about once per key per
//! TTL. A revocation is announced by Postgres (LISTEN/NOTIFY) and the key forgotten at once;
//! if the announcement is lost, a revoked key keeps working at most that TTL. Unknown keys
//! live in a separate, bounded negative cache, and the lookups they cause are budgeted per
//! client ([`KeyStore`]). `weir keys create | list | revoke` use [`create_key`],
//! [`list_keys`] and [`revoke_key`].

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use weir_model::Permission;

use crate::limit::{ClientId, RateLimiter};

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

/// A key's row as `weir keys list` shows it (never the key or its hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    /// Public id.
    pub key_id: String,
    /// Its workspace.
    pub workspace_id: String,
    /// Its permission (`read`, `write` or `admin`).
    pub permission: String,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// When it was revoked (RFC 3339), if it was.
    pub revoked_at: Option<String>,
}

/// Every key, or every key of `workspace_id`, oldest first within a workspace.
pub async fn list_keys(
    pool: &PgPool,
    workspace_id: Option<&str>,
) -> Result<Vec<KeyInfo>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT key_id, workspace_id, permission,
                  to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS "created_at!",
                  to_char(revoked_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS revoked_at
           FROM weir_api_keys
           WHERE $1::text IS NULL OR workspace_id = $1
           ORDER BY workspace_id, created_at, key_id"#,
        workspace_id
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| KeyInfo {
            key_id: r.key_id,
            workspace_id: r.workspace_id,
            permission: r.permission,
            created_at: r.created_at,
            revoked_at: r.revoked_at,
        })
        .collect())
}

/// What `weir keys revoke` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    /// The key was live and is now revoked.
    Now,
    /// The key had already been revoked.
    Already,
    /// There is no key with that id.
    Unknown,
}

/// Revokes the key `key_id`. Listening gateways forget it when the revocation commits (a
/// trigger notifies [`REVOKED_CHANNEL`]); any gateway stops accepting it within
/// `gateway.key_cache_ttl_ms` (the time a found key is trusted from memory).
pub async fn revoke_key(pool: &PgPool, key_id: &str) -> Result<Revoked, sqlx::Error> {
    let updated = sqlx::query!(
        "UPDATE weir_api_keys SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL",
        key_id
    )
    .execute(pool)
    .await?
    .rows_affected();
    if updated > 0 {
        return Ok(Revoked::Now);
    }
    let exists = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM weir_api_keys WHERE key_id = $1) AS "exists!""#,
        key_id
    )
    .fetch_one(pool)
    .await?;
    Ok(if exists {
        Revoked::Already
    } else {
        Revoked::Unknown
    })
}

/// The Postgres channel a revocation (or deletion) of a key is announced on, with the key id
/// (`sql/20261206000041_api_key_revocation_notify.sql`).
pub const REVOKED_CHANNEL: &str = "weir_api_key_revoked";

/// Whether `key` has the shape [`create_key`] gives keys (`weir_<hex id>_<hex secret>`).
/// Anything else is refused without hashing it or looking it up.
pub fn well_formed(key: &str) -> bool {
    let Some(rest) = key.strip_prefix("weir_") else {
        return false;
    };
    let Some((id, secret)) = rest.split_once('_') else {
        return false;
    };
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    (1..=64).contains(&id.len()) && (16..=128).contains(&secret.len()) && hex(id) && hex(secret)
}

#[derive(Debug, Clone)]
struct Known {
    caller: Caller,
    until: Instant,
}

/// Bounds of a [`KeyStore`].
#[derive(Debug, Clone, Copy)]
pub struct KeyStoreLimits {
    /// How long a found key is trusted from memory (so also how long a revoked key may
    /// keep working).
    pub ttl: Duration,
    /// How long a key Postgres does not know is answered 401 from memory.
    pub negative_ttl: Duration,
    /// Most unknown keys remembered.
    pub max_negative: usize,
    /// Key lookups finding nothing allowed per second per client, sustained.
    pub unknown_per_sec: u32,
    /// ... and at once.
    pub unknown_burst: u32,
}

/// Most found keys remembered before expired ones are dropped (only keys that exist in
/// Postgres get here, so callers cannot grow it).
const MAX_KNOWN: usize = 100_000;

/// The answer to a bearer key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// A live key.
    Known(Caller),
    /// Malformed, unknown or revoked.
    Unknown,
    /// The client sent too many unknown keys lately: not looked up (429).
    Throttled,
}

/// Key lookups with two in-memory caches that never share room: found keys (positive,
/// `ttl`) and keys Postgres did not know (negative, `negative_ttl`, at most `max_negative`).
/// A flood of random keys fills only the negative cache, and the lookups it causes are
/// bounded per client: once a client's budget of lookups that found nothing is spent, its
/// keys that are not already known are answered 429 without a query. A key created after it
/// was cached as unknown works once the negative entry expires.
#[derive(Debug)]
pub struct KeyStore {
    pool: PgPool,
    limits: KeyStoreLimits,
    known: RwLock<HashMap<String, Known>>,
    unknown: Mutex<HashMap<String, Instant>>,
    misses: RateLimiter<ClientId>,
}

/// Looking up a key failed for a reason other than the key.
#[derive(Debug, thiserror::Error)]
#[error("looking up an API key: {0}")]
pub struct KeyLookupError(#[from] sqlx::Error);

impl KeyStore {
    /// A store over `pool` with `limits`.
    pub fn new(pool: PgPool, limits: KeyStoreLimits) -> Self {
        Self {
            pool,
            misses: RateLimiter::new(limits.unknown_per_sec, limits.unknown_burst),
            limits,
            known: RwLock::new(HashMap::new()),
            unknown: Mutex::new(HashMap::new()),
        }
    }

    /// Resolves a bearer key sent by `client` (`None`: no client address, e.g. in-process
    /// tests; then lookups are not budgeted).
    pub async fn resolve(
        &self,
        key: &str,
        client: Option<ClientId>,
    ) -> Result<Resolved, KeyLookupError> {
        if !well_formed(key) {
            return Ok(Resolved::Unknown);
        }
        let hash = key_hash(key);
        let now = Instant::now();
        let stale = {
            let known = self.known.read().unwrap_or_else(|p| p.into_inner());
            match known.get(&hash) {
                Some(k) if k.until > now => return Ok(Resolved::Known(k.caller.clone())),
                Some(_) => true,
                None => false,
            }
        };
        if !stale {
            let unknown = self.unknown.lock().unwrap_or_else(|p| p.into_inner());
            if unknown.get(&hash).is_some_and(|until| *until > now) {
                return Ok(Resolved::Unknown);
            }
        }
        // A key found before is refreshed whatever the budget: the budget only bounds the
        // lookups random keys cause.
        if let Some(c) = client.filter(|_| !stale) {
            if !self.misses.has_token(&c, now) {
                ::metrics::counter!(crate::metrics::CLIENT_LIMITED, "reason" => "unknown_keys")
                    .increment(1);
                return Ok(Resolved::Throttled);
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
                permission: Permission::parse(&r.permission).ok()?,
            })
        });
        let now = Instant::now();
        match caller {
            Some(caller) => {
                self.remember_known(hash, caller.clone(), now);
                Ok(Resolved::Known(caller))
            }
            None => {
                self.known
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&hash);
                self.remember_unknown(hash, now);
                if let Some(c) = client {
                    self.misses.charge(&c, now);
                }
                Ok(Resolved::Unknown)
            }
        }
    }

    fn remember_known(&self, hash: String, caller: Caller, now: Instant) {
        let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
        if known.len() >= MAX_KNOWN {
            known.retain(|_, k| k.until > now);
            if known.len() >= MAX_KNOWN {
                known.clear();
            }
        }
        known.insert(
            hash,
            Known {
                caller,
                until: now + self.limits.ttl,
            },
        );
    }

    fn remember_unknown(&self, hash: String, now: Instant) {
        let mut unknown = self.unknown.lock().unwrap_or_else(|p| p.into_inner());
        if unknown.len() >= self.limits.max_negative {
            unknown.retain(|_, until| *until > now);
            if unknown.len() >= self.limits.max_negative {
                // Forgetting unknown keys only costs lookups, which the per-client budget
                // bounds; found keys live in the other map and are never touched.
                unknown.clear();
            }
        }
        unknown.insert(hash, now + self.limits.negative_ttl);
    }

    /// Forgets the found key `key_id` (revoked).
    pub fn forget(&self, key_id: &str) {
        self.known
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, k| k.caller.key_id != key_id);
    }

    /// Forgets keys as their revocations are announced ([`REVOKED_CHANNEL`]) until
    /// `shutdown`. Whenever the listening connection is (re)established, every found key is
    /// forgotten, since announcements made meanwhile are lost; that costs one lookup per key.
    pub async fn watch_revocations(&self, shutdown: CancellationToken) {
        let mut failures = 0u32;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.listen_revocations() => {
                    failures = failures.saturating_add(1);
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "LISTEN for key revocations lost");
                    }
                }
            }
            let backoff = Duration::from_millis(100u64 << failures.min(6));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
        }
    }

    async fn listen_revocations(&self) -> Result<(), sqlx::Error> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen(REVOKED_CHANNEL).await?;
        self.forget_all();
        loop {
            match listener.try_recv().await? {
                Some(n) => {
                    tracing::info!(key_id = n.payload(), "an API key was revoked");
                    self.forget(n.payload());
                }
                // Reconnected: announcements made meanwhile are lost.
                None => self.forget_all(),
            }
        }
    }

    fn forget_all(&self) {
        self.known
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Sizes of the found and unknown key caches (for tests and metrics).
    pub fn cached(&self) -> (usize, usize) {
        (
            self.known.read().unwrap_or_else(|p| p.into_inner()).len(),
            self.unknown.lock().unwrap_or_else(|p| p.into_inner()).len(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hashes_are_sha256_hex() {
        // Permission parsing and order: weir_model::permission's tests.
        assert_eq!(key_hash("a").len(), 64);
        assert_ne!(key_hash("a"), key_hash("b"));
    }

    #[test]
    fn only_well_formed_keys_are_looked_up() {
        let key = format!("weir_{}_{}", "0a1b2c3d4e5f", "ab".repeat(24));
        assert!(well_formed(&key));
        for bad in [
            "",
            "weir_",
            "weir__abcdefabcdefabcdef",
            "weir_0a1b_short",
            "Bearer weir_0a_0123456789abcdef",
            "weir_0a_0123456789abcdeg",
            "sk-0123456789abcdef0123456789",
        ] {
            assert!(!well_formed(bad), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn unknown_keys_never_displace_found_ones_and_are_budgeted_per_client() {
        // A pool that cannot connect: any lookup that reaches Postgres fails, so the test
        // sees exactly which answers came from memory.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(Duration::from_millis(200))
            .connect_lazy("postgres://nobody:nothing@127.0.0.1:9/none")
            .unwrap();
        let store = KeyStore::new(
            pool,
            KeyStoreLimits {
                ttl: Duration::from_secs(60),
                negative_ttl: Duration::from_secs(60),
                max_negative: 4,
                unknown_per_sec: 1,
                unknown_burst: 2,
            },
        );
        let good = format!("weir_0a_{}", "11".repeat(24));
        let caller = Caller {
            key_id: "0a".into(),
            workspace_id: "ws".into(),
            permission: Permission::Write,
        };
        store.remember_known(key_hash(&good), caller.clone(), Instant::now());
        for i in 0..50 {
            store.remember_unknown(key_hash(&format!("junk{i}")), Instant::now());
        }
        assert_eq!(store.cached(), (1, 2), "the negative cache stays bounded");
        assert_eq!(
            store.resolve(&good, None).await.unwrap(),
            Resolved::Known(caller)
        );
        let client = ClientId::new("192.0.2.7".parse().unwrap());
        store.misses.charge(&client, Instant::now());
        store.misses.charge(&client, Instant::now());
        let random = format!("weir_0b_{}", "22".repeat(24));
        assert_eq!(
            store.resolve(&random, Some(client)).await.unwrap(),
            Resolved::Throttled,
            "a spent budget answers without a lookup"
        );
        assert_eq!(
            store.resolve("not a key", Some(client)).await.unwrap(),
            Resolved::Unknown
        );
        assert!(
            store
                .resolve(&random, Some(ClientId::new("192.0.2.8".parse().unwrap())))
                .await
                .is_err(),
            "another client's budget is its own (the lookup reaches the dead pool)"
        );
    }
}
