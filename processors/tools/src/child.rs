//! weir processes started as children of a tool (`weir chaos`, `weir bench e2e`), and the
//! private files their configuration goes in.
//!
//! Invariants:
//! - a child never outlives its parent: `kill_on_drop`, and `PR_SET_PDEATHSIG` kills it when
//!   the parent dies without dropping it (SIGKILL, a crash);
//! - a child runs in its own process group, so a Ctrl-C in the parent's terminal reaches the
//!   parent only, which then stops its children in order;
//! - a child logs plain text to its own file at its configured filter, whatever the parent's
//!   `RUST_LOG` (the parent may quiet its own clients while Kafka is down).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;
use nix::sys::signal::Signal;
use tokio::process::Command;

/// Where a child listens.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    /// /metrics, /healthz and /readyz.
    pub telemetry: u16,
    /// The gateway's listen port, when the child runs the gateway.
    pub gateway: Option<u16>,
}

/// The command that starts `bin args` with `env` added to this process's environment, its
/// listen addresses from `ports`, and stdout and stderr into `log`.
pub fn command(
    bin: &Path,
    args: &[String],
    env: &[(String, String)],
    ports: Ports,
    log: std::fs::File,
) -> anyhow::Result<Command> {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env(
            "WEIR__TELEMETRY__LISTEN",
            format!("127.0.0.1:{}", ports.telemetry),
        )
        // Plain log files (tracing-subscriber honours NO_COLOR).
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .process_group(0);
    if let Some(port) = ports.gateway {
        cmd.env("WEIR__GATEWAY__LISTEN", format!("127.0.0.1:{port}"));
    }
    // SAFETY: between fork and exec only prctl(2) is called, which is async-signal-safe and
    // touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    Ok(cmd)
}

impl Ports {
    /// The /readyz addresses of a child: its telemetry's, which reports every component (the
    /// gateway's included), and the gateway's own, as its clients' balancer would ask.
    pub fn readyz(&self) -> Vec<String> {
        let mut urls = vec![format!("http://127.0.0.1:{}/readyz", self.telemetry)];
        if let Some(port) = self.gateway {
            urls.push(format!("http://127.0.0.1:{port}/readyz"));
        }
        urls
    }

    /// Whether every address of [`Ports::readyz`] answers 2xx now.
    pub async fn ready(&self, client: &reqwest::Client) -> bool {
        for u in self.readyz() {
            let ok = client
                .get(&u)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if !ok {
                return false;
            }
        }
        true
    }
}

/// Writes `text` to `path`, readable by this user only (a configuration holds credentials).
pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
