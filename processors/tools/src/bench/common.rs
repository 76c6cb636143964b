//! What the stage benchmarks share so that their figures hold from run to run: a start from a
//! state of their own making, and repetitions summarized by their median and their worst.
//!
//! Why: on a shared machine one benchmark's aftermath lands in the next one's measurement.
//! A materializer run leaves hundreds of MB of dirty pages in the OS page cache, about a GB of
//! WAL toward the next requested checkpoint, and dead tuples that wake autovacuum within a
//! minute; the next benchmark then measures that writeback, that checkpoint or that vacuum.
//! [`settle`] takes them out before a measured phase: `VACUUM (ANALYZE)` of the tables the
//! phase uses, a wait until no autovacuum worker runs, `CHECKPOINT`, then `sync` of the OS
//! page cache. It reports the tables' live and dead tuples as the phase meets them, so a run
//! shows that each repetition starts from the same state.
//!
//! Invariants:
//! - a figure's median is the middle value of the repetitions (the mean of the two middle
//!   ones for an even count); its worst is the lowest for a higher-is-better figure, the
//!   highest for a lower-is-better one;
//! - a target is met only when it holds at the median AND at the worst repetition;
//! - the summary keeps the first repetition's fields and replaces each summarized top-level
//!   figure with its median, so with one repetition it is that repetition's result.

use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use sqlx::PgPool;

use crate::common::{round, vacuum_analyze};

/// Which way a figure is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// Throughput, speedup, recall.
    Higher,
    /// Latency, errors, violations.
    Lower,
}

/// A figure summarized over repetitions, and its target if it has one.
#[derive(Debug, Clone, Copy)]
pub struct Figure {
    /// JSON pointer into one repetition's result (`/p99_ms`, `/patches_wrk/p99_ms`).
    pub pointer: &'static str,
    /// Which way it is better.
    pub better: Better,
    /// The bound it must meet (≥ for [`Better::Higher`], ≤ for [`Better::Lower`]).
    pub target: Option<f64>,
}

impl Figure {
    /// A higher-is-better figure without a target.
    pub const fn higher(pointer: &'static str) -> Self {
        Self {
            pointer,
            better: Better::Higher,
            target: None,
        }
    }

    /// A lower-is-better figure without a target.
    pub const fn lower(pointer: &'static str) -> Self {
        Self {
            pointer,
            better: Better::Lower,
            target: None,
        }
    }

    /// The same figure with a target (≥ or ≤ as it is better).
    pub const fn target(self, bound: f64) -> Self {
        Self {
            target: Some(bound),
            ..self
        }
    }

    /// The figure's name in the summary: its pointer without the leading `/`, `/` as `.`.
    pub fn name(&self) -> String {
        self.pointer.trim_start_matches('/').replace('/', ".")
    }
}

/// The middle value (the mean of the two middle ones for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// The worst value as the figure is better; `None` when empty.
pub fn worst(values: &[f64], better: Better) -> Option<f64> {
    let mut it = values.iter().copied();
    let first = it.next()?;
    Some(it.fold(first, |w, x| match better {
        Better::Higher => w.min(x),
        Better::Lower => w.max(x),
    }))
}

/// Whether `value` meets `bound` as the figure is better (≥ or ≤).
pub fn meets(value: f64, better: Better, bound: f64) -> bool {
    match better {
        Better::Higher => value >= bound,
        Better::Lower => value <= bound,
    }
}

/// One figure over the repetitions.
#[derive(Debug, Clone, PartialEq)]
pub struct Spread {
    /// Per repetition, in order.
    pub values: Vec<f64>,
    /// See [`median`].
    pub median: f64,
    /// See [`worst`].
    pub worst: f64,
    /// (max − min) / median in %, 0 when the median is 0.
    pub range_pct: f64,
}

impl Spread {
    /// The spread of `values`; `None` when empty.
    pub fn of(values: &[f64], better: Better) -> Option<Self> {
        let median = median(values)?;
        let worst = worst(values, better)?;
        let (lo, hi) = (
            worst_of(values, Better::Higher),
            worst_of(values, Better::Lower),
        );
        let range_pct = if median == 0.0 {
            0.0
        } else {
            (hi - lo) / median.abs() * 100.0
        };
        Some(Self {
            values: values.to_vec(),
            median,
            worst,
            range_pct,
        })
    }
}

fn worst_of(values: &[f64], better: Better) -> f64 {
    worst(values, better).unwrap_or(0.0)
}

/// Rounds a reported figure to a precision that keeps small latencies readable.
fn tidy(x: f64) -> f64 {
    if x.abs() >= 100.0 {
        round(x, 1)
    } else {
        round(x, 3)
    }
}

/// Combines the results of repetitions (each one bench result object) into one: the first
/// repetition's fields, each top-level figure of `figures` replaced by its median, and
/// `repeat`, `spread` (per figure: values, median, worst, range_pct), `targets` (per target:
/// the bound and whether it is met at the median and at the worst), `targets_met` and
/// `repetitions` (the results themselves).
pub fn summarize(reps: Vec<Value>, figures: &[Figure]) -> Value {
    let mut out = match reps.first() {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    let mut spreads = Map::new();
    let mut targets = Vec::new();
    let mut all_met = true;
    for f in figures {
        let values: Vec<f64> = reps
            .iter()
            .filter_map(|r| r.pointer(f.pointer).and_then(Value::as_f64))
            .collect();
        let Some(s) = Spread::of(&values, f.better) else {
            continue;
        };
        // Counts stay integers (a median of counts can be a half only for an even count).
        let integers = reps.iter().all(|r| {
            r.pointer(f.pointer)
                .is_none_or(|v| v.is_i64() || v.is_u64())
        });
        let show = |x: f64| {
            if integers && x.fract() == 0.0 {
                json!(x as i64)
            } else {
                json!(tidy(x))
            }
        };
        let name = f.name();
        if !name.contains('.') && out.contains_key(&name) {
            out.insert(name.clone(), show(s.median));
        }
        if let Some(bound) = f.target {
            let (at_median, at_worst) = (
                meets(s.median, f.better, bound),
                meets(s.worst, f.better, bound),
            );
            all_met &= at_median && at_worst;
            targets.push(json!({
                "figure": name,
                "bound": format!("{} {bound}", if f.better == Better::Higher { ">=" } else { "<=" }),
                "median": show(s.median),
                "worst": show(s.worst),
                "met_at_median": at_median,
                "met_at_worst": at_worst,
            }));
        }
        spreads.insert(
            name,
            json!({
                "values": s.values.iter().map(|v| show(*v)).collect::<Vec<_>>(),
                "median": show(s.median),
                "worst": show(s.worst),
                "range_pct": round(s.range_pct, 1),
            }),
        );
    }
    out.insert("repeat".into(), json!(reps.len()));
    out.insert("spread".into(), Value::Object(spreads));
    out.insert("targets".into(), json!(targets));
    out.insert("targets_met".into(), json!(all_met));
    out.insert("repetitions".into(), json!(reps));
    Value::Object(out)
}

/// Prints one line per repetition and one per summarized figure to stderr (stdout carries
/// the result).
pub fn print_spread(summary: &Value) {
    if let Some(spread) = summary.get("spread").and_then(Value::as_object) {
        for (name, s) in spread {
            eprintln!(
                "{name}: {} (median {}, worst {}, range {} %)",
                s["values"], s["median"], s["worst"], s["range_pct"]
            );
        }
    }
    if let Some(targets) = summary.get("targets").and_then(Value::as_array) {
        for t in targets {
            eprintln!(
                "target {} {}: at median {} ({}), at worst {} ({})",
                t["figure"].as_str().unwrap_or_default(),
                t["bound"].as_str().unwrap_or_default(),
                t["median"],
                if t["met_at_median"] == json!(true) {
                    "met"
                } else {
                    "NOT met"
                },
                t["worst"],
                if t["met_at_worst"] == json!(true) {
                    "met"
                } else {
                    "NOT met"
                },
            );
        }
    }
}

/// Rows (counted), dead tuples (as the last VACUUM left them, from the statistics views) and
/// total size of `tables` as the pool's search path resolves them (a private schema's copies
/// first). Rows are counted rather than read from the statistics views, which other sessions
/// update up to ten seconds late.
pub async fn table_state(pool: &PgPool, tables: &[&str]) -> anyhow::Result<Value> {
    let mut out = Vec::new();
    for table in tables {
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT n_dead_tup, pg_total_relation_size(relid)
             FROM pg_stat_user_tables WHERE relid = to_regclass($1)",
        )
        .bind(table)
        .fetch_optional(pool)
        .await?;
        let (dead, bytes) = row.unwrap_or_default();
        let live: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {}",
            weir_runtime::db::quote_ident(table)
        ))
        .fetch_one(pool)
        .await?;
        out.push(json!({"table": table, "live": live, "dead": dead, "bytes": bytes}));
    }
    Ok(json!(out))
}

/// Deletes with `statements` (each bound to `arg`) on one session, then has that session
/// publish its statistics at once: a session keeps its counts of deleted rows for up to ten
/// seconds before the statistics views see them, so a VACUUM right after would report them
/// as dead tuples it left. Returns the rows deleted per statement.
pub async fn delete_rows(
    pool: &PgPool,
    statements: &[&str],
    arg: &str,
) -> anyhow::Result<Vec<u64>> {
    let mut conn = pool.acquire().await?;
    let mut deleted = Vec::with_capacity(statements.len());
    for sql in statements {
        deleted.push(
            sqlx::query(sql)
                .bind(arg)
                .execute(&mut *conn)
                .await?
                .rows_affected(),
        );
    }
    // PostgreSQL 15+: flushed when the session goes idle after this statement; older servers
    // lack the function and keep the delay (the reported dead tuples may then lag).
    if sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&mut *conn)
        .await
        .is_ok()
    {
        drop(conn);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(deleted)
}

/// Autovacuum workers running now (what each is doing).
async fn autovacuum_running(pool: &PgPool) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT coalesce(query, '') FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'",
    )
    .fetch_all(pool)
    .await?)
}

/// VACUUMs tried before a phase while dead tuples remain (2 s apart).
const VACUUM_ATTEMPTS: usize = 4;

/// Dead tuples left in `tables` (as the last VACUUM reported them).
async fn dead_tuples(pool: &PgPool, tables: &[&str]) -> anyhow::Result<i64> {
    let mut dead = 0;
    for table in tables {
        let n: Option<i64> = sqlx::query_scalar(
            "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = to_regclass($1)",
        )
        .bind(table)
        .fetch_optional(pool)
        .await?;
        dead += n.unwrap_or(0);
    }
    Ok(dead)
}

/// Longest wait for autovacuum workers to finish before a measured phase.
const AUTOVACUUM_WAIT: Duration = Duration::from_secs(60);

/// Brings the machine to the state a measured phase starts from (see the module docs):
/// `VACUUM (ANALYZE)` of `tables` (the pool's search path resolves them), a wait (at most a
/// minute) until no autovacuum worker runs, `CHECKPOINT` (skipped with a warning if the role
/// may not), `sync`. Returns what it did and the tables' state, and prints it.
pub async fn settle(pool: &PgPool, tables: &[&str], label: &str) -> anyhow::Result<Value> {
    let started = Instant::now();
    // Dead tuples that a VACUUM cannot remove yet are held by a snapshot older than their
    // deletion (a long transaction of the same database): retry a few times, then report who
    // held them.
    let mut xmin_holders: Vec<String> = Vec::new();
    for attempt in 0..VACUUM_ATTEMPTS {
        vacuum_analyze(pool, tables).await?;
        if dead_tuples(pool, tables).await? == 0 {
            break;
        }
        xmin_holders = sqlx::query_scalar(
            "SELECT format('pid %s (%s, %s): %s', pid, coalesce(application_name, ''),
                           date_trunc('second', now() - coalesce(xact_start, backend_start)),
                           left(coalesce(query, ''), 80))
             FROM pg_stat_activity
             WHERE datname = current_database()
               AND (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)
               AND pid <> pg_backend_pid()",
        )
        .fetch_all(pool)
        .await?;
        if attempt + 1 < VACUUM_ATTEMPTS {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    let mut autovacuum_seen: Vec<String> = Vec::new();
    let wait = Instant::now();
    loop {
        let running = autovacuum_running(pool).await?;
        if running.is_empty() {
            break;
        }
        for q in running {
            if !autovacuum_seen.contains(&q) {
                autovacuum_seen.push(q);
            }
        }
        if wait.elapsed() >= AUTOVACUUM_WAIT {
            eprintln!("{label}: autovacuum still running after {AUTOVACUUM_WAIT:?}; going on");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let autovacuum_wait_ms = wait.elapsed().as_millis() as u64;
    // A CHECKPOINT here flushes what earlier work left dirty in shared buffers, and starts the
    // WAL count toward the next requested checkpoint from zero, so neither lands in the phase.
    let checkpoint = match sqlx::query("CHECKPOINT").execute(pool).await {
        Ok(_) => true,
        Err(e) => {
            eprintln!("{label}: CHECKPOINT not run ({e}); a checkpoint may land in the phase");
            false
        }
    };
    // The broker's log segments and everything else dirty in the OS page cache: written back
    // now rather than during the phase.
    let synced = tokio::process::Command::new("sync")
        .status()
        .await
        .map(|s| s.success())
        .unwrap_or(false);
    let state = table_state(pool, tables).await?;
    let dirty_kib = dirty_kib();
    let out = json!({
        "vacuumed": tables,
        "xmin_holders": xmin_holders,
        "autovacuum_waited_ms": autovacuum_wait_ms,
        "autovacuum_seen": autovacuum_seen,
        "checkpoint": checkpoint,
        "os_synced": synced,
        "os_dirty_kib": dirty_kib,
        "loadavg_1m": loadavg(),
        "settle_ms": started.elapsed().as_millis() as u64,
        "tables": state,
    });
    if !xmin_holders.is_empty() {
        eprintln!("{label}: dead tuples held by older snapshots of: {xmin_holders:?}");
    }
    eprintln!(
        "{label}: settled in {} ms (autovacuum waited {autovacuum_wait_ms} ms{}, checkpoint {checkpoint}, sync {synced}, dirty {} KiB, load {}); tables: {}",
        out["settle_ms"],
        if out["autovacuum_seen"].as_array().is_some_and(|a| !a.is_empty()) {
            format!(" for {}", out["autovacuum_seen"])
        } else {
            String::new()
        },
        dirty_kib.map_or("?".into(), |d| d.to_string()),
        out["loadavg_1m"],
        describe_tables(&out["tables"]),
    );
    Ok(out)
}

/// `table live/dead` pairs, for a log line.
pub fn describe_tables(state: &Value) -> String {
    state
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| {
                    format!(
                        "{} {} live / {} dead",
                        t["table"].as_str().unwrap_or_default(),
                        t["live"],
                        t["dead"]
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// The machine's one-minute load average (Linux `/proc/loadavg`): what else competed for the
/// cores as the phase started.
fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Dirty memory in the OS page cache (Linux `/proc/meminfo`), KiB.
fn dirty_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Dirty:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Turns autovacuum off for `tables` (copies of the benchmark's own, never a deployment's):
/// the benchmark vacuums them itself between repetitions, so a vacuum never starts at a
/// random moment inside a measured phase.
/// Names are qualified with the private schema, so a deployment's table is never altered.
pub async fn own_maintenance(pool: &PgPool, schema: &str, tables: &[&str]) -> anyhow::Result<()> {
    use weir_runtime::db::quote_ident;
    anyhow::ensure!(
        schema.starts_with("weir_private_"),
        "{schema} is not a benchmark's own schema"
    );
    for table in tables {
        sqlx::query(&format!(
            "ALTER TABLE {}.{} SET (autovacuum_enabled = false)",
            quote_ident(schema),
            quote_ident(table)
        ))
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Topics whose names start with `prefix` that the broker still lists, waiting up to
/// `timeout` for a deletion to show (it is asynchronous).
pub async fn topics_left(
    cfg: &weir_runtime::config::Config,
    prefix: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    let kafka = cfg.kafka.clone();
    let prefix = prefix.to_string();
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer as _};
        let group = format!("weir-bench-probe-{}", uuid::Uuid::now_v7().simple());
        let consumer: BaseConsumer =
            weir_runtime::kafka::consumer_config(&kafka, &group, 0).create()?;
        let start = Instant::now();
        loop {
            let meta = consumer.fetch_metadata(None, Duration::from_secs(10))?;
            let left: Vec<String> = meta
                .topics()
                .iter()
                .map(|t| t.name().to_string())
                .filter(|n| n.starts_with(&prefix))
                .collect();
            if left.is_empty() || start.elapsed() >= timeout {
                return Ok(left);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_worst_follow_the_figure_direction() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[523.0, 224.0, 360.0]), Some(360.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(worst(&[224.0, 523.0, 360.0], Better::Lower), Some(523.0));
        assert_eq!(worst(&[99_329.0, 12_252.0], Better::Higher), Some(12_252.0));
        assert_eq!(worst(&[], Better::Higher), None);
        assert!(meets(250.0, Better::Lower, 250.0));
        assert!(!meets(250.1, Better::Lower, 250.0));
        assert!(meets(25_000.0, Better::Higher, 25_000.0));
        assert!(!meets(24_999.0, Better::Higher, 25_000.0));
        let s = Spread::of(&[200.0, 100.0, 300.0], Better::Lower).unwrap();
        assert_eq!((s.median, s.worst, s.range_pct), (200.0, 300.0, 100.0));
        assert_eq!(
            Spread::of(&[0.0, 0.0], Better::Lower).unwrap().range_pct,
            0.0
        );
        assert_eq!(
            Figure::lower("/patches_wrk/p99_ms").name(),
            "patches_wrk.p99_ms"
        );
    }

    #[test]
    fn targets_hold_only_at_the_median_and_the_worst() {
        // The materializer's p99 over three back-to-back runs: met once, at the median not.
        let reps: Vec<Value> = [(224.0, 27_000.0), (360.0, 30_000.0), (523.0, 28_000.0)]
            .iter()
            .map(|(p99, rate)| json!({"p99_ms": p99, "patches_per_sec": rate, "patches": 100}))
            .collect();
        let figures = [
            Figure::lower("/p99_ms").target(250.0),
            Figure::higher("/patches_per_sec").target(25_000.0),
            Figure::higher("/missing"),
        ];
        let s = summarize(reps.clone(), &figures);
        assert_eq!(s["p99_ms"], json!(360.0), "top-level figure is the median");
        assert_eq!(s["patches_per_sec"], json!(28_000.0));
        assert_eq!(
            s["patches"],
            json!(100),
            "other fields from the first repetition"
        );
        assert_eq!(s["repeat"], json!(3));
        assert_eq!(s["repetitions"], json!(reps));
        assert_eq!(
            s["spread"]["p99_ms"]["values"],
            json!([224.0, 360.0, 523.0])
        );
        assert_eq!(s["spread"]["p99_ms"]["worst"], json!(523.0));
        assert!(
            s["spread"].get("missing").is_none(),
            "absent figures are skipped"
        );
        let t = &s["targets"];
        assert_eq!(t[0]["figure"], json!("p99_ms"));
        assert_eq!(t[0]["met_at_median"], json!(false));
        assert_eq!(t[0]["met_at_worst"], json!(false));
        assert_eq!(t[1]["met_at_median"], json!(true));
        assert_eq!(t[1]["met_at_worst"], json!(true));
        assert_eq!(s["targets_met"], json!(false));

        // Met at the median but not at the worst: not met.
        let reps = vec![json!({"x": 1.0}), json!({"x": 1.0}), json!({"x": 3.0})];
        let s = summarize(reps, &[Figure::lower("/x").target(2.0)]);
        assert_eq!(s["targets"][0]["met_at_median"], json!(true));
        assert_eq!(s["targets"][0]["met_at_worst"], json!(false));
        assert_eq!(s["targets_met"], json!(false));

        // Counts stay integers.
        let reps = vec![json!({"n": 0}), json!({"n": 2}), json!({"n": 0})];
        let s = summarize(reps, &[Figure::lower("/n").target(0.0)]);
        assert_eq!(s["n"], json!(0));
        assert_eq!(s["spread"]["n"]["values"], json!([0, 2, 0]));
        assert_eq!(s["targets"][0]["worst"], json!(2));

        // One repetition is that repetition's result, plus the summary fields.
        let s = summarize(vec![json!({"x": 1.5})], &[Figure::lower("/x").target(2.0)]);
        assert_eq!(s["x"], json!(1.5));
        assert_eq!(s["targets_met"], json!(true));
    }
}
