//! The cache processor's answers and refusals as a consumer sees them on Kafka: an answer
//! continues its lookup's whole trace context (traceparent and tracestate), a hit names its
//! result by a CAS ref that comes out typed, and a store whose `result_ref` is not a ref is
//! dead-lettered with that reason while the records after it are applied. The processor runs
//! in this process, the relay as `weir run relay`. Needs the local stack (`infra/local/up`,
//! `infra/local/env`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::Message;
use serde_json::json;
use weir_it::gateway::Setup;
use weir_it::{produce_in_order, random_name, spawn_weir_run};
use weir_model::CasRef;
use weir_runtime::events::{
    new_event, CacheAnswer, CacheEvent, CacheLookup, CacheStore, DeadLetter, Envelope,
};

const NODE_TYPE: &str = "tool";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACESTATE: &str = "weirtest=1,rojo=00f067aa0ba902b7";

fn store(ws: &str, id: &str, result_json: Option<&str>, result_ref: Option<&str>) -> CacheEvent {
    CacheEvent::CacheStore(new_event!(CacheStore {
        envelope: Envelope::new(ws, "", None),
        request_id: id.into(),
        requester: "worker".into(),
        permission: "write".into(),
        node_type: NODE_TYPE.into(),
        config_json: json!({"url": "https://example.test"}).to_string(),
        inputs_json: json!({"q": 1}).to_string(),
        result_json: result_json.map(String::from),
        result_ref: result_ref.map(Into::into),
        prompt: None,
        embedding: None,
        cost_ms: 700,
        required_permission: "read".into(),
    }))
}

fn lookup(ws: &str, id: &str, tracestate: Option<&str>) -> CacheEvent {
    CacheEvent::CacheLookup(new_event!(CacheLookup {
        envelope: Envelope::new(ws, TRACEPARENT, tracestate.map(String::from)),
        request_id: id.into(),
        requester: "reader".into(),
        permission: "read".into(),
        node_type: NODE_TYPE.into(),
        config_json: json!({"url": "https://example.test"}).to_string(),
        inputs_json: json!({"q": 1}).to_string(),
        prompt: None,
        embedding: None,
        semantic: false,
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_continue_the_lookups_trace_and_bad_refs_are_dead_lettered() {
    let setup = Setup::new("cans", |cfg| {
        cfg.cache.cacheable_node_types = vec![NODE_TYPE.into()];
        cfg.cache.semantic_node_types = Vec::new();
    })
    .await;
    let cache = weir_cache::Cache::new(
        setup.pool.clone(),
        setup.cas.clone(),
        Arc::new(setup.cfg.cache.clone()),
        None,
    )
    .await
    .unwrap();
    let processor = setup
        .services
        .consumer(weir_cache::CacheProcessor::new(cache, &setup.cfg.kafka));
    let processor = tokio::spawn(processor.run(setup.shutdown.clone()));
    let _relay = spawn_weir_run(&setup.cfg.kafka.topic_prefix, "relay", &[]);
    let producer = weir_runtime::kafka::producer(&setup.cfg.kafka).unwrap();

    let ws = random_name("ws");
    let result = r#"{"status":200}"#;
    produce_in_order(
        &producer,
        &setup.codec,
        &[
            store(&ws, "not-a-ref", None, Some("sha256:NOT-A-REF")),
            store(&ws, "good", Some(result), None),
            lookup(&ws, "with-tracestate", Some(TRACESTATE)),
            lookup(&ws, "without-tracestate", None),
        ],
    )
    .await
    .unwrap();

    let answers_in = weir_it::reader(&setup.cfg, &[&setup.codec.topic::<CacheAnswer>()]);
    let mut answers: HashMap<String, CacheAnswer> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while answers.len() < 2 && Instant::now() < deadline {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(2), answers_in.recv()).await {
            let a: CacheAnswer = setup.codec.decode(m.payload().unwrap()).await.unwrap();
            if a.workspace_id == ws {
                answers.insert(a.request_id.clone(), a);
            }
        }
    }
    assert_eq!(answers.len(), 2, "answers: {answers:?}");
    let with = &answers["with-tracestate"];
    assert!(with.hit, "{with:?}");
    assert_eq!(with.traceparent, TRACEPARENT);
    assert_eq!(with.tracestate.as_deref(), Some(TRACESTATE));
    let r = with.result_ref.as_ref().expect("a hit names its result");
    assert_eq!(r.get(), Ok(CasRef::of(result.as_bytes())));
    let without = &answers["without-tracestate"];
    assert!(
        without.hit && without.traceparent == TRACEPARENT,
        "{without:?}"
    );
    assert_eq!(without.tracestate, None);

    let letters = weir_it::reader(&setup.cfg, &[&setup.codec.topic::<DeadLetter>()]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let letter = loop {
        assert!(Instant::now() < deadline, "no dead letter for the bad ref");
        let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(2), letters.recv()).await else {
            continue;
        };
        let d: DeadLetter = setup.codec.decode(m.payload().unwrap()).await.unwrap();
        let Some(original) = d.original_value.as_deref() else {
            continue;
        };
        match setup.codec.decode::<CacheEvent>(original).await {
            Ok(CacheEvent::CacheStore(s))
                if s.request_id == "not-a-ref" && s.workspace_id == ws =>
            {
                // The dead letter keeps the record as written.
                assert_eq!(
                    s.result_ref.as_deref(),
                    Some("sha256:NOT-A-REF"),
                    "the original text survives"
                );
                break d;
            }
            _ => continue,
        }
    };
    assert_eq!(letter.error_class, "invalid");
    assert!(
        letter.error_message.contains("result_ref: invalid CAS ref"),
        "{}",
        letter.error_message
    );
    assert!(!processor.is_finished(), "the cache processor stopped");
    setup.shutdown.cancel();
}
