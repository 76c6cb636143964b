//! The outbox relay against the real stack: per-key order with three relays while one is
//! killed mid-run, and a broker outage that leaves every row in place.
//! Needs the local stack (`infra/local/up`) and its environment (`infra/local/env`).
//!
//! The outbox table is shared by every test and process on the machine. Each test writes rows
//! for topics under its own random prefix and asserts only about those; its relays may publish
//! other rows too, and relays of other processes may publish this test's rows, which is
//! harmless (lanes are exclusive across all relays). The two tests run one at a time
//! (`SERIAL`) so that their relays do not share the lanes between them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weir_it::{config, random_name};
use weir_relay::{Relay, RelayError};
use weir_runtime::config::Config;
use weir_runtime::outbox::lane_of;
use weir_runtime::telemetry::Health;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A relay configuration that moves fast: small batches (so a run lasts long enough to kill a
/// relay in the middle), quick rebalancing and heartbeats, short retries and shutdown.
fn relay_config(prefix: &str) -> Config {
    let mut cfg = config(prefix);
    cfg.relay.batch_size = 50;
    cfg.relay.poll_interval_ms = 50;
    cfg.relay.rebalance_interval_ms = 200;
    cfg.relay.heartbeat_timeout_ms = 1_000;
    cfg.runtime.retry_initial_ms = 50;
    cfg.runtime.retry_max_ms = 1_000;
    cfg.runtime.shutdown_deadline_ms = 2_000;
    cfg
}

async fn prepare(cfg: &Config) -> PgPool {
    weir_runtime::kafka::create_topics(&cfg.kafka)
        .await
        .expect("create topics");
    let pool = weir_runtime::db::pool(&cfg.postgres).expect("pool");
    weir_runtime::db::MIGRATOR
        .run(&pool)
        .await
        .expect("migrations");
    pool
}

/// Inserts `per_key` rows for each of `keys` in one statement, sequence-major, so every key's rows have
/// increasing ids in sequence order. Payload: key (u32 BE) then sequence (u32 BE).
async fn insert_rows(pool: &PgPool, topic: &str, keys: &[u32], per_key: u32, lanes: i32) -> usize {
    let (mut lane_col, mut key_col, mut payload_col, mut header_col) =
        (vec![], vec![], vec![], vec![]);
    for seq in 0..per_key {
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
    let n = lane_col.len();
    sqlx::query(
        "INSERT INTO weir_outbox (lane, topic, key, payload, headers)
         SELECT lane, $1, key, payload, headers
         FROM UNNEST($2::int[], $3::bytea[], $4::bytea[], $5::jsonb[])
              WITH ORDINALITY AS t(lane, key, payload, headers, ord)
         ORDER BY ord",
    )
    .bind(topic)
    .bind(&lane_col)
    .bind(&key_col)
    .bind(&payload_col)
    .bind(&header_col)
    .execute(pool)
    .await
    .expect("insert outbox rows");
    n
}

async fn outbox_rows(pool: &PgPool, topic: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM weir_outbox WHERE topic = $1")
        .bind(topic)
        .fetch_one(pool)
        .await
        .expect("count outbox rows")
}

async fn wait_outbox_empty(pool: &PgPool, topic: &str, timeout: Duration) -> i64 {
    let start = Instant::now();
    loop {
        let n = outbox_rows(pool, topic).await;
        if n == 0 || start.elapsed() > timeout {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A relay as a separate process would run it: its own pool, producer and session.
fn spawn_relay(
    cfg: &Arc<Config>,
    id: &str,
    shutdown: &CancellationToken,
) -> JoinHandle<Result<(), RelayError>> {
    let pool = weir_runtime::db::pool(&cfg.postgres).expect("pool");
    let producer = weir_relay::producer(&cfg.kafka).expect("producer");
    let relay = Relay::new(
        cfg.clone(),
        pool,
        producer,
        Health::default(),
        id.to_string(),
    );
    tokio::spawn(relay.run(shutdown.clone()))
}

/// Backends of a relay's dedicated session (found by its application name).
async fn relay_sessions(pool: &PgPool, id: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
        .bind(format!("weir-relay {id}"))
        .fetch_one(pool)
        .await
        .expect("pg_stat_activity")
}

/// Lane locks held by a relay's session.
async fn relay_lanes(pool: &PgPool, id: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE a.application_name = $1 AND l.locktype = 'advisory' AND l.classid = $2::oid
           AND l.objsubid = 2 AND l.granted",
    )
    .bind(format!("weir-relay {id}"))
    .bind(weir_relay::LOCK_NAMESPACE)
    .fetch_one(pool)
    .await
    .expect("pg_locks")
}

async fn heartbeat_rows(pool: &PgPool, ids: &[String]) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM weir_relays WHERE relay_id = ANY($1)")
        .bind(ids)
        .fetch_one(pool)
        .await
        .expect("weir_relays")
}

fn consumer_from_beginning(cfg: &Config, topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer =
        weir_runtime::kafka::consumer_config(&cfg.kafka, &random_name("relay-check"), 60_000)
            .create()
            .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..cfg.kafka.partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition list");
    }
    consumer.assign(&tpl).expect("assign");
    consumer
}

/// What the test saw in Kafka.
#[derive(Default)]
struct Seen {
    /// (key, seq) → occurrences.
    count: HashMap<(u32, u32), usize>,
    /// Per key, the sequence numbers in the order of their first occurrence.
    first_order: HashMap<u32, Vec<u32>>,
    /// Messages without an `event_id` header.
    missing_event_id: usize,
}

impl Seen {
    fn observe(&mut self, m: &rdkafka::message::BorrowedMessage<'_>) {
        let p = m.payload().unwrap_or_default();
        let (Some(k), Some(s)) = (p.get(0..4), p.get(4..8)) else {
            panic!("unexpected payload {p:?}");
        };
        let key = u32::from_be_bytes(k.try_into().unwrap_or_default());
        let seq = u32::from_be_bytes(s.try_into().unwrap_or_default());
        assert_eq!(
            m.key(),
            Some(format!("key-{key}").as_bytes()),
            "the Kafka key is the outbox key"
        );
        let has_event_id = m
            .headers()
            .is_some_and(|h| h.iter().any(|h| h.key == "event_id" && h.value.is_some()));
        if !has_event_id {
            self.missing_event_id += 1;
        }
        let n = self.count.entry((key, seq)).or_default();
        *n += 1;
        if *n == 1 {
            self.first_order.entry(key).or_default().push(seq);
        }
    }

    fn distinct(&self) -> usize {
        self.count.len()
    }

    fn duplicates(&self) -> usize {
        self.count.values().map(|n| n - 1).sum()
    }

    /// First occurrences that come after a higher sequence number of the same key.
    fn order_violations(&self) -> usize {
        self.first_order
            .values()
            .map(|seqs| seqs.windows(2).filter(|w| w[1] < w[0]).count())
            .sum()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_keep_per_key_order_when_one_is_killed() {
    // Few keys, so that the batches in flight at once (3 relays × 50 rows) hold several rows
    // of the same keys: row-level SKIP LOCKED without lanes fails this test with thousands of
    // order violations (checked by mutating the relay), lanes must give zero.
    const KEYS: u32 = 50;
    const PER_KEY: u32 = 400;
    const EVENTS: usize = (KEYS * PER_KEY) as usize;
    let _serial = SERIAL.lock().await;
    let prefix = format!("{}.", random_name("relay"));
    let cfg = Arc::new(relay_config(&prefix));
    let pool = prepare(&cfg).await;
    let topic = cfg.kafka.topic("weir.workflows.v1");
    assert_eq!(
        insert_rows(
            &pool,
            &topic,
            &(0..KEYS).collect::<Vec<_>>(),
            PER_KEY,
            cfg.outbox.lanes
        )
        .await,
        EVENTS
    );

    let consumer = consumer_from_beginning(&cfg, &topic);
    let shutdown = CancellationToken::new();
    let run = random_name("r");
    let mut ids: Vec<String> = (0..3).map(|i| format!("{run}-{i}")).collect();
    let mut relays: Vec<JoinHandle<_>> = ids
        .iter()
        .map(|id| spawn_relay(&cfg, id, &shutdown))
        .collect();

    let mut seen = Seen::default();
    let mut killed_at = None;
    let deadline = Instant::now() + Duration::from_secs(45);
    while seen.distinct() < EVENTS && Instant::now() < deadline {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await {
            seen.observe(&m);
        }
        if killed_at.is_none() && seen.distinct() >= EVENTS / 3 {
            // Abrupt death: the task is dropped wherever it is (most likely waiting for acks
            // mid-batch); its connection closes and Postgres ends the session.
            relays[0].abort();
            killed_at = Some(seen.distinct());
            let replacement = format!("{run}-replacement");
            relays.push(spawn_relay(&cfg, &replacement, &shutdown));
            ids.push(replacement);
        }
    }
    let killed_at = killed_at.expect("the relay was never killed");
    assert!(
        killed_at < EVENTS,
        "the kill came too late to test anything"
    );
    println!(
        "killed relay 0 after {killed_at} of {EVENTS} events; distinct {}, duplicates {}",
        seen.distinct(),
        seen.duplicates()
    );

    assert_eq!(seen.distinct(), EVENTS, "some events never reached Kafka");
    assert_eq!(
        wait_outbox_empty(&pool, &topic, Duration::from_secs(15)).await,
        0,
        "published rows left in the outbox"
    );
    assert_eq!(seen.order_violations(), 0, "per-key order broken");
    assert_eq!(seen.missing_event_id, 0, "headers were not published");

    // The killed relay's session is gone, and with it its lanes.
    let killed = ids[0].clone();
    let start = Instant::now();
    while relay_sessions(&pool, &killed).await > 0 && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        relay_sessions(&pool, &killed).await,
        0,
        "the killed relay's session lives on"
    );

    // Graceful stop: every relay ends cleanly, releases its lanes and removes its heartbeat.
    shutdown.cancel();
    let (killed_task, live) = relays.split_first_mut().expect("relays");
    assert!(killed_task.await.is_err_and(|e| e.is_cancelled()));
    for r in live {
        r.await.expect("relay task").expect("relay stops cleanly");
    }
    let graceful = &ids[1..];
    for id in graceful {
        assert_eq!(relay_lanes(&pool, id).await, 0, "{id} still holds lanes");
    }
    assert_eq!(
        heartbeat_rows(&pool, graceful).await,
        0,
        "heartbeats left behind"
    );

    // Late deliveries (an aborted producer's last in-flight requests) can only be duplicates.
    while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await {
        seen.observe(&m);
    }
    assert_eq!(seen.distinct(), EVENTS);
    assert_eq!(
        seen.order_violations(),
        0,
        "per-key order broken by a late delivery"
    );
    println!("final: duplicates {}", seen.duplicates());
}

/// The lanes a relay's session holds, sorted.
async fn held_lanes(pool: &PgPool, id: &str) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT l.objid::bigint::int FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE a.application_name = $1 AND l.locktype = 'advisory' AND l.classid = $2::oid
           AND l.objsubid = 2 AND l.granted ORDER BY 1",
    )
    .bind(format!("weir-relay {id}"))
    .bind(weir_relay::LOCK_NAMESPACE)
    .fetch_all(pool)
    .await
    .expect("pg_locks")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_leaves_rows_in_place_until_a_relay_can_publish() {
    const KEYS: usize = 100;
    const PER_KEY: u32 = 5;
    const EVENTS: usize = KEYS * PER_KEY as usize;
    let _serial = SERIAL.lock().await;
    let prefix = format!("{}.", random_name("relay-outage"));
    let cfg = Arc::new(relay_config(&prefix));
    let pool = prepare(&cfg).await;
    let topic = cfg.kafka.topic("weir.run-events.v1");
    let lane_of_key = |k: u32| lane_of(format!("key-{k}").as_bytes(), cfg.outbox.lanes);

    // A relay whose broker is unreachable. Alone it takes every lane; next to relays of other
    // processes on this machine (a running `weir dev`) it takes its share.
    let mut broken = (*cfg).clone();
    broken.kafka.bootstrap_servers = "127.0.0.1:1".into();
    let broken = Arc::new(broken);
    let broken_id = random_name("broken");
    let broken_stop = CancellationToken::new();
    let broken_task = spawn_relay(&broken, &broken_id, &broken_stop);
    let start = Instant::now();
    let mut lanes = held_lanes(&pool, &broken_id).await;
    while (lanes.is_empty() || lanes != held_lanes(&pool, &broken_id).await)
        && start.elapsed() < Duration::from_secs(20)
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
        lanes = held_lanes(&pool, &broken_id).await;
    }
    assert!(!lanes.is_empty(), "the broken relay never got a lane");

    // Rows only in its lanes: no other relay may publish them while it holds them, and its
    // first batch with them gets stuck waiting for the broker (its lanes then stay put).
    let keys: Vec<u32> = (0..)
        .filter(|k| lanes.contains(&lane_of_key(*k)))
        .take(KEYS)
        .collect();
    insert_rows(&pool, &topic, &keys, PER_KEY, cfg.outbox.lanes).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        held_lanes(&pool, &broken_id).await,
        lanes,
        "a stuck relay keeps its lanes"
    );
    assert_eq!(
        outbox_rows(&pool, &topic).await,
        EVENTS as i64,
        "rows must stay in the outbox while the broker is unreachable"
    );
    let watcher = consumer_from_beginning(&cfg, &topic);
    for p in 0..cfg.kafka.partitions {
        let (_, high) = watcher
            .fetch_watermarks(&topic, p, Duration::from_secs(10))
            .expect("watermarks");
        assert_eq!(high, 0, "partition {p} received records during the outage");
    }

    // Shutdown mid-outage: the stuck batch is abandoned, lanes and heartbeat released.
    broken_stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), broken_task)
        .await
        .expect("the broken relay stops within its shutdown deadline")
        .expect("relay task")
        .expect("a broker outage is not fatal");
    assert_eq!(relay_lanes(&pool, &broken_id).await, 0);
    assert_eq!(
        heartbeat_rows(&pool, std::slice::from_ref(&broken_id)).await,
        0
    );

    // The broker is back (a correctly configured relay): everything goes out, in order.
    let stop = CancellationToken::new();
    let relay = spawn_relay(&cfg, &random_name("healthy"), &stop);
    assert_eq!(
        wait_outbox_empty(&pool, &topic, Duration::from_secs(30)).await,
        0,
        "the healthy relay did not publish the rows"
    );
    let mut seen = Seen::default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.distinct() < EVENTS && Instant::now() < deadline {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(200), watcher.recv()).await {
            seen.observe(&m);
        }
    }
    stop.cancel();
    relay
        .await
        .expect("relay task")
        .expect("relay stops cleanly");
    assert_eq!(seen.distinct(), EVENTS, "nothing lost");
    assert_eq!(seen.order_violations(), 0);
    assert_eq!(seen.missing_event_id, 0);
    assert_eq!(
        seen.duplicates(),
        0,
        "nothing was published during the outage"
    );
}
