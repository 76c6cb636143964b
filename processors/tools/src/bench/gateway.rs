//! `weir bench gateway`: the gateway in this process against the local stack, driven by an
//! in-process HTTP/1.1 load generator (hyper, one connection per worker, requests back to
//! back on each), all in the same run:
//!
//! 1. `http_only`: GET /healthz, the HTTP stack alone (no auth, no Kafka): the ceiling;
//! 2. `patches`: POST /v1/workflows/{id}/patches with a valid key, each answered 202 only
//!    after the broker acknowledged the event (acks=all, idempotent producer).
//!
//! Topics live under a random prefix; the load generator shares the machine's cores with the
//! gateway and the broker, so the figures are a lower bound of the gateway alone.
//!
//! The phases run `repeat` times against the same gateway, each repetition after a
//! checkpoint, an OS `sync` and a wait for autovacuum workers (see
//! [`super::common::settle`]): what ran before (another benchmark, the previous repetition)
//! is written out before, not during, a phase. The topics and the benchmark's API key are
//! deleted at the end. The result is the first repetition's fields with each figure's median,
//! and the spread and targets over the repetitions.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use weir_runtime::config::Config;

use weir_model::Permission;

use super::common::{settle, summarize, topics_left, Figure};
use crate::common::{own_gateway, percentile, round, scratch_config, OwnGateway};

/// The figures summarized over repetitions, with their targets (the seed's orchestrator API
/// answered 5,000 requests/s with p99 100 ms).
pub const FIGURES: [Figure; 8] = [
    Figure::higher("/requests_per_sec").target(20_000.0),
    Figure::lower("/p99_ms").target(20.0),
    Figure::lower("/p50_ms"),
    Figure::lower("/patches/errors"),
    Figure::higher("/http_only_healthz/requests_per_sec"),
    Figure::higher("/patches_wrk/requests_per_sec").target(20_000.0),
    Figure::lower("/patches_wrk/p99_ms").target(20.0),
    Figure::lower("/patches_wrk/non_2xx"),
];

/// Benchmark parameters.
#[derive(Debug, Clone)]
pub struct Params {
    /// Concurrent connections (each sends its next request when the previous is answered).
    pub connections: usize,
    /// Seconds of the measured patch phase (after a one-second warm-up).
    pub seconds: u64,
    /// Workflows the patches are spread over.
    pub workflows: usize,
    /// Also drive the same endpoint with wrk (Debian package `wrk`), an external load
    /// generator that takes less CPU than the in-process one.
    pub wrk: bool,
    /// Repetitions of the phases (at least 1).
    pub repeat: usize,
}

/// Parses a wrk duration (`812.00us`, `7.02ms`, `1.20s`) into milliseconds.
fn wrk_ms(s: &str) -> Option<f64> {
    let (num, unit) = s
        .trim()
        .split_at(s.trim().find(|c: char| c.is_ascii_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    match unit {
        "us" => Some(v / 1000.0),
        "ms" => Some(v),
        "s" => Some(v * 1000.0),
        "m" => Some(v * 60_000.0),
        _ => None,
    }
}

/// Runs wrk against `POST /v1/workflows/{prefix}wf-{n}/patches`; returns its summary.
async fn wrk_phase(
    addr: SocketAddr,
    key: &str,
    prefix: &str,
    workflows: usize,
    connections: usize,
    seconds: u64,
) -> anyhow::Result<Value> {
    let script = format!(
        r#"local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", "/v1/workflows/{prefix}wf-" .. (n % {workflows}) .. "/patches",
    {{["Authorization"] = "Bearer {key}", ["Content-Type"] = "application/json"}},
    '[{{"op":"replace","path":"/nodes/fetch/config/n","value":' .. n .. '}}]')
end
"#
    );
    let dir = std::env::temp_dir().join(format!("weir-bench-wrk-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("patch.lua");
    std::fs::write(&path, script)?;
    let out = tokio::process::Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
            "-s",
        ])
        .arg(&path)
        .arg(format!("http://{addr}"))
        .output()
        .await
        .context("running wrk (apt-get install wrk)")?;
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(out.status.success(), "wrk failed: {text}");
    let field = |label: &str| -> Option<&str> {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(label))
            .and_then(|l| l.split_whitespace().nth(label.split_whitespace().count()))
    };
    let rps: f64 = field("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let non_2xx: u64 = field("Non-2xx or 3xx responses:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let socket_errors = text.lines().any(|l| l.trim().starts_with("Socket errors"));
    Ok(json!({
        "requests_per_sec": rps.round(),
        "p50_ms": field("50%").and_then(wrk_ms),
        "p90_ms": field("90%").and_then(wrk_ms),
        "p99_ms": field("99%").and_then(wrk_ms),
        "non_2xx": non_2xx,
        "socket_errors": socket_errors,
        "connections": connections,
        "seconds": seconds,
    }))
}

struct Phase {
    ok: u64,
    errors: u64,
    elapsed: Duration,
    /// Latencies of successful requests, microseconds, sorted.
    latencies: Vec<u32>,
}

impl Phase {
    fn summary(&self) -> Value {
        let pct = |q: f64| percentile(&self.latencies, q) / 1000.0;
        json!({
            "requests": self.ok,
            "errors": self.errors,
            "seconds": round(self.elapsed.as_secs_f64(), 3),
            "requests_per_sec": (self.ok as f64 / self.elapsed.as_secs_f64()).round(),
            "p50_ms": pct(0.50),
            "p90_ms": pct(0.90),
            "p99_ms": pct(0.99),
            "max_ms": pct(1.0),
        })
    }
}

/// One request of a worker: (method, path, body).
type MakeRequest = Arc<dyn Fn(usize, u64) -> (hyper::Method, String, Option<Bytes>) + Send + Sync>;

async fn load(
    addr: SocketAddr,
    key: &str,
    connections: usize,
    warmup: Duration,
    measure: Duration,
    make: MakeRequest,
    expect: u16,
) -> anyhow::Result<Phase> {
    let start = Instant::now() + warmup;
    let end = start + measure;
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..connections {
        let make = make.clone();
        let auth = format!("Bearer {key}");
        workers.spawn(async move {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let (mut ok, mut errors, mut lat) = (0u64, 0u64, Vec::with_capacity(100_000));
            let mut i = 0u64;
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                let (method, path, body) = make(w, i);
                i += 1;
                let req = Request::builder()
                    .method(method)
                    .uri(path)
                    .header("host", "bench")
                    .header("authorization", &auth)
                    .header("content-type", "application/json")
                    .body(Full::new(body.unwrap_or_default()))?;
                let sent = Instant::now();
                let res = sender.send_request(req).await?;
                let status = res.status().as_u16();
                res.into_body().collect().await?;
                let done = Instant::now();
                if sent >= start {
                    if status == expect {
                        ok += 1;
                        lat.push(done.duration_since(sent).as_micros().min(u32::MAX as u128) as u32);
                    } else {
                        errors += 1;
                    }
                }
            }
            anyhow::Ok((ok, errors, lat))
        });
    }
    let mut phase = Phase {
        ok: 0,
        errors: 0,
        elapsed: measure,
        latencies: Vec::new(),
    };
    while let Some(r) = workers.join_next().await {
        let (ok, errors, lat) = r??;
        phase.ok += ok;
        phase.errors += errors;
        phase.latencies.extend(lat);
    }
    phase.latencies.sort_unstable();
    Ok(phase)
}

async fn one_request(
    addr: SocketAddr,
    key: &str,
    method: hyper::Method,
    path: &str,
    body: Bytes,
) -> anyhow::Result<u16> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "bench")
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(body))?;
    let res = sender.send_request(req).await?;
    let status = res.status().as_u16();
    res.into_body().collect().await?;
    Ok(status)
}

/// Runs the benchmark; returns the result object (the command prints it as its last line).
pub async fn run(cfg: Arc<Config>, params: Params) -> anyhow::Result<Value> {
    let prefix = format!("bench-gw-{}.", uuid::Uuid::now_v7().simple());
    let mut c = scratch_config(&cfg, prefix.clone());
    // The benchmark measures the gateway, not the rate limit.
    c.gateway.rate_limit_per_sec = u32::MAX / 2;
    c.gateway.rate_limit_burst = u32::MAX / 2;
    let cfg = Arc::new(c);
    let OwnGateway {
        state,
        pool,
        workspace,
        key,
    } = own_gateway(&cfg, Permission::Write).await?;
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let running = weir_gateway::spawn(listener, state, shutdown.clone())?;
    let addr = running.addr;

    // Create the workflows through the gateway (this gateway then knows they exist).
    let definition = json!({
        "nodes": {"fetch": {"type": "http_request", "config": {"url": "https://example.com", "n": 0}},
                  "summarize": {"type": "agent", "config": {"model": "small"}}},
        "edges": [{"from": "fetch", "to": "summarize"}],
        "settings": {"max_hops": 100}
    })
    .to_string();
    let workflows = params.workflows.max(1);
    for w in 0..workflows {
        let status = one_request(
            addr,
            &key,
            hyper::Method::PUT,
            &format!("/v1/workflows/{prefix}wf-{w}"),
            Bytes::from(definition.clone()),
        )
        .await?;
        anyhow::ensure!(status == 202, "creating workflow {w} answered {status}");
    }

    let producer_setting = |name: &str, default: &str| {
        cfg.kafka
            .producer
            .get(name)
            .cloned()
            .unwrap_or_else(|| default.into())
    };
    let linger = producer_setting("linger.ms", weir_gateway::produce::DEFAULT_LINGER_MS);
    let compression = producer_setting("compression.type", "none");
    let mut reps = Vec::new();
    for rep in 1..=params.repeat.max(1) {
        let start_state = settle(&pool, &[], &format!("repetition {rep}")).await?;
        let health: MakeRequest = Arc::new(|_, _| (hyper::Method::GET, "/healthz".into(), None));
        let http_only = load(
            addr,
            &key,
            params.connections,
            Duration::from_millis(500),
            Duration::from_secs(3),
            health,
            200,
        )
        .await?;

        let patch: MakeRequest = {
            let prefix = prefix.clone();
            Arc::new(move |w, i| {
                let body =
                    format!(r#"[{{"op":"replace","path":"/nodes/fetch/config/n","value":{i}}}]"#);
                (
                    hyper::Method::POST,
                    format!(
                        "/v1/workflows/{prefix}wf-{}/patches",
                        (w + i as usize) % workflows
                    ),
                    Some(Bytes::from(body)),
                )
            })
        };
        let patches = load(
            addr,
            &key,
            params.connections,
            Duration::from_secs(1),
            Duration::from_secs(params.seconds.max(1)),
            patch,
            202,
        )
        .await?;
        let wrk = if params.wrk {
            Some(
                wrk_phase(
                    addr,
                    &key,
                    &prefix,
                    workflows,
                    params.connections,
                    params.seconds.max(1),
                )
                .await?,
            )
        } else {
            None
        };
        let p = patches.summary();
        eprintln!(
            "repetition {rep}: {} requests/s, p50/p99 {}/{} ms{}",
            p["requests_per_sec"],
            p["p50_ms"],
            p["p99_ms"],
            wrk.as_ref().map_or(String::new(), |w| format!(
                "; wrk {} requests/s, p99 {} ms",
                w["requests_per_sec"], w["p99_ms"]
            ))
        );
        reps.push(json!({
            "repetition": rep,
            "bench": "gateway",
            "endpoint": "POST /v1/workflows/{workflow_id}/patches",
            "acks": "all",
            "idempotent_producer": true,
            "linger_ms": linger,
            "compression": compression,
            "connections": params.connections,
            "workflows": workflows,
            "requests_per_sec": p["requests_per_sec"],
            "p50_ms": p["p50_ms"],
            "p99_ms": p["p99_ms"],
            "patches": p,
            "http_only_healthz": http_only.summary(),
            "patches_wrk": wrk,
            "start_state": start_state,
        }));
    }
    shutdown.cancel();
    let _ = running.task.await;
    // Nothing left behind: the key (the workspace has nothing else) and the topics.
    sqlx::query("DELETE FROM weir_api_keys WHERE workspace_id = $1")
        .bind(&workspace)
        .execute(&pool)
        .await?;
    weir_runtime::kafka::delete_planned_topics(&cfg.kafka).await?;
    let left = topics_left(&cfg, &prefix, Duration::from_secs(10)).await?;
    if !left.is_empty() {
        eprintln!("topics still listed after deletion: {left:?}");
    }
    let mut summary = summarize(reps, &FIGURES);
    summary["topics_left"] = json!(left.len());
    Ok(summary)
}

#[cfg(test)]
mod tests {
    #[test]
    fn wrk_durations_parse() {
        assert_eq!(super::wrk_ms("812.00us"), Some(0.812));
        assert_eq!(super::wrk_ms("7.02ms"), Some(7.02));
        assert_eq!(super::wrk_ms("1.50s"), Some(1500.0));
        assert_eq!(super::wrk_ms("n/a"), None);
    }
}
