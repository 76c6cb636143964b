//! Metric names of the gateway (one place).

/// Requests answered, by `route` and `status` (counter).
pub const REQUESTS: &str = "weir_gateway_requests_total";
/// Time from request to answer, by `route` (histogram, seconds).
pub const REQUEST_SECONDS: &str = "weir_gateway_request_seconds";
/// Time from enqueueing an event to the broker's acknowledgement, by `topic` (histogram).
pub const PRODUCE_SECONDS: &str = "weir_gateway_produce_seconds";
/// Events the broker did not take: `reason` = queue_full | in_flight | timeout | kafka (counter).
pub const PRODUCE_REFUSED: &str = "weir_gateway_produce_refused_total";
/// API key lookups that went to Postgres (counter).
pub const KEY_LOOKUPS: &str = "weir_gateway_key_lookups_total";
/// Requests refused by a workspace's rate limit (counter).
pub const RATE_LIMITED: &str = "weir_gateway_rate_limited_total";
