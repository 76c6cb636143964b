//! The fault-injection suite behind `weir chaos`.
//!
//! [`load`] drives a sustained mixed workload through the gateway and keeps a [`load::Ledger`]
//! of everything the gateway acknowledged; the driver (this module, [`procs`], [`faults`])
//! runs several weir processes and injects faults on a seeded schedule; [`check`] drains and
//! verifies the invariants against what Kafka and Postgres hold; [`report`] prints the figures.

pub mod check;
pub mod faults;
pub mod load;
pub mod procs;
pub mod report;
