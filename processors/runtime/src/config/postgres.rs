//! The `postgres` section.

use serde::{Deserialize, Serialize};

use super::Secret;

/// Postgres settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Connection URL (env: DATABASE_URL); secret because it usually embeds a password.
    pub url: Secret<String>,
    /// Upper bound of pooled connections per process.
    pub max_connections: u32,
    /// How long to wait for a pooled connection before the batch is retried, in ms.
    pub acquire_timeout_ms: u64,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: Secret::new("postgres://weir:weir@127.0.0.1:5432/weir".into()),
            max_connections: 16,
            acquire_timeout_ms: 5_000,
        }
    }
}
