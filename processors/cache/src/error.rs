//! Errors of the cache, each with its retry-vs-dead-letter classification.

use weir_runtime::cas::CasError;
use weir_runtime::error::{postgres_disposition, Disposition};

/// What can go wrong looking up or storing a result.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The request itself is invalid (bad permission name, JSON that does not parse, empty
    /// workspace): the record is dead-lettered, the gateway answers 400.
    #[error("invalid cache request: {0}")]
    Invalid(String),
    /// An embedding's dimension differs from the deployment's (`cache.dimensions`), or the
    /// stored embedding space differs from the configuration.
    #[error("embedding dimension mismatch: {0}")]
    Dimension(String),
    /// The embedder failed (model files missing or unreadable, inference error, endpoint down).
    #[error("embedder: {message}")]
    Embed {
        /// Detail.
        message: String,
        /// Whether waiting can fix it (an unreachable endpoint) or not (missing model files).
        retry: bool,
    },
    /// Postgres failed. The message is logged; API callers see only "database unavailable".
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// The CAS failed (other than a missing or corrupt blob, which is a miss).
    #[error("cas: {0}")]
    Cas(#[from] CasError),
}

impl CacheError {
    /// What the consumer loop does with this error.
    pub fn disposition(&self) -> Disposition {
        match self {
            CacheError::Invalid(_) | CacheError::Dimension(_) => Disposition::DeadLetter,
            CacheError::Embed { retry: true, .. } => Disposition::Retry,
            CacheError::Embed { retry: false, .. } => Disposition::Fatal,
            CacheError::Postgres(e) => postgres_disposition(e),
            CacheError::Cas(e) => e.disposition(),
        }
    }

    /// A message safe to show an API caller: database and storage details stay in the logs.
    pub fn public_message(&self) -> String {
        match self {
            CacheError::Invalid(_) | CacheError::Dimension(_) => self.to_string(),
            CacheError::Embed { .. } => "embedder unavailable".into(),
            CacheError::Postgres(_) => "database unavailable".into(),
            CacheError::Cas(_) => "result store unavailable".into(),
        }
    }
}

impl From<CacheError> for weir_runtime::ApplyError {
    fn from(e: CacheError) -> Self {
        match e {
            CacheError::Postgres(e) => weir_runtime::ApplyError::Postgres(e),
            other => weir_runtime::ApplyError::Other {
                disposition: other.disposition(),
                message: other.to_string(),
            },
        }
    }
}
