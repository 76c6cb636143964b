//! The coordinator's SQL on its own, against the real Postgres: hand-made batches go through
//! `Coordinator::load`, the pure `step` and `Coordinator::write`, and the tests assert what
//! loading returns and what writing leaves in the tables and the outbox. Everything runs in a
//! private schema (`weir_runtime::db::PrivateSchema`) holding copies of the tables involved,
//! so nothing else on the database (a relay, a timer loop, another test) sees these rows.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{json, Value};
use sqlx::types::chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use weir_coordinator::machine::{Env, Input, NodeRt, Phase};
use weir_coordinator::processor::{step, Advanced, Item};
use weir_coordinator::Coordinator;
use weir_it::{config, prepare, random_name, run_requested};
use weir_runtime::codec::Codec;
use weir_runtime::db::PrivateSchema;
use weir_runtime::events::{CompletionEvent, NodeReady, RunEvent, TopicEvent};
use weir_runtime::Outbox;

/// The tables the coordinator reads and writes in a batch.
const TABLES: &[&str] = &[
    "weir_runs",
    "weir_run_nodes",
    "weir_run_timers",
    "weir_coordinator_definitions",
    "weir_workflow_heads",
    "weir_outbox",
];

struct Setup {
    codec: Arc<Codec>,
    private: PrivateSchema,
    coordinator: Coordinator,
    topic: String,
    /// A workspace and a suffix of this test's own.
    ws: String,
    id: String,
}

async fn setup(label: &str) -> Setup {
    let prefix = format!("{}.", random_name("csql"));
    let cfg = Arc::new(config(&prefix));
    let codec = prepare(&cfg).await.expect("prepare");
    let private = PrivateSchema::create(&cfg.postgres, label, TABLES)
        .await
        .expect("private schema");
    let cas = weir_runtime::cas::Cas::from_config(&cfg)
        .await
        .expect("cas");
    let history = weir_wiring::PatchLogReplay::new(private.pool().clone(), cas.clone());
    let coordinator = Coordinator::new(cfg.clone(), cas, Arc::new(history));
    let id = uuid::Uuid::now_v7().simple().to_string();
    Setup {
        codec,
        topic: cfg.kafka.topic(CompletionEvent::TOPIC),
        private,
        coordinator,
        ws: format!("ws-sql-{id}"),
        id,
    }
}

impl Setup {
    fn pool(&self) -> &PgPool {
        self.private.pool()
    }

    /// Loads, steps and writes `groups` in one transaction, committed; returns what load
    /// returned (checked by `check_loaded` before stepping), the stats and the outbox events.
    async fn batch(
        &self,
        groups: Vec<(String, Vec<Item>)>,
        check_loaded: impl FnOnce(&weir_coordinator::processor::Loaded),
    ) -> (Advanced, Vec<String>) {
        let mut tx = self.pool().begin().await.unwrap();
        let loaded = self.coordinator.load(&mut tx, groups).await.expect("load");
        check_loaded(&loaded);
        // No jitter: a retry is due after its full backoff.
        let mut jitter = |n: u64| n;
        let mut env = Env {
            now_ms: Utc::now().timestamp_millis(),
            max_backoff_ms: 300_000,
            jitter: &mut jitter,
        };
        let stepped = step::step(loaded, &mut env);
        let mut outbox = Outbox::new(&self.codec, 4);
        let mut stats = Advanced::default();
        self.coordinator
            .write(&mut tx, stepped, &mut outbox, &mut stats)
            .await
            .expect("write");
        outbox.flush(&mut tx).await.unwrap();
        let events = take_outbox(&mut tx, &self.codec).await;
        tx.commit().await.unwrap();
        (stats, events)
    }

    /// A workflow head in this test's workspace.
    async fn head(&self, workflow_id: &str, definition: Option<&Value>, r: Option<&str>) {
        sqlx::query(
            "INSERT INTO weir_workflow_heads (workflow_id, workspace_id, version, definition,
                                              definition_ref, definition_sha256)
             VALUES ($1, $2, 1, $3, $4, $5)",
        )
        .bind(workflow_id)
        .bind(&self.ws)
        .bind(definition)
        .bind(r)
        .bind("0".repeat(64))
        .execute(self.pool())
        .await
        .unwrap();
    }
}

/// The outbox rows in push order, as "Kind run_id details"; deletes them.
async fn take_outbox(conn: &mut PgConnection, codec: &Codec) -> Vec<String> {
    let rows: Vec<(String, Vec<u8>)> =
        sqlx::query_as("DELETE FROM weir_outbox RETURNING id, topic, payload")
            .fetch_all(&mut *conn)
            .await
            .unwrap()
            .into_iter()
            .map(|(id, topic, payload): (i64, String, Vec<u8>)| (id, (topic, payload)))
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_values()
            .collect();
    let mut events = Vec::new();
    for (topic, payload) in rows {
        let line = if topic == codec.topic::<NodeReady>() {
            let e: NodeReady = codec.decode(&payload).await.unwrap();
            format!(
                "NodeReady {} {} attempt={} hop={} deadline={}",
                e.run_id,
                e.node_id,
                e.attempt,
                e.hop,
                e.deadline_at.is_some()
            )
        } else {
            match codec.decode::<RunEvent>(&payload).await.unwrap() {
                RunEvent::RunStarted(e) => format!("RunStarted {} v{}", e.run_id, e.version),
                RunEvent::RunFailed(e) => {
                    format!("RunFailed {} v{} {}", e.run_id, e.version, e.reason)
                }
                RunEvent::NodeRetried(e) => format!(
                    "NodeRetried {} {} {}->{} {:?}",
                    e.run_id, e.node_id, e.failed_attempt, e.next_attempt, e.error
                ),
                other => format!("{other:?}"),
            }
        };
        events.push(line);
    }
    events
}

fn requested(s: &Setup, run_id: &str, workflow_id: &str, key: Option<&str>) -> Item {
    let mut req = run_requested(&s.ws, run_id, workflow_id);
    req.idempotency_key = key.map(str::to_string);
    Item::Requested(Box::new(req))
}

fn completed(ws: &str, node_id: &str, attempt: i32, error: Option<&str>) -> Item {
    Item::Input {
        input: Input::Completed {
            node_id: node_id.into(),
            attempt,
            succeeded: error.is_none(),
            output_json: error.is_none().then(|| "{\"ok\":true}".to_string()),
            output_ref: None,
            error: error.map(str::to_string),
            from_cache: false,
        },
        workspace_id: Some(ws.into()),
        at_us: weir_runtime::events::now_micros(),
        duration_ms: 7,
        traceparent: String::new(),
    }
}

fn cancel(ws: &str) -> Item {
    Item::Input {
        input: Input::Cancel { reason: None },
        workspace_id: Some(ws.into()),
        at_us: weir_runtime::events::now_micros(),
        duration_ms: 0,
        traceparent: String::new(),
    }
}

/// a → b; a is retried once after 1 s and has a one-minute deadline.
fn two_nodes() -> Value {
    json!({"nodes": {"a": {"type": "function", "config": {"k": 1},
                           "retry": {"max_attempts": 2, "backoff_ms": 1000}, "deadline_ms": 60000},
                     "b": {"type": "function", "config": {}}},
           "edges": [{"from": "a", "to": "b"}], "settings": {"max_hops": 10}})
}

type RunRow = (
    String,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<DateTime<Utc>>,
    String,
    DateTime<Utc>,
);

async fn run_row(pool: &PgPool, run_id: &str) -> Option<RunRow> {
    sqlx::query_as(
        "SELECT status, version, reason, idempotency_key, finished_at, completions_topic,
                last_progress_at
         FROM weir_runs WHERE run_id = $1",
    )
    .bind(run_id)
    .fetch_optional(pool)
    .await
    .unwrap()
}

async fn node_rows(pool: &PgPool, run_id: &str) -> Vec<(String, String, i32, i32, Option<String>)> {
    sqlx::query_as(
        "SELECT node_id, status, attempt, hop, error FROM weir_run_nodes WHERE run_id = $1
         ORDER BY node_id",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn timer_rows(pool: &PgPool, run_id: &str) -> Vec<(String, String, i32, DateTime<Utc>)> {
    sqlx::query_as(
        "SELECT node_id, kind, attempt, due_at FROM weir_run_timers WHERE run_id = $1
         ORDER BY node_id, kind",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_and_write_a_new_batch_then_its_stored_runs() {
    let s = setup("coordinator_sql_new").await;
    let (ws, id) = (s.ws.clone(), s.id.clone());
    let wf = format!("wf-{id}");
    s.head(&wf, Some(&two_nodes()), None).await;
    let [r1, r2, r3, r4] = ["r1", "r2", "r3", "r4"].map(|r| format!("{r}-{id}"));
    let key = format!("key-{id}");

    // Batch 1: a run that starts, one of a workflow the workspace does not have (with a
    // cancel behind it), one reusing the first one's idempotency key, and a completion for a
    // run nobody requested.
    let groups = vec![
        (r1.clone(), vec![requested(&s, &r1, &wf, Some(&key))]),
        (
            r2.clone(),
            vec![
                requested(&s, &r2, &format!("missing-{id}"), None),
                cancel(&ws),
            ],
        ),
        (r3.clone(), vec![requested(&s, &r3, &wf, Some(&key))]),
        (r4.clone(), vec![completed(&ws, "a", 1, None)]),
    ];
    let before = Utc::now();
    let (stats, events) = s
        .batch(groups, |l| {
            assert!(l.stored.is_empty(), "nothing is stored yet");
            let pin = &l.pinned[&r1];
            assert_eq!(pin.version, 1, "no version asked: the head's");
            assert_eq!(pin.plan.ids, ["a", "b"]);
            assert_eq!(l.pinned.len(), 1);
            assert_eq!(l.failed_starts.len(), 1);
            assert_eq!(l.failed_starts[0].req.run_id, r2);
            assert_eq!(
                l.failed_starts[0].reason,
                format!("workflow missing-{id} not found in workspace {ws}")
            );
            assert_eq!(l.duplicates, HashSet::from([r3.clone()]));
            assert_eq!(l.ignored.get("unknown_run"), 1);
            assert_eq!(l.ignored.get("duplicate_request"), 1);
            let r4_items = l.groups.iter().find(|(r, _)| *r == r4).map(|g| g.1.len());
            assert_eq!(r4_items, Some(0), "an unknown run's items are dropped");
        })
        .await;
    assert_eq!(
        (stats.started, stats.dispatched, stats.ended, stats.ignored),
        (1, 1, 1, 3),
        "{stats:?}"
    );
    assert_eq!(
        events,
        [
            format!("RunFailed {r2} v0 workflow missing-{id} not found in workspace {ws}"),
            format!("RunStarted {r1} v1"),
            format!("NodeReady {r1} a attempt=1 hop=1 deadline=true"),
        ]
    );
    let pool = s.pool();
    let (status, version, reason, k, finished, topic, _) = run_row(pool, &r1).await.unwrap();
    assert_eq!(
        (status.as_str(), version, reason, k.as_deref(), finished),
        ("running", Some(1), None, Some(key.as_str()), None)
    );
    assert_eq!(
        topic, s.topic,
        "a run records the completions topic it came from"
    );
    let (status, version, reason, _, finished, ..) = run_row(pool, &r2).await.unwrap();
    assert_eq!((status.as_str(), version), ("failed", None));
    assert!(reason.unwrap().starts_with("workflow missing-"));
    assert!(finished.is_some(), "a failed start is finished");
    assert!(
        run_row(pool, &r3).await.is_none(),
        "the duplicate is dropped"
    );
    assert!(run_row(pool, &r4).await.is_none());
    assert_eq!(
        node_rows(pool, &r1).await,
        [("a".to_string(), "running".to_string(), 1, 1, None)],
        "only the dispatched root has a row"
    );
    let timers = timer_rows(pool, &r1).await;
    assert_eq!(timers.len(), 1, "{timers:?}");
    assert_eq!(
        (timers[0].0.as_str(), timers[0].1.as_str(), timers[0].2),
        ("a", "deadline", 1)
    );
    let due_in = timers[0].3 - before;
    assert!(
        (59..=61).contains(&due_in.num_seconds()),
        "deadline one minute out: {due_in:?}"
    );
    let pinned: (String, Option<Value>) = sqlx::query_as(
        "SELECT workspace_id, definition FROM weir_coordinator_definitions
         WHERE workflow_id = $1 AND version = 1",
    )
    .bind(&wf)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        pinned,
        (ws.clone(), Some(two_nodes())),
        "the head is snapshotted"
    );

    // Batch 2: the stored runs. A completion from another workspace changes nothing, the
    // root's failure schedules its retry; the run that failed at start takes nothing.
    let progress_before = run_row(pool, &r1).await.unwrap().6;
    let groups = vec![
        (
            r1.clone(),
            vec![
                completed("another-ws", "a", 1, None),
                completed(&ws, "a", 1, Some("boom")),
            ],
        ),
        (r2.clone(), vec![cancel(&ws)]),
    ];
    let before = Utc::now();
    let (stats, events) = s
        .batch(groups, |l| {
            assert_eq!(l.stored.len(), 2);
            let run = &l.stored[&r1];
            assert_eq!(
                (run.status.as_str(), run.version, run.workspace_id.as_str()),
                ("running", Some(1), ws.as_str())
            );
            assert_eq!(l.stored[&r2].version, None);
            let nodes = &l.nodes[&r1];
            assert_eq!(nodes.len(), 1);
            let (node_id, n): &(String, NodeRt) = &nodes[0];
            assert_eq!(
                (node_id.as_str(), n.phase, n.attempt, n.hop, n.dirty),
                ("a", Phase::Running, 1, 1, false)
            );
            assert!(!l.nodes.contains_key(&r2));
            assert!(l.plans.contains_key(&(ws.clone(), wf.clone(), 1)));
            assert!(l.broken.is_empty() && l.pinned.is_empty() && l.failed_starts.is_empty());
        })
        .await;
    assert_eq!(
        (stats.started, stats.dispatched, stats.ended, stats.ignored),
        (0, 0, 0, 2),
        "foreign_workspace and run_finished: {stats:?}"
    );
    assert_eq!(events, [format!("NodeRetried {r1} a 1->2 Some(\"boom\")")]);
    assert_eq!(
        node_rows(pool, &r1).await,
        [(
            "a".to_string(),
            "retry_wait".to_string(),
            1,
            1,
            Some("boom".to_string())
        )]
    );
    let timers = timer_rows(pool, &r1).await;
    let kinds: Vec<(&str, i32)> = timers.iter().map(|t| (t.1.as_str(), t.2)).collect();
    assert_eq!(
        kinds,
        [("deadline", 1), ("retry", 2)],
        "timers are never cancelled; the retry is added"
    );
    let retry_in = timers[1].3 - before;
    assert!(
        (900..=2_000).contains(&retry_in.num_milliseconds()),
        "retry after the full backoff: {retry_in:?}"
    );
    let progress_after = run_row(pool, &r1).await.unwrap().6;
    assert!(
        progress_after > progress_before,
        "an ended attempt is progress"
    );

    s.private.drop_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_definition_that_cannot_be_had_fails_its_runs_not_the_batch() {
    let s = setup("coordinator_sql_broken").await;
    let (ws, id) = (s.ws.clone(), s.id.clone());
    let pool = s.pool();
    // A stored running run whose pinned snapshot is a blob that does not exist, with a timer.
    let (lost_wf, cyclic_wf) = (format!("lost-{id}"), format!("cyclic-{id}"));
    let missing = weir_model::CasRef::of(format!("never stored {id}").as_bytes());
    let [r5, r6] = ["r5", "r6"].map(|r| format!("{r}-{id}"));
    sqlx::query(
        "INSERT INTO weir_coordinator_definitions (workflow_id, version, workspace_id, definition_ref)
         VALUES ($1, 1, $2, $3)",
    )
    .bind(&lost_wf)
    .bind(&ws)
    .bind(missing.to_string())
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO weir_runs (run_id, workspace_id, workflow_id, version, requester, permission,
                                status, completions_topic)
         VALUES ($1, $2, $3, 1, 'it', 'write', 'running', $4)",
    )
    .bind(&r5)
    .bind(&ws)
    .bind(&lost_wf)
    .bind(&s.topic)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO weir_run_timers (run_id, node_id, kind, attempt, due_at)
         VALUES ($1, 'a', 'retry', 2, now() + interval '1 hour')",
    )
    .bind(&r5)
    .execute(pool)
    .await
    .unwrap();
    // A head whose definition is not a DAG: a new run of it cannot start.
    let cyclic = json!({"nodes": {"a": {"type": "function", "config": {}},
                                  "b": {"type": "function", "config": {}}},
                        "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "a"}]});
    s.head(&cyclic_wf, Some(&cyclic), None).await;

    let groups = vec![
        (r5.clone(), vec![cancel(&ws)]),
        (r6.clone(), vec![requested(&s, &r6, &cyclic_wf, None)]),
    ];
    let (stats, events) = s
        .batch(groups, |l| {
            let why = &l.broken[&(ws.clone(), lost_wf.clone(), 1)];
            assert_eq!(
                why,
                &format!("definition unavailable: CAS blob {missing} not found")
            );
            assert!(l.plans.is_empty());
            assert_eq!(l.stored[&r5].status, "running");
            assert_eq!(l.failed_starts.len(), 1);
            assert!(
                l.failed_starts[0]
                    .reason
                    .starts_with(&format!("workflow {cyclic_wf} version 1 is invalid: ")),
                "{}",
                l.failed_starts[0].reason
            );
        })
        .await;
    assert_eq!(
        (stats.started, stats.dispatched, stats.ended),
        (0, 0, 2),
        "{stats:?}"
    );
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(
        events[0],
        format!("RunFailed {r5} v1 definition unavailable: CAS blob {missing} not found"),
        "the stored run fails first, with the blob named"
    );
    assert!(events[1].starts_with(&format!("RunFailed {r6} v0 workflow {cyclic_wf}")));
    let (status, _, reason, _, finished, ..) = run_row(pool, &r5).await.unwrap();
    assert_eq!(status, "failed");
    assert_eq!(
        reason.as_deref(),
        Some(format!("definition unavailable: CAS blob {missing} not found").as_str())
    );
    assert!(finished.is_some());
    assert!(
        timer_rows(pool, &r5).await.is_empty(),
        "its timers are dropped"
    );
    let (status, version, ..) = run_row(pool, &r6).await.unwrap();
    assert_eq!((status.as_str(), version), ("failed", None));
    let snapshots: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM weir_coordinator_definitions WHERE workflow_id = $1",
    )
    .bind(&cyclic_wf)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        snapshots, 1,
        "the head is snapshotted even though it does not compile"
    );

    s.private.drop_all().await.unwrap();
}
