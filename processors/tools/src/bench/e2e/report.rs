//! What `weir bench e2e` reports: one [`Row`] per (workload, rate), the readable tables, the
//! JSON, and the chart's series.
//!
//! Invariants: every figure of the tables is in the JSON; CPU per event divides a process's
//! CPU time inside the measured window by the events of that window (patches made visible,
//! or completions accepted); a row whose generator fell behind says so.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::chart::Series;
use super::load::Counts;
use super::stats::Summary;

/// Issue lag p99 above which the load generator counts as behind its schedule (the tokio
/// timer alone adds up to a millisecond, a busy shared machine a few more).
pub const BEHIND_P99_MS: f64 = 10.0;

/// The workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// Patches POSTed, read back as WorkflowMaterialized.
    Patches,
    /// Fan-out/fan-in runs: completions POSTed by workers, read back as the next NodeReady.
    Completions,
}

impl Workload {
    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Patches => "patches",
            Workload::Completions => "completions",
        }
    }
}

/// One phase's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Which workload.
    pub workload: Workload,
    /// Offered events per second (patches, or completions: runs/s × nodes per run).
    pub offered_per_sec: f64,
    /// Achieved: patches made visible per second, or completions accepted per second.
    pub achieved_per_sec: f64,
    /// The latency of the workload: patch → visible, or completion → next NodeReady.
    pub latency: Summary,
    /// The same requests' POST → 202 (the gateway and the broker's acknowledgement).
    pub answered: Summary,
    /// POST → the output record's Kafka timestamp (the relay produced it; ms resolution,
    /// wall clock): what remains of `latency` is the broker's delivery to the reader.
    pub published: Summary,
    /// Runs started per second (offered).
    pub runs_offered_per_sec: f64,
    /// Runs completed per second.
    pub runs_per_sec: f64,
    /// NodeReady read per second.
    pub node_ready_per_sec: f64,
    /// Run start → first NodeReady.
    pub start_to_first_ready: Summary,
    /// Run start → RunCompleted.
    pub run_time: Summary,
    /// Requests of the workload (patches, or completions).
    pub requests: Counts,
    /// Run starts.
    pub run_starts: Counts,
    /// Requests whose output never arrived within the drain time (counted as errors).
    pub outputs_missing: u64,
    /// Rejected patches and failed runs (errors too).
    pub rejected: u64,
    /// All errors: failed requests, missing outputs, rejections.
    pub errors: u64,
    /// Errors by class.
    pub error_classes: BTreeMap<String, u64>,
    /// How late requests left after their intended time.
    pub issue_lag: Summary,
    /// Whether the load generator fell behind its schedule (lag p99 above 10 ms).
    pub generator_behind: bool,
    /// Seconds measured.
    pub seconds: f64,
    /// Events the CPU is divided by.
    pub events: u64,
    /// CPU seconds inside the window per process group (role, broker, Postgres, ...).
    pub cpu_seconds: BTreeMap<String, f64>,
    /// CPU µs per event per process group.
    pub cpu_us_per_event: BTreeMap<String, f64>,
}

fn ms(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// The readable tables.
pub fn table(rows: &[Row], groups: &[String]) -> String {
    let mut o = String::new();
    for w in [Workload::Patches, Workload::Completions] {
        let rows: Vec<&Row> = rows.iter().filter(|r| r.workload == w).collect();
        if rows.is_empty() {
            continue;
        }
        let what = match w {
            Workload::Patches => "patch → WorkflowMaterialized read (ms)",
            Workload::Completions => "completion → next NodeReady read (ms)",
        };
        let _ = writeln!(o, "\n{}: {what}", w.name());
        let _ = write!(
            o,
            "{:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8} {:>9}",
            "offered/s", "achieved", "p50", "p99", "p99.9", "max", "errors", "lag p99", "gen"
        );
        if w == Workload::Completions {
            let _ = write!(o, " {:>7} {:>8} {:>8}", "runs/s", "run p50", "run p99");
        }
        o.push('\n');
        for r in rows {
            let _ = write!(
                o,
                "{:>9.0} {:>9.0} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8} {:>9}",
                r.offered_per_sec,
                r.achieved_per_sec,
                ms(r.latency.p50_ms),
                ms(r.latency.p99_ms),
                ms(r.latency.p999_ms),
                ms(r.latency.max_ms),
                r.errors,
                ms(r.issue_lag.p99_ms),
                if r.generator_behind { "BEHIND" } else { "ok" }
            );
            if w == Workload::Completions {
                let _ = write!(
                    o,
                    " {:>7.0} {:>8} {:>8}",
                    r.runs_per_sec,
                    ms(r.run_time.p50_ms),
                    ms(r.run_time.p99_ms)
                );
            }
            o.push('\n');
        }
    }
    let _ = writeln!(
        o,
        "\nwhere the time goes, p50 / p99 ms from the intended send: 202 answered, output produced by the relay, output read"
    );
    let _ = writeln!(
        o,
        "{:<12} {:>9} {:>17} {:>17} {:>17}",
        "workload", "offered/s", "202", "produced", "read"
    );
    for r in rows {
        let pair = |s: &Summary| format!("{} / {}", ms(s.p50_ms), ms(s.p99_ms));
        let _ = writeln!(
            o,
            "{:<12} {:>9.0} {:>17} {:>17} {:>17}",
            r.workload.name(),
            r.offered_per_sec,
            pair(&r.answered),
            pair(&r.published),
            pair(&r.latency)
        );
    }
    if rows.iter().any(|r| !r.cpu_us_per_event.is_empty()) {
        let _ = writeln!(
            o,
            "\nCPU µs per event (process CPU time in the window / events; postgres is the whole server, pg_backends the part of it serving this run's processes)"
        );
        let _ = write!(o, "{:<12} {:>9}", "workload", "offered/s");
        for g in groups {
            let _ = write!(o, " {:>12}", g);
        }
        let _ = writeln!(o, " {:>9}", "total");
        let sum_of = |r: &Row| -> f64 {
            groups
                .iter()
                // pg_backends is part of postgres: counted once.
                .filter(|g| g.as_str() != "pg_backends")
                .map(|g| r.cpu_us_per_event.get(g).copied().unwrap_or(0.0))
                .sum()
        };
        for r in rows {
            let _ = write!(o, "{:<12} {:>9.0}", r.workload.name(), r.offered_per_sec);
            for g in groups {
                let v = r.cpu_us_per_event.get(g).copied().unwrap_or(0.0);
                let _ = write!(o, " {:>12.1}", v);
            }
            let _ = writeln!(o, " {:>9.1}", sum_of(r));
        }
    }
    o
}

/// The chart's series: p50 and p99 of each workload against its achieved throughput.
pub fn series(rows: &[Row]) -> Vec<Series> {
    let mut out = Vec::new();
    for (w, colour) in [
        (Workload::Patches, "#1f77b4"),
        (Workload::Completions, "#d62728"),
    ] {
        let rows: Vec<&Row> = rows.iter().filter(|r| r.workload == w).collect();
        if rows.is_empty() {
            continue;
        }
        let label = match w {
            Workload::Patches => "patch → visible",
            Workload::Completions => "completion → next ready",
        };
        for (p, dashed) in [("p50", true), ("p99", false)] {
            out.push(Series {
                label: format!("{label} {p}"),
                colour,
                dashed,
                points: rows
                    .iter()
                    .map(|r| {
                        let y = if dashed {
                            r.latency.p50_ms
                        } else {
                            r.latency.p99_ms
                        };
                        (r.achieved_per_sec, y)
                    })
                    .collect(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(workload: Workload, offered: f64, p50: f64, p99: f64) -> Row {
        Row {
            workload,
            offered_per_sec: offered,
            achieved_per_sec: offered * 0.99,
            latency: Summary {
                count: 10,
                p50_ms: p50,
                p99_ms: p99,
                p999_ms: p99,
                max_ms: p99,
            },
            answered: Summary::default(),
            published: Summary::default(),
            runs_offered_per_sec: offered / 10.0,
            runs_per_sec: offered / 10.0,
            node_ready_per_sec: offered,
            start_to_first_ready: Summary::default(),
            run_time: Summary::default(),
            requests: Counts::default(),
            run_starts: Counts::default(),
            outputs_missing: 0,
            rejected: 0,
            errors: 3,
            error_classes: BTreeMap::new(),
            issue_lag: Summary::default(),
            generator_behind: offered > 1000.0,
            seconds: 10.0,
            events: 100,
            cpu_seconds: BTreeMap::new(),
            cpu_us_per_event: [
                ("gateway".to_string(), 12.5),
                ("kafka".to_string(), 30.0),
                ("pg_backends".to_string(), 7.0),
            ]
            .into_iter()
            .collect(),
        }
    }

    #[test]
    fn tables_and_series_cover_every_row() {
        let rows = vec![
            row(Workload::Patches, 50.0, 4.0, 9.0),
            row(Workload::Patches, 2000.0, 6.0, 120.0),
            row(Workload::Completions, 50.0, 5.0, 11.0),
        ];
        let groups = vec![
            "gateway".to_string(),
            "kafka".to_string(),
            "pg_backends".to_string(),
        ];
        let t = table(&rows, &groups);
        assert!(t.contains("patches: patch → WorkflowMaterialized"));
        assert!(t.contains("completions: completion → next NodeReady"));
        assert_eq!(t.matches("BEHIND").count(), 1);
        assert!(t.contains("CPU µs per event"));
        assert!(t.contains("where the time goes"));
        assert!(
            t.contains("42.5") && !t.contains("49.5"),
            "the total of the CPU columns, pg_backends (part of postgres) not added"
        );
        let s = series(&rows);
        assert_eq!(s.len(), 4);
        assert_eq!(s[1].points, vec![(49.5, 9.0), (1980.0, 120.0)]);
        assert_ne!(s[2].dashed, s[3].dashed);
        let json = serde_json::to_value(&rows[0]).unwrap_or_default();
        assert_eq!(json["workload"], "patches");
        assert_eq!(json["latency"]["p99_ms"], 9.0);
    }
}
