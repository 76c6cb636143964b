//! The weir processes of a chaos run: started, killed, paused, restarted and stopped.
//!
//! Invariants:
//! - no child outlives the driver: every child has `kill_on_drop`, dies with the driver
//!   (`PR_SET_PDEATHSIG`), and [`Fleet`]'s `Drop` kills what is left (a paused child too:
//!   SIGKILL needs no SIGCONT);
//! - children run in their own process group, so a Ctrl-C in the driver's terminal reaches
//!   the driver only, which then stops them in order;
//! - a child that exits on its own (not by a fault) is restarted after a second, as a
//!   service manager would, and the exit is recorded for the report: a crash is a finding.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// What one weir process runs.
#[derive(Clone, Debug)]
pub struct ProcSpec {
    /// Name in logs and the report: `all-0`, `gateway`, `materializer`, ...
    pub name: String,
    /// Arguments of the weir binary: `["dev"]` or `["run", "<processor>"]`.
    pub args: Vec<String>,
    /// The gateway's listen port, when it runs the gateway.
    pub gateway_port: Option<u16>,
    /// Port of /metrics, /healthz and /readyz.
    pub metrics_port: u16,
}

/// The processes of a run: `full` processes with every processor (`weir dev`), then one
/// process per role of `split` (`weir run <role>`). Ports from `port_base`: gateways on
/// `port_base + i`, telemetry on `port_base + 100 + i`.
pub fn layout(full: usize, split: &[String], port_base: u16) -> Vec<ProcSpec> {
    let mut out = Vec::new();
    for i in 0..full {
        out.push(ProcSpec {
            name: format!("all-{i}"),
            args: vec!["dev".into()],
            gateway_port: Some(port_base + i as u16),
            metrics_port: port_base + 100 + i as u16,
        });
    }
    for (j, role) in split.iter().enumerate() {
        let i = (full + j) as u16;
        out.push(ProcSpec {
            name: role.clone(),
            args: vec!["run".into(), role.clone()],
            gateway_port: (role == "gateway").then_some(port_base + i),
            metrics_port: port_base + 100 + i,
        });
    }
    out
}

/// An exit nobody asked for.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Crash {
    /// Which process.
    pub process: String,
    /// When the driver noticed the exit.
    #[serde(skip)]
    pub at: SystemTime,
    /// Exit status as printed.
    pub status: String,
}

struct ProcState {
    child: Option<Child>,
    /// A fault holds it (killed or paused): the supervisor leaves it alone.
    held: bool,
    starts: u32,
}

struct Proc {
    spec: ProcSpec,
    state: Mutex<ProcState>,
}

/// The running processes.
pub struct Fleet {
    procs: Vec<Proc>,
    bin: PathBuf,
    env: Vec<(String, String)>,
    logs: PathBuf,
    crashes: std::sync::Mutex<Vec<Crash>>,
}

impl Fleet {
    /// Starts every process. `env` is added to the driver's own environment (the stack's
    /// endpoints); each process also gets its own listen addresses. Logs go to
    /// `logs/<name>.log` (appended across restarts).
    pub async fn start(
        bin: &Path,
        specs: Vec<ProcSpec>,
        env: Vec<(String, String)>,
        logs: &Path,
    ) -> anyhow::Result<Arc<Fleet>> {
        std::fs::create_dir_all(logs)
            .with_context(|| format!("cannot create {}", logs.display()))?;
        let fleet = Arc::new(Fleet {
            procs: specs
                .into_iter()
                .map(|spec| Proc {
                    spec,
                    state: Mutex::new(ProcState {
                        child: None,
                        held: false,
                        starts: 0,
                    }),
                })
                .collect(),
            bin: bin.to_path_buf(),
            env,
            logs: logs.to_path_buf(),
            crashes: std::sync::Mutex::new(Vec::new()),
        });
        for p in &fleet.procs {
            let mut st = p.state.lock().await;
            fleet.spawn(p, &mut st)?;
        }
        Ok(fleet)
    }

    fn spawn(&self, p: &Proc, st: &mut ProcState) -> anyhow::Result<()> {
        let path = self.logs.join(format!("{}.log", p.spec.name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let mut cmd = weir_tools::child::command(
            &self.bin,
            &p.spec.args,
            &self.env,
            weir_tools::child::Ports {
                telemetry: p.spec.metrics_port,
                gateway: p.spec.gateway_port,
            },
            log,
        )?;
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {} ({})", p.spec.name, self.bin.display()))?;
        st.child = Some(child);
        st.starts += 1;
        Ok(())
    }

    /// The processes' names, by index (the schedule's targets).
    pub fn names(&self) -> Vec<String> {
        self.procs.iter().map(|p| p.spec.name.clone()).collect()
    }

    /// The specs, by index.
    pub fn specs(&self) -> Vec<ProcSpec> {
        self.procs.iter().map(|p| p.spec.clone()).collect()
    }

    /// Base URLs of every gateway.
    pub fn gateways(&self) -> Vec<String> {
        self.procs
            .iter()
            .filter_map(|p| p.spec.gateway_port)
            .map(|port| format!("http://127.0.0.1:{port}"))
            .collect()
    }

    /// Waits until every process answers /readyz with 200.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let deadline = tokio::time::Instant::now() + timeout;
        for p in &self.procs {
            let ports = weir_tools::child::Ports {
                telemetry: p.spec.metrics_port,
                gateway: p.spec.gateway_port,
            };
            let url = ports.readyz().join(" and ");
            loop {
                if ports.ready(&client).await {
                    break;
                }
                if let Some(status) = self.exited(p).await {
                    anyhow::bail!(
                        "{} exited during startup ({status}); see {}",
                        p.spec.name,
                        self.logs.join(format!("{}.log", p.spec.name)).display()
                    );
                }
                if tokio::time::Instant::now() >= deadline {
                    anyhow::bail!(
                        "{} not ready after {timeout:?} ({url}); see {}",
                        p.spec.name,
                        self.logs.join(format!("{}.log", p.spec.name)).display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        Ok(())
    }

    async fn exited(&self, p: &Proc) -> Option<String> {
        let mut st = p.state.lock().await;
        match st.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => Some(status.to_string()),
            _ => None,
        }
    }

    fn proc(&self, i: usize) -> anyhow::Result<&Proc> {
        self.procs
            .get(i)
            .with_context(|| format!("no process #{i}"))
    }

    /// SIGKILL of process `i`; it stays down for `down`, then starts again.
    pub async fn kill_restart(&self, i: usize, down: Duration) -> anyhow::Result<()> {
        let p = self.proc(i)?;
        {
            let mut st = p.state.lock().await;
            st.held = true;
            if let Some(mut c) = st.child.take() {
                // start_kill sends SIGKILL; wait reaps it so its ports are free.
                let _ = c.start_kill();
                let _ = c.wait().await;
            }
        }
        tokio::time::sleep(down).await;
        let mut st = p.state.lock().await;
        let r = self.spawn(p, &mut st);
        st.held = false;
        r
    }

    /// SIGSTOP of process `i` for `pause`, then SIGCONT.
    pub async fn pause(&self, i: usize, pause: Duration) -> anyhow::Result<()> {
        let p = self.proc(i)?;
        let pid = {
            let mut st = p.state.lock().await;
            let pid = st
                .child
                .as_ref()
                .and_then(Child::id)
                .with_context(|| format!("{} is not running", p.spec.name))?;
            st.held = true;
            pid
        };
        let pid = Pid::from_raw(i32::try_from(pid)?);
        let r = kill(pid, Signal::SIGSTOP).context("SIGSTOP");
        tokio::time::sleep(pause).await;
        let c = kill(pid, Signal::SIGCONT).context("SIGCONT");
        p.state.lock().await.held = false;
        r.and(c)
    }

    /// Restarts every process that exited on its own, until `stop`; records each exit.
    pub async fn supervise(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            for p in &self.procs {
                let mut st = p.state.lock().await;
                if st.held {
                    continue;
                }
                let exit = match st.child.as_mut().map(Child::try_wait) {
                    Some(Ok(Some(status))) => Some(status.to_string()),
                    Some(Err(e)) => Some(format!("wait failed: {e}")),
                    None => Some("not running".into()),
                    Some(Ok(None)) => None,
                };
                if let Some(status) = exit {
                    tracing::warn!(process = %p.spec.name, %status, "a weir process exited on its own; restarting it");
                    if let Ok(mut c) = self.crashes.lock() {
                        c.push(Crash {
                            process: p.spec.name.clone(),
                            at: SystemTime::now(),
                            status,
                        });
                    }
                    st.child = None;
                    if let Err(e) = self.spawn(p, &mut st) {
                        tracing::error!(process = %p.spec.name, error = %format!("{e:#}"), "cannot restart");
                    }
                }
            }
        }
    }

    /// Exits nobody asked for, so far.
    pub fn crashes(&self) -> Vec<Crash> {
        self.crashes.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Graceful stop: SIGCONT (in case), SIGTERM to all, then SIGKILL to whatever has not
    /// exited after `deadline`. Returns each process's exit as `(name, clean, status)`.
    pub async fn stop(&self, deadline: Duration) -> Vec<(String, bool, String)> {
        for p in &self.procs {
            let st = p.state.lock().await;
            if let Some(pid) = st.child.as_ref().and_then(Child::id) {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
                    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                }
            }
        }
        let mut out = Vec::new();
        for p in &self.procs {
            let mut st = p.state.lock().await;
            st.held = true;
            let Some(mut c) = st.child.take() else {
                out.push((p.spec.name.clone(), false, "not running".into()));
                continue;
            };
            match tokio::time::timeout(deadline, c.wait()).await {
                Ok(Ok(status)) => {
                    out.push((p.spec.name.clone(), status.success(), status.to_string()))
                }
                Ok(Err(e)) => out.push((p.spec.name.clone(), false, format!("wait: {e}"))),
                Err(_) => {
                    let _ = c.start_kill();
                    let _ = c.wait().await;
                    out.push((
                        p.spec.name.clone(),
                        false,
                        format!("still running after {deadline:?}: killed"),
                    ));
                }
            }
        }
        out
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for p in &mut self.procs {
            if let Some(c) = p.state.get_mut().child.as_mut() {
                let _ = c.start_kill();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_gives_every_process_its_own_ports() {
        let specs = layout(3, &["gateway".into(), "materializer".into()], 18400);
        assert_eq!(specs.len(), 5);
        let mut ports: Vec<u16> = specs.iter().map(|s| s.metrics_port).collect();
        ports.extend(specs.iter().filter_map(|s| s.gateway_port));
        let n = ports.len();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), n, "a port is used twice");
        assert_eq!(specs.iter().filter(|s| s.gateway_port.is_some()).count(), 4);
        assert_eq!(specs[3].args, ["run", "gateway"]);
        assert_eq!(specs[4].gateway_port, None);
    }
}
