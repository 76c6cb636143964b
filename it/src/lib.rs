//! Support for weir's integration tests, which run against the real local stack
//! (`infra/local/up`): configuration with a random topic prefix per test, a producer that
//! speaks the Confluent wire format, and `LedgerProcessor`, a processor that records every
//! record it applies so a test can count exactly-once effects. [`gateway`] runs the HTTP
//! gateway in the test's process, with the processors a test asks for.
//!
//! The ledger table deliberately has no unique constraint: a record applied twice shows up
//! twice, so the exactly-once assertions can fail.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::PgConnection;
use weir_runtime::codec::Codec;
use weir_runtime::config::Config;
use weir_runtime::events::{CompletionEvent, NodeCompleted, NodeStatus, RunRequested, TopicEvent};
use weir_runtime::{ApplyError, Outbox, Processor, Record, Rejection};

pub mod gateway;

/// Attempts above this violate the ledger's CHECK constraint: a data error inside the batch
/// transaction, which the runtime must isolate and dead-letter.
pub const EXPLODING_ATTEMPT: i32 = 5_000;

/// Configuration for a test: the stack from the environment (`infra/local/env`), topics
/// under `prefix`.
pub fn config(prefix: &str) -> Config {
    let mut env: Vec<(String, String)> = std::env::vars().collect();
    env.push(("WEIR__KAFKA__TOPIC_PREFIX".into(), prefix.into()));
    env.push(("WEIR__KAFKA__PARTITIONS".into(), "3".into()));
    Config::load_from(None, env).expect("test configuration")
}

/// A random lowercase name, for topics prefixes and groups.
pub fn random_name(kind: &str) -> String {
    format!("it-{kind}-{}", uuid::Uuid::now_v7().simple())
}

/// A consumer of `topics` from their first record, in a group of its own (nothing it reads
/// is taken from another reader): how a test reads what weir produced.
pub fn reader(cfg: &Config, topics: &[&str]) -> rdkafka::consumer::StreamConsumer {
    use rdkafka::consumer::Consumer as _;
    let consumer: rdkafka::consumer::StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.bootstrap_servers)
        .set("group.id", random_name("reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("reader consumer");
    consumer.subscribe(topics).expect("subscribe");
    consumer
}

/// Creates the ledger table (idempotent).
pub async fn create_ledger(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    // CREATE TABLE IF NOT EXISTS races with itself across sessions (tests run in parallel).
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(7250001)")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS it_ledger (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            consumer_group text NOT NULL,
            topic text NOT NULL,
            partition int NOT NULL,
            record_offset bigint NOT NULL,
            event_id uuid NOT NULL,
            run_id text NOT NULL,
            attempt int NOT NULL CHECK (attempt < 5000)
        )",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Records every NodeCompleted it applies in `it_ledger`; rejects attempts below 1 as invalid.
pub struct LedgerProcessor {
    /// Consumer group.
    pub group: String,
}

#[async_trait]
impl Processor for LedgerProcessor {
    type Event = CompletionEvent;

    fn group(&self) -> String {
        self.group.clone()
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        records: &[Record<CompletionEvent>],
        _outbox: &mut Outbox<'_>,
    ) -> Result<Vec<Rejection>, ApplyError> {
        let mut rejected = Vec::new();
        let (mut topics, mut partitions, mut offsets, mut ids, mut runs, mut attempts) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for (index, r) in records.iter().enumerate() {
            let CompletionEvent::NodeCompleted(c) = &r.event else {
                continue;
            };
            if c.attempt < 1 {
                rejected.push(Rejection {
                    index,
                    reason: format!("attempt {} < 1", c.attempt),
                });
                continue;
            }
            topics.push(r.coords.topic.clone());
            partitions.push(r.coords.partition);
            offsets.push(r.coords.offset);
            ids.push(c.event_id);
            runs.push(c.run_id.clone());
            attempts.push(c.attempt);
        }
        sqlx::query(
            "INSERT INTO it_ledger (consumer_group, topic, partition, record_offset, event_id, run_id, attempt)
             SELECT $1, * FROM UNNEST($2::text[], $3::int[], $4::bigint[], $5::uuid[], $6::text[], $7::int[])",
        )
        .bind(&self.group)
        .bind(&topics)
        .bind(&partitions)
        .bind(&offsets)
        .bind(&ids)
        .bind(&runs)
        .bind(&attempts)
        .execute(conn)
        .await?;
        Ok(rejected)
    }
}

/// A NodeCompleted event for `run_id`.
pub fn node_completed(run_id: &str, attempt: i32) -> CompletionEvent {
    CompletionEvent::NodeCompleted(NodeCompleted {
        event_id: weir_runtime::events::new_event_id(),
        occurred_at: weir_runtime::events::now_micros(),
        workspace_id: "ws-it".into(),
        traceparent: String::new(),
        tracestate: None,
        run_id: run_id.into(),
        node_id: "fetch".into(),
        attempt,
        status: NodeStatus::Succeeded,
        output_json: Some("{\"ok\":true}".into()),
        output_ref: None,
        error: None,
        duration_ms: 12,
        worker_id: "worker-it".into(),
        from_cache: false,
    })
}

/// A RunRequested of `workflow_id` in workspace `ws`, by requester `it` with `write`, without
/// inputs or idempotency key (set them with struct update syntax).
pub fn run_requested(ws: &str, run_id: &str, workflow_id: &str) -> RunRequested {
    RunRequested {
        event_id: weir_runtime::events::new_event_id(),
        occurred_at: weir_runtime::events::now_micros(),
        workspace_id: ws.into(),
        traceparent: String::new(),
        tracestate: None,
        run_id: run_id.into(),
        workflow_id: workflow_id.into(),
        version: None,
        requester: "it".into(),
        permission: "write".into(),
        inputs_json: None,
        inputs_ref: None,
        idempotency_key: None,
    }
}

/// Produces raw bytes to a topic and waits for the broker's acknowledgement.
pub async fn produce_raw(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &[u8],
) -> anyhow::Result<(i32, i64)> {
    let delivered = producer
        .send(
            FutureRecord::to(topic).key(key).payload(payload),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| anyhow::anyhow!("produce to {topic}: {e}"))?;
    Ok((delivered.partition, delivered.offset))
}

/// Encodes an event through the registry and produces it, keyed by its key.
pub async fn produce<E: TopicEvent>(
    producer: &FutureProducer,
    codec: &Codec,
    event: &E,
) -> anyhow::Result<(i32, i64)> {
    let bytes = codec.encode(event).await?;
    produce_raw(producer, &codec.topic::<E>(), event.key(), &bytes).await
}

/// Sets up a prefix's topics, schemas and migrations; returns its codec.
pub async fn prepare(cfg: &Config) -> anyhow::Result<Arc<Codec>> {
    weir_runtime::kafka::create_topics(&cfg.kafka).await?;
    let schemas = weir_runtime::ops::load_schemas(None).map_err(anyhow::Error::msg)?;
    // Tests register their prefixes' schemas in parallel; a request the registry drops now
    // and then (a pooled keep-alive connection it closed) is retried, as the processors
    // retry an unreachable registry. Registration is idempotent.
    let mut attempt = 0;
    loop {
        attempt += 1;
        match weir_runtime::ops::register_schemas(cfg, &schemas).await {
            Ok(true) => break,
            Ok(false) => anyhow::bail!("registering schemas"),
            Err(e) if attempt < 5 => {
                eprintln!("registering schemas (attempt {attempt}): {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let pool = weir_runtime::db::pool(&cfg.postgres)?;
    weir_runtime::db::MIGRATOR.run(&pool).await?;
    create_ledger(&pool).await?;
    Ok(Arc::new(Codec::new(&cfg.schema_registry, &cfg.kafka)?))
}

/// Produces events in exactly the given order and waits for every acknowledgement.
pub async fn produce_in_order<E: TopicEvent>(
    producer: &FutureProducer,
    codec: &Codec,
    events: &[E],
) -> anyhow::Result<()> {
    Ok(weir_runtime::kafka::produce_in_order(producer, codec, events).await?)
}

/// A child process that is killed when dropped, so a failing test leaves nothing running.
pub struct ChildGuard(pub std::process::Child);

impl ChildGuard {
    /// SIGKILLs the child and reaps it.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Sends `signal` and waits for the child to exit.
    pub fn signal_and_wait(
        &mut self,
        signal: nix::sys::signal::Signal,
    ) -> std::process::ExitStatus {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), signal);
        self.0.wait().expect("wait for child")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `weir` binary built next to the test executables (`cargo test --workspace` builds it).
///
/// # Panics
/// If it was not built: the message says how to build it.
pub fn weir_bin() -> std::path::PathBuf {
    // target/<profile>/deps/<test>-<hash> → target/<profile>/weir
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("weir");
    assert!(
        bin.exists(),
        "{} not built: run the tests with `cargo test --workspace`",
        bin.display()
    );
    bin
}

/// `weir run <what>` (the binary of [`weir_bin`]) on the topics under `prefix`, with `env`
/// added, telemetry on a free port, warnings only and stdout discarded.
pub fn spawn_weir_run(prefix: &str, what: &str, env: &[(&str, &str)]) -> ChildGuard {
    ChildGuard(
        std::process::Command::new(weir_bin())
            .args(["run", what])
            .env("WEIR__KAFKA__TOPIC_PREFIX", prefix)
            .envs(env.iter().copied())
            .env("WEIR__TELEMETRY__LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn weir"),
    )
}
