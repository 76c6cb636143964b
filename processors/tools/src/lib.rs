//! weir's tools outside the data path: nothing a running deployment loads.
//!
//! - [`bench`]: the benchmarks behind `weir bench <materialize|coordinator|cache|relay|gateway>`,
//!   one module per processor, driving each through its public API; and `weir bench e2e`
//!   ([`bench::e2e`]), the whole pipeline in weir processes of its own, through the gateway.
//! - [`demo`]: the workload behind `weir demo` (workflows, patches, runs with simulated workers
//!   and both caches, all through the HTTP gateway).
//! - [`private`]: an outbox of its own beside a live deployment, which the benchmarks and the
//!   relay's fault tests publish through.
//! - [`common`]: what they share: percentiles, warm-up samples, scratch topics and schemas,
//!   consumer-group and watermark probes, the result's JSON line.
//! - [`child`]: weir processes started as children (chaos, the end-to-end benchmark).
//! - [`worker`]: the simulated worker of `weir demo` and `weir chaos`.
//!
//! Invariant: no processor crate depends on this one; it depends on them.

pub mod bench;
pub mod child;
pub mod common;
pub mod demo;
pub mod private;
pub mod worker;
