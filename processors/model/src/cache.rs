//! The result cache's rules on what may be cached and what a request may hold, shared by the
//! cache processor and by the gateway and coordinator that check requests before they reach
//! it (so a client mistake is answered at once, not dead-lettered where the client never
//! hears of it).
//!
//! Invariants: the same input is accepted or refused the same way wherever it is checked;
//! every function here is total (no panic on any input).

/// Longest node type accepted, in bytes (the gateway's and the cache processor's limit).
pub const MAX_NODE_TYPE_BYTES: usize = 128;

/// Smallest norm a vector may have before normalization: below it, the direction is noise
/// (and zero has none: cosine with it is NaN).
pub const MIN_NORM: f64 = 1e-6;

/// Whether results of `node_type` may be cached: it is one of `cacheable_node_types`
/// (`cache.cacheable_node_types`; by default `function`, `pure`, `http_request`,
/// `database_query` and `agent`, never `human`: a person's decision is not a reusable result).
pub fn is_cacheable(cacheable_node_types: &[String], node_type: &str) -> bool {
    cacheable_node_types.iter().any(|t| t == node_type)
}

/// Refuses a prompt the cache will not hash or embed: empty (or only whitespace: not a
/// question) or longer than `max_prompt_bytes` (`cache.max_prompt_bytes`). The error is the
/// reason, safe to show the caller.
pub fn check_prompt(prompt: Option<&str>, max_prompt_bytes: usize) -> Result<(), String> {
    let Some(p) = prompt else { return Ok(()) };
    if p.trim().is_empty() {
        return Err("prompt is empty".into());
    }
    if p.len() > max_prompt_bytes {
        return Err(format!(
            "prompt is {} bytes, more than cache.max_prompt_bytes ({max_prompt_bytes})",
            p.len(),
        ));
    }
    Ok(())
}

/// Checks a vector (from an embedder or a caller) and scales it to unit length: exactly
/// `dims` components, all finite, norm at least [`MIN_NORM`] and finite (computed in f64,
/// so huge finite components cannot overflow it to infinity). The error is the reason.
pub fn validate_vector(mut v: Vec<f32>, dims: usize) -> Result<Vec<f32>, String> {
    if v.len() != dims {
        return Err(format!(
            "an embedding has {} dimensions, this deployment uses {dims} (cache.dimensions)",
            v.len()
        ));
    }
    if v.iter().any(|x| !x.is_finite()) {
        return Err("an embedding holds NaN or infinity".into());
    }
    let norm = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    if !norm.is_finite() || norm < MIN_NORM {
        return Err(format!(
            "an embedding has length {norm:e}: a zero (or near-zero) vector has no direction"
        ));
    }
    v.iter_mut()
        .for_each(|x| *x = (f64::from(*x) / norm) as f32);
    if v.iter().any(|x| !x.is_finite()) {
        return Err("an embedding cannot be normalized".into());
    }
    Ok(v)
}
