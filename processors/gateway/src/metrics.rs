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

/// Open event streams of this instance (gauge).
pub const OPEN_STREAMS: &str = "weir_gateway_open_streams";
/// Streams refused by a limit, by `reason` = instance | workspace (counter).
pub const STREAMS_REFUSED: &str = "weir_gateway_streams_refused_total";
/// Streams the gateway closed, by `reason` = slow (its client did not keep up) (counter).
pub const STREAMS_DROPPED: &str = "weir_gateway_streams_dropped_total";
/// Change notices fanned out from the Kafka feed to streams (counter).
pub const STREAM_NOTICES: &str = "weir_gateway_stream_notices_total";
/// Events written to streams, by `stream` = run | workflow (counter).
pub const STREAM_EVENTS: &str = "weir_gateway_stream_events_total";

/// 1 while the gateway's readiness check (Postgres and Kafka reachable) passes, else 0
/// (gauge).
pub const READY: &str = "weir_gateway_ready";

/// Help text and units of the gateway's metrics. Call once at start, after the recorder is
/// installed (`weir_runtime::telemetry::metrics_handle`). `route` is the matched route
/// template (or `unmatched`), `topic` a configured topic, the rest fixed lists.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        REQUESTS,
        Unit::Count,
        "HTTP requests answered, by route template and status code."
    );
    describe_histogram!(
        REQUEST_SECONDS,
        Unit::Seconds,
        "Seconds from request to answer, by route template."
    );
    describe_histogram!(
        PRODUCE_SECONDS,
        Unit::Seconds,
        "Seconds from enqueueing an event to the broker's acknowledgement, by topic."
    );
    describe_counter!(PRODUCE_REFUSED, Unit::Count,
        "Events the broker did not take, by reason (queue_full, in_flight, timeout, kafka, encode, too_large).");
    describe_counter!(
        KEY_LOOKUPS,
        Unit::Count,
        "API key lookups that went to Postgres."
    );
    describe_counter!(
        RATE_LIMITED,
        Unit::Count,
        "Requests refused by a workspace's rate limit."
    );
    describe_counter!(CLIENT_LIMITED, Unit::Count,
        "Requests refused per client address before authentication, by reason (requests, unknown_keys, connections).");
    describe_counter!(
        CONNECTIONS_CLOSED,
        Unit::Count,
        "Connections closed on a client, by reason (header_timeout, idle_timeout)."
    );
    describe_counter!(
        BODY_TIMEOUTS,
        Unit::Count,
        "Request bodies not received within gateway.body_read_timeout_ms."
    );
    describe_gauge!(OPEN_CONNECTIONS, Unit::Count, "Open client connections.");
    describe_gauge!(READY, Unit::Count,
        "1 while the gateway's readiness check (Postgres and Kafka reachable, every 2 s) passes, else 0.");
    describe_gauge!(
        OPEN_STREAMS,
        Unit::Count,
        "Open event streams of this instance."
    );
    describe_counter!(
        STREAMS_REFUSED,
        Unit::Count,
        "Event streams refused by a limit, by reason (instance, workspace)."
    );
    describe_counter!(
        STREAMS_DROPPED,
        Unit::Count,
        "Event streams closed by the gateway, by reason (slow: the client did not keep up)."
    );
    describe_counter!(
        STREAM_NOTICES,
        Unit::Count,
        "Change notices fanned out from the Kafka feed to event streams."
    );
    describe_counter!(
        STREAM_EVENTS,
        Unit::Count,
        "Events written to event streams, by stream (run, workflow)."
    );
    describe_counter!(
        IDEMPOTENCY_CONFLICTS,
        Unit::Count,
        "Idempotency-Key reuses with a different body (answered 422)."
    );
}
