//! The processor runtime against the real stack: exactly-once effects across a SIGKILL,
//! dead letters for poison records, and the schema compatibility gate.
//! Needs the local stack (`infra/local/up`) and its environment (`infra/local/env`).

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rdkafka::message::{Headers, Message};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use weir_it::{
    config, node_completed, prepare, produce, produce_raw, random_name, weir_bin, ChildGuard,
    LedgerProcessor, EXPLODING_ATTEMPT,
};
use weir_runtime::events::{DeadLetter, TopicEvent};
use weir_runtime::{telemetry, BatchConsumer};

fn spawn_consumer(prefix: &str, group: &str) -> ChildGuard {
    ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_it-consumer"))
            .arg(group)
            .env("WEIR__KAFKA__TOPIC_PREFIX", prefix)
            // Small batches so the run lasts long enough to be killed in the middle.
            .env("WEIR__RUNTIME__MAX_BATCH", "25")
            .env("WEIR__RUNTIME__MAX_WAIT_MS", "1")
            // The killed instance leaves the group after this, not after the 45 s default.
            .env("WEIR__KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "6000")
            .env("WEIR__TELEMETRY__LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn it-consumer"),
    )
}

async fn ledger_count(pool: &PgPool, group: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM it_ledger WHERE consumer_group = $1")
        .bind(group)
        .fetch_one(pool)
        .await
        .expect("count ledger")
}

async fn wait_for_count(pool: &PgPool, group: &str, at_least: i64, timeout: Duration) -> i64 {
    let start = Instant::now();
    loop {
        let n = ledger_count(pool, group).await;
        if n >= at_least || start.elapsed() > timeout {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_applies_exactly_once_across_a_sigkill() {
    const RUNS: usize = 40;
    const EVENTS: usize = 6_000;
    let prefix = format!("{}.", random_name("eo"));
    let group = random_name("group");
    let cfg = config(&prefix);
    let codec = prepare(&cfg)
        .await
        .expect("prepare topics, schemas, migrations");
    let pool = weir_runtime::db::pool(&cfg.postgres).unwrap();
    let producer = weir_runtime::kafka::producer(&cfg.kafka).unwrap();

    // Produce everything first, many sends in flight at once.
    let events: Vec<_> = (0..EVENTS)
        .map(|i| node_completed(&format!("run-{}", i % RUNS), 1 + (i / RUNS) as i32))
        .collect();
    let produced: Vec<uuid::Uuid> = events.iter().map(|e| e.event_id()).collect();
    for chunk in events.chunks(500) {
        let sends = chunk.iter().map(|e| produce(&producer, &codec, e));
        for r in futures::future::join_all(sends).await {
            r.unwrap();
        }
    }

    let mut child = spawn_consumer(&prefix, &group);
    let before_kill =
        wait_for_count(&pool, &group, (EVENTS / 5) as i64, Duration::from_secs(120)).await;
    child.kill();
    let at_kill = ledger_count(&pool, &group).await;
    assert!(
        before_kill > 0,
        "the consumer applied nothing before the kill"
    );
    assert!(
        at_kill < EVENTS as i64,
        "the kill came too late to test anything ({at_kill} applied)"
    );

    let mut child = spawn_consumer(&prefix, &group);
    let done = wait_for_count(&pool, &group, EVENTS as i64, Duration::from_secs(180)).await;
    // Graceful stop: SIGTERM ends the consumer with a clean exit.
    let status = child.signal_and_wait(Signal::SIGTERM);
    assert!(
        status.success(),
        "it-consumer exited with {status} on SIGTERM"
    );
    assert_eq!(done, EVENTS as i64, "not every event was applied");

    // Nothing applied twice (the ledger has no unique constraint, so duplicates would show).
    assert_eq!(
        ledger_count(&pool, &group).await,
        EVENTS as i64,
        "an event was applied twice"
    );
    let ids: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT event_id FROM it_ledger WHERE consumer_group = $1")
            .bind(&group)
            .fetch_all(&pool)
            .await
            .unwrap();
    let distinct: HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), EVENTS);
    assert_eq!(
        distinct,
        produced.iter().collect::<HashSet<_>>(),
        "applied events differ from produced ones"
    );

    // Per-key order: a key lives in one partition, and its records were applied in offset order.
    let out_of_order: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
           SELECT record_offset < lag(record_offset) OVER (PARTITION BY run_id ORDER BY id)
                  OR partition <> lag(partition) OVER (PARTITION BY run_id ORDER BY id) AS regressed
           FROM it_ledger WHERE consumer_group = $1) t WHERE regressed",
    )
    .bind(&group)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        out_of_order, 0,
        "records of one key were applied out of order"
    );

    // Positions in Postgres point past the last record of every partition.
    let (positions, sum): (i64, i64) = sqlx::query_as(
        "SELECT count(*), COALESCE(sum(next_offset), 0)::bigint FROM weir_consumer_positions WHERE consumer_group = $1",
    )
    .bind(&group)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(positions, 3, "one position per partition");
    assert_eq!(sum, EVENTS as i64, "positions sum to the number of records");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_are_dead_lettered_and_the_rest_apply() {
    let prefix = format!("{}.", random_name("dlq"));
    let group = random_name("group");
    let mut cfg = config(&prefix);
    // One partition, so "the records after the poison" is well defined.
    cfg.kafka
        .topic_partitions
        .insert("weir.completions.v1".into(), 1);
    let cfg = Arc::new(cfg);
    let codec = prepare(&cfg).await.expect("prepare");
    let pool = weir_runtime::db::pool(&cfg.postgres).unwrap();
    let producer = weir_runtime::kafka::producer(&cfg.kafka).unwrap();
    let topic = codec.topic::<weir_runtime::events::CompletionEvent>();

    let good1 = node_completed("run-a", 1);
    produce(&producer, &codec, &good1).await.unwrap();
    let garbage = b"{\"not\": \"avro\"}".to_vec();
    let (_, garbage_offset) = produce_raw(&producer, &topic, "run-a", &garbage)
        .await
        .unwrap();
    let unknown_id = [0u8, 0x7f, 0xff, 0xff, 0xf0, 2, 4, 6];
    let (_, unknown_offset) = produce_raw(&producer, &topic, "run-a", &unknown_id)
        .await
        .unwrap();
    let (_, invalid_offset) = produce(&producer, &codec, &node_completed("run-a", 0))
        .await
        .unwrap();
    let (_, exploding_offset) = produce(
        &producer,
        &codec,
        &node_completed("run-a", EXPLODING_ATTEMPT),
    )
    .await
    .unwrap();
    let good2 = node_completed("run-a", 2);
    produce(&producer, &codec, &good2).await.unwrap();

    let shutdown = CancellationToken::new();
    let consumer = BatchConsumer::new(
        cfg.clone(),
        Arc::new(LedgerProcessor {
            group: group.clone(),
        }),
        pool.clone(),
        codec.clone(),
        producer.clone(),
        telemetry::Health::default(),
    );
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    let applied = wait_for_count(&pool, &group, 2, Duration::from_secs(60)).await;
    assert_eq!(applied, 2, "the records after the poison must still apply");

    // Read the dead-letter topic.
    let dlq = weir_it::reader(&cfg, &[&codec.topic::<DeadLetter>()]);
    let mut letters = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while letters.len() < 4 && Instant::now() < deadline {
        let msg = match tokio::time::timeout(Duration::from_secs(5), dlq.recv()).await {
            Ok(Ok(m)) => m,
            _ => continue,
        };
        let header = |name: &str| {
            msg.headers()
                .and_then(|h| h.iter().find(|x| x.key == name))
                .and_then(|x| x.value)
                .map(|v| String::from_utf8_lossy(v).to_string())
        };
        let class = header("weir.dlq.error.class").expect("class header");
        let offset: i64 = header("weir.dlq.source.offset")
            .expect("offset header")
            .parse()
            .unwrap();
        assert_eq!(
            header("weir.dlq.source.topic").as_deref(),
            Some(topic.as_str())
        );
        assert_eq!(header("weir.dlq.source.partition").as_deref(), Some("0"));
        assert!(header("weir.dlq.error.message").is_some_and(|m| !m.is_empty()));
        let letter: DeadLetter = codec
            .decode(msg.payload().unwrap())
            .await
            .expect("dead letter decodes");
        assert_eq!(letter.source_offset, offset);
        assert_eq!(letter.error_class, class);
        assert_eq!(letter.consumer_group, group);
        letters.push((
            offset,
            class,
            letter.original_value.clone().unwrap_or_default(),
        ));
    }
    shutdown.cancel();
    task.await.unwrap().expect("consumer ends cleanly");

    letters.sort();
    let classes: Vec<(i64, &str)> = letters.iter().map(|(o, c, _)| (*o, c.as_str())).collect();
    assert_eq!(
        classes,
        vec![
            (garbage_offset, "framing"),
            (unknown_offset, "unknown_schema"),
            (invalid_offset, "invalid"),
            (exploding_offset, "apply"),
        ]
    );
    assert_eq!(
        letters[0].2, garbage,
        "the original bytes travel with the dead letter"
    );
    assert_eq!(letters[1].2, unknown_id.to_vec());
    let runs: Vec<i32> =
        sqlx::query_scalar("SELECT attempt FROM it_ledger WHERE consumer_group = $1 ORDER BY id")
            .bind(&group)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        runs,
        vec![1, 2],
        "exactly the two good records applied, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_check_refuses_an_incompatible_change() {
    let prefix = format!("{}.", random_name("schema"));
    let weir = |args: &[&str]| {
        Command::new(weir_bin())
            .args(args)
            .env("WEIR__KAFKA__TOPIC_PREFIX", &prefix)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run weir")
    };
    let out = weir(&["schemas", "register"]);
    assert!(
        out.status.success(),
        "register: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas");
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let file = dir.path().join("weir.completions.v1.avsc");
    let original = std::fs::read_to_string(&file).unwrap();
    let with_field = |field: serde_json::Value| {
        let mut schema: serde_json::Value = serde_json::from_str(&original).unwrap();
        let branches = schema
            .as_array_mut()
            .expect("completions schema is a union");
        let node_completed = branches
            .iter_mut()
            .find(|b| b["name"] == "NodeCompleted")
            .expect("NodeCompleted branch");
        node_completed["fields"].as_array_mut().unwrap().push(field);
        serde_json::to_string_pretty(&schema).unwrap()
    };
    let dir_arg = dir.path().to_str().unwrap();

    std::fs::write(
        &file,
        with_field(serde_json::json!({"name": "queue", "type": "string"})),
    )
    .unwrap();
    let out = weir(&["schemas", "check", "--dir", dir_arg]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "check must refuse: {stdout}");
    assert!(stdout.contains("INCOMPATIBLE"), "{stdout}");
    assert!(
        stdout.contains("weir.runs.NodeCompleted.queue"),
        "the field that broke it is named: {stdout}"
    );
    let out = weir(&["schemas", "register", "--dir", dir_arg]);
    assert_eq!(out.status.code(), Some(1), "register must refuse too");

    std::fs::write(
        &file,
        with_field(serde_json::json!({"name": "queue", "type": "string", "default": "main"})),
    )
    .unwrap();
    let out = weir(&["schemas", "check", "--dir", dir_arg]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "a defaulted field is compatible: {stdout}"
    );
    assert!(
        stdout.contains("BACKWARD compatible with version 1"),
        "{stdout}"
    );
}

/// Outbox rows keep push order in both of the outbox's write paths (an `INSERT` of arrays up
/// to `SMALL_BATCH` rows, COPY past it), and a batch pool gets past a connection killed while
/// idle: the next use fails at most once, with an error the runtime retries, and a new
/// connection answers after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_order_in_both_write_paths_and_a_killed_pool_connection() {
    use weir_runtime::error::postgres_disposition;
    use weir_runtime::events::CompletionEvent;
    use weir_runtime::outbox::SMALL_BATCH;
    use weir_runtime::{Disposition, Outbox};

    let prefix = random_name("outbox");
    let cfg = config(&prefix);
    let codec = prepare(&cfg).await.expect("prepare");
    let pool = weir_runtime::db::pool(&cfg.postgres).expect("pool");
    let topic = codec.topic::<CompletionEvent>();
    for n in [1, 3, SMALL_BATCH, SMALL_BATCH + 1, 3 * SMALL_BATCH] {
        let mut tx = pool.begin().await.expect("begin");
        let mut outbox = Outbox::new(&codec, 4);
        let run = random_name("run");
        let mut pushed = Vec::new();
        for i in 0..n {
            let e = node_completed(&run, i as i32 + 1);
            let CompletionEvent::NodeCompleted(c) = &e else {
                unreachable!("node_completed makes a NodeCompleted")
            };
            pushed.push(c.event_id.to_string());
            outbox.push(&e).await.expect("push");
        }
        assert_eq!(outbox.flush(&mut tx).await.expect("flush"), n as u64);
        assert!(outbox.is_empty(), "flush empties the outbox");
        let (ids, lanes): (Vec<String>, Vec<i32>) = sqlx::query_as::<_, (String, i32)>(
            "SELECT headers->>'event_id', lane FROM weir_outbox WHERE topic = $1 ORDER BY id",
        )
        .bind(&topic)
        .fetch_all(&mut *tx)
        .await
        .expect("read the outbox")
        .into_iter()
        .unzip();
        assert_eq!(ids, pushed, "{n} rows: ids follow push order");
        assert!(
            lanes.windows(2).all(|w| w[0] == w[1]),
            "one key, one lane: {lanes:?}"
        );
        // Never committed: no relay ever sees these rows.
        tx.rollback().await.expect("rollback");
    }

    let batch = weir_runtime::db::batch_pool(&cfg.postgres).expect("batch pool");
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&batch)
        .await
        .expect("first connection");
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
        .bind(pid)
        .fetch_one(&pool)
        .await
        .expect("terminate");
    assert!(killed, "the pool's connection {pid} was terminated");
    let mut answered = None;
    for attempt in 1..=2 {
        match sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
            .fetch_one(&batch)
            .await
        {
            Ok(p) => {
                answered = Some((attempt, p));
                break;
            }
            Err(e) => assert_eq!(
                postgres_disposition(&e),
                Disposition::Retry,
                "a killed connection is a transient error: {e}"
            ),
        }
    }
    let (attempt, new_pid) = answered.expect("a new connection answers by the second use");
    assert_ne!(
        new_pid, pid,
        "answered on attempt {attempt} by a new connection"
    );
}
