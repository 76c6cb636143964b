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

use rdkafka::producer::FutureRecord;
use serde_json::{json, Value};
use sqlx::PgPool;
use weir_it::{config, prepare, produce, produce_raw, random_name, weir_bin, ChildGuard};
use weir_materializer::processor::patch_submitted;
use weir_runtime::codec::Codec;
use weir_runtime::events::{now_micros, PatchSubmitted};

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

/// Distinct events per record type that this run produces: the materializer's two types and
/// the consumer runtime's dead letters. NodeReady, the run lifecycle (RunStarted ...
/// RunStalled) and CacheAnswer join when the coordinator and the cache processor run here.
fn expected_this_run() -> Value {
    json!({
        "weir.workflows.WorkflowMaterialized": 3,
        "weir.workflows.PatchRejected": 1,
        "weir.dlq.DeadLetter": 2,
    })
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
    for p in [&first, &second, &conflicting, &large] {
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
    assert_eq!(wait_decided(&pool, &patches, 4).await, 4, "patches decided");

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
        "applied_patches": [first.patch_id, second.patch_id, large.patch_id],
        "rejected_patches": {conflicting.patch_id.to_string(): "version_conflict"},
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
    materializer.kill();
    relay.kill();

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
        json!({"inline_definitions": 2, "definition_refs": 1, "with_traceparent": 1,
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
