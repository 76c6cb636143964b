//! The `schema_registry` section.

use serde::{Deserialize, Serialize};

use super::Secret;

/// Schema registry settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Base URL of the Confluent-compatible API (env: SCHEMA_REGISTRY_URL).
    pub url: String,
    /// Basic-auth user, if the registry needs one.
    pub username: String,
    /// Basic-auth password.
    pub password: Secret<String>,
    /// Timeout of one registry call, in ms.
    pub timeout_ms: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8081/apis/ccompat/v7".into(),
            username: String::new(),
            password: Secret::default(),
            timeout_ms: 5_000,
        }
    }
}
