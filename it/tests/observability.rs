//! The dashboards and alert rules against a real Prometheus (Debian's `/usr/bin/prometheus`,
//! installed by `infra/local/prereqs`) scraping a real `weir dev` on the local stack.
//!
//! One test: `weir dev` on a random topic prefix (stall detection after 4 s), Prometheus
//! scraping it every second with the alert rules of `infra/observability/rules/weir.rules.yml`
//! loaded from a copy whose `for:` durations are shortened (the expressions are the file's
//! own, byte for byte), the demo workload (`weir demo`) through its gateway, and then one run
//! left stalled on purpose (a node no worker answers). Then:
//! - every alert rule loaded and evaluates without error, and every metric its expression
//!   reads has series;
//! - every query of every panel of `infra/observability/grafana/weir.json` parses and returned
//!   data over the test's time range;
//! - WorkflowStalled fires, and this process's coordinator counted the stall.
//!
//! Needs the local stack (`infra/local/up`), its environment (`infra/local/env`) and the
//! `weir` binary (`cargo build -p weir`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use weir_it::{config, prepare, random_name, weir_bin, ChildGuard};

const PROMETHEUS: &str = "/usr/bin/prometheus";
/// How long a shortened `for:` lasts: long enough to be a real pending phase.
const TEST_FOR: &str = "2s";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// The rules file with every `for:` set to [`TEST_FOR`]; nothing else changes.
fn shortened_rules(original: &str) -> String {
    original
        .lines()
        .map(|l| {
            let t = l.trim_start();
            if t.starts_with("for:") {
                format!("{}for: {TEST_FOR}", &l[..l.len() - t.len()])
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Metric names an expression reads (identifiers followed by `{`, `[`, `)` or space that
/// are not PromQL words): enough for weir's rules, which name every metric in full.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const WORDS: &[&str] = &[
        "sum",
        "max",
        "min",
        "by",
        "without",
        "on",
        "and",
        "or",
        "unless",
        "rate",
        "increase",
        "deriv",
        "histogram_quantile",
        "offset",
        "le",
        "group",
        "topic",
        "partition",
        "instance",
        "pool",
        "backend",
        "class",
        "outcome",
        "job",
        "bool",
        "count",
        "avg",
    ];
    let mut out = BTreeSet::new();
    let mut cur = String::new();
    let mut in_str = false;
    let mut depth_braces = 0;
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c == '"' {
            in_str = !in_str;
        }
        if in_str {
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            cur.push(c);
            continue;
        }
        if !cur.is_empty()
            && depth_braces == 0
            && !WORDS.contains(&cur.as_str())
            && cur.chars().next().is_some_and(|f| f.is_ascii_alphabetic())
            && (cur.starts_with("weir_") || cur == "up")
        {
            out.insert(cur.clone());
        }
        cur.clear();
        match c {
            '{' => depth_braces += 1,
            '}' => depth_braces -= 1,
            _ => {}
        }
    }
    out
}

struct Prom {
    http: reqwest::Client,
    base: String,
}

impl Prom {
    async fn get(&self, path: &str, params: &[(&str, String)]) -> Value {
        let res = self
            .http
            .get(format!("{}{path}", self.base))
            .query(params)
            .send()
            .await
            .unwrap_or_else(|e| panic!("prometheus {path}: {e}"));
        let status = res.status();
        let body: Value = res.json().await.expect("prometheus answers JSON");
        assert!(
            status.is_success() && body["status"] == "success",
            "prometheus {path} {params:?}: {status} {body}"
        );
        body["data"].clone()
    }

    /// An instant query, None while Prometheus does not answer yet.
    async fn try_instant(&self, q: &str) -> Option<Vec<Value>> {
        let res = self
            .http
            .get(format!("{}/api/v1/query", self.base))
            .query(&[("query", q)])
            .send()
            .await
            .ok()?;
        let body: Value = res.json().await.ok()?;
        body["data"]["result"].as_array().cloned()
    }

    async fn instant(&self, q: &str) -> Vec<Value> {
        let d = self.get("/api/v1/query", &[("query", q.to_string())]).await;
        d["result"].as_array().cloned().unwrap_or_default()
    }

    async fn range(&self, q: &str, start: f64, end: f64) -> Vec<Value> {
        let d = self
            .get(
                "/api/v1/query_range",
                &[
                    ("query", q.to_string()),
                    ("start", format!("{start:.3}")),
                    ("end", format!("{end:.3}")),
                    ("step", "1".to_string()),
                ],
            )
            .await;
        d["result"].as_array().cloned().unwrap_or_default()
    }

    async fn firing(&self, alert: &str) -> bool {
        let d = self.get("/api/v1/alerts", &[]).await;
        d["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["labels"]["alertname"] == alert && a["state"] == "firing")
    }
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_and_alerts_work_against_a_live_prometheus() {
    assert!(
        Path::new(PROMETHEUS).exists(),
        "{PROMETHEUS} missing: run infra/local/prereqs (Debian's prometheus package)"
    );
    let started = now_s();
    let prefix = random_name("obs");
    let cfg = config(&prefix);
    prepare(&cfg).await.expect("topics, schemas, migrations");
    let (metrics_port, gateway_port, prom_port) = (free_port(), free_port(), free_port());
    let telemetry = format!("127.0.0.1:{metrics_port}");
    let gateway = format!("127.0.0.1:{gateway_port}");
    let env = [
        ("WEIR__KAFKA__TOPIC_PREFIX", prefix.clone()),
        ("WEIR__KAFKA__PARTITIONS", "3".to_string()),
        ("WEIR__TELEMETRY__LISTEN", telemetry.clone()),
        ("WEIR__TELEMETRY__STATS_INTERVAL_MS", "1000".to_string()),
        ("WEIR__GATEWAY__LISTEN", gateway.clone()),
        ("WEIR__COORDINATOR__STALL_AFTER_MS", "4000".to_string()),
        ("WEIR__COORDINATOR__TIMER_POLL_MS", "500".to_string()),
        ("RUST_LOG", "warn".to_string()),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let dev_log = dir.path().join("weir-dev.log");
    let mut dev = ChildGuard(
        Command::new(weir_bin())
            .arg("dev")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&dev_log).expect("weir dev log"))
            .spawn()
            .expect("spawn weir dev"),
    );
    // What weir dev said, for a failure's message.
    let dev_tail = || {
        let text = std::fs::read_to_string(&dev_log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };

    // Prometheus: 1 s scrapes and evaluations, the rules with shortened `for:`.
    let original = std::fs::read_to_string(repo().join("infra/observability/rules/weir.rules.yml"))
        .expect("rules file");
    let alerts_in_file = original
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    let rules = dir.path().join("weir.rules.yml");
    let copy = shortened_rules(&original);
    // Only `for:` lines differ: the expressions Prometheus evaluates are the file's.
    assert_eq!(copy.lines().count(), original.lines().count());
    for (a, b) in original.lines().zip(copy.lines()) {
        assert!(
            a == b || (a.trim_start().starts_with("for:") && b.trim_start().starts_with("for:"))
        );
    }
    std::fs::write(&rules, copy).expect("write rules");
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: weir\n    static_configs:\n      - targets: ['{telemetry}']\n",
            rules.display()
        ),
    )
    .expect("write prometheus.yml");
    let _prom_child = ChildGuard(
        Command::new(PROMETHEUS)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).expect("log file"))
            .spawn()
            .expect("spawn prometheus"),
    );
    let prom = Prom {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("http client"),
        base: format!("http://127.0.0.1:{prom_port}"),
    };
    wait_for(
        "prometheus to scrape weir dev",
        Duration::from_secs(120),
        || async {
            prom.try_instant("up{job=\"weir\"} == 1")
                .await
                .is_some_and(|r| !r.is_empty())
        },
    )
    .await;

    // The demo workload through weir dev's gateway.
    let demo = tokio::task::spawn_blocking({
        let env = env.clone();
        let gateway = gateway.clone();
        move || {
            Command::new(weir_bin())
                .args([
                    "demo",
                    "--gateway",
                    &format!("http://{gateway}"),
                    "--runs",
                    "8",
                ])
                .args(["--timeout-secs", "240"])
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .output()
                .expect("run weir demo")
        }
    })
    .await
    .expect("demo task");
    assert!(
        demo.status.success(),
        "weir demo failed:\n{}\n{}",
        String::from_utf8_lossy(&demo.stdout),
        String::from_utf8_lossy(&demo.stderr)
    );

    // A run left stalled on purpose: one `human` node, and nobody answers it.
    let pool = weir_runtime::db::pool(&cfg.postgres).expect("pool");
    let workspace = random_name("obs-ws");
    let key = weir_gateway::create_key(&pool, &workspace, weir_model::Permission::Admin)
        .await
        .expect("api key")
        .key;
    let http = reqwest::Client::new();
    let put = http
        .put(format!("http://{gateway}/v1/workflows/wait-for-a-human"))
        .bearer_auth(&key)
        .json(&json!({"nodes": {"ask": {"type": "human", "config": {}}}, "edges": []}))
        .send()
        .await
        .expect("PUT workflow");
    assert!(put.status().is_success(), "PUT workflow: {}", put.status());
    // The materializer makes version 1; a run of a workflow not materialized yet would fail.
    wait_for(
        "the workflow to be materialized",
        Duration::from_secs(120),
        || async {
            http.get(format!("http://{gateway}/v1/workflows/wait-for-a-human"))
                .bearer_auth(&key)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        },
    )
    .await;
    let res = http
        .post(format!("http://{gateway}/v1/runs"))
        .bearer_auth(&key)
        .json(&json!({"workflow_id": "wait-for-a-human", "inputs": {}}))
        .send()
        .await
        .expect("POST run");
    assert!(res.status().is_success(), "POST run: {}", res.status());
    let v: Value = res.json().await.expect("run answer");
    let run_id = v["run_id"].as_str().map(str::to_string);
    let run_id = run_id.expect("the stalled run was accepted");

    // This coordinator starts the run, marks it stalled and counts the stall; WorkflowStalled
    // fires.
    let row = || async {
        sqlx::query_as::<_, (String, bool)>(
            "SELECT status, stalled FROM weir_runs WHERE run_id = $1",
        )
        .bind(&run_id)
        .fetch_optional(&pool)
        .await
        .expect("weir_runs")
    };
    let counted = || async {
        !prom
            .instant(&format!(
                "weir_coordinator_stalls_total{{instance=\"{telemetry}\"}} > 0"
            ))
            .await
            .is_empty()
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    while !counted().await {
        assert!(
            Instant::now() < deadline,
            "the stall of run {run_id} was not counted; its row: {:?}; weir dev's log:\n{}",
            row().await,
            dev_tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_for(
        "WorkflowStalled to fire",
        Duration::from_secs(60),
        || async { prom.firing("WorkflowStalled").await },
    )
    .await;
    assert_eq!(
        row().await,
        Some(("running".to_string(), true)),
        "run {run_id} is running and marked stalled"
    );

    // Every alert rule loaded (the test copy's expressions are the file's), evaluates without
    // error, and every metric it reads has series.
    let groups = prom.get("/api/v1/rules", &[]).await;
    let loaded: Vec<&Value> = groups["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter(|r| r["type"] == "alerting")
        .collect();
    assert_eq!(
        loaded.len(),
        alerts_in_file,
        "every alert of the file is loaded"
    );
    let mut missing = Vec::new();
    for r in &loaded {
        let name = r["name"].as_str().unwrap_or_default();
        assert_eq!(r["health"], "ok", "alert {name} evaluates: {r}");
        let block = original
            .split(&format!("- alert: {name}\n"))
            .nth(1)
            .and_then(|b| b.split("- alert:").next())
            .unwrap_or_default();
        let want = if block.contains("for:") { 2.0 } else { 0.0 };
        assert_eq!(
            r["duration"].as_f64(),
            Some(want),
            "alert {name}: for: of the test copy"
        );
        let query = r["query"].as_str().unwrap_or_default();
        for metric in metric_names(query) {
            if prom.instant(&format!("count({metric})")).await.is_empty()
                && prom
                    .instant(&format!("count({metric}_bucket)"))
                    .await
                    .is_empty()
            {
                missing.push(format!("{name}: {metric}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "alert expressions read metrics with no series: {missing:?}"
    );

    // Every panel query parses and returned data during the test.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("infra/observability/grafana/weir.json"))
            .expect("dashboard file"),
    )
    .expect("dashboard JSON");
    // A few more scrapes, so a counter that moved last has two samples in a window.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let end = now_s();
    let mut empty = Vec::new();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .expect("expr")
                .replace("$__rate_interval", "15s");
            queries += 1;
            if prom.range(&expr, started, end).await.is_empty() {
                empty.push(format!("{}: {expr}", panel["title"]));
            }
        }
    }
    assert!(
        queries >= 40,
        "the dashboard has its panels ({queries} queries)"
    );
    assert!(empty.is_empty(), "panel queries without data: {empty:#?}");

    // Leave no stalled run behind for other tests' gauges.
    let cancel = http
        .post(format!("http://{gateway}/v1/runs/{run_id}/cancel"))
        .bearer_auth(&key)
        .json(&json!({}))
        .send()
        .await
        .expect("cancel the stalled run");
    assert!(cancel.status().is_success(), "cancel: {}", cancel.status());
    wait_for(
        "the stalled run to end",
        Duration::from_secs(60),
        || async {
            let status: String =
                sqlx::query_scalar("SELECT status FROM weir_runs WHERE run_id = $1")
                    .bind(&run_id)
                    .fetch_one(&pool)
                    .await
                    .expect("run row");
            status != "running"
        },
    )
    .await;

    let status = dev.signal_and_wait(nix::sys::signal::Signal::SIGTERM);
    assert!(status.success(), "weir dev stopped cleanly: {status}");
}

#[test]
fn the_test_copy_of_the_rules_changes_only_for() {
    let original =
        "      - alert: A\n        expr: up == 0\n        for: 10m\n        labels: {}\n";
    let copy = shortened_rules(original);
    assert_eq!(
        copy,
        "      - alert: A\n        expr: up == 0\n        for: 2s\n        labels: {}"
    );
    assert_eq!(
        metric_names(
            r#"sum by (group) (rate(weir_x_total{class="a b"}[5m])) > 0 and on () up == 0"#
        ),
        ["up", "weir_x_total"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
}
