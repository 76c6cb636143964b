//! The fault-injection suite behind `weir chaos`.
//!
//! [`load`] drives a sustained mixed workload through the gateway and keeps a [`load::Ledger`]
//! of everything the gateway acknowledged; the driver (this module, [`procs`], [`faults`])
//! runs several weir processes and injects faults on a seeded schedule; [`check`] drains and
//! verifies the invariants against what Kafka and Postgres hold; [`report`] prints the figures.
//!
//! A run, in order: find the stack (refusing the shared dev stack unless asked), give the run
//! its own topic prefix (so its topics and consumer groups start empty), migrate, create the
//! topics, register the schemas, start the processes and wait until each is ready, start the
//! load, inject the schedule's faults while sampling lag and latency every second, stop the
//! load, drain and check, stop the processes gracefully, then print the report and one JSON
//! line. Whatever happens (an error, Ctrl-C), no child is left running and every service of
//! the stack is started again before returning.

pub mod check;
pub mod faults;
pub mod load;
pub mod procs;
pub mod report;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use weir_runtime::config::Config;

use crate::faults::{Counts, FaultKind, FaultRecord, PlanInput, Schedule, Stack};
use crate::procs::Fleet;
use crate::report::{Sample, Thresholds};

/// `weir chaos`: several weir processes under a sustained load through the gateway while
/// processes are killed and paused and Kafka, Postgres, S3 and the registry fail under them;
/// then the invariants are checked and a report printed (last line: JSON). Runs against the
/// stack whose environment is loaded, which must be a stack of its own
/// (`WEIR_STACK_NAME=chaos infra/local/up`, `eval "$(WEIR_STACK_NAME=chaos infra/local/env)"`).
/// Exit 1 when an invariant fails.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Seconds of load with faults (default 600; 170 with --ci).
    #[arg(long)]
    pub duration: Option<u64>,
    /// Seed of the schedule and the workload (default: from the clock; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// The bounded run for CI: 170 s, one fault of each kind.
    #[arg(long)]
    pub ci: bool,
    /// Replay a schedule file (JSON, as saved in the run's directory) instead of planning one.
    #[arg(long)]
    pub schedule: Option<PathBuf>,
    /// Processes running every processor (`weir dev`).
    #[arg(long, default_value_t = 3)]
    pub processes: usize,
    /// Processes split by role, one per role (`weir run <role>`), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "gateway,materializer")]
    pub split: Vec<String>,
    /// Kafka brokers of the stack: 1, or 3 (a stack started with `WEIR_KAFKA_BROKERS=3`,
    /// whose `infra/local/env` exports it; topics get three replicas, and each Kafka fault
    /// kills one broker).
    #[arg(long, env = "WEIR_KAFKA_BROKERS", default_value_t = 1)]
    pub brokers: usize,
    /// Consumer group session timeout of the processes, in ms (a pause lasts longer).
    #[arg(long, default_value_t = 10_000)]
    pub session_timeout_ms: u64,
    /// Distinct workflows patched.
    #[arg(long, default_value_t = 2_000)]
    pub workflows: usize,
    /// Patches offered per second.
    #[arg(long, default_value_t = 40.0)]
    pub patches_per_sec: f64,
    /// Fan-out/fan-in runs offered per second.
    #[arg(long, default_value_t = 1.0)]
    pub runs_per_sec: f64,
    /// Cache stores and lookups offered per second.
    #[arg(long, default_value_t = 10.0)]
    pub cache_ops_per_sec: f64,
    /// Poison records per minute (must end in the DLQ or be rejected).
    #[arg(long, default_value_t = 6.0)]
    pub poison_per_min: f64,
    /// Lag (records) under which the groups count as caught up after a fault.
    #[arg(long, default_value_t = 200)]
    pub lag_threshold: i64,
    /// First port of the processes: gateways from here, telemetry from here + 100.
    #[arg(long, default_value_t = 18_400)]
    pub port_base: u16,
    /// Directory for the processes' logs, the schedule and the report (default: under the
    /// stack's data directory, `.stack-<name>/chaos/<run>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The `infra/local` directory of the stack's scripts (default: found from the current
    /// directory upwards).
    #[arg(long)]
    pub stack_scripts: Option<PathBuf>,
    /// Allow running against the default dev stack (its Kafka and Postgres get killed: never
    /// while anyone else uses it).
    #[arg(long)]
    pub allow_shared_stack: bool,
}

fn find_scripts(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        anyhow::ensure!(
            p.join("service").is_file(),
            "{}: no `service` script here",
            p.display()
        );
        return Ok(p.to_path_buf());
    }
    let cwd = std::env::current_dir()?;
    for dir in cwd.ancestors() {
        let p = dir.join("infra/local");
        if p.join("service").is_file() && p.join("lib.sh").is_file() {
            return Ok(p);
        }
    }
    anyhow::bail!(
        "cannot find infra/local/service from {}: run weir chaos inside the weir repository or pass --stack-scripts",
        cwd.display()
    )
}

/// The stack the run drives (named by `WEIR_STACK_NAME`; [`run`] has already refused the
/// unnamed dev stack unless allowed); refuses a configuration that does not point at the
/// Kafka and Postgres of the stack whose services the faults would stop.
async fn resolve_stack(args: &Args, cfg: &Config, out: &Path) -> anyhow::Result<Stack> {
    let scripts = find_scripts(args.stack_scripts.as_deref())?;
    let name = std::env::var("WEIR_STACK_NAME")
        .ok()
        .filter(|n| !n.is_empty());
    let stack = Stack {
        name,
        scripts,
        log: out.join("stack-service.log"),
    };
    let env = stack.env().await?;
    let get = |k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    // The stack's size decides what a Kafka fault is: with one broker, a kill of that broker;
    // with three, a kill of one of them. A run that guessed wrong would test something else.
    let brokers = get("KAFKA_BOOTSTRAP_SERVERS")
        .split(',')
        .filter(|a| !a.trim().is_empty())
        .count();
    anyhow::ensure!(
        brokers == args.brokers,
        "--brokers {}: stack {:?} has {brokers} Kafka broker(s) (start a three-broker stack with \
         WEIR_KAFKA_BROKERS=3 WEIR_STACK_NAME=... infra/local/up)",
        args.brokers,
        stack.name.as_deref().unwrap_or("(default)"),
    );
    anyhow::ensure!(
        get("KAFKA_BOOTSTRAP_SERVERS") == cfg.kafka.bootstrap_servers
            && get("DATABASE_URL") == *cfg.postgres.url.expose(),
        "the configuration does not point at stack {:?} (its Kafka is {}, the configuration's {}): \
         load its environment with eval \"$(WEIR_STACK_NAME={} infra/local/env)\"",
        stack.name.as_deref().unwrap_or("(default)"),
        get("KAFKA_BOOTSTRAP_SERVERS"),
        cfg.kafka.bootstrap_servers,
        stack.name.as_deref().unwrap_or("")
    );
    Ok(stack)
}

const SERVICES: [&str; 4] = ["kafka", "postgres", "s3", "registry"];

async fn run_weir(
    bin: &Path,
    args: &[&str],
    env: &[(String, String)],
    log: &Path,
) -> anyhow::Result<()> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let status = tokio::process::Command::new(bin)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .kill_on_drop(true)
        .status()
        .await?;
    anyhow::ensure!(
        status.success(),
        "weir {} failed ({status}); see {}",
        args.join(" "),
        log.display()
    );
    Ok(())
}

/// Runs the whole suite; `Ok(false)` when an invariant fails.
pub async fn run(cfg: Arc<Config>, args: Args) -> anyhow::Result<bool> {
    anyhow::ensure!(
        args.brokers == 1 || args.brokers == 3,
        "--brokers {}: the local stack runs 1 or 3 Kafka brokers",
        args.brokers
    );
    anyhow::ensure!(
        args.processes >= 1,
        "--processes: at least one process runs every processor"
    );
    for role in &args.split {
        anyhow::ensure!(
            ["gateway", "materializer", "coordinator", "relay", "cache"].contains(&role.as_str()),
            "--split: unknown role {role:?} (gateway, materializer, coordinator, relay, cache)"
        );
    }
    let stack_name = std::env::var("WEIR_STACK_NAME")
        .ok()
        .filter(|n| !n.is_empty());
    if stack_name.is_none() && !args.allow_shared_stack {
        anyhow::bail!(
            "weir chaos kills the stack's Kafka and Postgres, so it runs on a stack of its own:\n  \
             WEIR_STACK_NAME=chaos infra/local/up\n  \
             eval \"$(WEIR_STACK_NAME=chaos infra/local/env)\"\n  \
             weir chaos ...\n\
             (the loaded environment names no stack, i.e. the shared dev stack; \
             --allow-shared-stack runs there anyway)"
        );
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
    let from_file = match &args.schedule {
        Some(p) => Some(Schedule::read(p)?),
        None => None,
    };
    let seed = from_file
        .as_ref()
        .map(|s| s.seed)
        .or(args.seed)
        .unwrap_or(now.as_secs() % 1_000_000);
    let run_id = format!("{}-s{seed}", now.as_secs());
    let scripts = find_scripts(args.stack_scripts.as_deref())?;
    let out = match &args.out {
        Some(o) => o.clone(),
        None => {
            let root = scripts
                .parent()
                .and_then(Path::parent)
                .context("infra/local has no repository root")?;
            let stack_dir = match &stack_name {
                Some(n) => format!(".stack-{n}"),
                None => ".stack".into(),
            };
            root.join(stack_dir).join("chaos").join(&run_id)
        }
    };
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let stack = resolve_stack(&args, &cfg, &out).await?;
    println!(
        "weir chaos: stack {:?} (Kafka {}, scripts {}), output in {}",
        stack.name.as_deref().unwrap_or("default (shared)"),
        cfg.kafka.bootstrap_servers,
        stack.scripts.display(),
        out.display()
    );

    let duration = Duration::from_secs(
        from_file
            .as_ref()
            .map(|s| s.duration_s)
            .or(args.duration)
            .unwrap_or(if args.ci { 170 } else { 600 }),
    );
    let specs = procs::layout(args.processes, &args.split, args.port_base);
    let schedule = match from_file {
        Some(s) => s,
        None => faults::plan(
            seed,
            &PlanInput {
                duration,
                warmup: Duration::from_secs(if args.ci { 15 } else { 20 }),
                tail: Duration::from_secs(if args.ci { 20 } else { 30 }),
                counts: if args.ci {
                    Counts::ci()
                } else {
                    Counts::full(duration)
                },
                session_timeout: Duration::from_millis(args.session_timeout_ms),
                processes: specs.len(),
                brokers: args.brokers,
            },
        ),
    };
    schedule.validate(specs.len(), args.brokers)?;
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    print!("{}", schedule.describe(&names));
    std::fs::write(
        out.join("schedule.json"),
        serde_json::to_string_pretty(&schedule)?,
    )?;

    // The run's own prefix: its topics and groups start empty, and earlier runs' leftovers
    // (topics, groups, outbox rows of other topics) do not enter its figures.
    let prefix = format!("chaos{}s{seed}.", now.as_secs() % 100_000_000);
    let mut run_cfg = (*cfg).clone();
    run_cfg.kafka.topic_prefix = prefix.clone();
    run_cfg.kafka.consumer.insert(
        "session.timeout.ms".into(),
        args.session_timeout_ms.to_string(),
    );
    // Every topic on every broker (min.insync.replicas 2 is the brokers' default), so that
    // acks=all means two copies and one broker down loses nothing.
    let replication = i32::try_from(args.brokers).context("--brokers")?;
    run_cfg.kafka.replication_factor = replication;
    // The processes read the driver's effective configuration (file and environment alike)
    // from this file; the environment's own layers still apply on top, so the run's settings
    // are repeated there.
    let cfg_path = out.join("weir.toml");
    weir_tools::child::write_private(
        &cfg_path,
        &toml::to_string(&run_cfg).context("config as TOML")?,
    )?;
    let child_env = vec![
        ("WEIR_CONFIG".to_string(), cfg_path.display().to_string()),
        ("WEIR__KAFKA__TOPIC_PREFIX".into(), prefix.clone()),
        (
            "WEIR__KAFKA__CONSUMER__SESSION__TIMEOUT__MS".into(),
            args.session_timeout_ms.to_string(),
        ),
        (
            "WEIR__KAFKA__REPLICATION_FACTOR".into(),
            replication.to_string(),
        ),
    ];
    let bin = std::env::current_exe().context("the weir binary's path")?;
    let prep_log = out.join("prepare.log");
    for a in [
        &["migrate"][..],
        &["topics", "create"][..],
        &["schemas", "register"][..],
    ] {
        run_weir(&bin, a, &child_env, &prep_log).await?;
    }
    println!(
        "topics and groups prefixed {prefix:?}; starting {} processes",
        specs.len()
    );

    let abort = CancellationToken::new();
    let on_signal = abort.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("weir chaos: interrupted; stopping the processes and restarting the stack's services");
            on_signal.cancel();
        }
    });
    let fleet = Fleet::start(&bin, specs, child_env, &out.join("logs")).await?;
    let result = drive(&args, Arc::new(run_cfg), &schedule, &fleet, &stack, &abort).await;
    // Whatever happened: no service of the stack stays down, no child keeps running.
    for svc in SERVICES {
        if let Err(e) = stack.service(svc, "start").await {
            eprintln!("weir chaos: cannot restart {svc}: {e:#}");
        }
    }
    let stopped = fleet.stop(Duration::from_secs(30)).await;
    let (report_inputs, t0) = result?;
    let DriveOutcome {
        records,
        samples,
        answers,
        check,
    } = report_inputs;
    let report = report::build(report::Inputs {
        schedule: &schedule,
        t0,
        processes: names,
        records: &records,
        samples: &samples,
        answers: &answers,
        check,
        crashes: fleet.crashes(),
        stopped,
        thresholds: Thresholds {
            lag: args.lag_threshold,
        },
        logs: out.join("logs"),
    });
    print!("{}", report.render());
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!("report: {}", out.join("report.json").display());
    println!("{}", report.json_line());
    Ok(report.ok)
}

/// Injects one fault and ends it (restart, SIGCONT); what happened, with wall-clock times.
async fn inject(
    f: &faults::Fault,
    fleet: &Fleet,
    stack: &Stack,
    start: tokio::time::Instant,
) -> FaultRecord {
    let started = SystemTime::now();
    let down = Duration::from_millis(f.duration_ms);
    let target = f.target.unwrap_or(0);
    let who = f
        .target
        .and_then(|t| fleet.names().get(t).cloned())
        .or_else(|| f.broker.map(|b| format!("broker {b}")))
        .unwrap_or_default();
    println!(
        "  t={:>4}s fault {} {who} for {:.1}s",
        start.elapsed().as_secs(),
        f.kind.name(),
        down.as_secs_f64()
    );
    let r = match f.kind {
        FaultKind::ProcessKill => fleet.kill_restart(target, down).await,
        FaultKind::ProcessPause => fleet.pause(target, down).await,
        kind => {
            let (svc, action) = match kind {
                // One node of a three-broker cluster (`kafka:N`), or the single broker.
                FaultKind::KafkaKill => (
                    f.broker
                        .map(|b| format!("kafka:{b}"))
                        .unwrap_or_else(|| "kafka".into()),
                    "kill",
                ),
                FaultKind::PostgresStop => ("postgres".into(), "immediate-stop"),
                FaultKind::S3Stop => ("s3".into(), "stop"),
                _ => ("registry".into(), "stop"),
            };
            match stack.service(&svc, action).await {
                Ok(()) => {
                    tokio::time::sleep(down).await;
                    stack.service(&svc, "start").await
                }
                Err(e) => Err(e),
            }
        }
    };
    let ended = SystemTime::now();
    println!(
        "  t={:>4}s fault {} {who} over ({:.1}s){}",
        start.elapsed().as_secs(),
        f.kind.name(),
        ended
            .duration_since(started)
            .unwrap_or_default()
            .as_secs_f64(),
        r.as_ref()
            .err()
            .map(|e| format!(": {e:#}"))
            .unwrap_or_default()
    );
    FaultRecord {
        fault: f.clone(),
        started,
        ended: r.is_ok().then_some(ended),
        error: r.err().map(|e| format!("{e:#}")),
    }
}

struct DriveOutcome {
    records: Vec<FaultRecord>,
    samples: Vec<Sample>,
    answers: Vec<load::Answer>,
    check: check::CheckReport,
}

/// Latest total lag, refreshed by its own loop (a lag query can block while Kafka is down).
type LagCell = Arc<std::sync::Mutex<Option<(std::time::Instant, i64)>>>;

/// Takes a [`Sample`] each second; prints a progress line every ten.
struct Sampler {
    lag: LagCell,
    start: tokio::time::Instant,
    samples: Vec<Sample>,
}

impl Sampler {
    fn sample(&mut self, load: Option<&load::Load>) {
        let snap = load.map(load::Load::snapshot);
        let p99_ms = snap.as_ref().and_then(|s| s.recent_p99_ms);
        let acknowledged = snap.as_ref().map(|s| s.acknowledged).unwrap_or(0);
        // A lag older than 3 s is unknown (the query is stuck on a broker that is down).
        let lag = self.lag.lock().ok().and_then(|g| {
            g.filter(|(t, _)| t.elapsed() < Duration::from_secs(3))
                .map(|(_, l)| l)
        });
        if self.samples.len().is_multiple_of(10) {
            println!(
                "  t={:>4}s lag={} p99={} acked={} answers={:?}",
                self.start.elapsed().as_secs(),
                lag.map(|l| l.to_string()).unwrap_or_else(|| "?".into()),
                p99_ms
                    .map(|p| format!("{p:.0}ms"))
                    .unwrap_or_else(|| "-".into()),
                acknowledged,
                snap.map(|s| s.answers_by_status).unwrap_or_default()
            );
        }
        self.samples.push(Sample {
            at: SystemTime::now(),
            lag,
            p99_ms,
            acknowledged,
        });
    }
}

async fn drive(
    args: &Args,
    cfg: Arc<Config>,
    schedule: &Schedule,
    fleet: &Arc<Fleet>,
    stack: &Stack,
    abort: &CancellationToken,
) -> anyhow::Result<(DriveOutcome, SystemTime)> {
    tokio::select! {
        r = fleet.wait_ready(Duration::from_secs(180)) => r?,
        _ = abort.cancelled() => anyhow::bail!("interrupted"),
    }
    let bg = CancellationToken::new();
    let _stop_bg = bg.clone().drop_guard();
    tokio::spawn(fleet.clone().supervise(bg.clone()));

    let stop_load = CancellationToken::new();
    let load = load::start(
        &cfg,
        load::LoadConfig {
            gateways: fleet.gateways(),
            seed: schedule.seed,
            workflows: args.workflows,
            patches_per_sec: args.patches_per_sec,
            runs_per_sec: args.runs_per_sec,
            cache_ops_per_sec: args.cache_ops_per_sec,
            poison_per_min: args.poison_per_min,
        },
        stop_load.clone(),
    )
    .await?;
    let t0 = SystemTime::now();
    let start = tokio::time::Instant::now();
    println!("load started; faults follow the schedule");

    // Lag poller.
    let lag: LagCell = Arc::default();
    {
        let (lag, cfg, bg) = (lag.clone(), cfg.clone(), bg.clone());
        tokio::spawn(async move {
            while !bg.is_cancelled() {
                let c = cfg.clone();
                if let Ok(Ok(l)) =
                    tokio::task::spawn_blocking(move || check::consumer_lag(&c)).await
                {
                    if let Ok(mut g) = lag.lock() {
                        *g = Some((std::time::Instant::now(), l));
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }
    let mut sampler = Sampler {
        lag,
        start,
        samples: Vec::new(),
    };
    // Faults, in two lanes that each run one fault at a time: the infrastructure and pauses
    // in one, process kills in the other. A fault starts at its planned time or, when the
    // previous one of its lane is still restarting, as soon as that one is over; a kill also
    // waits while an infrastructure fault or a pause is in progress, so at most one thing is
    // down at any moment and every answer during an outage is that outage's.
    let busy = Arc::new(tokio::sync::RwLock::new(()));
    let (kills, others): (Vec<_>, Vec<_>) = schedule
        .faults
        .iter()
        .cloned()
        .partition(|f| f.kind == FaultKind::ProcessKill);
    let mut tasks = tokio::task::JoinSet::new();
    for (lane, exclusive) in [(others, true), (kills, false)] {
        let (fleet, stack, busy) = (fleet.clone(), stack.clone(), busy.clone());
        tasks.spawn(async move {
            let mut records = Vec::new();
            for f in lane {
                tokio::time::sleep_until(start + Duration::from_millis(f.at_ms)).await;
                // The infrastructure lane holds the lock for its whole fault; kills take it
                // shared, only to wait for the end of one.
                let _guard = if exclusive {
                    Some(busy.clone().write_owned().await)
                } else {
                    drop(busy.read().await);
                    None
                };
                records.push(inject(&f, &fleet, &stack, start).await);
            }
            records
        });
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let end = start + Duration::from_secs(schedule.duration_s);
    loop {
        tokio::select! {
            _ = tick.tick() => sampler.sample(Some(&load)),
            _ = tokio::time::sleep_until(end) => break,
            _ = abort.cancelled() => anyhow::bail!("interrupted"),
        }
    }
    let mut records = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => sampler.sample(Some(&load)),
            r = tasks.join_next() => match r {
                Some(Ok(recs)) => records.extend(recs),
                Some(Err(e)) => anyhow::bail!("a fault task failed: {e}"),
                None => break,
            },
            _ = abort.cancelled() => anyhow::bail!("interrupted"),
        }
    }
    records.sort_by_key(|r| r.started);
    println!(
        "  t={:>4}s faults over; stopping the load, draining and checking",
        start.elapsed().as_secs()
    );
    stop_load.cancel();
    let ledger = {
        let finish = load.finish(Duration::from_secs(120));
        tokio::pin!(finish);
        loop {
            tokio::select! {
                _ = tick.tick() => sampler.sample(None),
                r = &mut finish => break r?,
                _ = abort.cancelled() => anyhow::bail!("interrupted"),
            }
        }
    };
    let check = {
        let check = check::check(&cfg, &ledger, Duration::from_secs(180));
        tokio::pin!(check);
        loop {
            tokio::select! {
                _ = tick.tick() => sampler.sample(None),
                r = &mut check => break r?,
                _ = abort.cancelled() => anyhow::bail!("interrupted"),
            }
        }
    };
    bg.cancel();
    Ok((
        DriveOutcome {
            records,
            samples: sampler.samples,
            answers: ledger.answers,
            check,
        },
        t0,
    ))
}
