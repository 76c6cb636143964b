//! Hostile input against the runtime and the coordinator, on the real stack: a poison record
//! costs itself (bisection, not one transaction per record), positions in Postgres win over
//! Kafka's committed offsets (a restored database re-applies), dead letters have a way out
//! (`weir dlq list | show | redrive`), and a run whose definition blob is gone fails alone
//! while the coordinator carries on. Each test also checks that the consumer is still running
//! and that a good record of another workspace sent right after applies within seconds.
//! Needs the local stack (`infra/local/up`), its environment (`infra/local/env`) and the
//! `weir` binary (`cargo build -p weir`).

use std::collections::HashSet;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use sqlx::{PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weir_it::{
    config, node_completed, prepare, produce, random_name, weir_bin, LedgerProcessor,
    EXPLODING_ATTEMPT,
};
use weir_runtime::codec::Codec;
use weir_runtime::dlq::{self, Filter};
use weir_runtime::error::RuntimeError;
use weir_runtime::events::{self, CompletionEvent, NodeCompleted, RunRequested};
use weir_runtime::{
    telemetry, ApplyError, BatchConsumer, Config, Outbox, Processor, Record, Rejection,
};

/// LedgerProcessor that counts its transactions (calls of `apply`, failed ones included) and
/// rejects the runs in `blocked` as invalid (a cause an operator can "fix").
struct Counting {
    inner: LedgerProcessor,
    calls: Arc<AtomicUsize>,
    blocked: Arc<Mutex<HashSet<String>>>,
}

impl Counting {
    fn new(group: &str) -> Self {
        Self {
            inner: LedgerProcessor {
                group: group.into(),
            },
            calls: Arc::default(),
            blocked: Arc::default(),
        }
    }
}

#[async_trait]
impl Processor for Counting {
    type Event = CompletionEvent;

    fn group(&self) -> String {
        self.inner.group.clone()
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        records: &[Record<CompletionEvent>],
        outbox: &mut Outbox<'_>,
    ) -> Result<Vec<Rejection>, ApplyError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let blocked = self.blocked.lock().unwrap().clone();
        let (mut keep, mut index_of, mut rejected) = (Vec::new(), Vec::new(), Vec::new());
        for (i, r) in records.iter().enumerate() {
            match &r.event {
                CompletionEvent::NodeCompleted(c) if blocked.contains(&c.run_id) => {
                    rejected.push(Rejection {
                        index: i,
                        reason: format!("run {} is blocked", c.run_id),
                    })
                }
                _ => {
                    keep.push(r.clone());
                    index_of.push(i);
                }
            }
        }
        for r in self.inner.apply(conn, &keep, outbox).await? {
            rejected.push(Rejection {
                index: index_of[r.index],
                reason: r.reason,
            });
        }
        Ok(rejected)
    }
}

fn start(
    cfg: &Arc<Config>,
    processor: Arc<Counting>,
    pool: &PgPool,
    codec: &Arc<Codec>,
) -> (CancellationToken, JoinHandle<Result<(), RuntimeError>>) {
    let shutdown = CancellationToken::new();
    let consumer = BatchConsumer::new(
        cfg.clone(),
        processor,
        pool.clone(),
        codec.clone(),
        weir_runtime::kafka::producer(&cfg.kafka).unwrap(),
        telemetry::Health::default(),
    );
    (shutdown.clone(), tokio::spawn(consumer.run(shutdown)))
}

async fn ledger(pool: &PgPool, group: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM it_ledger WHERE consumer_group = $1")
        .bind(group)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn ledger_of_run(pool: &PgPool, group: &str, run: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM it_ledger WHERE consumer_group = $1 AND run_id = $2")
        .bind(group)
        .bind(run)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn positions_sum(pool: &PgPool, group: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(next_offset), 0)::int8 FROM weir_consumer_positions WHERE consumer_group = $1",
    )
    .bind(group)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Polls `probe` until it returns at least `want` or `timeout` passes; returns the last value.
async fn wait_until<F, Fut>(want: i64, timeout: Duration, mut probe: F) -> i64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = i64>,
{
    let start = Instant::now();
    loop {
        let n = probe().await;
        if n >= want || start.elapsed() > timeout {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A NodeCompleted of another workspace.
fn other_workspace(run: &str) -> CompletionEvent {
    let mut e = node_completed(run, 1);
    if let CompletionEvent::NodeCompleted(c) = &mut e {
        c.workspace_id = "ws-other".into();
    }
    e
}

/// The processor is still running, and a good record of another workspace applies within
/// seconds.
async fn still_serving(
    pool: &PgPool,
    producer: &rdkafka::producer::FutureProducer,
    codec: &Codec,
    group: &str,
    task: &JoinHandle<Result<(), RuntimeError>>,
) {
    assert!(!task.is_finished(), "the consumer stopped");
    let run = format!("other-{}", uuid::Uuid::now_v7().simple());
    let sent = Instant::now();
    produce(producer, codec, &other_workspace(&run))
        .await
        .unwrap();
    let n = wait_until(1, Duration::from_secs(10), || {
        ledger_of_run(pool, group, &run)
    })
    .await;
    assert_eq!(n, 1, "another workspace's record did not apply within 10 s");
    eprintln!(
        "another workspace's record applied in {} ms",
        sent.elapsed().as_millis()
    );
    assert!(!task.is_finished(), "the consumer stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_record_costs_itself_not_its_batch() {
    const GOOD: usize = 600;
    let prefix = format!("{}.", random_name("bisect"));
    let group = random_name("group");
    let mut cfg = config(&prefix);
    // One partition and everything produced first: one big batch holds all the records.
    cfg.kafka
        .topic_partitions
        .insert("weir.completions.v1".into(), 1);
    cfg.runtime.max_batch = 2_000;
    cfg.runtime.max_wait_ms = 500;
    cfg.runtime.consumers = 1;
    let cfg = Arc::new(cfg);
    let codec = prepare(&cfg).await.expect("prepare");
    let pool = weir_runtime::db::pool(&cfg.postgres).unwrap();
    let producer = weir_runtime::kafka::producer(&cfg.kafka).unwrap();

    // 600 good records with two records in between that break the batch's transaction (a
    // CHECK violation: SQLSTATE 23514) and one the processor rejects.
    let mut events = Vec::new();
    for i in 0..GOOD {
        if i == 150 || i == 450 {
            events.push(node_completed(&format!("poison-{i}"), EXPLODING_ATTEMPT));
        }
        if i == 300 {
            events.push(node_completed("invalid", 0));
        }
        events.push(node_completed(
            &format!("run-{}", i % 40),
            1 + (i / 40) as i32,
        ));
    }
    weir_it::produce_in_order(&producer, &codec, &events)
        .await
        .unwrap();

    let processor = Arc::new(Counting::new(&group));
    let calls = processor.calls.clone();
    let (shutdown, task) = start(&cfg, processor, &pool, &codec);
    let total = events.len() as i64;
    let done = wait_until(total, Duration::from_secs(90), || {
        positions_sum(&pool, &group)
    })
    .await;
    assert_eq!(done, total, "the position did not reach the end");
    assert_eq!(
        ledger(&pool, &group).await,
        GOOD as i64,
        "every good record applied exactly once"
    );
    let ids: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT event_id) FROM it_ledger WHERE consumer_group = $1",
    )
    .bind(&group)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(ids, GOOD as i64, "a record was applied twice");
    let transactions = calls.load(Ordering::SeqCst);
    eprintln!("{total} records, 2 poison: {transactions} apply transactions");
    // One transaction per record would be 600+; bisection costs about 2·log2(n) per poison.
    assert!(
        transactions <= 60,
        "{transactions} transactions for 2 poison records in {total}: not bisected"
    );

    // The dead letters, read through `weir dlq`'s reader, carry the reason.
    let listing = dlq::read(
        &cfg,
        &codec,
        None,
        &Filter {
            group: Some(group.clone()),
            ..Filter::default()
        },
        &[],
        10_000,
        100,
    )
    .await
    .unwrap();
    let mut letters: Vec<(String, String)> = listing
        .entries
        .iter()
        .map(|e| (e.error_class.clone(), e.error_message.clone()))
        .collect();
    letters.sort();
    assert_eq!(letters.len(), 3, "{letters:?}");
    assert_eq!(letters[0].0, "apply");
    assert_eq!(letters[1].0, "apply");
    assert!(
        letters[0].1.contains("check constraint") || letters[0].1.contains("23514"),
        "the reason names the violation: {letters:?}"
    );
    assert_eq!(letters[2].0, "invalid");

    still_serving(&pool, &producer, &codec, &group, &task).await;
    shutdown.cancel();
    task.await.unwrap().expect("consumer ends cleanly");
}

/// Kafka's committed offsets of `group` on `topic`, summed.
fn kafka_committed(cfg: &Config, group: &str, topic: &str, partitions: i32) -> i64 {
    let c: BaseConsumer = weir_runtime::kafka::consumer_config(&cfg.kafka, group, 0)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    c.committed_offsets(tpl, Duration::from_secs(10))
        .unwrap()
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restored_behind_kafka_reapplies_what_it_lost() {
    const EVENTS: usize = 90;
    let prefix = format!("{}.", random_name("restore"));
    let group = random_name("group");
    let mut cfg = config(&prefix);
    cfg.runtime.consumers = 1;
    cfg.runtime.max_batch = 20;
    let cfg = Arc::new(cfg);
    let codec = prepare(&cfg).await.expect("prepare");
    let pool = weir_runtime::db::pool(&cfg.postgres).unwrap();
    let producer = weir_runtime::kafka::producer(&cfg.kafka).unwrap();
    let topic = codec.topic::<CompletionEvent>();

    let events: Vec<_> = (0..EVENTS)
        .map(|i| node_completed(&format!("run-{}", i % 9), 1 + (i / 9) as i32))
        .collect();
    weir_it::produce_in_order(&producer, &codec, &events)
        .await
        .unwrap();
    let (shutdown, task) = start(&cfg, Arc::new(Counting::new(&group)), &pool, &codec);
    let n = wait_until(EVENTS as i64, Duration::from_secs(60), || {
        ledger(&pool, &group)
    })
    .await;
    assert_eq!(n, EVENTS as i64);
    shutdown.cancel();
    task.await.unwrap().expect("consumer ends cleanly");
    // The clean stop committed Kafka's offsets: Kafka alone would resume at the end.
    assert_eq!(
        kafka_committed(&cfg, &group, &topic, cfg.kafka.partitions),
        EVENTS as i64,
        "Kafka's committed offsets are at the end"
    );

    // "Restore" the database to a moment before the last records of every partition: the
    // positions move back (the effects stay in the ledger, which counts applications).
    let lost: i64 = sqlx::query_scalar(
        "WITH b AS (SELECT partition, next_offset AS old FROM weir_consumer_positions WHERE consumer_group = $1),
              u AS (UPDATE weir_consumer_positions p SET next_offset = greatest(p.next_offset - 7, 0)
                    FROM b WHERE p.consumer_group = $1 AND p.partition = b.partition
                    RETURNING b.old - p.next_offset AS d)
         SELECT coalesce(sum(d), 0)::int8 FROM u",
    )
    .bind(&group)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(lost > 0);

    let processor = Arc::new(Counting::new(&group));
    let (shutdown, task) = start(&cfg, processor, &pool, &codec);
    let want = EVENTS as i64 + lost;
    let n = wait_until(want, Duration::from_secs(60), || ledger(&pool, &group)).await;
    assert_eq!(
        n, want,
        "the {lost} records the restore lost were not re-applied (Kafka's offsets won)"
    );
    assert_eq!(positions_sum(&pool, &group).await, EVENTS as i64);
    // Exactly those: nothing older came back.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        ledger(&pool, &group).await,
        want,
        "more than the lost records re-applied"
    );

    still_serving(&pool, &producer, &codec, &group, &task).await;
    shutdown.cancel();
    task.await.unwrap().expect("consumer ends cleanly");
}

fn weir(prefix: &str, args: &[&str]) -> Output {
    let out = Command::new(weir_bin())
        .args(args)
        .env("WEIR__KAFKA__TOPIC_PREFIX", prefix)
        .env("WEIR__KAFKA__PARTITIONS", "3")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run weir");
    eprintln!(
        "$ weir {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_shown_and_redriven_once() {
    let prefix = format!("{}.", random_name("redrive"));
    let group = random_name("group");
    let mut cfg = config(&prefix);
    cfg.runtime.consumers = 1;
    let cfg = Arc::new(cfg);
    let codec = prepare(&cfg).await.expect("prepare");
    let pool = weir_runtime::db::pool(&cfg.postgres).unwrap();
    let producer = weir_runtime::kafka::producer(&cfg.kafka).unwrap();
    let topic = codec.topic::<CompletionEvent>();

    let processor = Arc::new(Counting::new(&group));
    processor.blocked.lock().unwrap().insert("held".into());
    let blocked = processor.blocked.clone();
    let (shutdown, task) = start(&cfg, processor, &pool, &codec);
    let (_, source_offset) = produce(&producer, &codec, &node_completed("held", 3))
        .await
        .unwrap();
    produce(&producer, &codec, &node_completed("fine", 1))
        .await
        .unwrap();
    assert_eq!(
        wait_until(1, Duration::from_secs(60), || ledger_of_run(
            &pool, &group, "fine"
        ))
        .await,
        1
    );
    assert_eq!(ledger_of_run(&pool, &group, "held").await, 0);

    // list: the letter, its source coordinates and the reason.
    let out = weir(&prefix, &["dlq", "list", "--group", &group, "--json"]);
    assert!(out.status.success());
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let letter = &lines[0];
    assert_eq!(letter["source_topic"], json!(topic));
    assert_eq!(letter["source_offset"], json!(source_offset));
    assert_eq!(letter["consumer_group"], json!(group));
    assert_eq!(letter["error_class"], json!("invalid"));
    assert_eq!(letter["error_message"], json!("run held is blocked"));
    assert_eq!(letter["redriven_at"], Value::Null);
    let at = format!(
        "{}:{}",
        letter["at"]["partition"].as_i64().unwrap(),
        letter["at"]["offset"].as_i64().unwrap()
    );
    let table = weir(&prefix, &["dlq", "list", "--group", &group]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("run held is blocked"));

    // show: the original record.
    let out = weir(&prefix, &["dlq", "show", &at]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("reason      run held is blocked"), "{text}");
    assert!(text.contains("key         held"), "{text}");
    assert!(text.contains("schema id"), "{text}");

    // Fix the cause, redrive: it applies, once.
    blocked.lock().unwrap().clear();
    let out = weir(&prefix, &["dlq", "redrive", &at]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("redriven"));
    assert_eq!(
        wait_until(1, Duration::from_secs(30), || ledger_of_run(
            &pool, &group, "held"
        ))
        .await,
        1,
        "the redriven record did not apply"
    );
    // The redriven record names the dead letter it came from.
    let (redriven_partition, redriven_offset): (i32, i64) = sqlx::query_as(
        "SELECT target_partition, target_offset FROM weir_dlq_redrives WHERE dlq_topic = $1 || 'weir.dlq.v1'",
    )
    .bind(&prefix)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(redriven_offset > source_offset);
    let reader: BaseConsumer =
        weir_runtime::kafka::consumer_config(&cfg.kafka, &random_name("r"), 0)
            .create()
            .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, redriven_partition, Offset::Offset(redriven_offset))
        .unwrap();
    reader.assign(&tpl).unwrap();
    let msg = (0..40)
        .find_map(|_| reader.poll(Duration::from_millis(250)))
        .expect("the redriven record")
        .unwrap();
    let from = msg
        .headers()
        .and_then(|h| h.iter().find(|x| x.key == dlq::REDRIVE_HEADER))
        .and_then(|x| x.value)
        .map(|v| String::from_utf8_lossy(v).to_string());
    assert_eq!(
        from,
        Some(format!("{prefix}weir.dlq.v1/{}", at.replace(':', "/"))),
        "the redriven record names its dead letter"
    );
    assert_eq!(msg.key(), Some(&b"held"[..]), "the original key");

    // A second redrive is refused with a warning (exit 1), and nothing applies twice.
    let out = weir(&prefix, &["dlq", "redrive", &at]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already redriven"));
    let out = weir(&prefix, &["dlq", "list", "--group", &group, "--json"]);
    let listed: Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    assert!(listed["redriven_at"].is_string(), "{listed}");
    // Redrive needs a selection: no positions and no filter is refused.
    assert!(!weir(&prefix, &["dlq", "redrive"]).status.success());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(ledger_of_run(&pool, &group, "held").await, 1);

    still_serving(&pool, &producer, &codec, &group, &task).await;
    shutdown.cancel();
    task.await.unwrap().expect("consumer ends cleanly");
}

fn run_requested(ws: &str, run_id: &str, workflow_id: &str) -> CompletionEvent {
    CompletionEvent::RunRequested(RunRequested {
        inputs_json: Some(format!("{{\"run\":\"{run_id}\"}}")),
        ..weir_it::run_requested(ws, run_id, workflow_id)
    })
}

fn completed(ws: &str, run_id: &str, node: &str) -> CompletionEvent {
    CompletionEvent::NodeCompleted(NodeCompleted {
        event_id: events::new_event_id(),
        occurred_at: events::now_micros(),
        workspace_id: ws.into(),
        traceparent: String::new(),
        tracestate: None,
        run_id: run_id.into(),
        node_id: node.into(),
        attempt: 1,
        status: events::NodeStatus::Succeeded,
        output_json: Some("{\"ok\":true}".into()),
        output_ref: None,
        error: None,
        duration_ms: 1,
        worker_id: "it".into(),
        from_cache: false,
    })
}

/// Inserts a workflow head the way the materializer does, its definition inline or as a
/// CAS reference.
async fn head(pool: &PgPool, ws: &str, wf: &str, def: Option<&Value>, r: Option<&str>) {
    sqlx::query(
        "INSERT INTO weir_workflow_heads (workflow_id, workspace_id, version, definition, definition_ref, definition_sha256)
         VALUES ($1, $2, 1, $3, $4, repeat('0', 64))",
    )
    .bind(wf)
    .bind(ws)
    .bind(def)
    .bind(r)
    .execute(pool)
    .await
    .expect("insert head");
}

async fn run_state(pool: &PgPool, run: &str) -> Option<(String, Option<String>)> {
    sqlx::query_as("SELECT status, reason FROM weir_runs WHERE run_id = $1")
        .bind(run)
        .fetch_optional(pool)
        .await
        .unwrap()
}

async fn wait_run(pool: &PgPool, run: &str, status: &str) -> Option<(String, Option<String>)> {
    let start = Instant::now();
    loop {
        let s = run_state(pool, run).await;
        if s.as_ref().is_some_and(|(st, _)| st == status)
            || start.elapsed() > Duration::from_secs(30)
        {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn start_coordinator(
    cfg: &Arc<Config>,
    pool: &PgPool,
    codec: &Arc<Codec>,
    cas: &weir_runtime::cas::Cas,
) -> (CancellationToken, JoinHandle<Result<(), RuntimeError>>) {
    let shutdown = CancellationToken::new();
    let coordinator = weir_coordinator::Coordinator::new(
        cfg.clone(),
        cas.clone(),
        Arc::new(weir_wiring::PatchLogReplay::new(pool.clone(), cas.clone())),
    );
    let consumer = BatchConsumer::new(
        cfg.clone(),
        Arc::new(coordinator),
        pool.clone(),
        codec.clone(),
        weir_runtime::kafka::producer(&cfg.kafka).unwrap(),
        telemetry::Health::default(),
    );
    (shutdown.clone(), tokio::spawn(consumer.run(shutdown)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_definition_blob_fails_its_runs_not_the_coordinator() {
    let prefix = format!("{}.", random_name("blob"));
    let mut cfg = config(&prefix);
    cfg.runtime.consumers = 1;
    let cfg = Arc::new(cfg);
    let codec = prepare(&cfg).await.expect("prepare");
    let pool = weir_runtime::db::pool(&cfg.postgres).unwrap();
    let producer = weir_runtime::kafka::producer(&cfg.kafka).unwrap();
    let cas = weir_runtime::cas::Cas::from_config(&cfg)
        .await
        .expect("cas");
    let id = uuid::Uuid::now_v7().simple().to_string();
    let (bad_ws, good_ws) = (format!("ws-bad-{id}"), format!("ws-good-{id}"));
    let def = json!({"nodes": {"a": {"type": "function", "config": {"id": id}},
                               "b": {"type": "function", "config": {}}},
                     "edges": [{"from": "a", "to": "b"}], "settings": {"max_hops": 10}});

    // A workflow whose definition blob never existed, one whose blob will vanish after its
    // run started, and a good one in another workspace.
    let missing = weir_model::CasRef::of(format!("never stored {id}").as_bytes());
    head(&pool, &bad_ws, "gone", None, Some(&missing.to_string())).await;
    let stored = cas.put_json(&def).await.unwrap();
    head(&pool, &bad_ws, "vanishing", None, Some(&stored.to_string())).await;
    head(&pool, &good_ws, "fine", Some(&def), None).await;

    let (shutdown, task) = start_coordinator(&cfg, &pool, &codec, &cas);
    let (never, later) = (
        uuid::Uuid::now_v7().to_string(),
        uuid::Uuid::now_v7().to_string(),
    );
    produce(&producer, &codec, &run_requested(&bad_ws, &never, "gone"))
        .await
        .unwrap();
    produce(
        &producer,
        &codec,
        &run_requested(&bad_ws, &later, "vanishing"),
    )
    .await
    .unwrap();
    let (status, reason) = wait_run(&pool, &never, "failed").await.expect("run row");
    assert_eq!(status, "failed");
    assert!(
        reason.as_deref().unwrap_or("").contains("not found"),
        "the reason names the missing blob: {reason:?}"
    );
    assert_eq!(
        wait_run(&pool, &later, "running")
            .await
            .map(|s| s.0)
            .as_deref(),
        Some("running")
    );
    shutdown.cancel();
    task.await.unwrap().expect("coordinator ends cleanly");

    // The blob goes (damage, a bad restore); a fresh coordinator (no plan in memory) gets the
    // run's next completion.
    cas.delete(&stored).await.unwrap();
    let (shutdown, task) = start_coordinator(&cfg, &pool, &codec, &cas);
    produce(&producer, &codec, &completed(&bad_ws, &later, "a"))
        .await
        .unwrap();
    let (status, reason) = wait_run(&pool, &later, "failed").await.expect("run row");
    assert_eq!(status, "failed", "{reason:?}");
    assert!(
        reason.as_deref().unwrap_or("").contains("not found"),
        "the reason names the missing blob: {reason:?}"
    );
    let timers: i64 = sqlx::query_scalar("SELECT count(*) FROM weir_run_timers WHERE run_id = $1")
        .bind(&later)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(timers, 0, "a failed run keeps no timers");
    // Later completions of the failed run are ignored, not failed again.
    produce(&producer, &codec, &completed(&bad_ws, &later, "b"))
        .await
        .unwrap();

    // The coordinator still runs, and another workspace's run proceeds within seconds.
    assert!(!task.is_finished(), "the coordinator stopped");
    let good = uuid::Uuid::now_v7().to_string();
    let sent = Instant::now();
    produce(&producer, &codec, &run_requested(&good_ws, &good, "fine"))
        .await
        .unwrap();
    produce(&producer, &codec, &completed(&good_ws, &good, "a"))
        .await
        .unwrap();
    let dispatched = wait_until(1, Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM weir_run_nodes WHERE run_id = $1 AND node_id = 'b' AND status = 'running'",
        )
        .bind(&good)
        .fetch_one(&pool)
        .await
        .unwrap()
    })
    .await;
    assert_eq!(
        dispatched, 1,
        "another workspace's run did not proceed within 10 s"
    );
    eprintln!(
        "another workspace's run advanced in {} ms",
        sent.elapsed().as_millis()
    );
    assert_eq!(
        run_state(&pool, &later).await.map(|s| s.0).as_deref(),
        Some("failed")
    );
    let failed_events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM weir_runs WHERE run_id = ANY($1) AND status = 'failed'",
    )
    .bind(vec![never.clone(), later.clone()])
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(failed_events, 2);
    assert!(!task.is_finished(), "the coordinator stopped");
    shutdown.cancel();
    task.await.unwrap().expect("coordinator ends cleanly");
}
