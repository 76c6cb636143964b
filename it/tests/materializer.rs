//! The patch flow end to end on the real stack: PatchSubmitted → `weir run materializer`
//! (SIGKILLed several times) → Postgres heads and patch log → `weir run relay` (killed once)
//! → WorkflowMaterialized / PatchRejected on weir.workflows.v1.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::message::Message;
use serde_json::{json, Value};
use sqlx::PgPool;
use weir_it::{
    config, prepare, produce, produce_in_order, produce_raw, random_name, spawn_weir_run,
    ChildGuard,
};
use weir_materializer::processor::patch_submitted;
use weir_model::definition::{canonical_json_verbatim_numbers, Limits};
use weir_model::fold::{self, Decision, Head, Submitted};
use weir_model::patch::Patch;
use weir_runtime::codec::Codec;
use weir_runtime::events::{PatchSubmitted, WorkflowEvent};

fn spawn_weir(prefix: &str, what: &str) -> ChildGuard {
    let env = [
        ("WEIR__RUNTIME__MAX_BATCH", "200"),
        ("WEIR__KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "6000"),
    ];
    spawn_weir_run(prefix, what, &env)
}

fn create(seed: u64) -> Value {
    json!([{"op": "add", "path": "", "value": {
        "nodes": {"a": {"type": "function", "config": {"v": seed}}, "b": {"type": "pure", "config": {}}},
        "edges": [{"from": "a", "to": "b"}],
        "settings": {"max_hops": 10}}}])
}

/// A random patch over every op kind; some fail (a missing path, a failing test, a cycle,
/// moving into a child, an unknown node type).
fn random_ops(rng: &mut StdRng, i: usize) -> Value {
    let n = format!("n{}", rng.random_range(0..6));
    let m = format!("n{}", rng.random_range(0..6));
    match rng.random_range(0..12) {
        0 => {
            json!([{"op": "add", "path": format!("/nodes/{n}"), "value": {"type": "agent", "config": {"i": i}}}])
        }
        1 => {
            json!([{"op": "add", "path": format!("/nodes/{n}"), "value": {"type": "http_request", "config": {}}},
                    {"op": "add", "path": "/edges/-", "value": {"from": "a", "to": n}}])
        }
        2 => json!([{"op": "remove", "path": format!("/nodes/{n}")}]),
        3 => json!([{"op": "replace", "path": "/nodes/a/config/v", "value": i}]),
        4 => json!([{"op": "move", "from": "/nodes/b/config", "path": "/nodes/a/config"}]),
        5 => json!([{"op": "copy", "from": "/nodes/a", "path": format!("/nodes/{m}")}]),
        6 => json!([{"op": "test", "path": "/settings/max_hops", "value": 10},
                    {"op": "replace", "path": "/settings/max_hops", "value": 20}]),
        7 => json!([{"op": "test", "path": "/settings/max_hops", "value": 20},
                    {"op": "replace", "path": "/settings/max_hops", "value": 10}]),
        8 => json!([{"op": "add", "path": "/edges/-", "value": {"from": "b", "to": "a"}}]),
        9 => json!([{"op": "move", "from": "/nodes", "path": "/nodes/a/x"}]),
        10 => {
            json!([{"op": "add", "path": format!("/nodes/{n}"), "value": {"type": "teleport", "config": {}}}])
        }
        _ => json!([{"op": "remove", "path": "/edges/0"}]),
    }
}

async fn wait_decided(pool: &PgPool, topic: &str, n: i64, timeout: Duration) -> i64 {
    let start = Instant::now();
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM weir_workflow_patches WHERE source_topic = $1",
        )
        .bind(topic)
        .fetch_one(pool)
        .await
        .unwrap();
        if done >= n || start.elapsed() > timeout {
            return done;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads every WorkflowEvent of the prefix's workflows topic until `expected` distinct
/// events have been seen (or a timeout); returns them in topic order with duplicates.
async fn read_workflow_events(
    cfg: &weir_runtime::Config,
    codec: &Codec,
    expected: usize,
) -> Vec<WorkflowEvent> {
    let consumer = weir_it::reader(cfg, &[&codec.topic::<WorkflowEvent>()]);
    let mut out = Vec::new();
    let mut ids = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while ids.len() < expected && Instant::now() < deadline {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await {
            let e: WorkflowEvent = codec
                .decode(m.payload().unwrap())
                .await
                .expect("workflow event decodes");
            ids.insert(weir_runtime::events::TopicEvent::event_id(&e));
            out.push(e);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_patches_fold_exactly_once_through_crashes() {
    const WORKFLOWS: usize = 100;
    const PATCHES: usize = 10_000;
    let prefix = format!("{}.", random_name("mat"));
    let cfg = config(&prefix);
    let codec = prepare(&cfg).await.expect("prepare");
    let pool = weir_runtime::db::pool(&cfg.postgres).unwrap();
    let producer = weir_runtime::kafka::producer(&cfg.kafka).unwrap();
    let topic = codec.topic::<PatchSubmitted>();
    let mut rng = StdRng::seed_from_u64(0x5eed);

    // The stream, and the expected outcome folded here, in the test process.
    let limits = Limits::default();
    let mut heads: BTreeMap<String, Head> = BTreeMap::new();
    let mut expected_versions: HashMap<String, Vec<i64>> = HashMap::new();
    let mut rejected = 0usize;
    let mut stream = Vec::with_capacity(PATCHES);
    for i in 0..PATCHES {
        let w = if i < WORKFLOWS {
            i
        } else {
            rng.random_range(0..WORKFLOWS)
        };
        let workflow_id = format!("{prefix}wf-{w}");
        let ops = if i < WORKFLOWS {
            create(w as u64)
        } else {
            random_ops(&mut rng, i)
        };
        let head = heads
            .entry(workflow_id.clone())
            .or_insert_with(|| Head::empty("ws-it"));
        let decision = fold::step(
            head,
            &Submitted {
                workspace_id: "ws-it".into(),
                base_version: None,
                operations: Patch::from_value(&ops),
            },
            &limits,
        );
        match decision {
            Decision::Applied { version, .. } => expected_versions
                .entry(workflow_id.clone())
                .or_default()
                .push(version),
            Decision::Rejected { .. } => rejected += 1,
        }
        stream.push(patch_submitted(&workflow_id, "ws-it", "it", None, &ops));
    }
    assert!(
        rejected > 500 && rejected < PATCHES / 2,
        "the stream has a useful mix of failures ({rejected})"
    );
    let applied_total: usize = expected_versions.values().map(Vec::len).sum();

    // Produce in the background while the materializer runs and is killed.
    let producing = {
        let (producer, codec) = (producer.clone(), codec.clone());
        tokio::spawn(async move {
            // In chunks, so the materializer runs (and is killed) while patches arrive.
            for chunk in stream.chunks(500) {
                produce_in_order(&producer, &codec, chunk).await.unwrap();
            }
        })
    };
    let mut relay = spawn_weir(&prefix, "relay");
    let mut materializer = spawn_weir(&prefix, "materializer");
    for (kill_at, kill_relay) in [(1_500, false), (4_000, true), (7_000, false)] {
        let done = wait_decided(&pool, &topic, kill_at, Duration::from_secs(180)).await;
        assert!(done >= kill_at, "stuck at {done} decided patches");
        materializer.kill();
        materializer = spawn_weir(&prefix, "materializer");
        if kill_relay {
            relay.kill();
            relay = spawn_weir(&prefix, "relay");
        }
    }
    producing.await.unwrap();
    let done = wait_decided(&pool, &topic, PATCHES as i64, Duration::from_secs(300)).await;
    assert_eq!(done, PATCHES as i64, "every patch decided exactly once");

    // Heads equal the independent fold.
    let stored: Vec<(String, i64, Value)> = sqlx::query_as(
        "SELECT workflow_id, version, definition FROM weir_workflow_heads WHERE workflow_id LIKE $1",
    )
    .bind(format!("{prefix}%"))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(stored.len(), WORKFLOWS);
    for (id, version, definition) in &stored {
        let want = &heads[id];
        assert_eq!(*version, want.version, "{id} version");
        assert_eq!(
            canonical_json_verbatim_numbers(definition),
            canonical_json_verbatim_numbers(&want.definition),
            "{id} definition"
        );
    }
    // Versions in the log are contiguous per workflow, and so is the applied count.
    let gaps: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT version - lag(version) OVER (PARTITION BY workflow_id ORDER BY version) AS step
         FROM weir_workflow_patches WHERE source_topic = $1 AND status = 'applied') t WHERE step <> 1",
    )
    .bind(&topic)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(gaps, 0, "versions are contiguous");

    // Every version reached analytics once (after dedupe by event id), in order.
    let events = read_workflow_events(&cfg, &codec, PATCHES).await;
    let mut seen = HashSet::new();
    let mut versions: HashMap<String, Vec<i64>> = HashMap::new();
    let mut rejections = 0;
    for e in &events {
        if !seen.insert(weir_runtime::events::TopicEvent::event_id(e)) {
            continue; // a relay was killed: at least once, deduplicated by event id
        }
        match e {
            WorkflowEvent::WorkflowMaterialized(m) => versions
                .entry(m.workflow_id.clone())
                .or_default()
                .push(m.version),
            WorkflowEvent::PatchRejected(_) => rejections += 1,
        }
    }
    assert_eq!(rejections, rejected, "one PatchRejected per rejected patch");
    assert_eq!(
        versions.values().map(Vec::len).sum::<usize>(),
        applied_total
    );
    assert_eq!(
        versions, expected_versions,
        "WorkflowMaterialized once per version, in order"
    );

    // Replay agrees with the stored heads.
    let cas = weir_runtime::cas::Cas::from_config(&cfg).await.unwrap();
    for (id, ..) in stored.iter().take(5) {
        let report = weir_materializer::replay::replay(&pool, &cas, "ws-it", id, None, &limits)
            .await
            .unwrap();
        assert!(
            report.differences.is_empty(),
            "{id}: {:?}",
            report.differences
        );
    }

    materializer.kill();
    relay.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_are_rejected_and_poison_is_dead_lettered() {
    let prefix = format!("{}.", random_name("matrej"));
    let cfg = config(&prefix);
    let codec = prepare(&cfg).await.expect("prepare");
    let pool = weir_runtime::db::pool(&cfg.postgres).unwrap();
    let producer = weir_runtime::kafka::producer(&cfg.kafka).unwrap();
    let topic = codec.topic::<PatchSubmitted>();
    let wf = format!("{prefix}wf");
    let patch = |base: Option<i64>, ops: Value| patch_submitted(&wf, "ws-it", "it", base, &ops);
    let first = patch(Some(0), create(1));
    produce(&producer, &codec, &first).await.unwrap();
    produce_raw(&producer, &topic, &wf, b"not avro")
        .await
        .unwrap();
    let conflicting = patch(Some(7), json!([{"op": "remove", "path": "/nodes/b"}]));
    produce(&producer, &codec, &conflicting).await.unwrap();
    produce(&producer, &codec, &first).await.unwrap(); // the same patch id again: ignored
    let second = patch(
        Some(1),
        json!([{"op": "replace", "path": "/settings/max_hops", "value": 3}]),
    );
    produce(&producer, &codec, &second).await.unwrap();

    let mut materializer = spawn_weir(&prefix, "materializer");
    let mut relay = spawn_weir(&prefix, "relay");
    assert_eq!(
        wait_decided(&pool, &topic, 3, Duration::from_secs(60)).await,
        3
    );
    let (version, hops): (i64, Value) = sqlx::query_as(
        "SELECT version, definition->'settings'->'max_hops' FROM weir_workflow_heads WHERE workflow_id = $1",
    )
    .bind(&wf)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((version, hops), (2, json!(3)));
    let (status, code, head): (String, Option<String>, i64) = sqlx::query_as(
        "SELECT status, reason_code, head_version FROM weir_workflow_patches WHERE patch_id = $1",
    )
    .bind(conflicting.patch_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), code.as_deref(), head),
        ("rejected", Some("version_conflict"), 1)
    );

    let events = read_workflow_events(&cfg, &codec, 3).await;
    let rejected: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            WorkflowEvent::PatchRejected(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].patch_id, conflicting.patch_id);
    assert_eq!(rejected[0].reason_code, "version_conflict");
    assert_eq!(rejected[0].base_version, Some(7));
    let dead: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM weir_consumer_positions WHERE topic = $1 AND next_offset = 5",
    )
    .bind(&topic)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        dead, 1,
        "the poison record was passed (dead-lettered), not retried forever"
    );
    materializer.kill();
    relay.kill();
}
