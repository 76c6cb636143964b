//! Every metric name the runtime emits, in one place. Labels: `group` (consumer group),
//! `topic`, `partition`, `class` (error class).

/// Records applied to Postgres (counter).
pub const RECORDS_APPLIED: &str = "weir_records_applied_total";
/// Records skipped because their offset was already applied: redeliveries (counter).
pub const RECORDS_DUPLICATE: &str = "weir_records_duplicate_total";
/// Records sent to the dead-letter topic, by `class` (counter).
pub const RECORDS_DEAD_LETTERED: &str = "weir_records_dead_lettered_total";
/// Batches committed (counter).
pub const BATCHES_COMMITTED: &str = "weir_batches_committed_total";
/// Batch parts split in halves after a data error, to isolate the poison record (counter).
pub const BATCH_SPLITS: &str = "weir_batch_splits_total";
/// Batch attempts that failed transiently and were retried (counter).
pub const BATCH_RETRIES: &str = "weir_batch_retries_total";
/// Records per committed batch (histogram).
pub const BATCH_SIZE: &str = "weir_batch_records";
/// Time from the start of a batch transaction to its commit (histogram, seconds).
pub const BATCH_DURATION: &str = "weir_batch_duration_seconds";
/// Consumer lag per partition, from librdkafka statistics (gauge).
pub const CONSUMER_LAG: &str = "weir_consumer_lag";
/// Partitions currently assigned to this consumer (gauge).
pub const ASSIGNED_PARTITIONS: &str = "weir_assigned_partitions";
/// Offset gaps: records that were expected but not delivered, e.g. deleted by retention (counter).
pub const OFFSET_GAPS: &str = "weir_offset_gaps_total";
/// Outbox rows written (counter).
pub const OUTBOX_WRITTEN: &str = "weir_outbox_rows_written_total";
