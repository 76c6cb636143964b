//! The materializer: folds patch events into workflow versions.
//!
//! The pure part (JSON Pointer and Patch, definition validation, the fold) is the domain
//! model's ([`weir_model`]); this crate is the processor around it: batches from Kafka, the
//! patch log and heads in Postgres, large documents in the CAS ([`processor`]), and the
//! rebuild of a workflow from its patch log ([`replay`]). Its failures are [`error`]'s.
//!
//! Invariant kept by everything built here: every materialized version is a document that
//! [`weir_model::definition::validate`] accepts.

pub mod error;
pub mod metrics;
pub mod processor;
pub mod replay;

pub use error::MaterializerError;
pub use processor::Materializer;
