//! Hostile input to the result cache, against the real stack: the cache answers only the
//! question asked (the exact key covers the prompt, a semantic hit needs the same config),
//! the audit trail names the API key for stores and lookups, an escaped e-mail address is
//! refused, and poison records (an empty or over-long prompt, a prompt the embedder answers
//! 400 to, zero / NaN / wrong-length vectors, a required permission above the producer's)
//! are dead-lettered with their reason while the cache processor keeps running and a good
//! record of another workspace right after is applied within seconds.
//!
//! The processor and the gateway run in this process, with the OpenAI-compatible embedder
//! pointed at a tiny HTTP server on 127.0.0.1 (a real HTTP peer, not a mock of weir code):
//! it answers 400 to an input holding `POISON-400` and a deterministic pseudo-random
//! 384-dimension vector per text otherwise (equal texts, equal vectors; different texts,
//! nearly orthogonal ones). Needs the local stack (`infra/local/up`, `infra/local/env`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use weir_gateway::{create_key, Sources};
use weir_it::gateway::{Answer, Gateway, Options, Setup};
use weir_it::{config, produce_in_order, random_name};
use weir_model::Permission;
use weir_runtime::config::{CasBackend, Config, EmbedderKind, Secret};
use weir_runtime::events::{
    new_event_id, now_micros, CacheEvent, CacheLookup, CacheStore, DeadLetter,
};
use weir_runtime::telemetry::Health;

/// Dimension of the deployment's embedding space (pinned in the shared database).
const DIMS: usize = 384;

/// A deterministic pseudo-random vector for `text` (FNV-1a seeds the generator).
fn vector_of(text: &str) -> Vec<f32> {
    let seed = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut rng = StdRng::seed_from_u64(seed);
    (0..DIMS).map(|_| rng.random::<f32>() - 0.5).collect()
}

/// The OpenAI-compatible embeddings endpoint (see the module docs); returns its base URL.
async fn embeddings_endpoint() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                let (head_end, len) = loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        break (i + 4, len);
                    }
                };
                while buf.len() < head_end + len {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body: Value =
                    serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or_default();
                let inputs: Vec<String> = body["input"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|x| x.as_str().unwrap_or("").to_string())
                            .collect()
                    })
                    .unwrap_or_default();
                let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                let (status, answer) = if !head.contains("bearer test-key") {
                    (
                        401,
                        json!({"error": {"message": "Incorrect API key provided"}}),
                    )
                } else if inputs
                    .iter()
                    .any(|t| t.is_empty() || t.contains("POISON-400"))
                {
                    (
                        400,
                        json!({"error": {"message": "This model's maximum context length is exceeded", "type": "invalid_request_error"}}),
                    )
                } else {
                    let data: Vec<Value> = inputs
                        .iter()
                        .enumerate()
                        .map(|(i, t)| json!({"index": i, "embedding": vector_of(t)}))
                        .collect();
                    (200, json!({ "data": data }))
                };
                let text = answer.to_string();
                let reply = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                    text.len()
                );
                let _ = sock.write_all(reply.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}")
}

/// The cache processor and the gateway of one test.
struct Stack {
    gw: Gateway,
    producer: FutureProducer,
    health: Health,
    processor: JoinHandle<Result<(), weir_runtime::error::RuntimeError>>,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for Stack {
    type Target = Gateway;

    fn deref(&self) -> &Gateway {
        &self.gw
    }
}

async fn start() -> Stack {
    start_with(|_| {}).await
}

async fn start_with(tweak: impl FnOnce(&mut Config)) -> Stack {
    let dir = tempfile::tempdir().unwrap();
    let embeddings = embeddings_endpoint().await;
    let setup = Setup::new("hcache", |cfg| {
        cfg.cas.backend = CasBackend::Local;
        cfg.cas.local_dir = dir.path().display().to_string();
        cfg.cache.embedder = EmbedderKind::Openai;
        cfg.cache.dimensions = DIMS as u32;
        cfg.cache.openai_base_url = embeddings;
        cfg.cache.openai_api_key = Secret::new("test-key".to_string());
        cfg.cache.max_prompt_bytes = 1_024;
        cfg.gateway.rate_limit_per_sec = 10_000;
        cfg.gateway.rate_limit_burst = 10_000;
        cfg.gateway.client_rate_limit_per_sec = 10_000;
        cfg.gateway.client_rate_limit_burst = 10_000;
        tweak(cfg);
    })
    .await;
    let embedder = weir_cache::Embedder::from_config(&setup.cfg.cache)
        .await
        .unwrap();
    let cache = weir_cache::Cache::new(
        setup.pool.clone(),
        setup.cas.clone(),
        Arc::new(setup.cfg.cache.clone()),
        Some(embedder),
    )
    .await
    .unwrap();
    let health = setup.services.health.clone();
    let processor = setup.services.consumer(
        weir_cache::CacheProcessor::new(cache.clone(), &setup.cfg.kafka)
            .with_health(health.clone()),
    );
    let processor = tokio::spawn(processor.run(setup.shutdown.clone()));
    let sources = Sources {
        run_status: None,
        cache_lookup: Some(Arc::new(weir_wiring::ResultCacheLookup::new(cache))),
    };
    let gw = setup
        .serve(Options {
            sources,
            ..Options::default()
        })
        .await;
    Stack {
        producer: weir_runtime::kafka::producer(&gw.cfg.kafka).unwrap(),
        gw,
        health,
        processor,
        _dir: dir,
    }
}

/// A key and its public id (`weir_<key_id>_<secret>`).
struct Key {
    key: String,
    id: String,
}

impl Stack {
    async fn key(&self, workspace: &str, permission: Permission) -> Key {
        let k = create_key(&self.pool, workspace, permission).await.unwrap();
        Key {
            key: k.key,
            id: k.key_id,
        }
    }

    async fn post(&self, path: &str, key: &Key, body: Value) -> Answer {
        self.gw.post(path, &key.key, body).await
    }

    /// Polls `sql` (one bigint, `$1` = `bind`) until it is at least `want`, for `within`.
    async fn wait_count(&self, sql: &str, bind: &str, want: i64, within: Duration) -> i64 {
        let deadline = Instant::now() + within;
        loop {
            let n: i64 = sqlx::query_scalar(sql)
                .bind(bind)
                .fetch_one(&self.pool)
                .await
                .unwrap();
            if n >= want || Instant::now() > deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Dead letters of this test's cache topic, by the request id of the original record,
    /// until `want` are seen (60 s at most).
    async fn dead_letters(&self, want: &[&str]) -> HashMap<String, DeadLetter> {
        let consumer = weir_it::reader(&self.cfg, &[&self.codec.topic::<DeadLetter>()]);
        let mut found = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while want.iter().any(|w| !found.contains_key(*w)) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "dead letters seen: {:?}, wanted {want:?}",
                found.keys().collect::<Vec<_>>()
            );
            if let Ok(Ok(m)) = tokio::time::timeout(left, consumer.recv()).await {
                let d: DeadLetter = self.codec.decode(m.payload().unwrap()).await.unwrap();
                let Some(original) = d.original_value.as_deref() else {
                    continue;
                };
                let Ok(e) = self.codec.decode::<CacheEvent>(original).await else {
                    continue;
                };
                let id = match &e {
                    CacheEvent::CacheStore(s) => s.request_id.clone(),
                    CacheEvent::CacheLookup(l) => l.request_id.clone(),
                };
                found.insert(id, d);
            }
        }
        found
    }

    /// The processor task has not ended (no Fatal, no panic).
    fn processor_runs(&self) {
        assert!(!self.processor.is_finished(), "the cache processor stopped");
    }
}

fn store_event(ws: &str, id: &str, prompt: Option<&str>, result: &str) -> CacheStore {
    CacheStore {
        event_id: new_event_id(),
        occurred_at: now_micros(),
        workspace_id: ws.into(),
        traceparent: String::new(),
        tracestate: None,
        request_id: id.into(),
        requester: "worker-key".into(),
        permission: "write".into(),
        node_type: "agent".into(),
        config_json: json!({"model": "m1"}).to_string(),
        inputs_json: json!({"doc": 1}).to_string(),
        result_json: Some(result.into()),
        result_ref: None,
        prompt: prompt.map(String::from),
        embedding: None,
        cost_ms: 900,
        required_permission: "read".into(),
    }
}

fn lookup_event(ws: &str, id: &str, prompt: Option<&str>) -> CacheLookup {
    CacheLookup {
        event_id: new_event_id(),
        occurred_at: now_micros(),
        workspace_id: ws.into(),
        traceparent: String::new(),
        tracestate: None,
        request_id: id.into(),
        requester: "reader-key".into(),
        permission: "read".into(),
        node_type: "agent".into(),
        config_json: json!({"model": "m1"}).to_string(),
        inputs_json: json!({"doc": 2}).to_string(),
        prompt: prompt.map(String::from),
        embedding: None,
        semantic: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_answers_only_the_question_asked_and_audits_the_key() {
    let st = start().await;
    let ws = random_name("ws");
    let (writer, reader) = (
        st.key(&ws, Permission::Write).await,
        st.key(&ws, Permission::Read).await,
    );
    let entry = |prompt: &str| {
        json!({"node_type": "agent", "config": {"model": "m1", "system": "be brief"},
               "inputs": {"doc": 1}, "prompt": prompt,
               "result": {"answer": format!("the answer to {prompt}")}, "cost_ms": 1200,
               "required_permission": "read"})
    };
    let a = st
        .post("/v1/cache/entries", &writer, entry("Summarize the report"))
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.body);
    let n = st
        .wait_count(
            "SELECT count(*) FROM cache_semantic WHERE workspace_id = $1",
            &ws,
            1,
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(n, 1, "the store was applied (exact and semantic entry)");

    let lookup = |prompt: &str, config: Value, inputs: Value, semantic: bool| {
        json!({"node_type": "agent", "config": config, "inputs": inputs,
               "prompt": prompt, "semantic": semantic})
    };
    let m1 = json!({"system": "be brief", "model": "m1"});
    // The same node, config and inputs with another prompt: another question, a miss.
    let other = st
        .post(
            "/v1/cache/lookup",
            &reader,
            lookup("Translate the report", m1.clone(), json!({"doc": 1}), false),
        )
        .await;
    assert_eq!(other.status, StatusCode::OK, "{:?}", other.body);
    assert_eq!(
        other.body["hit"], false,
        "another prompt was served: {:?}",
        other.body
    );
    let other = st
        .post(
            "/v1/cache/lookup",
            &reader,
            lookup("Translate the report", m1.clone(), json!({"doc": 1}), true),
        )
        .await;
    assert_eq!(other.body["hit"], false, "{:?}", other.body);
    // The same prompt: an exact hit.
    let same = st
        .post(
            "/v1/cache/lookup",
            &reader,
            lookup("Summarize the report", m1.clone(), json!({"doc": 1}), false),
        )
        .await;
    assert_eq!(
        (same.body["hit"].clone(), same.body["kind"].clone()),
        (json!(true), json!("exact")),
        "{:?}",
        same.body
    );
    assert_eq!(
        same.body["result"]["answer"],
        "the answer to Summarize the report"
    );
    // Semantic, same prompt (similarity 1) but another model: another question, a miss.
    let m2 = json!({"system": "be brief", "model": "m2"});
    let model = st
        .post(
            "/v1/cache/lookup",
            &reader,
            lookup("Summarize the report", m2, json!({"doc": 7}), true),
        )
        .await;
    assert_eq!(model.status, StatusCode::OK, "{:?}", model.body);
    assert_eq!(
        model.body["hit"], false,
        "another config was served: {:?}",
        model.body
    );
    // Semantic with the same config (other inputs): the entry answers.
    let sem = st
        .post(
            "/v1/cache/lookup",
            &reader,
            lookup("Summarize the report", m1.clone(), json!({"doc": 7}), true),
        )
        .await;
    assert_eq!(
        (sem.body["hit"].clone(), sem.body["kind"].clone()),
        (json!(true), json!("semantic")),
        "{:?}",
        sem.body
    );
    // Client mistakes at the synchronous lookup are 422 with a problem body, never 503.
    for bad in ["", &"x".repeat(2_000)] {
        let a = st
            .post(
                "/v1/cache/lookup",
                &reader,
                lookup(bad, m1.clone(), json!({"doc": 1}), true),
            )
            .await;
        assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{:?}", a.body);
        assert!(
            a.body["detail"].as_str().unwrap_or("").contains("prompt"),
            "{:?}",
            a.body
        );
    }

    // The audit trail: the store names the writer's key, each hit the reader's key.
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT kind, requester, owner FROM cache_audit WHERE workspace_id = $1 ORDER BY at, kind",
    )
    .bind(&ws)
    .fetch_all(&st.pool)
    .await
    .unwrap();
    let by_kind = |k: &str| {
        rows.iter()
            .filter(|r| r.0 == k)
            .map(|r| (r.1.clone(), r.2.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        by_kind("store"),
        vec![(writer.id.clone(), writer.id.clone())],
        "{rows:?}"
    );
    assert_eq!(
        by_kind("exact"),
        vec![(reader.id.clone(), writer.id.clone())],
        "{rows:?}"
    );
    assert_eq!(
        by_kind("semantic"),
        vec![(reader.id.clone(), writer.id.clone())],
        "{rows:?}"
    );
    assert!(
        rows.iter().all(|r| !r.1.starts_with("gateway:")),
        "{rows:?}"
    );

    // An e-mail address hidden behind a JSON escape, as a worker's output reaches the cache
    // (the coordinator forwards output_json as the worker wrote it): refused and audited.
    let escaped = r#"{"contact":"jane.doe\u0040example.com","note":"call back"}"#;
    let id = random_name("pii");
    produce_in_order(
        &st.producer,
        &st.codec,
        &[CacheEvent::CacheStore(store_event(
            &ws,
            &id,
            Some("Who asked?"),
            escaped,
        ))],
    )
    .await
    .unwrap();
    let n = st
        .wait_count(
            "SELECT count(*) FROM cache_audit WHERE request_id = $1 AND kind = 'refused' AND detail = 'pii:email'",
            &id,
            1,
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(n, 1, "the escaped e-mail address was not refused");
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM cache_entries WHERE workspace_id = $1")
            .bind(&ws)
            .fetch_one(&st.pool)
            .await
            .unwrap();
    assert_eq!(stored, 1, "only the first entry is stored");
    st.processor_runs();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_cache_records_cost_one_record_and_others_carry_on() {
    let st = start().await;
    let poison_ws = random_name("ws-poison");
    let good_ws = random_name("ws-good");
    let writer = st.key(&poison_ws, Permission::Write).await;

    // Through the gateway: the processor's own vector and prompt checks answer 422, before
    // anything is produced or stored.
    for (body, needle) in [
        (
            json!({"prompt": "zero vector", "embedding": vec![0.0f32; DIMS]}),
            "zero",
        ),
        (
            json!({"prompt": "short", "embedding": vec![1.0f32; 3]}),
            "3 dimensions",
        ),
        (json!({"prompt": "  "}), "prompt is empty"),
    ] {
        let mut entry = json!({"node_type": "agent", "config": {"model": "m1"},
                               "inputs": {"z": 1}, "result": {"ok": true}, "cost_ms": 5});
        entry
            .as_object_mut()
            .unwrap()
            .extend(body.as_object().unwrap().clone());
        let a = st.post("/v1/cache/entries", &writer, entry).await;
        assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{:?}", a.body);
        assert!(
            a.body["detail"].as_str().unwrap().contains(needle),
            "{:?}",
            a.body
        );
    }

    // Straight onto weir.cache.v1, in one batch.
    let mut nan = vec![0.1f32; DIMS];
    nan[7] = f32::NAN;
    let mut records: Vec<(String, CacheEvent)> = Vec::new();
    let mut poison = |id: &str, e: CacheEvent| records.push((id.to_string(), e));
    poison(
        "empty-prompt",
        CacheEvent::CacheLookup(lookup_event(&poison_ws, "empty-prompt", Some(""))),
    );
    poison(
        "long-prompt",
        CacheEvent::CacheStore(store_event(
            &poison_ws,
            "long-prompt",
            Some(&"y".repeat(5_000)),
            r#"{"a":1}"#,
        )),
    );
    poison(
        "embedder-400-store",
        CacheEvent::CacheStore(store_event(
            &poison_ws,
            "embedder-400-store",
            Some("POISON-400 please"),
            r#"{"a":2}"#,
        )),
    );
    poison(
        "embedder-400-lookup",
        CacheEvent::CacheLookup(lookup_event(
            &poison_ws,
            "embedder-400-lookup",
            Some("POISON-400 again"),
        )),
    );
    let mut nan_lookup = lookup_event(&poison_ws, "nan-vector", None);
    nan_lookup.embedding = Some(nan);
    poison("nan-vector", CacheEvent::CacheLookup(nan_lookup));
    // Producers that skip the gateway: the processor refuses an all-zero vector (finite,
    // but without a direction) itself.
    let mut zero = store_event(&poison_ws, "zero-vector", None, r#"{"a":5}"#);
    zero.embedding = Some(vec![0.0; DIMS]);
    poison("zero-vector", CacheEvent::CacheStore(zero));
    let mut short = store_event(&poison_ws, "short-vector", None, r#"{"a":3}"#);
    short.embedding = Some(vec![1.0; 3]);
    poison("short-vector", CacheEvent::CacheStore(short));
    let mut above = store_event(&poison_ws, "above-own-level", None, r#"{"a":4}"#);
    above.permission = "read".into();
    above.required_permission = "admin".into();
    poison("above-own-level", CacheEvent::CacheStore(above));
    let events: Vec<CacheEvent> = records.iter().map(|(_, e)| e.clone()).collect();
    produce_in_order(&st.producer, &st.codec, &events)
        .await
        .unwrap();

    // Right after: a good store and a good lookup of another workspace.
    let sent = Instant::now();
    let good_id = random_name("good");
    produce_in_order(
        &st.producer,
        &st.codec,
        &[
            CacheEvent::CacheStore(store_event(
                &good_ws,
                &good_id,
                Some("What is the capital of France?"),
                r#"{"answer":"Paris"}"#,
            )),
            CacheEvent::CacheLookup(lookup_event(
                &good_ws,
                "good-lookup",
                Some("What is the capital of France?"),
            )),
        ],
    )
    .await
    .unwrap();
    let n = st
        .wait_count(
            "SELECT count(*) FROM cache_audit WHERE workspace_id = $1 AND kind IN ('store', 'semantic')",
            &good_ws,
            2,
            Duration::from_secs(30),
        )
        .await;
    let took = sent.elapsed();
    assert_eq!(n, 2, "the good store and its semantic hit were applied");
    assert!(
        took < Duration::from_secs(15),
        "the good workspace waited {took:?}"
    );

    let want: Vec<&str> = records.iter().map(|(id, _)| id.as_str()).collect();
    let letters = st.dead_letters(&want).await;
    let reason = |id: &str| letters[id].error_message.clone();
    for (id, needle) in [
        ("empty-prompt", "prompt is empty"),
        ("long-prompt", "max_prompt_bytes"),
        ("embedder-400-store", "400"),
        ("embedder-400-lookup", "400"),
        ("nan-vector", "NaN"),
        ("short-vector", "3 dimensions"),
        ("above-own-level", "cannot store an entry requiring admin"),
        ("zero-vector", "zero"),
    ] {
        assert!(reason(id).contains(needle), "{id}: {}", reason(id));
        assert_eq!(letters[id].error_class, "invalid", "{id}");
    }
    // Nothing of a rejected record was written.
    let written: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM cache_entries WHERE workspace_id = $1)
              + (SELECT count(*) FROM cache_semantic WHERE workspace_id = $1)
              + (SELECT count(*) FROM cache_audit WHERE workspace_id = $1)",
    )
    .bind(&poison_ws)
    .fetch_one(&st.pool)
    .await
    .unwrap();
    assert_eq!(written, 0, "a rejected record left effects behind");
    st.processor_runs();
    assert!(
        st.health.report().contains(&format!(
            "{}: ready",
            weir_cache::processor::EMBEDDER_COMPONENT
        )),
        "{}",
        st.health.report()
    );
}

/// The coordinator's dispatch cache: a failure retrying cannot fix (here a blob path that is
/// a directory: EISDIR, a Fatal CAS error) is rolled back to its savepoint and answered as a
/// miss; the batch transaction stays usable and the hit it could not serve is not audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_dispatch_cache_means_misses_not_a_stopped_coordinator() {
    use weir_coordinator::{CacheCandidate, DispatchCache};
    use weir_wiring::ResultCache;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config("it-hcache-seam");
    cfg.cas.backend = CasBackend::Local;
    cfg.cas.local_dir = dir.path().display().to_string();
    let pool = weir_runtime::db::pool(&cfg.postgres).unwrap();
    let cas = weir_runtime::cas::Cas::local(&cfg.cas).unwrap();
    let cache =
        weir_cache::Cache::new(pool.clone(), cas.clone(), Arc::new(cfg.cache.clone()), None)
            .await
            .unwrap();
    let ws = random_name("ws-seam");
    let (config_v, inputs) = (
        json!({"f": "sum"}),
        json!({"predecessors": {}, "run": {"x": 1}}),
    );
    let out = cache
        .store(&weir_cache::StoreRequest {
            request_id: "seam".into(),
            workspace_id: ws.clone(),
            requester: "run:seed".into(),
            permission: weir_model::Permission::Write,
            node_type: "function".into(),
            config: config_v.clone(),
            inputs: inputs.clone(),
            result: weir_cache::StoreResult::Json(r#"{"sum":3}"#.into()),
            prompt: None,
            embedding: None,
            cost_ms: 40,
            required_permission: weir_model::Permission::Read,
        })
        .await
        .unwrap();
    assert!(
        matches!(out, weir_cache::StoreOutcome::Stored { .. }),
        "{out:?}"
    );
    let seam = ResultCache::new(cas.clone(), Arc::new(cfg.cache.clone()));
    let candidate = CacheCandidate {
        run_id: "run-1".into(),
        node_id: "n".into(),
        workspace_id: ws.clone(),
        requester: "key".into(),
        permission: "write".into(),
        node_type: "function".into(),
        config: config_v,
        inputs,
    };
    let audited = |pool: sqlx::PgPool, ws: String| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM cache_audit WHERE workspace_id = $1 AND kind = 'exact'",
        )
        .bind(ws)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    // Healthy: a hit, audited.
    let mut tx = pool.begin().await.unwrap();
    let got = seam
        .lookup(&mut tx, std::slice::from_ref(&candidate))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let hit = got[0].as_ref().expect("a hit");
    assert_eq!(audited(pool.clone(), ws.clone()).await, 1);

    // Broken: the blob's path becomes a directory.
    let r: weir_model::CasRef = hit
        .output_ref
        .clone()
        .unwrap_or_else(|| weir_model::CasRef::of(br#"{"sum":3}"#).to_string())
        .parse()
        .unwrap();
    let path = dir.path().join(cas.key(&r));
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir_all(&path).unwrap();
    let mut tx = pool.begin().await.unwrap();
    let got = seam
        .lookup(&mut tx, std::slice::from_ref(&candidate))
        .await
        .expect("a broken cache is a miss, not an error");
    assert_eq!(got, vec![None]);
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(one, 1, "the batch transaction is still usable");
    tx.commit().await.unwrap();
    assert_eq!(
        audited(pool.clone(), ws.clone()).await,
        1,
        "the unserved hit's audit row was rolled back"
    );
    // Rolled back, not settled as a bad blob (which would have deleted the entry): the
    // failure was the CAS's, and the entry answers again once the CAS is fixed.
    let entries: i64 =
        sqlx::query_scalar("SELECT count(*) FROM cache_entries WHERE workspace_id = $1")
            .bind(&ws)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(entries, 1);
}

/// A wrong API key for the embeddings endpoint (401) is the operator's to fix: the batch is
/// retried with backoff and the processor reports not ready — it does not stop, and the
/// record is neither dead-lettered nor half applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misconfigured_embedder_lowers_readiness_instead_of_stopping() {
    let st = start_with(|c| c.cache.openai_api_key = Secret::new("wrong".to_string())).await;
    let ws = random_name("ws-misconf");
    let id = random_name("st");
    produce_in_order(
        &st.producer,
        &st.codec,
        &[CacheEvent::CacheStore(store_event(
            &ws,
            &id,
            Some("needs an embedding"),
            r#"{"a":1}"#,
        ))],
    )
    .await
    .unwrap();
    let component = weir_cache::processor::EMBEDDER_COMPONENT;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !st
        .health
        .report()
        .contains(&format!("{component}: not ready"))
    {
        assert!(Instant::now() < deadline, "{}", st.health.report());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!st.health.ready());
    // Still running through a few retries, nothing written.
    tokio::time::sleep(Duration::from_secs(3)).await;
    st.processor_runs();
    let written: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM cache_entries WHERE workspace_id = $1)
              + (SELECT count(*) FROM cache_audit WHERE workspace_id = $1)",
    )
    .bind(&ws)
    .fetch_one(&st.pool)
    .await
    .unwrap();
    assert_eq!(written, 0);
}
