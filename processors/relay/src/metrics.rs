//! Every metric name the relay emits, in one place. The relay's metrics carry no labels: one
//! relay runs per process, and the scrape target tells relays apart.

/// Rows the broker acknowledged and the relay deleted from the outbox (counter). Rows
/// published again after a crash count again.
pub const PUBLISHED: &str = "weir_relay_published_total";
/// Time of one non-empty batch, from its SELECT to the DELETE of its rows (histogram, seconds).
pub const BATCH_SECONDS: &str = "weir_relay_batch_seconds";
/// Lanes this relay holds (gauge).
pub const LANES_OWNED: &str = "weir_relay_lanes_owned";
/// Age of the oldest outbox row the latest batch saw, by the database clock; 0 when the
/// relay's lanes are empty (gauge, seconds). Alert when it stays high.
pub const OUTBOX_LAG: &str = "weir_relay_outbox_lag_seconds";
/// Batch, rebalance or connection attempts that failed transiently and were retried (counter).
pub const RETRIES: &str = "weir_relay_retries_total";
/// Rows moved to `weir_outbox_dead` because the broker can never accept them (counter).
pub const DEAD: &str = "weir_relay_dead_total";
