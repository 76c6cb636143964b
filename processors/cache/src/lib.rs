//! weir-cache: the result cache. People in one workspace reuse each other's node results, so
//! an expensive HTTP or LLM call runs once instead of ten times.
//!
//! - [`cache`]: the [`Cache`] handle, as a library; [`cache::types`] its requests and answers,
//!   [`cache::exact`] exact lookups (key = sha256 of workspace, permission level, node type,
//!   config hash, inputs hash over canonical JSON; [`exact_lookup_batch`] is the
//!   coordinator's), `semantic` lookups (prompt embeddings in pgvector, HNSW with iterative
//!   index scans, vectors bound binary), `store` writes and `blobs` results in the CAS;
//!   which node types are cacheable is [`weir_model::cache`]'s rule;
//! - [`processor`]: the weir.cache.v1 processor answering on weir.cache-answers.v1;
//! - [`embed`]: the built-in all-MiniLM-L6-v2 (candle) and the OpenAI-compatible embedder;
//! - [`pii`]: the guard that keeps personal data and secrets out of the cache;
//! - [`maintenance`]: sweeper, purge, CAS garbage collection.
//!
//! Invariants (see docs/cache.md): a result never crosses a workspace or goes to a requester
//! below the entry's required permission (enforced in SQL); expired entries are never
//! served; a hit is served only if its CAS blob exists and verifies.

pub mod cache;
pub mod embed;
pub mod error;
pub mod key;
pub mod maintenance;
pub mod metrics;
pub mod pii;
pub mod processor;

pub use cache::{
    exact_lookup_batch, Answer, Cache, ExactHit, ExactRequest, LookupRequest, Refusal,
    StoreOutcome, StoreRequest, StoreResult, UnitVector,
};
pub use embed::Embedder;
pub use error::CacheError;
pub use processor::CacheProcessor;
