//! `weir bench e2e`: the whole pipeline as its users feel it. The benchmark starts its own weir
//! processes (this executable, or `--pipeline-bin`'s to measure another release under the same
//! load generator: `weir run gateway`, `materializer`, `coordinator`, `relay`, `--processes`
//! of each consumer) against the local stack, under a random topic prefix (its
//! own topics and consumer groups) and a workspace of its own, then drives them through the
//! gateway as users do:
//!
//! - `patches`: clients POST patches at a fixed offered rate; latency runs from each request's
//!   intended send time to its `WorkflowMaterialized` read from `weir.workflows.v1`;
//! - `completions`: clients start fan-out/fan-in runs (split → `fan_out` nodes → join) at the
//!   rate that makes the offered completions per second; workers answer every NodeReady at
//!   once by POSTing its completion; latency runs from a completion's intended send time (the
//!   NodeReady's arrival) to the next NodeReady read from `weir.node-ready.v1`.
//!
//! Before the ladders, each workload runs 5 s at 50/s unmeasured (fresh processes pay for
//! their first requests); then, before each workload's ladder, the machine is settled
//! ([`crate::bench::common::settle`]: autovacuum waited for, CHECKPOINT, sync). Each
//! (workload, rate) phase is a warm-up, then a measured window, then a drain (outputs of the
//! window's requests still arriving); a rate whose p99 passes
//! `stop_p99_ms`, whose achieved rate falls under 80 % of the offered one, or whose outputs
//! did not all arrive ends the ladder of that workload (the next rate would only grow a
//! backlog). CPU time of every process in the loop is read from `/proc` at the window's
//! edges. See docs/benchmarks.md, "End to end".
//!
//! Invariants: open loop (requests leave on schedule whatever the answers; latency from the
//! intended time); nothing of another run counts (own prefix, own workspace, readers start at
//! the topics' ends); every child is stopped when the benchmark ends, fails or is dropped.
//!
//! Isolated: the processes use a database of the run's own ([`OwnDatabase`]: created, migrated
//! by the pipeline's executable, dropped at the end), so a deployment's relays never see the
//! benchmark's outbox rows and one run's leftovers never slow the next.

pub mod chart;
pub mod load;
pub mod procs;
pub mod report;
pub mod stats;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use weir_model::Permission;
use weir_runtime::config::{Config, Secret};
use weir_runtime::db::quote_ident;

use crate::common::{create_topics, register_schemas, round, scratch_config};
use load::Shared;
use procs::{Children, Group, Probe, Spec};
use report::{Row, Workload, BEHIND_P99_MS};
use stats::{Schedule, Window};

/// Benchmark parameters.
#[derive(Debug, Clone)]
pub struct Params {
    /// Offered rates, events per second (patches/s; completions/s).
    pub rates: Vec<f64>,
    /// Workloads, in order.
    pub workloads: Vec<Workload>,
    /// Warm-up of each phase (requests sent, not measured).
    pub warmup: Duration,
    /// Measured window of each phase.
    pub duration: Duration,
    /// Longest wait, after a window, for the outputs of its requests.
    pub drain: Duration,
    /// Processes of each consumer processor (materializer, coordinator) and of the relay.
    pub processes: usize,
    /// Gateway processes (requests go round-robin).
    pub gateways: usize,
    /// Workflows the patches are spread over.
    pub workflows: usize,
    /// Parallel nodes between a run's split and join.
    pub fan_out: usize,
    /// Most requests in flight at once.
    pub max_inflight: usize,
    /// A request not answered within this is an error (timeout).
    pub request_timeout: Duration,
    /// A rate whose p99 is above this ends the workload's ladder.
    pub stop_p99_ms: f64,
    /// Where to write the latency-versus-throughput chart (SVG).
    pub chart: Option<PathBuf>,
    /// The weir executable the children run; `None`: this one.
    pub pipeline_bin: Option<PathBuf>,
    /// Print only the JSON line (no table).
    pub json_only: bool,
}

/// The fan-out/fan-in workflow the runs execute: split → `fan_out` nodes → join.
fn flow_definition(fan_out: usize) -> Value {
    let mut nodes = serde_json::Map::new();
    let mut edges = Vec::new();
    nodes.insert(
        "split".into(),
        json!({"type": "function", "config": {"fn": "split"}}),
    );
    nodes.insert(
        "join".into(),
        json!({"type": "function", "config": {"fn": "join"}}),
    );
    for i in 0..fan_out {
        let id = format!("work_{i}");
        nodes.insert(
            id.clone(),
            json!({"type": "function", "config": {"fn": "work", "shard": i}}),
        );
        edges.push(json!({"from": "split", "to": id}));
        edges.push(json!({"from": id, "to": "join"}));
    }
    json!({"nodes": nodes, "edges": edges, "settings": {"max_hops": 10}})
}

/// The workflow the patches change (one node whose config they replace).
fn patched_definition() -> Value {
    json!({"nodes": {"a": {"type": "function", "config": {"n": 0}}}, "edges": []})
}

/// Most processes of one role (`--processes`, `--gateways`).
const MAX_PROCESSES: usize = 16;
/// Highest offered rate, events per second.
const MAX_RATE: f64 = 1_000_000.0;

/// Run workflows (runs are spread over them).
const FLOWS: usize = 8;

/// Waits for SIGINT or SIGTERM; the signal's name.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        // No handler could be installed: the default action (and PR_SET_PDEATHSIG for the
        // children) stays in force.
        _ => std::future::pending().await,
    }
}

/// What a phase needs.
struct Ctx {
    shared: Arc<Shared>,
    groups: Arc<Vec<Group>>,
    params: Params,
    patch_workflows: Vec<String>,
    flows: Vec<String>,
}

/// One (workload, rate) phase: warm-up, window, drain.
async fn phase(
    ctx: &Ctx,
    workload: Workload,
    rate: f64,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Row> {
    let p = &ctx.params;
    let nodes_per_run = (p.fan_out + 2) as f64;
    let t0 = Instant::now() + Duration::from_millis(100);
    let window = Window {
        from: t0 + warmup,
        to: t0 + warmup + duration,
    };
    ctx.shared.begin_phase(window);
    let cpu = tokio::spawn(procs::measure_cpu(ctx.groups.clone(), window));
    let stop = CancellationToken::new();
    match workload {
        Workload::Patches => {
            let schedule = Schedule::new(t0, rate, warmup + duration);
            let wfs = ctx.patch_workflows.clone();
            let shared = ctx.shared.clone();
            load::open_loop(ctx.shared.clone(), schedule, stop, move |i, at| {
                let wf = wfs[i as usize % wfs.len()].clone();
                shared.clone().patch(wf, i, at)
            })
            .await;
        }
        Workload::Completions => {
            let schedule = Schedule::new(t0, rate / nodes_per_run, warmup + duration);
            let flows = ctx.flows.clone();
            let shared = ctx.shared.clone();
            // Unique inputs per run across phases.
            let base = (rate as u64) << 32;
            load::open_loop(ctx.shared.clone(), schedule, stop, move |i, at| {
                let wf = flows[i as usize % flows.len()].clone();
                shared.clone().start_run(wf, base + i, at)
            })
            .await;
        }
    }
    let drain_until = Instant::now() + p.drain;
    while ctx.shared.outstanding() > 0 && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = cpu.await.unwrap_or_default();
    let (ph, missing) = ctx.shared.end_phase();
    let secs = window.seconds();
    let (requests, latency, achieved, events) = match workload {
        Workload::Patches => (
            ph.patches,
            ph.patch_visible.summary(),
            ph.visible_in_window as f64 / secs,
            ph.visible_in_window,
        ),
        Workload::Completions => (
            ph.completions,
            ph.hop.summary(),
            ph.completions.accepted as f64 / secs,
            ph.completions.accepted,
        ),
    };
    let issue_lag = ph.issue_lag.summary();
    let errors =
        ph.patches.errors + ph.run_starts.errors + ph.completions.errors + missing + ph.rejected;
    let cpu_us_per_event = cpu
        .iter()
        .map(|(k, s)| (k.clone(), round(s * 1e6 / events.max(1) as f64, 1)))
        .collect();
    Ok(Row {
        workload,
        offered_per_sec: rate,
        achieved_per_sec: round(achieved, 1),
        latency,
        answered: ph.answered.summary(),
        published: ph.published.summary(),
        runs_offered_per_sec: if workload == Workload::Completions {
            round(rate / nodes_per_run, 1)
        } else {
            0.0
        },
        runs_per_sec: round(ph.runs_done_in_window as f64 / secs, 1),
        node_ready_per_sec: round(ph.ready_in_window as f64 / secs, 1),
        start_to_first_ready: ph.start_ready.summary(),
        run_time: ph.run_time.summary(),
        requests,
        run_starts: ph.run_starts,
        outputs_missing: missing,
        rejected: ph.rejected,
        errors,
        error_classes: ph.error_classes,
        generator_behind: issue_lag.p99_ms > BEHIND_P99_MS,
        issue_lag,
        seconds: round(secs, 3),
        events,
        cpu_seconds: cpu,
        cpu_us_per_event,
    })
}

/// Whether a phase saturated the pipeline: higher rates would only grow a backlog.
fn saturated(row: &Row, stop_p99_ms: f64) -> bool {
    row.latency.p99_ms > stop_p99_ms
        || row.achieved_per_sec < 0.8 * row.offered_per_sec
        || row.outputs_missing > 0
}

/// Runs the benchmark; returns the result object (the command prints it as its last line,
/// after the tables unless `json_only`).
pub async fn run(cfg: Arc<Config>, params: Params) -> anyhow::Result<Value> {
    // Bounds before anything starts: each flag decides how many processes, tasks, rows and
    // definitions the run makes on this machine.
    let mut bad = Vec::new();
    if !(1..=MAX_PROCESSES).contains(&params.processes) {
        bad.push(format!("--processes: 1 to {MAX_PROCESSES}"));
    }
    if !(1..=MAX_PROCESSES).contains(&params.gateways) {
        bad.push(format!("--gateways: 1 to {MAX_PROCESSES}"));
    }
    if params.rates.is_empty()
        || params.rates.len() > 64
        || !params
            .rates
            .iter()
            .all(|r| r.is_finite() && *r > 0.0 && *r <= MAX_RATE)
    {
        bad.push(format!(
            "--rates: 1 to 64 rates, each above 0 and at most {MAX_RATE}"
        ));
    }
    if !(1..=100_000).contains(&params.workflows) {
        bad.push("--workflows: 1 to 100000".into());
    }
    if !(1..=64).contains(&params.fan_out) {
        bad.push("--fan-out: 1 to 64".into());
    }
    if !(1..=1_000_000).contains(&params.max_inflight) {
        bad.push("--max-inflight: 1 to 1000000".into());
    }
    if let Some(b) = params.pipeline_bin.as_ref().filter(|b| !b.is_file()) {
        bad.push(format!("--pipeline-bin: {} is not a file", b.display()));
    }
    if params.duration.is_zero() || params.request_timeout.is_zero() {
        bad.push("--duration and --request-timeout: above 0".into());
    }
    anyhow::ensure!(bad.is_empty(), "{}", bad.join("; "));
    let id = uuid::Uuid::now_v7().simple().to_string();
    let bin = match &params.pipeline_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("the weir binary's path")?,
    };
    let db = OwnDatabase::create(&cfg, &id).await?;
    let result = run_in(cfg, params, &id, &bin, &db).await;
    db.drop_all().await;
    result
}

/// [`run`] once the run's database exists.
async fn run_in(
    cfg: Arc<Config>,
    params: Params,
    id: &str,
    bin: &Path,
    db: &OwnDatabase,
) -> anyhow::Result<Value> {
    let say = |s: String| {
        if !params.json_only {
            println!("{s}");
        }
    };
    let prefix = format!("bench-e2e-{id}.");
    let mut c = scratch_config(&cfg, prefix.clone());
    c.postgres.url = Secret::new(db.url.clone());
    // The benchmark measures the pipeline, not the per-client and per-workspace limits.
    c.gateway.rate_limit_per_sec = u32::MAX / 2;
    c.gateway.rate_limit_burst = u32::MAX / 2;
    c.gateway.client_rate_limit_per_sec = u32::MAX / 2;
    c.gateway.client_rate_limit_burst = u32::MAX / 2;
    let conns = (params.max_inflight + 100).max(c.gateway.max_connections);
    c.gateway.max_connections = conns;
    c.gateway.max_connections_per_client = conns;
    let cfg = Arc::new(c);
    create_topics(&cfg).await?;
    register_schemas(&cfg).await?;
    db.migrate(bin).await?;
    let pool = weir_runtime::db::pool(&cfg.postgres)?;
    let workspace = format!("bench-e2e-{id}");
    let key = weir_gateway::auth::create_key(&pool, &workspace, Permission::Write)
        .await
        .context("creating the benchmark's API key (has `weir migrate` run?)")?
        .key;
    pool.close().await;

    // The children read this run's configuration from a private file; the environment's
    // layers still apply on top of it, so what the run changed is repeated there.
    let dir = std::env::temp_dir().join(format!("weir-bench-e2e-{id}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cfg_path = dir.join("weir.toml");
    crate::child::write_private(
        &cfg_path,
        &toml::to_string(&*cfg).context("config as TOML")?,
    )?;
    let big = (u32::MAX / 2).to_string();
    let env: Vec<(String, String)> = [
        ("WEIR_CONFIG", cfg_path.display().to_string()),
        ("WEIR__KAFKA__TOPIC_PREFIX", prefix.clone()),
        ("WEIR__POSTGRES__URL", db.url.clone()),
        ("DATABASE_URL", db.url.clone()),
        ("WEIR__GATEWAY__RATE_LIMIT_PER_SEC", big.clone()),
        ("WEIR__GATEWAY__RATE_LIMIT_BURST", big.clone()),
        ("WEIR__GATEWAY__CLIENT_RATE_LIMIT_PER_SEC", big.clone()),
        ("WEIR__GATEWAY__CLIENT_RATE_LIMIT_BURST", big),
        ("WEIR__GATEWAY__MAX_CONNECTIONS", conns.to_string()),
        (
            "WEIR__GATEWAY__MAX_CONNECTIONS_PER_CLIENT",
            conns.to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut specs = Vec::new();
    let name = |role: &str, i: usize, n: usize| {
        if n == 1 {
            role.to_string()
        } else {
            format!("{role}-{}", i + 1)
        }
    };
    for i in 0..params.gateways {
        specs.push(Spec {
            name: name("gateway", i, params.gateways),
            role: "gateway".into(),
            telemetry_port: procs::free_port()?,
            gateway_port: Some(procs::free_port()?),
        });
    }
    for role in ["materializer", "coordinator", "relay"] {
        for i in 0..params.processes {
            specs.push(Spec {
                name: name(role, i, params.processes),
                role: role.into(),
                telemetry_port: procs::free_port()?,
                gateway_port: None,
            });
        }
    }
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    say(format!(
        "weir bench e2e: {} processes ({}), topics {prefix}*, logs in {} (kept if the run fails)",
        specs.len(),
        specs
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        logs.display()
    ));
    let mut children = Children::start(bin, specs, &env, &logs)?;
    // Ctrl-C or SIGTERM ends the run early but still stops the children and removes the
    // run's topics and configuration file.
    let result = tokio::select! {
        r = drive(&cfg, &params, &mut children, &key, &workspace, &say) => r,
        s = interrupted() => Err(anyhow::anyhow!("interrupted ({s})")),
    };
    let crashed = children.exited();
    children.stop(Duration::from_secs(20)).await;
    drop(children);
    let _ = std::fs::remove_file(&cfg_path);
    if let Err(e) = weir_runtime::kafka::delete_planned_topics(&cfg.kafka).await {
        tracing::warn!(error = %e, "cannot delete the benchmark's topics");
    }
    anyhow::ensure!(
        crashed.is_empty(),
        "weir processes exited during the run: {crashed:?}; see {}",
        logs.display()
    );
    let (rows, groups, settled) =
        result.with_context(|| format!("the processes' logs are in {}", logs.display()))?;
    // A run that went through leaves nothing behind; a failed one keeps the logs.
    let _ = std::fs::remove_dir_all(&dir);
    if !params.json_only {
        print!("{}", report::table(&rows, &groups));
    }
    if let Some(path) = &params.chart {
        let build = if cfg!(debug_assertions) {
            "debug build"
        } else {
            "release build"
        };
        let subtitle = format!(
            "weir bench e2e, {} process(es) per processor, {build}; shared 2-core machine, load generator and stack on it",
            params.processes
        );
        let svg = chart::svg(
            "weir end to end: latency vs throughput",
            &subtitle,
            "achieved events/s (patches made visible; completions accepted)",
            &report::series(&rows),
        );
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, svg).with_context(|| format!("cannot write {}", path.display()))?;
        say(format!("chart written to {}", path.display()));
    }
    let best = |w: Workload| {
        rows.iter()
            .filter(|r| r.workload == w)
            .map(|r| r.achieved_per_sec)
            .fold(0.0, f64::max)
    };
    Ok(json!({
        "bench": "e2e",
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "processes": params.processes,
        "gateways": params.gateways,
        "pipeline_bin": params.pipeline_bin.as_ref().map(|b| b.display().to_string()),
        "fan_out": params.fan_out,
        "workflows": params.workflows,
        "warmup_s": params.warmup.as_secs_f64(),
        "duration_s": params.duration.as_secs_f64(),
        "max_patches_per_sec": best(Workload::Patches),
        "max_completions_per_sec": best(Workload::Completions),
        "rows": rows,
        "settled": settled,
    }))
}

/// The run's own database: created empty, migrated by the pipeline's executable, dropped at
/// the end (whether the run went through or not). Nothing of a deployment's tables is read
/// or written, and nothing one run leaves behind (an outbox backlog when it ends saturated,
/// dead tuples) reaches the next one.
struct OwnDatabase {
    name: String,
    /// The URL of the new database (a secret: it carries the password).
    url: String,
    /// A pool on the configured database, to create and drop it.
    admin: sqlx::PgPool,
}

impl OwnDatabase {
    async fn create(cfg: &Config, id: &str) -> anyhow::Result<Self> {
        let name = format!("weir_bench_e2e_{id}");
        let url = with_database(cfg.postgres.url.expose(), &name)
            .context("postgres.url: not a URL whose database can be replaced")?;
        let admin = weir_runtime::db::pool(&cfg.postgres)?;
        sqlx::raw_sql(&format!("CREATE DATABASE {}", quote_ident(&name)))
            .execute(&admin)
            .await
            .context("creating the benchmark's own database (the role needs CREATEDB)")?;
        Ok(Self { name, url, admin })
    }

    /// `weir migrate` of `bin` on it: the schema the pipeline's release expects.
    async fn migrate(&self, bin: &Path) -> anyhow::Result<()> {
        let out = tokio::process::Command::new(bin)
            .arg("migrate")
            .env("WEIR__POSTGRES__URL", &self.url)
            .env("DATABASE_URL", &self.url)
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {} migrate", bin.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "{} migrate failed ({}): {}",
            bin.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    async fn drop_all(self) {
        let drop = format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(&self.name)
        );
        if let Err(e) = sqlx::raw_sql(&drop).execute(&self.admin).await {
            tracing::warn!(database = %self.name, error = %e, "cannot drop the benchmark's database");
        }
        self.admin.close().await;
    }
}

/// `url` (a Postgres URL) naming database `name` instead of its own; `None` if it is not
/// `scheme://authority...`. The authority cannot hold an unescaped `/`, so the path starts
/// at the first one after the scheme.
fn with_database(url: &str, name: &str) -> Option<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority = base.find("://")? + 3;
    let end = base[authority..]
        .find('/')
        .map_or(base.len(), |i| i + authority);
    let mut out = format!("{}/{name}", &base[..end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Some(out)
}

/// Everything between the children's start and their stop: readiness, setup, the phases.
async fn drive(
    cfg: &Arc<Config>,
    params: &Params,
    children: &mut Children,
    key: &str,
    workspace: &str,
    say: &impl Fn(String),
) -> anyhow::Result<(Vec<Row>, Vec<String>, Vec<Value>)> {
    children.wait_ready(Duration::from_secs(120)).await?;
    // Every consumer joined its group before anything is measured (a join later would
    // revoke partitions in the middle of a window).
    let members = cfg.runtime.consumers.max(1) * params.processes;
    for group in [weir_materializer::processor::GROUP, weir_coordinator::GROUP] {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let c = cfg.clone();
            let stable = tokio::task::spawn_blocking(move || {
                crate::common::group_stable(&c, group, Some(members))
            })
            .await??;
            if stable {
                break;
            }
            if Instant::now() > deadline {
                say(format!(
                    "warning: group {group} not stable with {members} members after 60 s"
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    let shared = Shared::new(
        children.gateways(),
        key,
        workspace.to_string(),
        params.max_inflight,
        params.request_timeout,
    )?;
    let stop_reader = CancellationToken::new();
    let starts = load::output_ends(cfg).await?;
    let reader = tokio::spawn(load::read_outputs(
        shared.clone(),
        cfg.clone(),
        starts,
        stop_reader.clone(),
    ));
    let _stop_reader = stop_reader.clone().drop_guard();

    // Setup: the workflows the patches change and the ones the runs execute.
    let patch_workflows: Vec<String> = (0..params.workflows).map(|i| format!("wf-{i}")).collect();
    let flows: Vec<String> = (0..FLOWS).map(|i| format!("flow-{i}")).collect();
    let mut puts = tokio::task::JoinSet::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let flow = Arc::new(flow_definition(params.fan_out));
    let patched = Arc::new(patched_definition());
    for (wf, def) in patch_workflows
        .iter()
        .map(|w| (w.clone(), patched.clone()))
        .chain(flows.iter().map(|w| (w.clone(), flow.clone())))
    {
        let (shared, sem) = (shared.clone(), sem.clone());
        puts.spawn(async move {
            let _p = sem.acquire_owned().await;
            for _ in 0..20 {
                if shared.put_workflow(&wf, &def).await {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            anyhow::bail!("PUT of {wf} was not accepted")
        });
    }
    while let Some(r) = puts.join_next().await {
        r??;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for wf in flows.iter().chain(patch_workflows.last()) {
        while !shared.visible(wf).await {
            anyhow::ensure!(Instant::now() < deadline, "{wf} never became visible");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // CPU groups: the children by role, the stack's services, the load generator.
    let mut by_role: BTreeMap<String, Vec<Probe>> = BTreeMap::new();
    for (name, role, pid) in children.pids() {
        by_role.entry(role).or_default().push(Probe {
            name,
            pid,
            tree: false,
            clients_of: Vec::new(),
        });
    }
    let mut groups: Vec<Group> = ["gateway", "materializer", "coordinator", "relay"]
        .iter()
        .filter_map(|r| {
            by_role.remove(*r).map(|probes| Group {
                label: (*r).to_string(),
                probes,
            })
        })
        .collect();
    let child_pids: Vec<u32> = children.pids().into_iter().map(|(_, _, pid)| pid).collect();
    for p in procs::stack_probes() {
        // Postgres serves everyone on the stack: its backends serving this run's processes
        // are also counted apart (the rest is other clients and the shared background work:
        // WAL writer, checkpointer, autovacuum).
        let own = (p.name == "postgres").then(|| Group {
            label: "pg_backends".into(),
            probes: vec![Probe {
                name: "pg_backends".into(),
                pid: p.pid,
                tree: true,
                clients_of: child_pids.clone(),
            }],
        });
        groups.push(Group {
            label: p.name.clone(),
            probes: vec![p],
        });
        groups.extend(own);
    }
    groups.push(Group {
        label: "generator".into(),
        probes: vec![Probe {
            name: "generator".into(),
            pid: std::process::id(),
            tree: false,
            clients_of: Vec::new(),
        }],
    });
    let labels: Vec<String> = groups.iter().map(|g| g.label.clone()).collect();
    say(format!("CPU measured for: {}", labels.join(", ")));

    let ctx = Ctx {
        shared,
        groups: Arc::new(groups),
        params: params.clone(),
        patch_workflows,
        flows,
    };
    // Fresh processes pay for their first requests (connections, statement plans, caches):
    // each workload runs a few seconds at a low rate, unmeasured, before its ladder.
    for &workload in &params.workloads {
        say(format!("priming: {} at 50/s for 5 s", workload.name()));
        phase(
            &ctx,
            workload,
            50.0,
            Duration::from_secs(4),
            Duration::from_secs(1),
        )
        .await?;
    }
    let mut rows = Vec::new();
    let mut settled = Vec::new();
    let pool = weir_runtime::db::pool(&cfg.postgres)?;
    for &workload in &params.workloads {
        // What earlier work left dirty (shared buffers, the OS page cache, a checkpoint due)
        // is written back now, not inside the ladder; autovacuum workers are waited for. The
        // ladder itself runs on without settling: its rates follow each other as a user's
        // load would.
        settled.push(
            crate::bench::common::settle(&pool, &[], &format!("e2e {}", workload.name())).await?,
        );
        for &rate in &params.rates {
            say(format!(
                "{} at {rate}/s: {:.0} s warm-up, {:.0} s measured",
                workload.name(),
                params.warmup.as_secs_f64(),
                params.duration.as_secs_f64()
            ));
            let row = phase(&ctx, workload, rate, params.warmup, params.duration).await?;
            say(format!(
                "  achieved {:.0}/s, p50 {} ms, p99 {} ms, p99.9 {} ms, errors {}{}",
                row.achieved_per_sec,
                row.latency.p50_ms,
                row.latency.p99_ms,
                row.latency.p999_ms,
                row.errors,
                if row.generator_behind {
                    format!(
                        ", GENERATOR BEHIND (issue lag p99 {} ms)",
                        row.issue_lag.p99_ms
                    )
                } else {
                    String::new()
                }
            ));
            let stop = saturated(&row, params.stop_p99_ms);
            rows.push(row);
            if stop {
                say(format!(
                    "  {} saturated at {rate}/s: higher rates skipped",
                    workload.name()
                ));
                break;
            }
        }
    }
    stop_reader.cancel();
    let _ = reader.await;
    pool.close().await;
    Ok((rows, labels, settled))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_names_another_database() {
        let cases = [
            (
                "postgres://u:p%2Fq@h:5432/weir",
                "postgres://u:p%2Fq@h:5432/other",
            ),
            (
                "postgres://u@h/weir?sslmode=require",
                "postgres://u@h/other?sslmode=require",
            ),
            ("postgresql://h:5432", "postgresql://h:5432/other"),
            (
                "postgres://h?host=/run/pg",
                "postgres://h/other?host=/run/pg",
            ),
        ];
        for (url, want) in cases {
            assert_eq!(with_database(url, "other").as_deref(), Some(want), "{url}");
        }
        assert_eq!(with_database("weir", "other"), None);
    }

    #[test]
    fn the_flow_is_a_valid_fan_out_fan_in() {
        let def = flow_definition(4);
        assert_eq!(def["nodes"].as_object().map(|n| n.len()), Some(6));
        assert_eq!(def["edges"].as_array().map(Vec::len), Some(8));
        let limits = weir_model::definition::Limits::default();
        assert!(weir_model::definition::validate(&def, &limits).is_ok());
        assert!(weir_model::definition::validate(&patched_definition(), &limits).is_ok());
    }
}
