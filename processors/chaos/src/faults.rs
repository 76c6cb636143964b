//! The fault schedule of a chaos run and the faults themselves.
//!
//! A [`Schedule`] is a list of [`Fault`]s (kind, start offset, duration, target process),
//! planned from a seed ([`plan`]) or read from a file (`--schedule`, the regression cases in
//! `infra/local/chaos-cases/`), and printed before the run starts, so that any run can be
//! replayed exactly. Faults of the infrastructure (Kafka, Postgres, S3, the registry) and
//! pauses never overlap one another: while one dependency is down, the gateway's answers are
//! attributed to that dependency alone. Process kills fall between them.
//!
//! Infrastructure faults go through `infra/local/service` of the stack the run drives
//! ([`Stack`]): Kafka is killed with SIGKILL (no controlled shutdown, log recovery on
//! restart; on a three-broker stack one broker at a time, [`Fault::broker`]), Postgres is shut down with `pg_ctl stop -m immediate` (open transactions lost, as
//! in a failover), S3 and the registry are stopped and started again. A fault's end is the
//! moment its service answers again (restart included), so an outage is what clients saw.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// What a fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// SIGKILL of a weir process, restarted after `duration`.
    ProcessKill,
    /// SIGSTOP of a weir process for `duration` (longer than the group session timeout), then
    /// SIGCONT: it wakes up as a zombie whose partitions moved.
    ProcessPause,
    /// SIGKILL of the Kafka broker (of one broker, [`Fault::broker`], on a three-broker
    /// stack), restarted after `duration`.
    KafkaKill,
    /// `pg_ctl stop -m immediate`, restarted after `duration`.
    PostgresStop,
    /// The S3 server stopped, started after `duration`.
    S3Stop,
    /// The schema registry stopped, started after `duration`.
    RegistryStop,
}

impl FaultKind {
    /// Every kind, in report order.
    pub const ALL: [FaultKind; 6] = [
        FaultKind::ProcessKill,
        FaultKind::ProcessPause,
        FaultKind::KafkaKill,
        FaultKind::PostgresStop,
        FaultKind::S3Stop,
        FaultKind::RegistryStop,
    ];

    /// The snake_case name used in the schedule, the report and the JSON line.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::ProcessKill => "process_kill",
            FaultKind::ProcessPause => "process_pause",
            FaultKind::KafkaKill => "kafka_kill",
            FaultKind::PostgresStop => "postgres_stop",
            FaultKind::S3Stop => "s3_stop",
            FaultKind::RegistryStop => "registry_stop",
        }
    }

    /// The dependency this fault takes away, for the infrastructure kinds.
    pub fn dependency(self) -> Option<&'static str> {
        match self {
            FaultKind::KafkaKill => Some("kafka"),
            FaultKind::PostgresStop => Some("postgres"),
            FaultKind::S3Stop => Some("s3"),
            FaultKind::RegistryStop => Some("registry"),
            FaultKind::ProcessKill | FaultKind::ProcessPause => None,
        }
    }

    /// Whether it acts on one weir process (then [`Fault::target`] names it).
    pub fn on_process(self) -> bool {
        matches!(self, FaultKind::ProcessKill | FaultKind::ProcessPause)
    }
}

/// One planned fault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// What it does.
    pub kind: FaultKind,
    /// When it starts, in ms from the start of the load.
    pub at_ms: u64,
    /// How long the process or service stays down (or paused), in ms.
    pub duration_ms: u64,
    /// Index of the weir process it acts on (process faults only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<usize>,
    /// The Kafka node a `kafka_kill` kills on a multi-broker stack (1-based, the `N` of
    /// `infra/local/service kafka:N`); none: every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<usize>,
}

/// A run's faults, in start order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// The seed it was planned from (and the seed of the workload).
    pub seed: u64,
    /// Length of the loaded part of the run, in seconds.
    pub duration_s: u64,
    /// The faults.
    pub faults: Vec<Fault>,
}

/// How many faults of each kind a run gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counts {
    /// Process kills.
    pub process_kill: usize,
    /// Pauses past the session timeout.
    pub process_pause: usize,
    /// Kafka kills.
    pub kafka_kill: usize,
    /// Postgres immediate shutdowns.
    pub postgres_stop: usize,
    /// S3 stops.
    pub s3_stop: usize,
    /// Registry stops.
    pub registry_stop: usize,
}

impl Counts {
    /// The bounded CI run: one fault of each kind.
    pub fn ci() -> Self {
        Counts {
            process_kill: 1,
            process_pause: 1,
            kafka_kill: 1,
            postgres_stop: 1,
            s3_stop: 1,
            registry_stop: 1,
        }
    }

    /// A full run of `duration`: for 10 minutes, 22 process kills, 2 pauses, 3 Kafka kills,
    /// 3 Postgres shutdowns, one S3 and one registry stop; scaled with the duration (at least
    /// one of each).
    pub fn full(duration: Duration) -> Self {
        let scale = duration.as_secs_f64() / 600.0;
        let n = |base: f64| ((base * scale).round() as usize).max(1);
        Counts {
            process_kill: n(22.0),
            process_pause: n(2.0),
            kafka_kill: n(3.0),
            postgres_stop: n(3.0),
            s3_stop: n(1.0),
            registry_stop: n(1.0),
        }
    }
}

/// What [`plan`] needs to know.
#[derive(Clone, Debug)]
pub struct PlanInput {
    /// Length of the loaded part of the run.
    pub duration: Duration,
    /// No fault before this (the load settles, the baseline latency is measured).
    pub warmup: Duration,
    /// No fault starts within this of the end.
    pub tail: Duration,
    /// Faults of each kind.
    pub counts: Counts,
    /// The consumer group session timeout the processes run with: a pause lasts longer.
    pub session_timeout: Duration,
    /// Number of weir processes (targets are `0..processes`).
    pub processes: usize,
    /// Kafka brokers of the stack: above 1, each Kafka kill takes one of them, drawn from
    /// the seed (with 1 the draw is skipped, so single-broker schedules stay as they were).
    pub brokers: usize,
}

/// Plans a schedule from a seed. Infrastructure faults and pauses each get an equal slot of
/// the run, in a seeded order, and start early in it (the rest of the slot is for the restart
/// and the recovery); process kills are spread over the run, outside those outages, at least
/// 8 s apart so that at most one process is down at a time.
pub fn plan(seed: u64, p: &PlanInput) -> Schedule {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut infra: Vec<FaultKind> = Vec::new();
    let c = p.counts;
    for (kind, n) in [
        (FaultKind::KafkaKill, c.kafka_kill),
        (FaultKind::PostgresStop, c.postgres_stop),
        (FaultKind::S3Stop, c.s3_stop),
        (FaultKind::RegistryStop, c.registry_stop),
        (FaultKind::ProcessPause, c.process_pause),
    ] {
        infra.extend(std::iter::repeat_n(kind, n));
    }
    // Seeded Fisher-Yates, so the order does not depend on rand's shuffle implementation.
    for i in (1..infra.len()).rev() {
        let j = rng.random_range(0..=i);
        infra.swap(i, j);
    }
    let start = p.warmup.as_millis() as u64;
    let end = p
        .duration
        .saturating_sub(p.tail)
        .as_millis()
        .max(u128::from(start) + 1) as u64;
    let window = end - start;
    let mut faults = Vec::new();
    let slot = window / (infra.len().max(1) as u64);
    let session = p.session_timeout.as_millis() as u64;
    let mut outages: Vec<(u64, u64)> = Vec::new();
    for (i, kind) in infra.into_iter().enumerate() {
        let duration_ms = match kind {
            FaultKind::KafkaKill => rng.random_range(4_000..=8_000),
            FaultKind::PostgresStop => rng.random_range(3_000..=6_000),
            FaultKind::S3Stop | FaultKind::RegistryStop => rng.random_range(8_000..=15_000),
            // Past the session timeout, so the group moves the partitions away.
            _ => session + rng.random_range(3_000..=8_000),
        };
        let jitter = rng.random_range(0..=(slot / 10).max(1));
        let at_ms = start + i as u64 * slot + jitter;
        let target = kind
            .on_process()
            .then(|| rng.random_range(0..p.processes.max(1)));
        let broker = (kind == FaultKind::KafkaKill && p.brokers > 1)
            .then(|| rng.random_range(1..=p.brokers));
        // A restart takes time after the fault's own duration (Kafka ~10 s).
        outages.push((at_ms.saturating_sub(2_000), at_ms + duration_ms + 12_000));
        faults.push(Fault {
            kind,
            at_ms,
            duration_ms,
            target,
            broker,
        });
    }
    let kills = c.process_kill as u64;
    if let Some(step) = window.checked_div(kills) {
        let mut last_end = 0u64;
        for i in 0..kills {
            let mut at_ms = start + i * step + rng.random_range(0..=(step / 2).max(1));
            at_ms = at_ms.max(last_end + 8_000);
            // Out of any infrastructure outage (its restart included).
            while let Some(&(_, e)) = outages.iter().find(|(s, e)| at_ms >= *s && at_ms < *e) {
                at_ms = e;
            }
            let duration_ms = rng.random_range(2_000..=5_000);
            last_end = at_ms + duration_ms;
            faults.push(Fault {
                kind: FaultKind::ProcessKill,
                at_ms,
                duration_ms,
                target: Some(rng.random_range(0..p.processes.max(1))),
                broker: None,
            });
        }
    }
    faults.sort_by_key(|f| f.at_ms);
    Schedule {
        seed,
        duration_s: p.duration.as_secs(),
        faults,
    }
}

impl Schedule {
    /// Reads a schedule file (JSON, as `weir chaos` prints and saves it).
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the schedule {}", path.display()))?;
        let s: Schedule = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a chaos schedule", path.display()))?;
        Ok(s)
    }

    /// Checks the schedule fits a run: targets and brokers exist, faults start within the run.
    pub fn validate(&self, processes: usize, brokers: usize) -> anyhow::Result<()> {
        for f in &self.faults {
            match f.broker {
                Some(b) if f.kind != FaultKind::KafkaKill || b == 0 || b > brokers => {
                    anyhow::bail!(
                        "{} at {} ms: broker {b} is not a Kafka node of this stack (1..={brokers}, kafka_kill only)",
                        f.kind.name(),
                        f.at_ms
                    )
                }
                _ => {}
            }
            match (f.kind.on_process(), f.target) {
                (true, Some(t)) if t < processes => {}
                (true, _) => anyhow::bail!(
                    "{} at {} ms: target must be a process index below {processes}",
                    f.kind.name(),
                    f.at_ms
                ),
                (false, Some(_)) => anyhow::bail!(
                    "{} at {} ms: only process faults have a target",
                    f.kind.name(),
                    f.at_ms
                ),
                (false, None) => {}
            }
            if f.at_ms >= self.duration_s * 1000 {
                anyhow::bail!(
                    "{} at {} ms starts after the run ({} s)",
                    f.kind.name(),
                    f.at_ms,
                    self.duration_s
                );
            }
        }
        Ok(())
    }

    /// Faults of each kind.
    pub fn count(&self, kind: FaultKind) -> usize {
        self.faults.iter().filter(|f| f.kind == kind).count()
    }

    /// The schedule as printed before a run: one line per fault.
    pub fn describe(&self, names: &[String]) -> String {
        let mut out = format!(
            "fault schedule (seed {}, {} s, {} faults):\n",
            self.seed,
            self.duration_s,
            self.faults.len()
        );
        for f in &self.faults {
            let target = f
                .target
                .map(|t| {
                    format!(
                        " {}",
                        names.get(t).cloned().unwrap_or_else(|| format!("#{t}"))
                    )
                })
                .or_else(|| f.broker.map(|b| format!(" broker {b}")))
                .unwrap_or_default();
            out.push_str(&format!(
                "  at {:>6.1}s  {:<14}{:<14} for {:.1}s\n",
                f.at_ms as f64 / 1000.0,
                f.kind.name(),
                target,
                f.duration_ms as f64 / 1000.0
            ));
        }
        out
    }
}

/// The stack whose services the faults stop: its `infra/local` scripts and its name.
#[derive(Clone, Debug)]
pub struct Stack {
    /// `WEIR_STACK_NAME` of the stack (`None`: the default dev stack).
    pub name: Option<String>,
    /// The `infra/local` directory holding `service` and `env`.
    pub scripts: PathBuf,
    /// Where the service script's output goes.
    pub log: PathBuf,
}

impl Stack {
    /// Runs `infra/local/service SERVICE ACTION` on this stack.
    pub async fn service(&self, service: &str, action: &str) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let mut cmd = tokio::process::Command::new(self.scripts.join("service"));
        cmd.args([service, action])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        match &self.name {
            Some(n) => cmd.env("WEIR_STACK_NAME", n),
            None => cmd.env_remove("WEIR_STACK_NAME"),
        };
        let status = cmd
            .status()
            .await
            .with_context(|| format!("cannot run {}/service", self.scripts.display()))?;
        anyhow::ensure!(
            status.success(),
            "infra/local/service {service} {action} failed ({status}); see {}",
            self.log.display()
        );
        Ok(())
    }

    /// The endpoints `infra/local/env` prints for this stack (`NAME -> value`).
    pub async fn env(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut cmd = tokio::process::Command::new(self.scripts.join("env"));
        match &self.name {
            Some(n) => cmd.env("WEIR_STACK_NAME", n),
            None => cmd.env_remove("WEIR_STACK_NAME"),
        };
        let out = cmd.output().await.context("cannot run infra/local/env")?;
        anyhow::ensure!(out.status.success(), "infra/local/env failed");
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (k, v) = l.strip_prefix("export ")?.split_once('=')?;
                Some((k.to_string(), v.trim_matches('\'').to_string()))
            })
            .collect())
    }
}

/// What happened to one fault, with wall-clock times (answers are matched against them).
#[derive(Clone, Debug, Serialize)]
pub struct FaultRecord {
    /// The fault as planned.
    pub fault: Fault,
    /// When it was injected.
    #[serde(skip)]
    pub started: SystemTime,
    /// When the process or service was back (restarted and answering), if it came back.
    #[serde(skip)]
    pub ended: Option<SystemTime>,
    /// Why injecting or ending it failed.
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(duration: u64, counts: Counts) -> PlanInput {
        PlanInput {
            duration: Duration::from_secs(duration),
            warmup: Duration::from_secs(20),
            tail: Duration::from_secs(20),
            counts,
            session_timeout: Duration::from_secs(10),
            processes: 5,
            brokers: 1,
        }
    }

    #[test]
    fn full_run_has_the_required_faults_without_overlapping_outages() {
        let p = input(600, Counts::full(Duration::from_secs(600)));
        let s = plan(7, &p);
        assert!(s.count(FaultKind::ProcessKill) >= 20);
        assert_eq!(s.count(FaultKind::KafkaKill), 3);
        assert_eq!(s.count(FaultKind::PostgresStop), 3);
        assert_eq!(s.count(FaultKind::ProcessPause), 2);
        assert_eq!(s.count(FaultKind::S3Stop), 1);
        assert_eq!(s.count(FaultKind::RegistryStop), 1);
        s.validate(5, 1).unwrap();
        let infra: Vec<_> = s
            .faults
            .iter()
            .filter(|f| f.kind != FaultKind::ProcessKill)
            .collect();
        for w in infra.windows(2) {
            assert!(w[0].at_ms + w[0].duration_ms < w[1].at_ms, "{w:?}");
        }
        for f in &s.faults {
            assert!(f.at_ms >= 20_000 && f.at_ms < 600_000, "{f:?}");
            if f.kind == FaultKind::ProcessPause {
                assert!(f.duration_ms > 10_000);
            }
        }
        let kills: Vec<_> = s
            .faults
            .iter()
            .filter(|f| f.kind == FaultKind::ProcessKill)
            .collect();
        for w in kills.windows(2) {
            assert!(
                w[0].at_ms + w[0].duration_ms < w[1].at_ms,
                "two processes down at once: {w:?}"
            );
        }
    }

    #[test]
    fn same_seed_same_schedule_and_it_round_trips() {
        let p = input(150, Counts::ci());
        let a = plan(42, &p);
        assert_eq!(a, plan(42, &p));
        assert_ne!(a, plan(43, &p));
        for k in FaultKind::ALL {
            assert_eq!(a.count(k), 1, "{k:?}");
        }
        let text = serde_json::to_string_pretty(&a).unwrap();
        let b: Schedule = serde_json::from_str(&text).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn validate_refuses_bad_targets() {
        let s = Schedule {
            seed: 1,
            duration_s: 60,
            faults: vec![Fault {
                kind: FaultKind::ProcessKill,
                at_ms: 1_000,
                duration_ms: 1_000,
                target: Some(9),
                broker: None,
            }],
        };
        assert!(s.validate(3, 1).is_err());
        assert!(s.validate(10, 1).is_ok());
        let s = Schedule {
            faults: vec![Fault {
                kind: FaultKind::KafkaKill,
                at_ms: 1_000,
                duration_ms: 1_000,
                target: Some(0),
                broker: None,
            }],
            ..s
        };
        assert!(s.validate(3, 1).is_err());
        let broker = |b| Schedule {
            faults: vec![Fault {
                kind: FaultKind::KafkaKill,
                at_ms: 1_000,
                duration_ms: 1_000,
                target: None,
                broker: Some(b),
            }],
            ..s.clone()
        };
        assert!(broker(2).validate(3, 3).is_ok());
        assert!(broker(2).validate(3, 1).is_err());
        assert!(broker(0).validate(3, 3).is_err());
        assert!(broker(4).validate(3, 3).is_err());
    }

    #[test]
    fn three_brokers_kill_one_broker_at_a_time_and_one_broker_schedules_are_unchanged() {
        let one = plan(11, &input(600, Counts::full(Duration::from_secs(600))));
        assert!(one.faults.iter().all(|f| f.broker.is_none()));
        // A one-broker schedule never mentions brokers, so earlier schedule files still read.
        assert!(!serde_json::to_string(&one).unwrap().contains("broker"));
        let three = plan(
            11,
            &PlanInput {
                brokers: 3,
                ..input(600, Counts::full(Duration::from_secs(600)))
            },
        );
        three.validate(5, 3).unwrap();
        assert!(three.validate(5, 1).is_err());
        let kafka: Vec<_> = three
            .faults
            .iter()
            .filter(|f| f.kind == FaultKind::KafkaKill)
            .collect();
        assert_eq!(kafka.len(), 3);
        for f in &kafka {
            assert!(matches!(f.broker, Some(1..=3)), "{f:?}");
        }
        assert!(three
            .faults
            .iter()
            .all(|f| f.kind == FaultKind::KafkaKill || f.broker.is_none()));
        assert!(three.describe(&[]).contains("kafka_kill     broker "));
    }
}
