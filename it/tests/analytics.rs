//! The analytics contract (docs/analytics.md) from the outside: a Python consumer with the
//! stock Confluent deserializers (confluent-kafka's `AvroDeserializer` on the registry's
//! Confluent-compatible API) decodes every output event an end-to-end run produces and checks
//! its fields and the relations between events (`it/python/weir_analytics_check.py`).
//!
//! Needs the local stack (`infra/local/up`, `infra/local/env`) and the Python venv that
//! `infra/local/prereqs` installs into `$WEIR_CACHE_DIR/venv` (default `~/.cache/weir/venv`).
//!
//! The run's topics are under a random prefix, so the checker sees only this run's events and
//! can demand exact counts. [`expected_this_run`] lists the record types this run produces;
//! the checker already has the field checks for every output record type in schemas/, so a
//! processor joining the flow only has to be started here and its types added to that list.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use rdkafka::Message;
use serde_json::{json, Value};
use sqlx::PgPool;
use weir_it::{config, prepare, produce, produce_raw, random_name, weir_bin, ChildGuard};
use weir_materializer::processor::patch_submitted;
use weir_runtime::codec::Codec;
use weir_runtime::events::{
    new_event_id, now_micros, CacheEvent, CacheLookup, CacheStore, CompletionEvent, NodeCompleted,
    NodeReady, NodeStatus, PatchSubmitted, RunCancelRequested, RunRequested,
};

/// Output topics the checker reads (unprefixed); all of them, so a stray event fails the run.
const OUTPUT_TOPICS: [&str; 5] = [
    "weir.workflows.v1",
    "weir.node-ready.v1",
    "weir.run-events.v1",
    "weir.cache-answers.v1",
    "weir.dlq.v1",
];

/// Above this the materializer stores a definition in the CAS (`definition_ref`); the big
/// workflow below exceeds it, the others stay inline (`definition_json`).
const INLINE_MAX: usize = 2048;

/// The Python interpreter of the test venv.
///
/// # Panics
/// If the venv is missing: the message says how to install it.
fn python() -> PathBuf {
    let cache = std::env::var_os("WEIR_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/weir")
        });
    let python = cache.join("venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run infra/local/prereqs (installs it/python/requirements.txt)",
        python.display()
    );
    python
}

fn python_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python")
}

fn spawn_weir(prefix: &str, what: &str) -> ChildGuard {
    ChildGuard(
        Command::new(weir_bin())
            .args(["run", what])
            .env("WEIR__KAFKA__TOPIC_PREFIX", prefix)
            // A run left waiting is reported stalled within the test's time.
            .env("WEIR__COORDINATOR__STALL_AFTER_MS", "1500")
            .env("WEIR__COORDINATOR__TIMER_POLL_MS", "100")
            .env(
                "WEIR__MATERIALIZER__INLINE_DEFINITION_MAX_BYTES",
                INLINE_MAX.to_string(),
            )
            .env("WEIR__TELEMETRY__LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn weir"),
    )
}

fn create(config: Value) -> Value {
    json!([{"op": "add", "path": "", "value": {
        "nodes": {"a": {"type": "function", "config": config}, "b": {"type": "pure", "config": {}}},
        "edges": [{"from": "a", "to": "b"}],
        "settings": {"max_hops": 10}}}])
}

/// Distinct events per record type that this run produces: the materializer's two types,
/// the consumer runtime's dead letters, and the coordinator's run events for the five runs
/// below (see [`Runs`]), and the cache processor's answers to two lookups (a hit, a miss).
fn expected_this_run() -> Value {
    json!({
        "weir.workflows.WorkflowMaterialized": 4,
        "weir.workflows.PatchRejected": 1,
        "weir.dlq.DeadLetter": 2,
        // completed: a, b; retried: a, a again, b; cancelled: a; stalled: a.
        "weir.runs.NodeReady": 7,
        "weir.run_events.RunStarted": 4,
        "weir.run_events.RunCompleted": 2,
        "weir.run_events.RunFailed": 1,
        "weir.run_events.RunCancelled": 1,
        "weir.run_events.NodeRetried": 1,
        "weir.run_events.RunStalled": 1,
        "weir.cache.CacheAnswer": 2,
    })
}

/// The runs of the test, one per lifecycle: completed, completed after a retry, failed
/// (unknown workflow), cancelled, stalled (no worker answers).
struct Runs {
    completed: String,
    retried: String,
    failed: String,
    cancelled: String,
    stalled: String,
}

fn run_requested(run_id: &str, workflow_id: &str, n: usize) -> CompletionEvent {
    CompletionEvent::RunRequested(RunRequested {
        event_id: new_event_id(),
        occurred_at: now_micros(),
        workspace_id: "ws-analytics".into(),
        traceparent: String::new(),
        tracestate: None,
        run_id: run_id.into(),
        workflow_id: workflow_id.into(),
        version: None,
        requester: "it".into(),
        permission: "write".into(),
        // Distinct inputs per run, also across test runs on one database (the run id is
        // random): no run is served from another's cached results.
        inputs_json: Some(format!("{{\"q\":{n},\"run\":\"{run_id}\"}}")),
        inputs_ref: None,
        idempotency_key: None,
    })
}

/// The workers of the test: answer the NodeReady of the completed and retried runs (failing
/// the retried run's first attempt of `a`), cancel the cancelled run once its first node is
/// dispatched, leave the others unanswered.
async fn worker(
    cfg: weir_runtime::config::Config,
    codec: std::sync::Arc<Codec>,
    runs: std::sync::Arc<Runs>,
    stop: tokio_util::sync::CancellationToken,
) {
    let producer = weir_runtime::kafka::producer(&cfg.kafka).unwrap();
    let consumer: StreamConsumer =
        weir_runtime::kafka::consumer_config(&cfg.kafka, &random_name("analytics-worker"), 0)
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
    consumer.subscribe(&[&codec.topic::<NodeReady>()]).unwrap();
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return,
            m = consumer.recv() => m.expect("node-ready"),
        };
        let ready: NodeReady = codec.decode(msg.payload().unwrap()).await.unwrap();
        if ready.run_id == runs.cancelled {
            // Cancelled once its first node is out, so the NodeReady is certain to exist.
            let cancel = CompletionEvent::RunCancelRequested(RunCancelRequested {
                event_id: new_event_id(),
                occurred_at: now_micros(),
                workspace_id: ready.workspace_id.clone(),
                traceparent: String::new(),
                tracestate: None,
                run_id: ready.run_id.clone(),
                reason: Some("analytics test".into()),
                requester: "it".into(),
            });
            produce(&producer, &codec, &cancel).await.unwrap();
            continue;
        }
        if ready.run_id != runs.completed && ready.run_id != runs.retried {
            continue;
        }
        let fail = ready.run_id == runs.retried && ready.node_id == "a" && ready.attempt == 1;
        let done = CompletionEvent::NodeCompleted(NodeCompleted {
            event_id: new_event_id(),
            occurred_at: now_micros(),
            workspace_id: ready.workspace_id.clone(),
            traceparent: ready.traceparent.clone(),
            tracestate: None,
            run_id: ready.run_id.clone(),
            node_id: ready.node_id.clone(),
            attempt: ready.attempt,
            status: if fail {
                NodeStatus::Failed
            } else {
                NodeStatus::Succeeded
            },
            output_json: (!fail).then(|| format!("{{\"node\":\"{}\"}}", ready.node_id)),
            output_ref: None,
            error: fail.then(|| "simulated failure".to_string()),
            duration_ms: 3,
            worker_id: "analytics-worker".into(),
            from_cache: false,
        });
        produce(&producer, &codec, &done).await.unwrap();
    }
}

async fn wait_decided(pool: &PgPool, topic: &str, n: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM weir_workflow_patches WHERE source_topic = $1",
        )
        .bind(topic)
        .fetch_one(pool)
        .await
        .expect("count decided patches");
        if done >= n || Instant::now() > deadline {
            return done;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn the_checker_accepts_every_output_record_type_and_rejects_broken_ones() {
    // The field checks of the types no processor produces in the run below are tested here,
    // on samples round-tripped through schemas/ with fastavro.
    let out = Command::new(python())
        .args(["-m", "unittest", "discover", "-v", "-s"])
        .arg(python_dir())
        .output()
        .expect("run python");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "checker unit tests failed:\n{stderr}");
    let ran: usize = stderr
        .lines()
        .find_map(|l| l.strip_prefix("Ran ")?.split(' ').next()?.parse().ok())
        .unwrap_or(0);
    assert!(ran >= 8, "the checker's unit tests ran: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_output_event_decodes_with_stock_python_deserializers() {
    let started_at = now_micros();
    let prefix = format!("{}.", random_name("analytics"));
    let cfg = config(&prefix);
    let codec: std::sync::Arc<Codec> = prepare(&cfg).await.expect("prepare");
    let pool = weir_runtime::db::pool(&cfg.postgres).unwrap();
    let producer = weir_runtime::kafka::producer(&cfg.kafka).unwrap();
    let patches = codec.topic::<PatchSubmitted>();

    // Two workflows: one small (inline definitions), one above INLINE_MAX (CAS claim check).
    let (small, big) = (format!("{prefix}wf-small"), format!("{prefix}wf-big"));
    let mut first = patch_submitted(&small, "ws-analytics", "it", Some(0), &create(json!({})));
    first.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into();
    first.tracestate = Some("weir=it".into());
    let second = patch_submitted(
        &small,
        "ws-analytics",
        "it",
        Some(1),
        &json!([{"op": "replace", "path": "/settings/max_hops", "value": 3}]),
    );
    let conflicting = patch_submitted(
        &small,
        "ws-analytics",
        "it",
        Some(7),
        &json!([{"op": "remove", "path": "/nodes/b"}]),
    );
    let large = patch_submitted(
        &big,
        "ws-analytics",
        "it",
        None,
        &create(json!({"blob": "x".repeat(INLINE_MAX * 2)})),
    );
    // The workflow the runs execute: `a` retries once (max_attempts 2), then `b`.
    let flow = format!("{prefix}wf-runs");
    let flow_create = patch_submitted(
        &flow,
        "ws-analytics",
        "it",
        Some(0),
        &json!([{"op": "add", "path": "", "value": {
            "nodes": {"a": {"type": "function", "config": {}, "retry": {"max_attempts": 2, "backoff_ms": 50}},
                      "b": {"type": "pure", "config": {}}},
            "edges": [{"from": "a", "to": "b"}]}}]),
    );
    for p in [&first, &second, &conflicting, &large, &flow_create] {
        produce(&producer, &codec, p).await.unwrap();
    }
    // Poison: a keyed record that is not Avro, and a keyless one of a single byte.
    let (_, poison_offset) = produce_raw(&producer, &patches, &small, b"not avro")
        .await
        .unwrap();
    let keyless = producer
        .send(
            FutureRecord::<(), [u8]>::to(&patches).payload(b"\x00"),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();

    let mut materializer = spawn_weir(&prefix, "materializer");
    let mut relay = spawn_weir(&prefix, "relay");
    assert_eq!(wait_decided(&pool, &patches, 5).await, 5, "patches decided");

    // Runs through the coordinator, with this test playing the workers.
    let id = || uuid::Uuid::now_v7().to_string();
    let runs = std::sync::Arc::new(Runs {
        completed: id(),
        retried: id(),
        failed: id(),
        cancelled: id(),
        stalled: id(),
    });
    let mut coordinator = spawn_weir(&prefix, "coordinator");
    let stop_worker = tokio_util::sync::CancellationToken::new();
    let worker_task = tokio::spawn(worker(
        cfg.clone(),
        codec.clone(),
        runs.clone(),
        stop_worker.clone(),
    ));
    let missing = format!("{prefix}wf-missing");
    for (n, (run, workflow)) in [
        (&runs.completed, &flow),
        (&runs.retried, &flow),
        (&runs.failed, &missing),
        (&runs.cancelled, &flow),
        (&runs.stalled, &flow),
    ]
    .into_iter()
    .enumerate()
    {
        produce(&producer, &codec, &run_requested(run, workflow, n))
            .await
            .unwrap();
    }

    // The cache processor: a stored result, then an exact lookup that hits and one that misses
    // (one workspace, so one partition: the store is applied before the lookups).
    let mut cache = spawn_weir(&prefix, "cache");
    let cache_event = |request_id: &str, inputs: &str, store: bool| {
        let (event_id, occurred_at) = (new_event_id(), now_micros());
        let (workspace_id, traceparent) = ("ws-analytics".to_string(), String::new());
        let (requester, permission) = ("it".to_string(), "write".to_string());
        let (node_type, config_json) = (
            "http_request".to_string(),
            "{\"url\":\"https://example.invalid\"}".to_string(),
        );
        if store {
            CacheEvent::CacheStore(CacheStore {
                event_id,
                occurred_at,
                workspace_id,
                traceparent,
                tracestate: None,
                request_id: request_id.into(),
                requester,
                permission,
                node_type,
                config_json,
                inputs_json: inputs.into(),
                result_json: Some("{\"rate\":1.08}".into()),
                result_ref: None,
                prompt: None,
                embedding: None,
                cost_ms: 850,
                required_permission: "read".into(),
            })
        } else {
            CacheEvent::CacheLookup(CacheLookup {
                event_id,
                occurred_at,
                workspace_id,
                traceparent,
                tracestate: None,
                request_id: request_id.into(),
                requester,
                permission,
                node_type,
                config_json,
                inputs_json: inputs.into(),
                prompt: None,
                embedding: None,
                semantic: false,
            })
        }
    };
    let (hit, miss) = (id(), id());
    for e in [
        cache_event(&id(), "{\"currency\":\"EUR\"}", true),
        cache_event(&hit, "{\"currency\": \"EUR\"}", false),
        cache_event(&miss, "{\"currency\":\"USD\"}", false),
    ] {
        produce(&producer, &codec, &e).await.unwrap();
    }

    let topics: serde_json::Map<String, Value> = OUTPUT_TOPICS
        .iter()
        .map(|t| (t.to_string(), Value::String(cfg.kafka.topic(t))))
        .collect();
    let spec = json!({
        "bootstrap_servers": cfg.kafka.bootstrap_servers,
        "schema_registry_url": cfg.schema_registry.url,
        "schemas_dir": PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas"),
        "topics": topics,
        "expect": expected_this_run(),
        "since_micros": started_at,
        "timeout_s": 120,
        "applied_patches": [first.patch_id, second.patch_id, large.patch_id, flow_create.patch_id],
        "rejected_patches": {conflicting.patch_id.to_string(): "version_conflict"},
        "cache_answers": {hit.clone(): {"hit": true, "kind": "exact"}, miss.clone(): {"hit": false, "kind": null}},
        "dead_letters": [
            {"source_topic": patches, "source_offset": poison_offset,
             "original_value_hex": hex(b"not avro"), "original_key": small, "error_class": "framing"},
            {"source_topic": patches, "source_offset": keyless.offset,
             "original_value_hex": hex(b"\x00"), "error_class": "framing"},
        ],
    });
    let dir = tempfile::tempdir().unwrap();
    if std::env::var_os("WEIR_IT_KEEP_SPEC").is_some() {
        eprintln!("checker spec: {spec:#}");
    }
    let spec_path = dir.path().join("spec.json");
    std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(python_dir().join("weir_analytics_check.py"))
            .arg(&spec_path)
            .output()
            .expect("run the checker")
    })
    .await
    .unwrap();
    stop_worker.cancel();
    worker_task.await.unwrap();
    materializer.kill();
    relay.kill();
    coordinator.kill();
    cache.kill();

    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("checker report is not JSON ({e}):\n{stdout}\n{stderr}"));
    assert_eq!(
        report["errors"],
        json!([]),
        "contract violations:\n{report:#}"
    );
    assert!(
        out.status.success(),
        "checker failed:\n{report:#}\n{stderr}"
    );
    assert_eq!(report["counts"], expected_this_run(), "{report:#}");
    assert_eq!(report["ok"], json!(true));
    assert_eq!(
        report["facts"],
        json!({"inline_definitions": 3, "definition_refs": 1, "with_traceparent": 1,
               "keyless_dead_letters": 1}),
        "the run covers both claim-check forms, a traced event and a keyless poison record"
    );
    eprintln!("analytics checker report: {report}");

    // The worked example of docs/analytics.md prints the same events, once each.
    let example =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/analytics-python/consume.py");
    let args = [
        "--bootstrap".to_string(),
        cfg.kafka.bootstrap_servers.clone(),
        "--registry".into(),
        cfg.schema_registry.url.clone(),
        "--prefix".into(),
        prefix.clone(),
        "--idle-exit".into(),
        "3".into(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(example)
            .args(args)
            .output()
            .expect("run the example")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut printed = serde_json::Map::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let line: Value = serde_json::from_str(line).expect("the example prints JSON lines");
        let name = line["type"].as_str().expect("type").to_string();
        let n = printed.get(&name).and_then(Value::as_u64).unwrap_or(0);
        printed.insert(name, json!(n + 1));
    }
    assert_eq!(Value::Object(printed), expected_this_run());
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
