//! What a chaos run measured, and its report.
//!
//! The driver samples the workload and the consumer lag every second ([`Sample`]). From the
//! samples and the fault records it computes, per fault, the outage (fault injected → the
//! process or service back) and the recovery (back → total lag under the threshold and the
//! recent patch→visible p99 back to its level before the fault). From the ledger's answers it
//! counts the gateway's answers by status while each dependency was down.
//!
//! The run passes when every invariant of the check holds, nothing acknowledged was lost or
//! took effect twice, the gateway never answered a 5xx other than 503 with Retry-After, every
//! process stopped cleanly at the end, and every fault was injected and ended.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::check::{CheckReport, Invariant};
use crate::faults::{FaultKind, FaultRecord, Schedule};
use crate::load::Answer;
use crate::procs::Crash;

/// One sample, taken every second.
#[derive(Clone, Debug)]
pub struct Sample {
    /// When.
    pub at: SystemTime,
    /// Total lag of weir's consumer groups; `None` when it could not be read (Kafka down).
    pub lag: Option<i64>,
    /// Patch→visible p99 over the last 5 s.
    pub p99_ms: Option<f64>,
    /// Acknowledged so far.
    pub acknowledged: u64,
}

/// How recovery is judged.
#[derive(Clone, Copy, Debug)]
pub struct Thresholds {
    /// Lag (records) under which a group counts as caught up (or twice the pre-fault lag,
    /// whichever is larger).
    pub lag: i64,
}

/// One fault, measured.
#[derive(Clone, Debug, Serialize)]
pub struct FaultFigures {
    /// Kind.
    pub kind: FaultKind,
    /// Target process, if any.
    pub target: Option<String>,
    /// Seconds from the start of the load.
    pub at_s: f64,
    /// Injected → back, in seconds.
    pub outage_s: Option<f64>,
    /// Back → lag and p99 recovered, in seconds (`None`: not within the run).
    pub recovery_s: Option<f64>,
    /// Injection or restart error.
    pub error: Option<String>,
}

/// Figures of one kind.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KindFigures {
    /// Faults injected.
    pub injected: usize,
    /// Longest outage, s.
    pub max_outage_s: Option<f64>,
    /// Mean recovery, s (recovered faults only).
    pub mean_recovery_s: Option<f64>,
    /// Longest recovery, s.
    pub max_recovery_s: Option<f64>,
    /// Faults not recovered within the run.
    pub not_recovered: usize,
}

/// The whole report (also the JSON line, minus the per-fault list's detail).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Seed of the schedule and the workload.
    pub seed: u64,
    /// Seconds of load.
    pub duration_s: u64,
    /// Processes, by index.
    pub processes: Vec<String>,
    /// Faults by kind.
    pub faults: BTreeMap<&'static str, KindFigures>,
    /// Every fault.
    pub each: Vec<FaultFigures>,
    /// Requests acknowledged with 202.
    pub acknowledged: u64,
    /// Acknowledged and lost (must be 0).
    pub lost: u64,
    /// Effects applied more than once (must be 0).
    pub duplicated_effects: u64,
    /// Gateway answers by status over the whole run (0: no connection).
    pub answers: BTreeMap<u16, u64>,
    /// Gateway answers by status while each dependency was down.
    pub answers_during_outage: BTreeMap<&'static str, BTreeMap<u16, u64>>,
    /// The same, by request kind: `"<kind> <status>"` → count.
    pub outage_answers_by_kind: BTreeMap<&'static str, BTreeMap<String, u64>>,
    /// 5xx answers other than 503 with Retry-After (must be 0).
    pub bad_5xx: u64,
    /// Exits nobody asked for (restarted by the driver).
    pub crashes: Vec<Crash>,
    /// Each process at the graceful stop: clean exit or not.
    pub stopped: Vec<(String, bool, String)>,
    /// Rebalance pauses by group: `(rebalances, median ms, p95 ms, max ms)`.
    pub rebalance_pause_ms: BTreeMap<String, (usize, f64, f64, f64)>,
    /// Every invariant: the check's and the driver's.
    pub invariants: Vec<Invariant>,
    /// Whether every invariant holds.
    pub ok: bool,
}

fn secs(a: SystemTime, since: SystemTime) -> f64 {
    a.duration_since(since)
        .map(|d| d.as_secs_f64())
        .unwrap_or_else(|e| -e.duration().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// When, after `end`, the run counts as recovered from a fault that started at `start`: the
/// first sample with the lag under `max(threshold, 2 × median lag of the 15 s before)` and the
/// p99 under `max(1.5 × p99 before, p99 before + 100 ms)`.
pub fn recovery(
    samples: &[Sample],
    start: SystemTime,
    end: SystemTime,
    t: Thresholds,
) -> Option<Duration> {
    let before = |s: &&Sample| {
        s.at < start
            && start
                .duration_since(s.at)
                .is_ok_and(|d| d <= Duration::from_secs(15))
    };
    let lag_base = median(
        samples
            .iter()
            .filter(before)
            .filter_map(|s| s.lag.map(|l| l as f64))
            .collect(),
    )
    .unwrap_or(0.0);
    let p99_base = median(
        samples
            .iter()
            .filter(before)
            .filter_map(|s| s.p99_ms)
            .collect(),
    );
    let lag_ok = (t.lag as f64).max(2.0 * lag_base);
    samples
        .iter()
        .filter(|s| s.at >= end)
        .find(|s| {
            let lag = s.lag.is_some_and(|l| (l as f64) <= lag_ok);
            let p99 = match (s.p99_ms, p99_base) {
                (Some(p), Some(b)) => p <= (1.5 * b).max(b + 100.0),
                _ => true,
            };
            lag && p99
        })
        .and_then(|s| s.at.duration_since(end).ok())
}

/// Counts of answers by status whose time falls in `[from, to]`.
pub fn answers_between(answers: &[Answer], from: SystemTime, to: SystemTime) -> BTreeMap<u16, u64> {
    let mut m = BTreeMap::new();
    for a in answers.iter().filter(|a| a.at >= from && a.at <= to) {
        *m.entry(a.status).or_insert(0) += 1;
    }
    m
}

/// Everything the report is built from.
pub struct Inputs<'a> {
    /// The schedule run.
    pub schedule: &'a Schedule,
    /// When the load started (the schedule's zero).
    pub t0: SystemTime,
    /// Process names by index.
    pub processes: Vec<String>,
    /// What happened to each fault.
    pub records: &'a [FaultRecord],
    /// The samples.
    pub samples: &'a [Sample],
    /// Every answer of the gateway.
    pub answers: &'a [Answer],
    /// The check's findings.
    pub check: CheckReport,
    /// Exits nobody asked for.
    pub crashes: Vec<Crash>,
    /// The graceful stop.
    pub stopped: Vec<(String, bool, String)>,
    /// Recovery thresholds.
    pub thresholds: Thresholds,
    /// The processes' logs (for the rebalance pauses).
    pub logs: std::path::PathBuf,
}

/// Builds the report.
pub fn build(i: Inputs<'_>) -> Report {
    let mut each = Vec::new();
    let mut during: BTreeMap<&'static str, BTreeMap<u16, u64>> = BTreeMap::new();
    let mut by_kind: BTreeMap<&'static str, BTreeMap<String, u64>> = BTreeMap::new();
    for r in i.records {
        let outage = r.ended.map(|e| secs(e, r.started));
        let rec = r
            .ended
            .and_then(|e| recovery(i.samples, r.started, e, i.thresholds))
            .map(|d| d.as_secs_f64());
        if let (Some(dep), Some(end)) = (r.fault.kind.dependency(), r.ended) {
            let m = during.entry(dep).or_default();
            for (status, n) in answers_between(i.answers, r.started, end) {
                *m.entry(status).or_insert(0) += n;
            }
            let k = by_kind.entry(dep).or_default();
            for a in i
                .answers
                .iter()
                .filter(|a| a.at >= r.started && a.at <= end)
            {
                *k.entry(format!("{} {}", a.kind, a.status)).or_insert(0) += 1;
            }
        }
        each.push(FaultFigures {
            kind: r.fault.kind,
            target: r.fault.target.map(|t| {
                i.processes
                    .get(t)
                    .cloned()
                    .unwrap_or_else(|| format!("#{t}"))
            }),
            at_s: secs(r.started, i.t0),
            outage_s: outage,
            recovery_s: rec,
            error: r.error.clone(),
        });
    }
    let mut faults: BTreeMap<&'static str, KindFigures> = BTreeMap::new();
    for k in FaultKind::ALL {
        let of: Vec<&FaultFigures> = each.iter().filter(|f| f.kind == k).collect();
        if of.is_empty() {
            continue;
        }
        let recs: Vec<f64> = of.iter().filter_map(|f| f.recovery_s).collect();
        faults.insert(
            k.name(),
            KindFigures {
                injected: of.len(),
                max_outage_s: of.iter().filter_map(|f| f.outage_s).reduce(f64::max),
                mean_recovery_s: (!recs.is_empty())
                    .then(|| recs.iter().sum::<f64>() / recs.len() as f64),
                max_recovery_s: recs.iter().copied().reduce(f64::max),
                not_recovered: of.len() - recs.len(),
            },
        );
    }
    let mut answers = BTreeMap::new();
    let mut bad_5xx = 0;
    for a in i.answers {
        *answers.entry(a.status).or_insert(0) += 1;
        if a.status >= 500 && !(a.status == 503 && a.retry_after) {
            bad_5xx += 1;
        }
    }
    let mut invariants = i.check.invariants.clone();
    let failed_faults: Vec<String> = each
        .iter()
        .filter(|f| f.error.is_some() || f.outage_s.is_none())
        .map(|f| {
            format!(
                "{} at {:.0}s: {}",
                f.kind.name(),
                f.at_s,
                f.error.as_deref().unwrap_or("did not end")
            )
        })
        .collect();
    invariants.push(Invariant {
        name: "driver: every scheduled fault was injected and ended".into(),
        holds: failed_faults.is_empty() && each.len() == i.schedule.faults.len(),
        detail: format!(
            "{} of {} faults ran; {}",
            each.len(),
            i.schedule.faults.len(),
            if failed_faults.is_empty() {
                "no errors".to_string()
            } else {
                failed_faults.join("; ")
            }
        ),
    });
    invariants.push(Invariant {
        name: "driver: the gateway answered no 5xx but 503 with Retry-After".into(),
        holds: bad_5xx == 0,
        detail: format!("{bad_5xx} other 5xx answers; all answers by status: {answers:?}"),
    });
    let unclean: Vec<String> = i
        .stopped
        .iter()
        .filter(|(_, clean, _)| !clean)
        .map(|(n, _, s)| format!("{n}: {s}"))
        .collect();
    invariants.push(Invariant {
        name: "driver: every process stopped cleanly at the end (SIGTERM, exit 0)".into(),
        holds: unclean.is_empty(),
        detail: if unclean.is_empty() {
            format!("{} processes", i.stopped.len())
        } else {
            unclean.join("; ")
        },
    });
    let mut pauses: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    for (g, d) in rebalance_pauses(&i.logs) {
        pauses.entry(g).or_default().push(d);
    }
    let rebalance_pause_ms = pauses
        .into_iter()
        .filter_map(|(g, v)| {
            let n = v.len();
            spread_ms(v).map(|(m, p, x)| (g, (n, m, p, x)))
        })
        .collect();
    let ok =
        invariants.iter().all(|v| v.holds) && i.check.lost == 0 && i.check.duplicated_effects == 0;
    Report {
        seed: i.schedule.seed,
        duration_s: i.schedule.duration_s,
        processes: i.processes,
        faults,
        each,
        acknowledged: i.check.acknowledged,
        lost: i.check.lost,
        duplicated_effects: i.check.duplicated_effects,
        answers,
        answers_during_outage: during,
        outage_answers_by_kind: by_kind,
        bad_5xx,
        crashes: i.crashes,
        stopped: i.stopped,
        rebalance_pause_ms,
        invariants,
        ok,
    }
}

fn opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.1}s")).unwrap_or_else(|| "-".into())
}

impl Report {
    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut o = String::new();
        o.push_str(&format!(
            "\n==== weir chaos report (seed {}, {} s of load, processes: {}) ====\n",
            self.seed,
            self.duration_s,
            self.processes.join(", ")
        ));
        o.push_str("\nfaults by kind:            injected  max outage  mean recovery  max recovery  not recovered\n");
        for (k, f) in &self.faults {
            o.push_str(&format!(
                "  {:<24} {:>8}  {:>10}  {:>13}  {:>12}  {:>13}\n",
                k,
                f.injected,
                opt(f.max_outage_s),
                opt(f.mean_recovery_s),
                opt(f.max_recovery_s),
                f.not_recovered
            ));
        }
        o.push_str("\neach fault:\n");
        for f in &self.each {
            o.push_str(&format!(
                "  at {:>6.1}s  {:<14} {:<13} outage {:>7}  recovery {:>7}{}\n",
                f.at_s,
                f.kind.name(),
                f.target.as_deref().unwrap_or(""),
                opt(f.outage_s),
                opt(f.recovery_s),
                f.error
                    .as_deref()
                    .map(|e| format!("  ERROR {e}"))
                    .unwrap_or_default()
            ));
        }
        o.push_str(
            "\ngateway answers by status while each dependency was down (0 = no connection):\n",
        );
        for (dep, m) in &self.answers_during_outage {
            o.push_str(&format!("  {dep:<9} {m:?}\n"));
            if let Some(k) = self.outage_answers_by_kind.get(dep) {
                o.push_str(&format!("  {:<9} by request: {k:?}\n", ""));
            }
        }
        o.push_str(&format!(
            "gateway answers over the whole run: {:?}\n",
            self.answers
        ));
        if !self.rebalance_pause_ms.is_empty() {
            o.push_str("\nrebalance pauses (revoked -> assigned, per consumer):\n");
            for (g, (n, m, p, x)) in &self.rebalance_pause_ms {
                o.push_str(&format!(
                    "  {g:<20} {n:>4} rebalances  median {m:>6.0} ms  p95 {p:>6.0} ms  max {x:>6.0} ms\n"
                ));
            }
        }
        if !self.crashes.is_empty() {
            o.push_str(&format!(
                "\nprocess exits nobody asked for (restarted): {}\n",
                self.crashes.len()
            ));
            for c in &self.crashes {
                o.push_str(&format!("  {}: {}\n", c.process, c.status));
            }
        }
        o.push_str(&format!(
            "\nacknowledged {}   lost {}   duplicated effects {}\n\ninvariants:\n",
            self.acknowledged, self.lost, self.duplicated_effects
        ));
        for v in &self.invariants {
            o.push_str(&format!(
                "  [{}] {}: {}\n",
                if v.holds { " ok " } else { "FAIL" },
                v.name,
                v.detail
            ));
        }
        o.push_str(&format!(
            "\nresult: {}\n",
            if self.ok { "PASS" } else { "FAIL" }
        ));
        o
    }

    /// The one-line JSON summary (the last line printed).
    pub fn json_line(&self) -> String {
        let v = serde_json::json!({
            "seed": self.seed,
            "duration_s": self.duration_s,
            "processes": self.processes,
            "faults": self.faults,
            "acknowledged": self.acknowledged,
            "lost": self.lost,
            "duplicated_effects": self.duplicated_effects,
            "answers": self.answers,
            "answers_during_outage": self.answers_during_outage,
            "bad_5xx": self.bad_5xx,
            "rebalance_pause_ms": self.rebalance_pause_ms,
            "crashes": self.crashes.len(),
            "invariants_failed": self.invariants.iter().filter(|v| !v.holds).map(|v| &v.name).collect::<Vec<_>>(),
            "ok": self.ok,
        });
        v.to_string()
    }
}

/// Pauses of consumer group rebalances, read from the processes' logs: for each consumer, the
/// time from "partitions revoked" to its next "partitions assigned" (the eager protocol stops
/// every partition of the group for that long). Returns `(group base name, pause)` pairs.
pub fn rebalance_pauses(logs: &std::path::Path) -> Vec<(String, Duration)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(logs) else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        // Per group, the revokes not yet matched by an assignment (a process runs several
        // consumers of one group; they rebalance together, so pairing in order is fair).
        let mut open: BTreeMap<String, Vec<chrono::DateTime<chrono::FixedOffset>>> =
            BTreeMap::new();
        for line in text.lines() {
            let revoked = line.contains("partitions revoked");
            if !revoked && !line.contains("partitions assigned") {
                continue;
            }
            let Some(ts) = line
                .split_whitespace()
                .next()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            else {
                continue;
            };
            let Some(group) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("group="))
            else {
                continue;
            };
            // Without the run's prefix: weir-materializer, weir-coordinator, weir-cache.
            let base = group.rsplit('.').next().unwrap_or(group).to_string();
            let pending = open.entry(base.clone()).or_default();
            if revoked {
                pending.push(ts);
            } else if !pending.is_empty() {
                let from = pending.remove(0);
                if let Ok(d) = (ts - from).to_std() {
                    out.push((base, d));
                }
            }
        }
    }
    out
}

/// Median, 95th percentile and maximum of some durations, in ms.
pub fn spread_ms(mut v: Vec<Duration>) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    Some((ms(at(0.5)), ms(at(0.95)), ms(v[v.len() - 1])))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s)
    }

    fn sample(s: u64, lag: i64, p99: f64) -> Sample {
        Sample {
            at: at(s),
            lag: Some(lag),
            p99_ms: Some(p99),
            acknowledged: 0,
        }
    }

    #[test]
    fn recovery_waits_for_lag_and_latency() {
        let mut v: Vec<Sample> = (0..20).map(|s| sample(s, 10, 50.0)).collect();
        // Fault at 20..25; lag high until 30, p99 high until 33.
        for s in 20..40 {
            let lag = if s < 30 { 5_000 } else { 10 };
            let p99 = if s < 33 { 900.0 } else { 60.0 };
            v.push(sample(s, lag, p99));
        }
        let t = Thresholds { lag: 100 };
        assert_eq!(
            recovery(&v, at(20), at(25), t),
            Some(Duration::from_secs(8))
        );
        // Never recovered.
        let v2: Vec<Sample> = (0..30)
            .map(|s| sample(s, if s < 20 { 1 } else { 9_999 }, 1.0))
            .collect();
        assert_eq!(recovery(&v2, at(20), at(25), t), None);
    }

    #[test]
    fn rebalance_pauses_pair_revokes_with_the_next_assignment() {
        let dir = std::env::temp_dir().join(format!("weir-chaos-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("p.log"),
            "2026-12-06T08:39:25.800000Z  INFO weir_runtime::consumer: partitions revoked group=x.weir-cache partitions=1\n\
             2026-12-06T08:39:25.900000Z  INFO weir_runtime::consumer: partitions assigned group=x.weir-materializer partitions=1\n\
             2026-12-06T08:39:26.050000Z  INFO weir_runtime::consumer: partitions assigned group=x.weir-cache partitions=2\n\
             garbage line\n",
        )
        .unwrap();
        let p = rebalance_pauses(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            p,
            vec![("weir-cache".to_string(), Duration::from_millis(250))]
        );
        let s = spread_ms(vec![
            Duration::from_millis(10),
            Duration::from_millis(30),
            Duration::from_millis(20),
        ]);
        assert_eq!(s, Some((20.0, 30.0, 30.0)));
    }

    #[test]
    fn answers_are_counted_inside_the_window() {
        let a = |s, status| Answer {
            at: at(s),
            kind: "patch",
            status,
            retry_after: status == 503,
        };
        let answers = vec![a(1, 202), a(5, 503), a(6, 503), a(7, 202), a(9, 500)];
        let m = answers_between(&answers, at(5), at(7));
        assert_eq!(m.get(&503), Some(&2));
        assert_eq!(m.get(&202), Some(&1));
        assert_eq!(m.get(&500), None);
    }
}
