//! The materializer: folds patch events into workflow versions.
//!
//! This crate's core is pure and dependency-light (serde, serde_json, thiserror):
//!
//! - [`pointer`](mod@pointer): RFC 6901 JSON Pointer (parsing, escaping, array index rules).
//! - [`patch`]: RFC 6902 JSON Patch, applied atomically (all operations or none) without
//!   copying the document, and revertible so a result that fails validation can be undone.
//! - [`definition`]: the workflow definition format, its validation into a typed DAG view,
//!   and canonical JSON for hashing.
//!
//! Invariant kept by everything built on these modules: every materialized version is a
//! document that [`definition::validate`] accepts.

pub mod definition;
pub mod fold;
pub mod metrics;
pub mod patch;
pub mod pointer;
pub mod processor;
pub mod replay;

pub use processor::Materializer;
