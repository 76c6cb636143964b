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

/// The `node_type` label for a type that did not go through [`crate::cache::node_label`]
/// (no configuration at hand): one of the six node types of a definition, else `other`.
pub fn node_type_label(node_type: &str) -> &'static str {
    match node_type {
        "function" => "function",
        "pure" => "pure",
        "http_request" => "http_request",
        "database_query" => "database_query",
        "agent" => "agent",
        "human" => "human",
        _ => "other",
    }
}

/// Help text and units of the cache's metrics. Call once at start, after the recorder is
/// installed (`weir_runtime::telemetry::metrics_handle`).
pub fn describe() {
    use metrics::{describe_counter, describe_histogram, Unit};
    describe_counter!(LOOKUPS, Unit::Count,
        "Cache lookups answered, by node_type and outcome (exact, semantic, miss). Hit rate: outcome!=miss over all.");
    describe_counter!(
        SAVED_MS,
        Unit::Milliseconds,
        "Milliseconds of work saved by cache hits (the entries' cost_ms), by node_type."
    );
    describe_counter!(
        SAVED_COST,
        Unit::Count,
        "Cost saved by cache hits in thousandths of the unit of cache.cost_per_hit, by node_type."
    );
    describe_histogram!(
        NEAR_MISS_SIMILARITY,
        Unit::Count,
        "Best-match cosine similarity of semantic lookups that missed, by node_type."
    );
    describe_counter!(
        STORED,
        Unit::Count,
        "Results stored, by node_type and kind (exact, semantic)."
    );
    describe_counter!(
        PII_REFUSED,
        Unit::Count,
        "Results refused by the PII guard, by node_type and pattern."
    );
    describe_counter!(
        REFUSED,
        Unit::Count,
        "Results refused for another reason, by reason (not_cacheable, too_large)."
    );
    describe_counter!(BAD_BLOB, Unit::Count,
        "Cache entries whose CAS blob was missing or corrupt at lookup (deleted, answered as a miss), by kind.");
    describe_counter!(
        SWEPT,
        Unit::Count,
        "Expired cache entries deleted by the sweeper."
    );
    describe_counter!(
        GC_DELETED,
        Unit::Count,
        "CAS blobs deleted by the cache's garbage collector."
    );
    describe_counter!(
        REJECTED,
        Unit::Count,
        "Cache records dead-lettered, by reason (invalid, prompt, embedding)."
    );
    describe_counter!(
        EMBED_REFUSED,
        Unit::Count,
        "Prompts the embedder refused one by one, by embedder."
    );
    describe_counter!(EMBEDDER_ERRORS, Unit::Count,
        "Embedder calls that failed as a whole (the batch is retried), by class (unavailable, misconfigured).");
    describe_counter!(EMBEDDED, Unit::Count, "Prompts embedded, by embedder.");
    describe_histogram!(
        EMBED_SECONDS,
        Unit::Seconds,
        "Seconds per embedding batch, by embedder."
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn unknown_node_types_are_other() {
        assert_eq!(super::node_type_label("agent"), "agent");
        assert_eq!(super::node_type_label("agent2"), "other");
        assert_eq!(super::node_type_label(""), "other");
    }
}
