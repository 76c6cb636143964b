//! The benchmarks behind `weir bench`, one module per processor. Each prints what it measured
//! and returns a JSON summary (`--json` prints it as one line). The stage benchmarks start
//! each repetition from a state of their own making and report the spread over repetitions
//! ([`common`]).

pub mod cache;
pub mod common;
pub mod coordinator;
pub mod e2e;
pub mod gateway;
pub mod materializer;
pub mod relay;
pub mod streams;
