//! weir's domain model: the vocabulary every layer shares, with no I/O.
//!
//! - [`pointer`](mod@pointer): RFC 6901 JSON Pointer (parsing, escaping, array index rules).
//! - [`patch`]: RFC 6902 JSON Patch, applied atomically (all operations or none) without
//!   copying the document, and revertible so a result that fails validation can be undone.
//! - [`definition`]: the workflow definition format, its validation into a typed DAG view
//!   ([`definition::Definition`]) within [`definition::Limits`], and canonical JSON for hashing.
//! - [`fold`]: one workflow's patches folded onto its head, shared by the materializer, replay
//!   and the benchmarks.
//! - [`cas_ref`]: [`CasRef`], the address of a blob in the content-addressed store, and
//!   [`WireRef`], a ref as an event carries it.
//! - [`permission`]: `read < write < admin`, the one [`Permission`] of keys, runs and cache
//!   entries.
//! - [`id`]: workflow and node ids and their validation.
//! - [`run`]: a run's status as clients see it ([`RunStatus`]).
//! - [`cache`]: the result cache's request rules (cacheable node types, prompts, vectors).
//!
//! Invariants: nothing here reads a clock, a socket or a file, so everything is property
//! tested; every materialized version is a document that [`definition::validate`] accepts.
//! This crate depends on no other weir crate: it is the bottom layer.

pub mod cache;
pub mod cas_ref;
pub mod definition;
pub mod fold;
pub mod id;
pub mod patch;
pub mod permission;
pub mod pointer;
pub mod run;

pub use cas_ref::{CasRef, WireRef};
pub use permission::Permission;
pub use run::RunStatus;
