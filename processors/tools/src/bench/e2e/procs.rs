//! The processes of `weir bench e2e`: the weir processes it starts as its children (this same
//! executable, `weir run <role>`), and the CPU time of every process in the loop (its children,
//! the stack's Kafka broker, Postgres with its backends, the S3 server, the registry, and the
//! load generator itself) read from `/proc`.
//!
//! Invariants:
//! - no child outlives the benchmark: each is started by [`crate::child::command`]
//!   (`kill_on_drop`, `PR_SET_PDEATHSIG`, its own process group, so a Ctrl-C reaches the
//!   benchmark only, which then stops them), and [`Children`]'s `Drop` kills what is left;
//! - a process tree's CPU delta counts each process once: time of processes alive at both
//!   reads, all of the time of those born in between, and the time of those that exited in
//!   between (the parent's reaped-children time) minus what they had at the first read.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::Child;

use super::stats::Window;
use crate::common::round;

/// Clock ticks per second of `/proc/<pid>/stat` times (USER_HZ, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// One weir process to start.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Its name in the report: `gateway`, `materializer-1`, ...
    pub name: String,
    /// Its role: what `weir run <role>` runs.
    pub role: String,
    /// Port of /metrics, /healthz and /readyz.
    pub telemetry_port: u16,
    /// The gateway's API port, when it runs the gateway.
    pub gateway_port: Option<u16>,
}

struct Running {
    spec: Spec,
    child: Child,
    pid: u32,
}

/// The running children.
pub struct Children {
    procs: Vec<Running>,
    logs: PathBuf,
}

/// A free TCP port on 127.0.0.1 (bound then released: another process may take it in
/// between, which the child's startup then reports).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl Children {
    /// Starts `specs` with `bin`, each with `env` added to this process's environment (plus
    /// its own listen addresses); logs go to `logs/<name>.log`.
    pub fn start(
        bin: &Path,
        specs: Vec<Spec>,
        env: &[(String, String)],
        logs: &Path,
    ) -> anyhow::Result<Self> {
        let mut procs = Vec::new();
        for spec in specs {
            let path = logs.join(format!("{}.log", spec.name));
            let log = std::fs::File::create(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            let mut cmd = crate::child::command(
                bin,
                &["run".to_string(), spec.role.clone()],
                env,
                crate::child::Ports {
                    telemetry: spec.telemetry_port,
                    gateway: spec.gateway_port,
                },
                log,
            )?;
            let child = cmd
                .spawn()
                .with_context(|| format!("cannot start {} ({})", spec.name, bin.display()))?;
            let pid = child.id().context("a child without a pid")?;
            procs.push(Running { spec, child, pid });
        }
        Ok(Self {
            procs,
            logs: logs.to_path_buf(),
        })
    }

    /// (name, role, pid) of each child.
    pub fn pids(&self) -> Vec<(String, String, u32)> {
        self.procs
            .iter()
            .map(|p| (p.spec.name.clone(), p.spec.role.clone(), p.pid))
            .collect()
    }

    /// Base URLs of the gateways.
    pub fn gateways(&self) -> Vec<String> {
        self.procs
            .iter()
            .filter_map(|p| p.spec.gateway_port)
            .map(|port| format!("http://127.0.0.1:{port}"))
            .collect()
    }

    /// Waits until every child answers /readyz (and a gateway its own /readyz) with 200.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let deadline = tokio::time::Instant::now() + timeout;
        for p in &mut self.procs {
            let ports = crate::child::Ports {
                telemetry: p.spec.telemetry_port,
                gateway: p.spec.gateway_port,
            };
            let log = self.logs.join(format!("{}.log", p.spec.name));
            loop {
                if ports.ready(&client).await {
                    break;
                }
                if let Ok(Some(status)) = p.child.try_wait() {
                    anyhow::bail!(
                        "{} exited during startup ({status}); see {}",
                        p.spec.name,
                        log.display()
                    );
                }
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "{} not ready after {timeout:?}; see {}",
                    p.spec.name,
                    log.display()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    /// Children that exited (a crash during the run is a finding): (name, status).
    pub fn exited(&mut self) -> Vec<(String, String)> {
        self.procs
            .iter_mut()
            .filter_map(|p| match p.child.try_wait() {
                Ok(Some(status)) => Some((p.spec.name.clone(), status.to_string())),
                _ => None,
            })
            .collect()
    }

    /// SIGTERM to all, then SIGKILL to what has not exited after `deadline`.
    pub async fn stop(&mut self, deadline: Duration) {
        for p in &self.procs {
            if let Ok(pid) = i32::try_from(p.pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        for p in &mut self.procs {
            if tokio::time::timeout(deadline, p.child.wait())
                .await
                .is_err()
            {
                let _ = p.child.start_kill();
                let _ = p.child.wait().await;
            }
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.child.start_kill();
        }
    }
}

/// User + system ticks of `pid` and of its reaped children, from `/proc/<pid>/stat`.
fn stat_ticks(pid: u32) -> Option<(u64, u64, u32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&s)
}

/// (utime + stime, cutime + cstime, ppid) of a `/proc/<pid>/stat` line.
fn parse_stat(s: &str) -> Option<(u64, u64, u32)> {
    // The command name may hold spaces and parentheses: the fields start after the last ") ".
    let rest = s.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i)?.parse::<u64>().ok();
    let ppid = f.get(1)?.parse::<u32>().ok()?;
    Some((n(11)? + n(12)?, n(13)? + n(14)?, ppid))
}

/// A process (or a process tree) whose CPU time is measured.
#[derive(Debug, Clone)]
pub struct Probe {
    /// Its name in the report.
    pub name: String,
    /// The process (the root of the tree).
    pub pid: u32,
    /// Whether its child processes count too (Postgres: the postmaster and its backends).
    pub tree: bool,
    /// When not empty: only the root's children serving a TCP connection of these
    /// processes count (the Postgres backends of the benchmark's own processes), found by
    /// the client port in a backend's command line (`postgres: user db 127.0.0.1(53020) ...`).
    pub clients_of: Vec<u32>,
}

/// One reading of a probe: ticks per live pid, and the root's reaped children's ticks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    ticks: HashMap<u32, u64>,
    reaped: u64,
    /// Whether `reaped` accounts for the processes that exit (false when only some of the
    /// root's children are read: an exited one then simply stops counting).
    partial: bool,
}

/// Every process's parent pid (one scan of /proc).
fn parents() -> HashMap<u32, u32> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) {
            if let Some((_, _, ppid)) = stat_ticks(pid) {
                out.insert(pid, ppid);
            }
        }
    }
    out
}

impl Probe {
    /// Reads the probe now.
    pub fn read(&self) -> Reading {
        if !self.clients_of.is_empty() {
            return self.read_clients();
        }
        let mut r = Reading::default();
        let Some((t, reaped, _)) = stat_ticks(self.pid) else {
            return r;
        };
        r.ticks.insert(self.pid, t);
        if self.tree {
            r.reaped = reaped;
            for (pid, ppid) in parents() {
                if ppid == self.pid {
                    if let Some((t, _, _)) = stat_ticks(pid) {
                        r.ticks.insert(pid, t);
                    }
                }
            }
        }
        r
    }

    fn read_clients(&self) -> Reading {
        let ports = local_ports(&self.clients_of);
        let mut r = Reading {
            partial: true,
            ..Reading::default()
        };
        for (pid, ppid) in parents() {
            if ppid != self.pid {
                continue;
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            if backend_client_port(&cmdline).is_some_and(|p| ports.contains(&p)) {
                if let Some((t, _, _)) = stat_ticks(pid) {
                    r.ticks.insert(pid, t);
                }
            }
        }
        r
    }
}

/// The local ports of the TCP sockets `pids` hold (their own ends of their connections).
fn local_ports(pids: &[u32]) -> HashSet<u16> {
    let mut inodes = HashSet::new();
    for pid in pids {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in dir.flatten() {
            let Ok(target) = std::fs::read_link(e.path()) else {
                continue;
            };
            let t = target.to_string_lossy();
            if let Some(n) = t
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse::<u64>().ok())
            {
                inodes.insert(n);
            }
        }
    }
    let mut ports = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        ports.extend(tcp_table_ports(&text, &inodes));
    }
    ports
}

/// The local ports of the rows of a `/proc/net/tcp` table whose socket inode is in `inodes`.
fn tcp_table_ports(text: &str, inodes: &HashSet<u64>) -> Vec<u16> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let inode = f.get(9)?.parse::<u64>().ok()?;
            if !inodes.contains(&inode) {
                return None;
            }
            let port = f.get(1)?.rsplit_once(':')?.1;
            u16::from_str_radix(port, 16).ok()
        })
        .collect()
}

/// The client port in a Postgres backend's command line: `postgres: weir weir
/// 127.0.0.1(53020) idle` → 53020; `None` for other processes (and Unix-socket clients).
fn backend_client_port(cmdline: &str) -> Option<u16> {
    let rest = cmdline.strip_prefix("postgres: ")?;
    let open = rest.find('(')?;
    let close = rest[open..].find(')')? + open;
    rest[open + 1..close].parse().ok()
}

/// CPU seconds between two readings of one probe (see the module's invariant).
pub fn cpu_seconds(before: &Reading, after: &Reading) -> f64 {
    let mut ticks: i64 = 0;
    for (pid, t) in &after.ticks {
        ticks += *t as i64 - before.ticks.get(pid).copied().unwrap_or(0) as i64;
    }
    if !after.partial {
        for (pid, t) in &before.ticks {
            if !after.ticks.contains_key(pid) {
                ticks -= *t as i64;
            }
        }
    }
    ticks += after.reaped as i64 - before.reaped as i64;
    ticks.max(0) as f64 / TICKS_PER_SEC
}

/// The first pid in a pid file, when that process is alive.
fn pid_file(path: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(path).ok()?;
    let pid = text.split_whitespace().next()?.parse::<u32>().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// The local stack's data directory (`.stack`, or `.stack-<WEIR_STACK_NAME>`), found from the
/// current directory upwards.
fn stack_dir() -> Option<PathBuf> {
    let name = std::env::var("WEIR_STACK_NAME")
        .ok()
        .filter(|n| !n.is_empty());
    let dir = match name {
        Some(n) => format!(".stack-{n}"),
        None => ".stack".into(),
    };
    let cwd = std::env::current_dir().ok()?;
    cwd.ancestors()
        .map(|a| a.join(&dir))
        .find(|d| d.is_dir() && d.join("pg").is_dir())
}

/// The first process whose command line contains `needle`, and whose parent's does not
/// (the root of a tree), scanning /proc.
fn find_process(needle: &str) -> Option<u32> {
    let cmdline = |pid: u32| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default()
    };
    let parents = parents();
    let mut pids: Vec<u32> = parents.keys().copied().collect();
    pids.sort_unstable();
    pids.into_iter().find(|pid| {
        cmdline(*pid).contains(needle)
            && !parents
                .get(pid)
                .is_some_and(|pp| cmdline(*pp).contains(needle))
    })
}

/// The local stack's processes: the Kafka broker, Postgres (the postmaster and its backends),
/// the S3 server and the registry, from the stack's pid files, else found in /proc.
pub fn stack_probes() -> Vec<Probe> {
    let dir = stack_dir();
    let from_file = |f: &str| dir.as_ref().and_then(|d| pid_file(&d.join(f)));
    let mut out = Vec::new();
    let mut add = |name: &str, pid: Option<u32>, tree: bool| {
        if let Some(pid) = pid {
            out.push(Probe {
                name: name.into(),
                pid,
                tree,
                clients_of: Vec::new(),
            });
        }
    };
    add(
        "kafka",
        from_file("kafka.pid").or_else(|| find_process("kafka.Kafka")),
        false,
    );
    add(
        "postgres",
        from_file("pg/postmaster.pid").or_else(|| find_process("bin/postgres")),
        true,
    );
    add("s3", from_file("s3.pid"), true);
    add("registry", from_file("registry.pid"), true);
    out
}

/// A process group of the CPU table: its label and probes.
pub struct Group {
    /// Its column in the table.
    pub label: String,
    /// Its processes.
    pub probes: Vec<Probe>,
}

fn read_all(groups: &[Group]) -> Vec<Vec<Reading>> {
    groups
        .iter()
        .map(|g| g.probes.iter().map(Probe::read).collect())
        .collect()
}

/// Reads every probe at the window's edges; CPU seconds per group.
pub async fn measure_cpu(groups: Arc<Vec<Group>>, window: Window) -> BTreeMap<String, f64> {
    tokio::time::sleep_until(window.from.into()).await;
    let g = groups.clone();
    let before = tokio::task::spawn_blocking(move || read_all(&g))
        .await
        .unwrap_or_default();
    tokio::time::sleep_until(window.to.into()).await;
    let g = groups.clone();
    let after = tokio::task::spawn_blocking(move || read_all(&g))
        .await
        .unwrap_or_default();
    let mut out = BTreeMap::new();
    for (i, g) in groups.iter().enumerate() {
        let (Some(b), Some(a)) = (before.get(i), after.get(i)) else {
            continue;
        };
        let s: f64 = b.iter().zip(a).map(|(b, a)| cpu_seconds(b, a)).sum();
        out.insert(g.label.clone(), round(s, 3));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_past_odd_command_names() {
        let line = "4242 (post gres) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 75 30 12 20 0 1 0 100 0 0";
        assert_eq!(parse_stat(line), Some((325, 42, 1)));
        assert_eq!(parse_stat("garbage"), None);
        assert!(stat_ticks(std::process::id()).is_some());
    }

    #[test]
    fn tree_deltas_count_each_process_once() {
        let reading = |ticks: &[(u32, u64)], reaped| Reading {
            ticks: ticks.iter().copied().collect(),
            reaped,
            partial: false,
        };
        // Root 1 with backends 2 (lives on) and 3 (exits, 40 ticks at the first reading,
        // 55 at its end, reaped into the root's children time); 4 is born.
        let before = reading(&[(1, 100), (2, 10), (3, 40)], 1000);
        let after = reading(&[(1, 110), (2, 30), (4, 5)], 1055);
        // 10 + 20 + 5 + (55 - 40) = 50 ticks.
        assert_eq!(cpu_seconds(&before, &after), 0.5);
        assert_eq!(cpu_seconds(&after, &after), 0.0);
        assert_eq!(cpu_seconds(&Reading::default(), &Reading::default()), 0.0);
        // Only some children read (the backends of one client): an exit stops counting.
        let partial = |ticks: &[(u32, u64)]| Reading {
            ticks: ticks.iter().copied().collect(),
            reaped: 0,
            partial: true,
        };
        let before = partial(&[(2, 10), (3, 40)]);
        let after = partial(&[(2, 30), (4, 5)]);
        assert_eq!(cpu_seconds(&before, &after), 0.25);
    }

    #[test]
    fn backends_are_matched_to_their_clients_by_port() {
        assert_eq!(
            backend_client_port("postgres: weir weir 127.0.0.1(53020) idle in transaction"),
            Some(53020)
        );
        assert_eq!(backend_client_port("postgres: walwriter "), None);
        assert_eq!(
            backend_client_port("postgres: weir weir [local] idle"),
            None
        );
        assert_eq!(backend_client_port("java -cp kafka(1)"), None);
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
                     0: 0100007F:D2A4 0100007F:1538 01 00000000:00000000 00:00000000 00000000     0        0 4242 1\n   \
                     1: 0100007F:D2A5 0100007F:1538 01 00000000:00000000 00:00000000 00000000     0        0 4243 1\n";
        let inodes: HashSet<u64> = [4242].into_iter().collect();
        assert_eq!(tcp_table_ports(table, &inodes), vec![0xD2A4]);
        // This process's own connection is found by its port.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let conn =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let port = conn.local_addr().expect("addr").port();
        assert!(local_ports(&[std::process::id()]).contains(&port));
    }

    #[test]
    fn this_process_is_measurable() {
        let p = Probe {
            name: "self".into(),
            pid: std::process::id(),
            tree: true,
            clients_of: Vec::new(),
        };
        let r = p.read();
        assert!(r.ticks.contains_key(&std::process::id()));
    }
}
