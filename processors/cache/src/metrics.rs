//! Metric names of the cache, in one place. Lookup metrics carry `workspace` and `node_type`;
//! `node_type` is one of the configured cacheable or semantic types, or `other` (a label
//! never takes a value a caller chooses freely).

/// Lookups answered, by `outcome` = `exact` | `semantic` | `miss`.
pub const LOOKUPS: &str = "weir_cache_lookups_total";
/// Milliseconds of work saved by hits (the entries' cost_ms).
pub const SAVED_MS: &str = "weir_cache_saved_ms_total";
/// Cost saved by hits, from `cache.cost_per_hit`.
pub const SAVED_COST: &str = "weir_cache_saved_cost_total";
/// Best-match similarity of semantic lookups that missed (near misses).
pub const NEAR_MISS_SIMILARITY: &str = "weir_cache_near_miss_similarity";
/// Results stored, by `kind` = `exact` | `semantic`.
pub const STORED: &str = "weir_cache_stored_total";
/// Results refused by the PII guard, by `pattern`.
pub const PII_REFUSED: &str = "weir_cache_pii_refused_total";
/// Results refused for another reason (`reason` = `not_cacheable` | `too_large`).
pub const REFUSED: &str = "weir_cache_refused_total";
/// Entries whose CAS blob was missing or corrupt at lookup (then deleted, answered as a miss).
pub const BAD_BLOB: &str = "weir_cache_bad_blob_total";
/// Expired entries deleted by the sweeper.
pub const SWEPT: &str = "weir_cache_swept_total";
/// CAS blobs deleted by the garbage collector.
pub const GC_DELETED: &str = "weir_cache_gc_deleted_total";
/// Records rejected (dead-lettered) by the cache processor, by `reason` = `invalid` |
/// `prompt` | `embedding`.
pub const REJECTED: &str = "weir_cache_rejected_total";
/// Prompts the embedder refused (one prompt each: a 4xx about it, a bad vector), by `embedder`.
pub const EMBED_REFUSED: &str = "weir_cache_embed_refused_total";
/// Embedder calls that failed as a whole, by `class` = `unavailable` | `misconfigured`.
pub const EMBEDDER_ERRORS: &str = "weir_cache_embedder_errors_total";
/// Prompts embedded, by `embedder`.
pub const EMBEDDED: &str = "weir_cache_embedded_total";
/// Seconds per embedding batch, by `embedder`.
pub const EMBED_SECONDS: &str = "weir_cache_embed_seconds";
