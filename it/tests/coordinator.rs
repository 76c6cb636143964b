//! Runs end to end on the real stack: RunRequested and NodeCompleted on weir.completions.v1 →
//! the coordinator (`weir dev`, or `weir run coordinator` SIGKILLed and restarted) → outbox →
//! the relay → NodeReady and run events in Kafka, answered by a simulated worker.

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use weir_it::{config, prepare, produce, random_name, weir_bin, ChildGuard};
use weir_runtime::codec::Codec;
use weir_runtime::events::{
    self, CompletionEvent, NodeCompleted, NodeReady, NodeStatus, RunEvent, RunRequested, TopicEvent,
};

/// The tests of this file run one at a time: every coordinator's timer loop serves every run
/// in the database, and writes its events under its own topic prefix, so two tests' processes
/// would fire each other's timers into the wrong topics.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn spawn_weir(prefix: &str, args: &[&str]) -> ChildGuard {
    ChildGuard(
        Command::new(weir_bin())
            .args(args)
            .env("WEIR__KAFKA__TOPIC_PREFIX", prefix)
            .env("WEIR__RUNTIME__MAX_BATCH", "500")
            .env("WEIR__KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "6000")
            .env("WEIR__COORDINATOR__TIMER_POLL_MS", "100")
            .env("WEIR__TELEMETRY__LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn weir"),
    )
}

/// What the worker does with one NodeReady: answer success, failure, or nothing.
type Policy = dyn Fn(&NodeReady) -> Option<bool> + Send + Sync;

/// Everything the worker saw, in order, duplicates included.
#[derive(Default)]
struct Seen {
    ready: Vec<(NodeReady, Instant)>,
    runs: Vec<RunEvent>,
}

impl Seen {
    fn ended(&self) -> usize {
        self.runs
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    RunEvent::RunCompleted(_) | RunEvent::RunFailed(_) | RunEvent::RunCancelled(_)
                )
            })
            .map(|e| e.event_id())
            .collect::<HashSet<_>>()
            .len()
    }

    /// Distinct NodeReady events per (run, node, attempt): must be exactly one each.
    fn dispatches(&self) -> HashMap<(String, String, i32), HashSet<Uuid>> {
        let mut out: HashMap<(String, String, i32), HashSet<Uuid>> = HashMap::new();
        for (r, _) in &self.ready {
            out.entry((r.run_id.clone(), r.node_id.clone(), r.attempt))
                .or_default()
                .insert(r.event_id);
        }
        out
    }
}

/// A worker: reads NodeReady and run events; answers every NodeReady delivery (duplicates
/// too, like an at-least-once worker) as `policy` says.
fn spawn_worker(
    cfg: &weir_runtime::Config,
    codec: Arc<Codec>,
    producer: FutureProducer,
    policy: Arc<Policy>,
    stop: CancellationToken,
) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.bootstrap_servers)
        .set("group.id", random_name("worker"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("worker consumer");
    let ready_topic = codec.topic::<NodeReady>();
    let runs_topic = codec.topic::<RunEvent>();
    consumer
        .subscribe(&[&ready_topic, &runs_topic])
        .expect("subscribe");
    let out = seen.clone();
    tokio::spawn(async move {
        loop {
            let m = tokio::select! {
                _ = stop.cancelled() => return,
                m = consumer.recv() => m,
            };
            let Ok(m) = m else { continue };
            let payload = m.payload().unwrap_or_default().to_vec();
            if m.topic() == runs_topic {
                let e: RunEvent = codec.decode(&payload).await.expect("run event decodes");
                out.lock().unwrap().runs.push(e);
                continue;
            }
            let r: NodeReady = codec.decode(&payload).await.expect("NodeReady decodes");
            out.lock().unwrap().ready.push((r.clone(), Instant::now()));
            if let Some(ok) = policy(&r) {
                let done = CompletionEvent::NodeCompleted(NodeCompleted {
                    event_id: events::new_event_id(),
                    occurred_at: events::now_micros(),
                    workspace_id: r.workspace_id.clone(),
                    traceparent: r.traceparent.clone(),
                    tracestate: None,
                    run_id: r.run_id.clone(),
                    node_id: r.node_id.clone(),
                    attempt: r.attempt,
                    status: if ok {
                        NodeStatus::Succeeded
                    } else {
                        NodeStatus::Failed
                    },
                    output_json: ok.then(|| json!({"node": r.node_id, "hop": r.hop}).to_string()),
                    output_ref: None,
                    error: (!ok).then(|| "simulated failure".to_string()),
                    duration_ms: 1,
                    worker_id: "it-worker".into(),
                    from_cache: false,
                });
                produce(&producer, &codec, &done)
                    .await
                    .expect("produce completion");
            }
        }
    });
    seen
}

async fn wait_for(
    seen: &Arc<Mutex<Seen>>,
    what: &str,
    timeout: Duration,
    f: impl Fn(&Seen) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        if f(&seen.lock().unwrap()) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn run_requested(run_id: &str, workflow_id: &str, ws: &str, key: Option<&str>) -> CompletionEvent {
    CompletionEvent::RunRequested(RunRequested {
        // Inputs unique to the run: these tests count dispatches, so no node may be served
        // from the result cache with another run's output.
        inputs_json: Some(format!("{{\"q\":42,\"run\":\"{run_id}\"}}")),
        idempotency_key: key.map(String::from),
        ..weir_it::run_requested(ws, run_id, workflow_id)
    })
}

/// Creates a workflow head directly (the materializer's table), as the materializer would.
async fn create_workflow(pool: &PgPool, workflow_id: &str, ws: &str, def: &Value) {
    weir_model::definition::validate(def, &Default::default()).expect("valid definition");
    let sha = weir_model::fold::sha256_hex(
        &weir_model::definition::canonical_json_verbatim_numbers(def),
    );
    sqlx::query(
        "INSERT INTO weir_workflow_heads (workflow_id, workspace_id, version, definition, definition_sha256)
         VALUES ($1, $2, 1, $3, $4)",
    )
    .bind(workflow_id)
    .bind(ws)
    .bind(def)
    .bind(sha)
    .execute(pool)
    .await
    .expect("insert head");
}

fn fan_out(width: usize) -> Value {
    let mut nodes = serde_json::Map::new();
    nodes.insert(
        "root".into(),
        json!({"type": "http_request", "config": {"url": "u"}}),
    );
    let mut edges = Vec::new();
    for i in 0..width {
        nodes.insert(
            format!("f{i}"),
            json!({"type": "agent", "config": {"i": i}, "retry": {"max_attempts": 2, "backoff_ms": 200}}),
        );
        edges.push(json!({"from": "root", "to": format!("f{i}")}));
        edges.push(json!({"from": format!("f{i}"), "to": "join"}));
    }
    nodes.insert("join".into(), json!({"type": "pure", "config": {}}));
    json!({"nodes": nodes, "edges": edges})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_flow_end_to_end_through_weir_dev() {
    let _serial = SERIAL.lock().await;
    let prefix = format!("{}.", random_name("coord-e2e"));
    let cfg = config(&prefix);
    let codec = prepare(&cfg).await.expect("prepare");
    let pool = weir_runtime::db::pool(&cfg.postgres).unwrap();
    let producer = weir_runtime::kafka::producer(&cfg.kafka).unwrap();
    let ws = format!("ws-{}", Uuid::now_v7().simple());
    let workflow_id = format!("{prefix}wf");
    let _dev = spawn_weir(&prefix, &["dev"]);

    // The workflow comes from a patch through the materializer.
    let patch = weir_materializer::processor::patch_submitted(
        &workflow_id,
        &ws,
        "it",
        None,
        &json!([{"op": "add", "path": "", "value": fan_out(4)}]),
    );
    produce(&producer, &codec, &patch).await.unwrap();

    // f1 fails its first attempt everywhere: one retry per run.
    let policy: Arc<Policy> =
        Arc::new(|r: &NodeReady| Some(!(r.node_id == "f1" && r.attempt == 1)));
    let stop = CancellationToken::new();
    let seen = spawn_worker(&cfg, codec.clone(), producer.clone(), policy, stop.clone());

    let deadline = Instant::now() + Duration::from_secs(60);
    while sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM weir_workflow_heads WHERE workflow_id = $1",
    )
    .bind(&workflow_id)
    .fetch_one(&pool)
    .await
    .unwrap()
        == 0
    {
        assert!(Instant::now() < deadline, "workflow never materialized");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let runs: Vec<String> = (0..20).map(|_| Uuid::now_v7().to_string()).collect();
    for (i, run_id) in runs.iter().enumerate() {
        let key = format!("key-{i}");
        produce(
            &producer,
            &codec,
            &run_requested(run_id, &workflow_id, &ws, Some(&key)),
        )
        .await
        .unwrap();
    }
    // The same idempotency key under another run id (once the first one started: runs are
    // keyed by run id, so the two could land on different partitions), and an unknown
    // workflow.
    let first = runs[0].clone();
    wait_for(
        &seen,
        "the first run to start",
        Duration::from_secs(60),
        |s| {
            s.runs
                .iter()
                .any(|e| matches!(e, RunEvent::RunStarted(r) if r.run_id == first))
        },
    )
    .await;
    let duplicate = Uuid::now_v7().to_string();
    produce(
        &producer,
        &codec,
        &run_requested(&duplicate, &workflow_id, &ws, Some("key-0")),
    )
    .await
    .unwrap();
    let unknown = Uuid::now_v7().to_string();
    produce(
        &producer,
        &codec,
        &run_requested(&unknown, "no-such-workflow", &ws, None),
    )
    .await
    .unwrap();

    wait_for(&seen, "21 ended runs", Duration::from_secs(120), |s| {
        s.ended() >= 21
    })
    .await;
    // A late duplicate completion of a finished run changes nothing.
    let first_root = seen
        .lock()
        .unwrap()
        .ready
        .iter()
        .find(|(r, _)| r.node_id == "root")
        .map(|(r, _)| r.clone())
        .unwrap();
    let late = CompletionEvent::NodeCompleted(NodeCompleted {
        event_id: events::new_event_id(),
        occurred_at: events::now_micros(),
        workspace_id: ws.clone(),
        traceparent: String::new(),
        tracestate: None,
        run_id: first_root.run_id.clone(),
        node_id: "root".into(),
        attempt: 1,
        status: NodeStatus::Failed,
        output_json: None,
        output_ref: None,
        error: Some("late".into()),
        duration_ms: 1,
        worker_id: "it-worker".into(),
        from_cache: false,
    });
    produce(&producer, &codec, &late).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();

    let s = std::mem::take(&mut *seen.lock().unwrap());
    let completed: HashSet<String> = s
        .runs
        .iter()
        .filter_map(|e| match e {
            RunEvent::RunCompleted(c) => Some(c.run_id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(completed, runs.iter().cloned().collect::<HashSet<_>>());
    let failed: Vec<_> = s
        .runs
        .iter()
        .filter_map(|e| match e {
            RunEvent::RunFailed(f) => Some(f.clone()),
            _ => None,
        })
        .collect();
    assert!(failed.iter().all(|f| f.run_id == unknown), "{failed:?}");
    assert!(
        failed[0].reason.contains("not found"),
        "{}",
        failed[0].reason
    );
    assert!(
        !s.runs.iter().any(|e| e.key() == duplicate),
        "duplicate request started a run"
    );
    let retried = s
        .runs
        .iter()
        .filter(
            |e| matches!(e, RunEvent::NodeRetried(r) if r.node_id == "f1" && r.next_attempt == 2),
        )
        .map(|e| e.key().to_string())
        .collect::<HashSet<_>>();
    assert_eq!(retried.len(), 20);

    // Every (run, node, attempt) dispatched exactly once: 6 nodes + f1's retry per run.
    let dispatches = s.dispatches();
    assert_eq!(dispatches.len(), 20 * 7);
    assert!(
        dispatches.values().all(|ids| ids.len() == 1),
        "a node was dispatched twice"
    );
    // The join sees all four fan-out outputs; hops count from the root.
    let join = s
        .ready
        .iter()
        .find(|(r, _)| r.node_id == "join")
        .unwrap()
        .0
        .clone();
    assert_eq!(join.inputs.len(), 4);
    assert_eq!(join.hop, 3);
    assert_eq!(
        join.run_inputs_json,
        Some(format!("{{\"q\":42,\"run\":\"{}\"}}", join.run_id))
    );
    drop(s);

    let status = weir_coordinator::run_status(&pool, &ws, runs[0].parse().unwrap())
        .await
        .unwrap()
        .expect("status of a run of this workspace");
    assert_eq!(status.status, "completed");
    assert_eq!(status.version, Some(1));
    assert_eq!(status.nodes.len(), 6);
    assert!(status.nodes.iter().all(|n| n.status == "succeeded"));
    assert_eq!(
        status
            .nodes
            .iter()
            .find(|n| n.node_id == "f1")
            .unwrap()
            .attempt,
        2
    );
    assert!(
        weir_coordinator::run_status(&pool, "another-ws", runs[0].parse().unwrap())
            .await
            .unwrap()
            .is_none()
    );
    let failed_status = weir_coordinator::run_status(&pool, &ws, unknown.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(failed_status.status, "failed");
    assert!(failed_status.nodes.is_empty());
    // The late failure did not touch the finished run.
    let root_status: String = sqlx::query_scalar(
        "SELECT status FROM weir_run_nodes WHERE run_id = $1 AND node_id = 'root'",
    )
    .bind(&first_root.run_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(root_status, "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_sigkilled_mid_run_dispatches_nothing_twice() {
    let _serial = SERIAL.lock().await;
    const RUNS: usize = 150;
    let prefix = format!("{}.", random_name("coord-kill"));
    let cfg = config(&prefix);
    let codec = prepare(&cfg).await.expect("prepare");
    let pool = weir_runtime::db::pool(&cfg.postgres).unwrap();
    let producer = weir_runtime::kafka::producer(&cfg.kafka).unwrap();
    let ws = format!("ws-{}", Uuid::now_v7().simple());
    let workflow_id = format!("{prefix}wf");
    create_workflow(&pool, &workflow_id, &ws, &fan_out(8)).await;
    let _relay = spawn_weir(&prefix, &["run", "relay"]);
    let mut coordinator = spawn_weir(&prefix, &["run", "coordinator"]);

    let stop = CancellationToken::new();
    let seen = spawn_worker(
        &cfg,
        codec.clone(),
        producer.clone(),
        Arc::new(|_: &NodeReady| Some(true)),
        stop.clone(),
    );
    let runs: Vec<String> = (0..RUNS).map(|_| Uuid::now_v7().to_string()).collect();
    let requests: Vec<CompletionEvent> = runs
        .iter()
        .map(|r| run_requested(r, &workflow_id, &ws, None))
        .collect();
    weir_it::produce_in_order(&producer, &codec, &requests)
        .await
        .unwrap();

    // Kill it twice while runs are in flight.
    for target in [RUNS * 2, RUNS * 6] {
        wait_for(&seen, "progress", Duration::from_secs(120), |s| {
            s.ready.len() >= target
        })
        .await;
        coordinator.kill();
        tokio::time::sleep(Duration::from_millis(500)).await;
        coordinator = spawn_weir(&prefix, &["run", "coordinator"]);
    }
    wait_for(&seen, "every run to end", Duration::from_secs(180), |s| {
        s.ended() >= RUNS
    })
    .await;
    stop.cancel();

    let s = std::mem::take(&mut *seen.lock().unwrap());
    let dispatches = s.dispatches();
    assert_eq!(
        dispatches.len(),
        RUNS * 10,
        "every node of every run dispatched"
    );
    let twice: Vec<_> = dispatches.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(twice.is_empty(), "dispatched twice: {twice:?}");
    assert!(dispatches.keys().all(|(_, _, attempt)| *attempt == 1));
    let completed = s
        .runs
        .iter()
        .filter(|e| matches!(e, RunEvent::RunCompleted(_)))
        .map(|e| e.key().to_string())
        .collect::<HashSet<_>>();
    assert_eq!(completed.len(), RUNS);
    drop(s);
    let (done, nodes): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM weir_runs WHERE workflow_id = $1 AND status = 'completed'),
                (SELECT count(*) FROM weir_run_nodes n JOIN weir_runs r USING (run_id)
                 WHERE r.workflow_id = $1 AND n.status = 'succeeded' AND n.attempt = 1)",
    )
    .bind(&workflow_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((done, nodes), (RUNS as i64, RUNS as i64 * 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_and_a_deadline_fire_after_a_restart() {
    let _serial = SERIAL.lock().await;
    let prefix = format!("{}.", random_name("coord-timers"));
    let cfg = config(&prefix);
    let codec = prepare(&cfg).await.expect("prepare");
    let pool = weir_runtime::db::pool(&cfg.postgres).unwrap();
    let producer = weir_runtime::kafka::producer(&cfg.kafka).unwrap();
    let ws = format!("ws-{}", Uuid::now_v7().simple());
    let workflow_id = format!("{prefix}wf");
    let def = json!({
        "nodes": {
            "a": {"type": "http_request", "config": {}, "retry": {"max_attempts": 2, "backoff_ms": 3000}},
            "b": {"type": "agent", "config": {}, "deadline_ms": 8000, "retry": {"max_attempts": 2, "backoff_ms": 10}}
        },
        "edges": [{"from": "a", "to": "b"}]
    });
    create_workflow(&pool, &workflow_id, &ws, &def).await;
    let _relay = spawn_weir(&prefix, &["run", "relay"]);
    let mut coordinator = spawn_weir(&prefix, &["run", "coordinator"]);

    // a fails its first attempt; b never answers its first attempt (the deadline fires).
    let policy: Arc<Policy> = Arc::new(|r: &NodeReady| match (r.node_id.as_str(), r.attempt) {
        ("a", 1) => Some(false),
        ("b", 1) => None,
        _ => Some(true),
    });
    let stop = CancellationToken::new();
    let seen = spawn_worker(&cfg, codec.clone(), producer.clone(), policy, stop.clone());
    let run_id = Uuid::now_v7().to_string();
    produce(
        &producer,
        &codec,
        &run_requested(&run_id, &workflow_id, &ws, None),
    )
    .await
    .unwrap();

    // The retry of a is scheduled: kill the coordinator before it is due.
    wait_for(&seen, "a's retry", Duration::from_secs(60), |s| {
        s.runs
            .iter()
            .any(|e| matches!(e, RunEvent::NodeRetried(r) if r.node_id == "a"))
    })
    .await;
    coordinator.kill();
    let timers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM weir_run_timers WHERE run_id = $1 AND node_id = 'a' AND kind = 'retry' AND attempt = 2",
    )
    .bind(&run_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(timers, 1, "the retry timer is durable");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let restarted = Instant::now();
    coordinator = spawn_weir(&prefix, &["run", "coordinator"]);

    // b's first attempt is dispatched after the restart; kill before its deadline.
    wait_for(&seen, "b attempt 1", Duration::from_secs(60), |s| {
        s.ready
            .iter()
            .any(|(r, _)| r.node_id == "b" && r.attempt == 1)
    })
    .await;
    coordinator.kill();
    {
        let s = seen.lock().unwrap();
        let a2 = s
            .ready
            .iter()
            .find(|(r, _)| r.node_id == "a" && r.attempt == 2)
            .unwrap();
        assert!(a2.1 > restarted, "a's retry fired before the restart");
    }
    // Longer than b's deadline and than the group's session timeout (6 s): the restarted
    // coordinator finds the killed one's partitions free at once, so b's second attempt is
    // not left waiting for its completion behind a rebalance while its own deadline runs.
    tokio::time::sleep(Duration::from_millis(8500)).await;
    let restarted = Instant::now();
    let _coordinator = spawn_weir(&prefix, &["run", "coordinator"]);

    wait_for(&seen, "the run to complete", Duration::from_secs(60), |s| {
        s.runs
            .iter()
            .any(|e| matches!(e, RunEvent::RunCompleted(_)))
    })
    .await;
    stop.cancel();
    let s = std::mem::take(&mut *seen.lock().unwrap());
    let b2 = s
        .ready
        .iter()
        .find(|(r, _)| r.node_id == "b" && r.attempt == 2)
        .unwrap();
    assert!(b2.1 > restarted, "b's deadline fired before the restart");
    let b_retry = s
        .runs
        .iter()
        .find_map(|e| match e {
            RunEvent::NodeRetried(r) if r.node_id == "b" => Some(r.clone()),
            _ => None,
        })
        .expect("b retried after its deadline");
    assert!(
        b_retry.error.as_deref().unwrap_or("").contains("deadline"),
        "{b_retry:?}"
    );
    assert_eq!(b_retry.failed_attempt, 1);
    let dispatches = s.dispatches();
    assert_eq!(dispatches.len(), 4);
    assert!(dispatches.values().all(|ids| ids.len() == 1));
    drop(s);
    let status = weir_coordinator::run_status(&pool, &ws, run_id.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.status, "completed");
    assert!(status
        .nodes
        .iter()
        .all(|n| n.status == "succeeded" && n.attempt == 2));
}

/// A run whose timers fail with an error that only looks transient (XX000 from the database,
/// here raised by a trigger for that one run) must not stop the timers of every other run:
/// after `runtime.suspect_retries` failed ticks the loop applies runs one by one, drops the
/// due timers of the run that still fails, and the other run's deadline fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_timers_keep_failing_does_not_stop_the_others() {
    let _serial = SERIAL.lock().await;
    let prefix = format!("{}.", random_name("coord-suspect"));
    let cfg = config(&prefix);
    let codec = prepare(&cfg).await.expect("prepare");
    let pool = weir_runtime::db::pool(&cfg.postgres).unwrap();
    let producer = weir_runtime::kafka::producer(&cfg.kafka).unwrap();
    let ws = format!("ws-{}", Uuid::now_v7().simple());
    let workflow_id = format!("{prefix}wf");
    let def = json!({
        "nodes": {"a": {"type": "agent", "config": {}, "deadline_ms": 4000,
                        "retry": {"max_attempts": 2, "backoff_ms": 10}}},
        "edges": []
    });
    create_workflow(&pool, &workflow_id, &ws, &def).await;
    let (bad, good) = (Uuid::now_v7().to_string(), Uuid::now_v7().to_string());
    let _relay = spawn_weir(&prefix, &["run", "relay"]);
    let _coordinator = spawn_weir(&prefix, &["run", "coordinator"]);
    // Nobody answers a first attempt: both runs' deadlines come due.
    let policy: Arc<Policy> = Arc::new(|r: &NodeReady| (r.attempt > 1).then_some(true));
    let stop = CancellationToken::new();
    let seen = spawn_worker(&cfg, codec.clone(), producer.clone(), policy, stop.clone());
    for run_id in [&bad, &good] {
        produce(
            &producer,
            &codec,
            &run_requested(run_id, &workflow_id, &ws, None),
        )
        .await
        .unwrap();
    }
    // Once both first attempts are out, the bad run's row refuses every update (the deadline's
    // included), and only while the trigger exists.
    wait_for(&seen, "both first attempts", Duration::from_secs(60), |s| {
        [&bad, &good].iter().all(|id| {
            s.ready
                .iter()
                .any(|(r, _)| &&r.run_id == id && r.attempt == 1)
        })
    })
    .await;
    let trigger = format!("weir_it_suspect_{}", Uuid::now_v7().simple());
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'simulated internal error' USING ERRCODE = 'XX000'; END $$;
         CREATE TRIGGER {trigger} BEFORE UPDATE ON weir_runs FOR EACH ROW
           WHEN (OLD.run_id = '{bad}') EXECUTE FUNCTION {trigger}();"
    ))
    .execute(&pool)
    .await
    .expect("install the trigger");
    let result = tokio::time::timeout(
        Duration::from_secs(90),
        wait_for(
            &seen,
            "the good run to complete",
            Duration::from_secs(120),
            |s| {
                s.runs
                    .iter()
                    .any(|e| matches!(e, RunEvent::RunCompleted(c) if c.run_id == good))
            },
        ),
    )
    .await;
    // The good run may complete while the bad run's tick is still in its suspect retries
    // (runs are ticked one by one, and the good one can come first): the drop is waited for,
    // with the trigger still refusing every update.
    let drop_deadline = Instant::now() + Duration::from_secs(60);
    let timers = loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM weir_run_timers WHERE run_id = $1")
            .bind(&bad)
            .fetch_one(&pool)
            .await
            .unwrap();
        if n == 0 || Instant::now() > drop_deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    stop.cancel();
    let bad_status: String = sqlx::query_scalar("SELECT status FROM weir_runs WHERE run_id = $1")
        .bind(&bad)
        .fetch_one(&pool)
        .await
        .unwrap();
    sqlx::raw_sql(&format!(
        "DROP TRIGGER {trigger} ON weir_runs; DROP FUNCTION {trigger}();"
    ))
    .execute(&pool)
    .await
    .expect("drop the trigger");
    result.expect("the good run completed");
    assert_eq!(timers, 0, "the bad run's due timers were dropped");
    assert_eq!(bad_status, "running", "the bad run was left as it was");
    let s = seen.lock().unwrap();
    assert!(
        !s.ready
            .iter()
            .any(|(r, _)| r.run_id == bad && r.attempt == 2),
        "the bad run's deadline did not take effect"
    );
}
