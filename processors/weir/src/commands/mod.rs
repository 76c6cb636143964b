//! What each command does, one module per group of commands; [`run`] dispatches a parsed
//! command to it. Every command returns `Ok(true)` on success, `Ok(false)` when a check it
//! made failed (exit 1), and an error when it could not do its work (exit 1, printed).

/// `println!` for a command's output: a line to stdout, and on failure the error is returned
/// (`?`) instead of a panic. A reader that stops early (`weir keys list | head`) closes the
/// pipe; the write's `BrokenPipe` error ends the command, and the binary then exits quietly
/// ([`is_broken_pipe`]).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

/// A line about work that goes on after it (a purge before its vacuum, one redriven letter of
/// many): a closed stdout is ignored, so the reader going away never stops the work half way
/// nor hides the warnings and exit code that follow.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `print!` for a command's output; see [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*)?
    }};
}

mod bench;
mod cache;
mod config;
mod demo;
mod dlq;
mod keys;
mod patch;
mod stack;
mod workflows;

use std::sync::Arc;

use weir_runtime::config::Config;

use crate::cli::{Command, ProcessorName};

/// What `weir dev` runs: every processor and the relay.
const DEV: [ProcessorName; 5] = [
    ProcessorName::Materializer,
    ProcessorName::Relay,
    ProcessorName::Coordinator,
    ProcessorName::Cache,
    ProcessorName::Gateway,
];

/// Runs `command`.
pub async fn run(command: Command, cfg: Arc<Config>) -> anyhow::Result<bool> {
    match command {
        Command::Migrate => stack::migrate(&cfg).await,
        Command::Topics { command } => stack::topics(&cfg, command).await,
        Command::Schemas { command } => stack::schemas(&cfg, command).await,
        Command::Doctor => Ok(weir_runtime::ops::doctor(&cfg).await?),
        Command::Config => config::print(&cfg),
        Command::Dlq { command } => dlq::run(&cfg, command).await,
        Command::Dev => crate::run::processors(cfg, &DEV).await,
        Command::Run { processor } => crate::run::processors(cfg, &[processor]).await,
        Command::Demo {
            gateway,
            runs,
            timeout_secs,
            json,
            check,
        } => demo::run(cfg, gateway, runs, timeout_secs, json, check).await,
        Command::Cache { command } => cache::run(&cfg, command).await,
        Command::Keys { command } => keys::run(&cfg, command).await,
        Command::Patch { command } => patch::run(&cfg, command),
        Command::Workflows { command } => workflows::run(&cfg, command).await,
        Command::Chaos(args) => weir_chaos::run(cfg, args).await,
        Command::Bench { command } => bench::run(cfg, command).await,
    }
}

/// Whether `e` is a write to a closed stdout (the reader of a pipe went away): the output is
/// no longer wanted, so the command ends quietly rather than as a failure.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
