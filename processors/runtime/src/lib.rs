//! The shared runtime of every weir processor.
//!
//! - [`config`]: layered configuration (defaults, file, environment), secrets kept secret.
//! - [`events`]: the event contract, mirroring the Avro schemas in `schemas/`.
//! - [`registry`] and [`codec`]: the schema registry and the Confluent wire format.
//! - [`consumer`]: the batch consumer, with positions committed in Postgres (effectively once).
//! - [`outbox`]: output events written in the same transaction as the effect.
//! - [`dlq`]: listing and redriving dead letters (`weir dlq`).
//! - [`trace`]: W3C trace context across HTTP and Kafka, and the OTLP export of spans.
//! - [`kafka`], [`db`], [`telemetry`], [`metrics`], [`error`]: the plumbing around them.

pub mod app;
pub mod cas;
pub mod codec;
pub mod config;
pub mod consumer;
pub mod copy;
pub mod db;
pub mod dlq;
pub mod error;
pub mod events;
pub mod kafka;
mod limits;
pub mod metrics;
pub mod ops;
pub mod outbox;
pub mod registry;
pub mod s3;
pub mod telemetry;
pub mod trace;
pub mod versions;

pub use config::Config;
pub use consumer::{BatchConsumer, Processor, Record, Rejection};
pub use error::{ApplyError, ClassifiedError, Classify, Coordinates, Disposition, EncodeError};
pub use outbox::Outbox;
