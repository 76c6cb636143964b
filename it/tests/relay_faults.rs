//! The outbox relay when a destination is missing, against the real stack: the rows of a topic
//! that does not exist wait (every other topic and key, in the same lanes too, is published at
//! once), go to `weir_outbox_dead` with their reason once the topic stayed missing past
//! `relay.missing_destination_dead_after_ms`, and are published in order when the topic is
//! created before that. And the relay benchmark beside a live relay: it leaves the
//! deployment's outbox, lanes and dead table alone.
//!
//! Needs the local stack (`infra/local/up`) and its environment (`infra/local/env`). The first
//! two tests publish through a [`PrivateOutbox`] (an outbox of their own, with their own lane
//! locks), so relays of other tests and processes never take their rows and the assertions
//! about where every row went are exact.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::Message;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weir_it::{config, random_name};
use weir_relay::{Relay, RelayError};
use weir_runtime::config::Config;
use weir_runtime::outbox::lane_of;
use weir_runtime::telemetry::Health;
use weir_tools::private::PrivateOutbox;

/// A relay configuration that moves fast: quick rebalancing, short retries and shutdown.
fn relay_config(prefix: &str, dead_after_ms: u64) -> Config {
    let mut cfg = config(prefix);
    cfg.relay.batch_size = 100;
    cfg.relay.poll_interval_ms = 50;
    cfg.relay.rebalance_interval_ms = 200;
    cfg.relay.heartbeat_timeout_ms = 1_000;
    cfg.relay.missing_destination_dead_after_ms = dead_after_ms;
    cfg.runtime.retry_initial_ms = 50;
    cfg.runtime.retry_max_ms = 1_000;
    cfg.runtime.shutdown_deadline_ms = 2_000;
    cfg
}

async fn create_topic(cfg: &Config, topic: &str) {
    let admin = weir_runtime::kafka::admin(&cfg.kafka).expect("admin client");
    let new = NewTopic::new(
        topic,
        cfg.kafka.partitions,
        TopicReplication::Fixed(cfg.kafka.replication_factor),
    );
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin
        .create_topics([&new], &opts)
        .await
        .expect("create topic")
    {
        r.expect("topic created");
    }
}

/// Inserts rows with sequences `seqs` for each of `keys`, sequence-major (per key, ids in
/// sequence order); payload: key (u32 BE) then sequence (u32 BE). Returns the ids.
async fn insert_rows(
    pool: &PgPool,
    topic: &str,
    keys: &[u32],
    seqs: std::ops::Range<u32>,
    lanes: i32,
) -> Vec<i64> {
    let (mut lane_col, mut key_col, mut payload_col, mut header_col) =
        (vec![], vec![], vec![], vec![]);
    for seq in seqs {
        for &k in keys {
            let key = format!("key-{k}").into_bytes();
            lane_col.push(lane_of(&key, lanes));
            key_col.push(key);
            let mut payload = k.to_be_bytes().to_vec();
            payload.extend_from_slice(&seq.to_be_bytes());
            payload_col.push(payload);
            header_col.push(serde_json::json!({ "event_id": uuid::Uuid::now_v7().to_string() }));
        }
    }
    sqlx::query_scalar(
        "INSERT INTO weir_outbox (lane, topic, key, payload, headers)
         SELECT lane, $1, key, payload, headers
         FROM UNNEST($2::int[], $3::bytea[], $4::bytea[], $5::jsonb[])
              WITH ORDINALITY AS t(lane, key, payload, headers, ord)
         ORDER BY ord
         RETURNING id",
    )
    .bind(topic)
    .bind(&lane_col)
    .bind(&key_col)
    .bind(&payload_col)
    .bind(&header_col)
    .fetch_all(pool)
    .await
    .expect("insert outbox rows")
}

async fn count(pool: &PgPool, table: &str, topic: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE topic = $1"))
        .bind(topic)
        .fetch_one(pool)
        .await
        .expect("count rows")
}

/// Polls until `table` holds `want` rows of `topic` or `timeout` passes; returns the count.
async fn wait_count(pool: &PgPool, table: &str, topic: &str, want: i64, timeout: Duration) -> i64 {
    let start = Instant::now();
    loop {
        let n = count(pool, table, topic).await;
        if n == want || start.elapsed() > timeout {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spawn_relay(
    cfg: &Arc<Config>,
    pool: &PgPool,
    namespace: i32,
    id: &str,
    shutdown: &CancellationToken,
) -> JoinHandle<Result<(), RelayError>> {
    let producer = weir_relay::producer(&cfg.kafka).expect("producer");
    let relay = Relay::new(
        cfg.clone(),
        pool.clone(),
        producer,
        Health::default(),
        id.to_string(),
    )
    .with_lock_namespace(namespace);
    tokio::spawn(relay.run(shutdown.clone()))
}

/// Stops the relay (it must stop cleanly), drops the private outbox and the test's topics.
async fn stop(
    relay: JoinHandle<Result<(), RelayError>>,
    shutdown: &CancellationToken,
    private: PrivateOutbox,
    cfg: &Config,
    topics: &[String],
) {
    shutdown.cancel();
    relay
        .await
        .expect("relay task")
        .expect("relay stops cleanly");
    private.drop_all().await.expect("drop the private outbox");
    weir_runtime::kafka::delete_topics(&cfg.kafka, topics)
        .await
        .ok();
}

/// Per key, the sequence numbers in the order of their first occurrence in the topic.
async fn read_topic(
    cfg: &Config,
    topic: &str,
    want: usize,
    timeout: Duration,
) -> HashMap<u32, Vec<u32>> {
    let consumer: StreamConsumer = weir_it::reader(cfg, &[topic]);
    let mut first: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let deadline = Instant::now() + timeout;
    while seen.len() < want && Instant::now() < deadline {
        let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await
        else {
            continue;
        };
        let p = m.payload().unwrap_or_default();
        let (Some(k), Some(s)) = (p.get(0..4), p.get(4..8)) else {
            panic!("unexpected payload {p:?}");
        };
        let key = u32::from_be_bytes(k.try_into().unwrap_or_default());
        let seq = u32::from_be_bytes(s.try_into().unwrap_or_default());
        if seen.insert((key, seq)) {
            first.entry(key).or_default().push(seq);
        }
    }
    first
}

fn assert_in_order(first: &HashMap<u32, Vec<u32>>, keys: &[u32], per_key: u32, what: &str) {
    for k in keys {
        assert_eq!(
            first.get(k).cloned().unwrap_or_default(),
            (0..per_key).collect::<Vec<_>>(),
            "{what}: key {k} complete and in sequence order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_topic_holds_only_its_own_rows_then_goes_dead() {
    let prefix = format!("{}.", random_name("relayfault"));
    let bound = Duration::from_secs(8);
    let cfg = Arc::new(relay_config(&prefix, bound.as_millis() as u64));
    let lanes = cfg.outbox.lanes;
    let private = PrivateOutbox::create(&cfg.postgres, "it_relay_faults")
        .await
        .expect("private outbox");
    let pool = private.pool().clone();
    let good = cfg.kafka.topic("good");
    let missing = cfg.kafka.topic("missing");
    create_topic(&cfg, &good).await;

    // The missing topic's rows come first (the lowest ids of their lanes); the good topic has
    // the same keys (same lanes, and same keys on another topic) and 15 more.
    let bad_keys: Vec<u32> = (0..5).collect();
    let good_keys: Vec<u32> = (0..20).collect();
    let bad_ids = insert_rows(&pool, &missing, &bad_keys, 0..3, lanes).await;
    insert_rows(&pool, &good, &good_keys, 0..5, lanes).await;

    let started = Instant::now();
    let shutdown = CancellationToken::new();
    let relay = spawn_relay(&cfg, &pool, private.namespace(), "faults-1", &shutdown);

    // Everything else is published at once, the bad lane's other keys included.
    let left = wait_count(&pool, "weir_outbox", &good, 0, Duration::from_secs(20)).await;
    let good_after = started.elapsed();
    assert_eq!(left, 0, "every row of the healthy topic published");
    assert!(
        good_after < bound,
        "healthy rows published within {good_after:?}, before the missing topic's bound"
    );
    assert_eq!(
        count(&pool, "weir_outbox", &missing).await,
        15,
        "the missing topic's rows wait in the outbox"
    );
    assert_eq!(
        count(&pool, "weir_outbox_dead", &missing).await,
        0,
        "not dead before the bound"
    );
    let first = read_topic(&cfg, &good, 100, Duration::from_secs(30)).await;
    assert_in_order(&first, &good_keys, 5, "healthy topic");

    // Past the bound, the missing topic's rows go to the dead table with their reason.
    let dead = wait_count(
        &pool,
        "weir_outbox_dead",
        &missing,
        15,
        bound + Duration::from_secs(20),
    )
    .await;
    let dead_after = started.elapsed();
    assert_eq!(dead, 15, "every row of the missing topic dead-lettered");
    assert!(dead_after >= bound, "not before the bound: {dead_after:?}");
    assert_eq!(count(&pool, "weir_outbox", &missing).await, 0);
    let (ids, reasons): (Vec<i64>, Vec<String>) = sqlx::query_as::<_, (i64, String)>(
        "SELECT id, reason FROM weir_outbox_dead WHERE topic = $1 ORDER BY id",
    )
    .bind(&missing)
    .fetch_all(&pool)
    .await
    .expect("dead rows")
    .into_iter()
    .unzip();
    assert_eq!(ids, bad_ids, "the same rows, ids kept");
    for r in &reasons {
        assert!(r.contains("does not exist"), "reason: {r}");
        assert!(r.contains(&missing), "reason names the topic: {r}");
        assert!(
            r.contains("relay.missing_destination_dead_after_ms"),
            "reason: {r}"
        );
    }

    // The relay goes on: new healthy rows are published, new rows of the still missing topic
    // go to the dead table at its next check.
    insert_rows(&pool, &missing, &[7], 0..2, lanes).await;
    insert_rows(&pool, &good, &[100, 101], 0..2, lanes).await;
    assert_eq!(
        wait_count(&pool, "weir_outbox", &good, 0, Duration::from_secs(10)).await,
        0,
        "later healthy rows published"
    );
    assert_eq!(
        wait_count(
            &pool,
            "weir_outbox_dead",
            &missing,
            17,
            Duration::from_secs(10)
        )
        .await,
        17,
        "later rows of the missing topic dead-lettered"
    );
    assert!(!relay.is_finished(), "the relay is still running");

    stop(relay, &shutdown, private, &cfg, &[good]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_topic_created_before_the_bound_gets_its_rows_in_order() {
    let prefix = format!("{}.", random_name("relayfault"));
    let cfg = Arc::new(relay_config(&prefix, 120_000));
    let lanes = cfg.outbox.lanes;
    let private = PrivateOutbox::create(&cfg.postgres, "it_relay_faults")
        .await
        .expect("private outbox");
    let pool = private.pool().clone();
    let good = cfg.kafka.topic("good");
    let late = cfg.kafka.topic("late");
    create_topic(&cfg, &good).await;

    let keys: Vec<u32> = (0..10).collect();
    insert_rows(&pool, &late, &keys, 0..10, lanes).await;
    insert_rows(&pool, &good, &keys, 0..3, lanes).await;
    let shutdown = CancellationToken::new();
    let relay = spawn_relay(&cfg, &pool, private.namespace(), "faults-2", &shutdown);

    assert_eq!(
        wait_count(&pool, "weir_outbox", &good, 0, Duration::from_secs(20)).await,
        0,
        "healthy rows published while the other topic is missing"
    );
    // Let the relay find it missing a few times (re-checks with backoff), then create it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count(&pool, "weir_outbox", &late).await, 100, "rows wait");
    // More rows of the missing topic while it waits: they queue behind the others.
    insert_rows(&pool, &late, &[3], 10..11, lanes).await;
    create_topic(&cfg, &late).await;
    let created = Instant::now();

    assert_eq!(
        wait_count(&pool, "weir_outbox", &late, 0, Duration::from_secs(30)).await,
        0,
        "the waiting rows are published once the topic exists"
    );
    eprintln!(
        "published {:?} after the topic was created",
        created.elapsed()
    );
    assert_eq!(
        count(&pool, "weir_outbox_dead", &late).await,
        0,
        "nothing dead-lettered"
    );
    let mut first = read_topic(&cfg, &late, 101, Duration::from_secs(30)).await;
    // Key 3 got an eleventh row while the topic was missing: it comes last.
    let key3 = first.remove(&3).unwrap_or_default();
    assert_eq!(
        key3,
        (0..11).collect::<Vec<_>>(),
        "key 3 complete and in order"
    );
    let others: Vec<u32> = keys.iter().copied().filter(|k| *k != 3).collect();
    assert_in_order(&first, &others, 10, "late topic");

    stop(relay, &shutdown, private, &cfg, &[good, late]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_benchmark_leaves_a_live_deployment_alone() {
    let prefix = format!("{}.", random_name("relaybench"));
    let cfg = Arc::new(relay_config(&prefix, 60_000));
    let lanes = cfg.outbox.lanes;
    let pool = weir_runtime::db::pool(&cfg.postgres).expect("pool");
    weir_runtime::db::MIGRATOR
        .run(&pool)
        .await
        .expect("migrations");
    let live_topic = cfg.kafka.topic("live");
    create_topic(&cfg, &live_topic).await;

    // A live deployment's relay on the shared outbox, with rows of its own.
    let shutdown = CancellationToken::new();
    let live_id = random_name("live-relay");
    let live = spawn_relay(&cfg, &pool, weir_relay::LOCK_NAMESPACE, &live_id, &shutdown);
    let beating = Instant::now();
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM weir_relays WHERE relay_id = $1")
        .bind(&live_id)
        .fetch_one(&pool)
        .await
        .expect("heartbeat")
        == 0
    {
        assert!(
            beating.elapsed() < Duration::from_secs(20),
            "live relay heartbeat"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    insert_rows(&pool, &live_topic, &[1, 2, 3], 0..10, lanes).await;

    let bench = tokio::spawn(weir_tools::bench::relay::run(cfg.clone(), 3_000, 2, 1));
    // While the benchmark runs: none of its rows in the deployment's outbox, and the
    // deployment's new rows are still published (its lanes were not taken).
    let bench_rows = format!("{prefix}weir.bench.relay.%");
    let mut sampled = 0;
    let mut inserted = false;
    while !bench.is_finished() {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM weir_outbox WHERE topic LIKE $1")
            .bind(&bench_rows)
            .fetch_one(&pool)
            .await
            .expect("sample");
        assert_eq!(n, 0, "benchmark rows in the deployment's outbox");
        sampled += 1;
        if !inserted && sampled == 5 {
            insert_rows(&pool, &live_topic, &[4, 5], 0..10, lanes).await;
            inserted = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let result = bench
        .await
        .expect("bench task")
        .expect("benchmark runs beside a live relay");
    assert_eq!(result["missing"], 0, "{result}");
    assert_eq!(result["order_violations"], 0, "{result}");
    assert!(
        result["deployment_relays"].as_i64().unwrap_or(0) >= 1,
        "{result}"
    );
    assert_eq!(
        wait_count(
            &pool,
            "weir_outbox",
            &live_topic,
            0,
            Duration::from_secs(20)
        )
        .await,
        0,
        "the deployment's rows are published"
    );
    let first = read_topic(&cfg, &live_topic, 50, Duration::from_secs(30)).await;
    assert_in_order(&first, &[1, 2, 3, 4, 5], 10, "deployment topic");
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM weir_outbox_dead WHERE topic LIKE $1")
        .bind(format!("{prefix}%"))
        .fetch_one(&pool)
        .await
        .expect("dead rows");
    assert_eq!(
        dead, 0,
        "nothing of the benchmark in the deployment's dead table"
    );
    let leftovers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'weir_private_bench_relay_%'",
    )
    .fetch_one(&pool)
    .await
    .expect("schemas");
    assert_eq!(leftovers, 0, "the benchmark's own outbox is dropped");

    shutdown.cancel();
    live.await
        .expect("relay task")
        .expect("relay stops cleanly");
    weir_runtime::kafka::delete_topics(&cfg.kafka, &[live_topic])
        .await
        .ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_topic_deleted_under_the_relay_stops_only_its_own_rows() {
    let prefix = format!("{}.", random_name("relayfault"));
    let bound = Duration::from_secs(5);
    let cfg = Arc::new(relay_config(&prefix, bound.as_millis() as u64));
    weir_runtime::telemetry::init_tracing(&cfg.telemetry);
    let lanes = cfg.outbox.lanes;
    let private = PrivateOutbox::create(&cfg.postgres, "it_relay_faults")
        .await
        .expect("private outbox");
    let pool = private.pool().clone();
    let good = cfg.kafka.topic("good");
    let doomed = cfg.kafka.topic("doomed");
    create_topic(&cfg, &good).await;
    create_topic(&cfg, &doomed).await;
    let shutdown = CancellationToken::new();
    let relay = spawn_relay(&cfg, &pool, private.namespace(), "faults-4", &shutdown);

    // Both topics get rows all along; one of them is deleted in the middle.
    let keys: Vec<u32> = (0..5).collect();
    let rounds = 60u32;
    for round in 0..rounds {
        insert_rows(&pool, &doomed, &keys, round..round + 1, lanes).await;
        insert_rows(&pool, &good, &keys, round..round + 1, lanes).await;
        if round == 20 {
            weir_runtime::kafka::delete_topics(&cfg.kafka, std::slice::from_ref(&doomed))
                .await
                .expect("delete topic");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        wait_count(&pool, "weir_outbox", &good, 0, Duration::from_secs(20)).await,
        0,
        "the healthy topic's rows are all published"
    );
    assert!(!relay.is_finished(), "the relay survives a deleted topic");
    let first = read_topic(
        &cfg,
        &good,
        keys.len() * rounds as usize,
        Duration::from_secs(30),
    )
    .await;
    assert_in_order(&first, &keys, rounds, "healthy topic");
    // The deleted topic's rows: published before the deletion, or dead-lettered at the bound.
    assert_eq!(
        wait_count(
            &pool,
            "weir_outbox",
            &doomed,
            0,
            bound + Duration::from_secs(30)
        )
        .await,
        0,
        "the deleted topic's rows leave the outbox"
    );
    let dead = count(&pool, "weir_outbox_dead", &doomed).await;
    assert!(
        dead > 0,
        "rows written after the deletion are dead-lettered"
    );
    eprintln!("{dead} rows of the deleted topic dead-lettered");
    assert!(!relay.is_finished(), "the relay is still running");

    stop(relay, &shutdown, private, &cfg, &[good]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_coordinator_benchmark_writes_no_row_a_live_relay_would_publish() {
    let prefix = format!("{}.", random_name("coordbench"));
    let cfg = Arc::new(relay_config(&prefix, 60_000));
    let pool = weir_runtime::db::pool(&cfg.postgres).expect("pool");
    weir_runtime::db::MIGRATOR
        .run(&pool)
        .await
        .expect("migrations");
    let started = Instant::now();
    let bench = tokio::spawn(weir_tools::bench::coordinator::run(cfg.clone(), 20, 5, 1));
    // Its NodeReady and run events go to topics that do not exist: none may appear in the
    // deployment's outbox, where a live relay would take them.
    let mut max_seen = 0i64;
    while !bench.is_finished() {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM weir_outbox WHERE topic LIKE 'bench-%'")
                .fetch_one(&pool)
                .await
                .expect("sample");
        max_seen = max_seen.max(n);
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "benchmark too slow"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let result = bench
        .await
        .expect("bench task")
        .expect("the coordinator benchmark completes every run");
    assert_eq!(result["runs"], 20, "{result}");
    assert_eq!(
        max_seen, 0,
        "benchmark rows seen in the deployment's outbox"
    );
    let leftovers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'weir_private_bench_coordinator_%'",
    )
    .fetch_one(&pool)
    .await
    .expect("schemas");
    assert_eq!(leftovers, 0, "the benchmark's own outbox is dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_materializer_benchmark_keeps_its_own_groups_and_outbox() {
    let prefix = format!("{}.", random_name("matbench"));
    let cfg = Arc::new(relay_config(&prefix, 60_000));
    let pool = weir_runtime::db::pool(&cfg.postgres).expect("pool");
    weir_runtime::db::MIGRATOR
        .run(&pool)
        .await
        .expect("migrations");
    let deployment_group = cfg.kafka.group(weir_materializer::processor::GROUP);
    let params = weir_tools::bench::materializer::Params {
        warmup_patches: 0,
        warmup_time: Duration::ZERO,
        patches: 300,
        workflows: 30,
        latency_patches: 100,
        naive_patches: 20,
        repeat: 1,
    };
    let bench = tokio::spawn(weir_tools::bench::materializer::run(cfg.clone(), params));
    let started = Instant::now();
    let mut samples = 0;
    while !bench.is_finished() {
        // The deployment's group (same prefix) is never joined, and none of the benchmark's
        // outbox rows are in the deployment's outbox.
        let kafka = cfg.kafka.clone();
        let group = deployment_group.clone();
        let state = tokio::task::spawn_blocking(move || {
            weir_runtime::kafka::group_state(&kafka, &group, Duration::from_secs(5))
        })
        .await
        .expect("probe task")
        .expect("group state");
        assert!(
            state.as_ref().is_none_or(|(_, members)| *members == 0),
            "the deployment's group {deployment_group} was joined: {state:?}"
        );
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM weir_outbox WHERE topic LIKE $1")
            .bind(format!("{prefix}bench-%"))
            .fetch_one(&pool)
            .await
            .expect("sample");
        assert_eq!(n, 0, "benchmark rows in the deployment's outbox");
        samples += 1;
        assert!(
            started.elapsed() < Duration::from_secs(400),
            "benchmark too slow"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let result = bench
        .await
        .expect("bench task")
        .expect("the materializer benchmark runs");
    assert_eq!(result["patches"], 300, "{result}");
    assert!(samples > 0);
    let leftovers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'weir_private_bench_materialize_%'",
    )
    .fetch_one(&pool)
    .await
    .expect("schemas");
    assert_eq!(leftovers, 0, "the benchmark's own outbox is dropped");
}
