//! The `weir` command. Thin: it parses arguments ([`cli`]), loads the configuration and
//! runs the command ([`commands`]; processors through [`run`]). Exit codes: 0 success, 1 a
//! check failed, 2 bad configuration or usage.

mod cli;
mod commands;
mod run;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use weir_runtime::{config::Config, telemetry};

use crate::cli::Cli;

/// mimalloc instead of the system allocator: folding patches and encoding events allocate
/// and free many small JSON nodes, and glibc's malloc spent a large share of the
/// materializer's CPU on that (free-list consolidation) in `weir bench materialize` profiles.
/// Built with `no_thp`: mimalloc otherwise madvises its arenas for transparent huge pages, and
/// the kernel then zeroes a whole 2 MiB page on each fault after a purge (`clear_page_erms` in
/// a materializer drain's profile).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_tracing(&cfg.telemetry);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let trace_deadline = std::time::Duration::from_millis(cfg.runtime.shutdown_deadline_ms);
    let code = match runtime.block_on(commands::run(cli.command, Arc::new(cfg))) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        // The reader of a pipe stopped early (`weir keys list | head`): not a failure.
        Err(e) if commands::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    };
    // The spans still buffered (the last batches' and requests'), within the deadline.
    telemetry::shutdown_tracing(trace_deadline);
    code
}
