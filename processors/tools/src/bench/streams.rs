//! `weir bench streams`: the cost of live streams on the gateway, in this process against
//! the local stack.
//!
//! 1. `held`: `streams` workflow streams (`GET /v1/workflows/{id}/events`, one HTTP/1.1
//!    connection each) spread over `workflows` workflows are opened and kept; the process's
//!    resident memory before and after gives the bytes one open stream costs (client side
//!    included: the clients run in this process, so it is an upper bound), idle CPU while
//!    they are held is the heartbeats' cost.
//! 2. `fanout`: for `seconds`, `changes_per_sec` new versions are written to the patch log
//!    (one row and the head, as the materializer writes them) and announced on
//!    `weir.workflows.v1`, as the relay would; every stream of that workflow reads and sends
//!    it. Measured: events delivered to clients per second, the latency from the write to a
//!    client holding the event (p50/p99), and the process's CPU time per delivered event.
//!
//! The workflows' rows are written directly (no materializer), so the figures are the
//! gateway's fan-out alone. Topics live under a random prefix.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rdkafka::producer::FutureRecord;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use weir_runtime::config::Config;

use weir_model::Permission;

use crate::common::{own_gateway, percentile, round, scratch_config, OwnGateway};

/// Benchmark parameters.
#[derive(Debug, Clone)]
pub struct Params {
    /// Streams held open.
    pub streams: usize,
    /// Workflows they are spread over (each change fans out to streams / workflows).
    pub workflows: usize,
    /// New versions written per second during the fan-out phase.
    pub changes_per_sec: u64,
    /// Seconds of the fan-out phase.
    pub seconds: u64,
}

/// Now, in µs since the epoch.
fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Resident memory of this process, in bytes (Linux).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// CPU seconds (user + system) this process used so far (Linux).
fn cpu_seconds() -> f64 {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) start at ") ".
            let rest = s.rsplit_once(") ")?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    // USER_HZ is 100 on Linux.
    ticks as f64 / 100.0
}

/// What the clients saw.
#[derive(Default)]
struct Seen {
    heads: AtomicU64,
    events: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
}

/// One client: opens the stream, counts `head` and `version` events; a version's operations
/// carry the time it was written.
async fn client(
    addr: std::net::SocketAddr,
    key: String,
    path: String,
    seen: Arc<Seen>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .uri(path)
        .header("host", "bench")
        .header("authorization", format!("Bearer {key}"))
        .body(Empty::<Bytes>::new())?;
    let res = sender.send_request(req).await?;
    anyhow::ensure!(res.status() == 200, "stream refused: {}", res.status());
    let mut body = res.into_body();
    let mut buf = String::new();
    loop {
        let frame = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            f = body.frame() => f,
        };
        let Some(frame) = frame else { return Ok(()) };
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        buf.push_str(&String::from_utf8_lossy(&data));
        while let Some(cut) = buf.find("\n\n") {
            let block: String = buf.drain(..cut + 2).collect();
            if block.contains("\nevent: head\n") {
                seen.heads.fetch_add(1, Ordering::Relaxed);
            } else if block.contains("\nevent: version\n") {
                let written = block
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .and_then(|d| serde_json::from_str::<Value>(d).ok())
                    .and_then(|v| v["operations"][0]["value"].as_i64());
                if let Some(t) = written {
                    let us = (now_micros() - t).clamp(0, u32::MAX as i64) as u32;
                    seen.latencies_us
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(us);
                }
                seen.events.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Runs the benchmark; returns the result object (the command prints it as its last line).
pub async fn run(cfg: Arc<Config>, params: Params) -> anyhow::Result<Value> {
    anyhow::ensure!(
        params.workflows >= 1 && params.streams >= 1,
        "nothing to measure"
    );
    let prefix = format!("bench-streams-{}.", uuid::Uuid::now_v7().simple());
    let mut c = scratch_config(&cfg, prefix.clone());
    c.gateway.rate_limit_per_sec = u32::MAX / 2;
    c.gateway.rate_limit_burst = u32::MAX / 2;
    c.gateway.client_rate_limit_per_sec = u32::MAX / 2;
    c.gateway.client_rate_limit_burst = u32::MAX / 2;
    c.gateway.max_connections = params.streams + 100;
    c.gateway.max_connections_per_client = params.streams + 100;
    c.gateway.max_streams = params.streams;
    c.gateway.max_streams_per_workspace = params.streams;
    let cfg = Arc::new(c);
    let OwnGateway {
        state,
        pool,
        workspace,
        key,
    } = own_gateway(&cfg, Permission::Read).await?;
    let wf = |i: usize| format!("streams-{i}");
    for i in 0..params.workflows {
        sqlx::query(
            "INSERT INTO weir_workflow_heads (workflow_id, workspace_id, version, definition, definition_sha256)
             VALUES ($1, $2, 1, '{}'::jsonb, 'bench')",
        )
        .bind(wf(i))
        .bind(&workspace)
        .execute(&pool)
        .await?;
    }
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let running = weir_gateway::spawn(listener, state, shutdown.clone())?;
    // Let the feed assign its partitions before anything is announced.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 1. Held streams.
    let seen = Arc::new(Seen::default());
    let stop = CancellationToken::new();
    let rss_before = rss_bytes();
    let opened = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for s in 0..params.streams {
        let path = format!("/v1/workflows/{}/events", wf(s % params.workflows));
        clients.spawn(client(
            running.addr,
            key.clone(),
            path,
            seen.clone(),
            stop.clone(),
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while (seen.heads.load(Ordering::Relaxed) as usize) < params.streams {
        anyhow::ensure!(Instant::now() < deadline, "streams did not all open");
        if let Some(Ok(Err(e))) = clients.try_join_next() {
            anyhow::bail!("a stream failed: {e}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let open_ms = opened.elapsed().as_secs_f64() * 1000.0;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_held = rss_bytes();
    let idle_cpu0 = cpu_seconds();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_cpu = (cpu_seconds() - idle_cpu0) / 3.0;
    let per_stream = rss_held.saturating_sub(rss_before) as f64 / params.streams as f64;
    println!(
        "held: {} streams opened in {:.0} ms; {:.1} KiB resident per stream (client side included); idle CPU {:.1}%",
        params.streams,
        open_ms,
        per_stream / 1024.0,
        idle_cpu * 100.0
    );

    // 2. Fan-out at a fixed rate of changes.
    let producer = weir_runtime::kafka::producer(&cfg.kafka)?;
    let topic = cfg.kafka.topic("weir.workflows.v1");
    let mut versions = vec![1i64; params.workflows];
    let interval = Duration::from_secs_f64(1.0 / params.changes_per_sec.max(1) as f64);
    let events0 = seen.events.load(Ordering::Relaxed);
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let end = start + Duration::from_secs(params.seconds);
    let mut next = start;
    let mut changes = 0u64;
    // Events the clients should get: each change reaches the streams of its workflow.
    let per_workflow: Vec<u64> = (0..params.workflows)
        .map(|i| {
            (0..params.streams)
                .filter(|s| s % params.workflows == i)
                .count() as u64
        })
        .collect();
    let mut expected = events0;
    while Instant::now() < end {
        let i = (changes as usize) % params.workflows;
        versions[i] += 1;
        let v = versions[i];
        let ops = json!([{"op": "replace", "path": "/t", "value": now_micros()}]);
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO weir_workflow_patches
               (workflow_id, patch_id, workspace_id, author, head_version, status, version,
                definition_sha256, operations, source_topic, source_partition, source_offset,
                submitted_at)
             VALUES ($1, $2, $3, 'bench', $4, 'applied', $5, 'bench', $6, 'bench', 0, $5, now())",
        )
        .bind(wf(i))
        .bind(uuid::Uuid::now_v7())
        .bind(&workspace)
        .bind(v - 1)
        .bind(v)
        .bind(&ops)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE weir_workflow_heads SET version = $3 WHERE workspace_id = $1 AND workflow_id = $2",
        )
        .bind(&workspace)
        .bind(wf(i))
        .bind(v)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let key = wf(i);
        // The feed reads only the key: the value need not decode.
        producer
            .send(
                FutureRecord::to(&topic).key(&key).payload(&b"bench"[..]),
                Duration::from_secs(5),
            )
            .await
            .map_err(|(e, _)| e)?;
        changes += 1;
        expected += per_workflow[i];
        next += interval;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }
    // Let the last changes arrive.
    let drain = Instant::now() + Duration::from_secs(10);
    while seen.events.load(Ordering::Relaxed) < expected && Instant::now() < drain {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let delivered = seen.events.load(Ordering::Relaxed) - events0;
    let mut lat = std::mem::take(&mut *seen.latencies_us.lock().unwrap_or_else(|p| p.into_inner()));
    lat.sort_unstable();
    let p = |q: f64| round(percentile(&lat, q) / 1000.0, 2);
    let (p50, p99) = (p(0.5), p(0.99));
    println!(
        "fanout: {changes} changes in {:.1} s to {} streams each: {} events delivered ({:.0}/s), write→client p50 {p50} ms p99 {p99} ms, {:.0} µs CPU per event",
        params.seconds as f64,
        params.streams / params.workflows,
        delivered,
        delivered as f64 / elapsed,
        cpu * 1e6 / delivered.max(1) as f64
    );
    stop.cancel();
    shutdown.cancel();
    while clients.join_next().await.is_some() {}
    Ok(json!({
        "bench": "streams",
        "streams": params.streams,
        "workflows": params.workflows,
        "held": {
            "open_ms": round(open_ms, 0),
            "resident_kib_per_stream": round(per_stream / 1024.0, 1),
            "idle_cpu_percent": round(idle_cpu * 100.0, 1),
        },
        "fanout": {
            "changes": changes,
            "changes_per_sec": params.changes_per_sec,
            "streams_per_change": params.streams / params.workflows,
            "events_delivered": delivered,
            "events_per_sec": round(delivered as f64 / elapsed, 0),
            "write_to_client_p50_ms": p50,
            "write_to_client_p99_ms": p99,
            "cpu_us_per_event": round(cpu * 1e6 / delivered.max(1) as f64, 1),
        },
    }))
}
