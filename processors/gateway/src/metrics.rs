//! Metric names of the gateway (one place).

/// Requests answered, by `route` and `status` (counter).
pub const REQUESTS: &str = "weir_gateway_requests_total";
/// Time from request to answer, by `route` (histogram, seconds).
pub const REQUEST_SECONDS: &str = "weir_gateway_request_seconds";
/// Time from enqueueing an event to the broker's acknowledgement, by `topic` (histogram).
pub const PRODUCE_SECONDS: &str = "weir_gateway_produce_seconds";
/// Events the broker did not take: `reason` = queue_full | in_flight | timeout | kafka |
/// encode | too_large (counter).
pub const PRODUCE_REFUSED: &str = "weir_gateway_produce_refused_total";
/// API key lookups that went to Postgres (counter).
pub const KEY_LOOKUPS: &str = "weir_gateway_key_lookups_total";
/// Requests refused by a workspace's rate limit, after authentication (counter).
pub const RATE_LIMITED: &str = "weir_gateway_rate_limited_total";
/// Requests refused per client address before authentication, by `reason` = requests |
/// unknown_keys | connections (counter).
pub const CLIENT_LIMITED: &str = "weir_gateway_client_limited_total";
/// Connections the gateway closed on a client, by `reason` = header_timeout | idle_timeout
/// (counter).
pub const CONNECTIONS_CLOSED: &str = "weir_gateway_connections_closed_total";
/// Request bodies not received within `gateway.body_read_timeout_ms` (counter).
pub const BODY_TIMEOUTS: &str = "weir_gateway_body_timeouts_total";
/// Open client connections (gauge).
pub const OPEN_CONNECTIONS: &str = "weir_gateway_open_connections";
/// Idempotency-Key reuses with a different body, answered 422 (counter).
pub const IDEMPOTENCY_CONFLICTS: &str = "weir_gateway_idempotency_conflicts_total";
