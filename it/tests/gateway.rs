//! The HTTP gateway against the real stack: every endpoint and every error case, the events
//! it produces (read back from Kafka and decoded), the materializer deciding what it accepted,
//! the rate limit, Kafka down (503, nothing accepted) and schemathesis driving
//! docs/openapi.json (no 5xx, no response outside the document).

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;
use weir_gateway::{RunStatusSource, SourceError, Sources};
use weir_it::gateway::{Gateway, Options};
use weir_it::{config, random_name};
use weir_model::{Permission, RunStatus};
use weir_runtime::config::Config;
use weir_runtime::events::{CacheEvent, CompletionEvent, NodeStatus, PatchSubmitted};

/// A gateway (and, if asked, a materializer) in this process, on fresh topics.
async fn start(tweak: impl FnOnce(&mut Config), sources: Sources, materializer: bool) -> Gateway {
    let configure = |cfg: &mut Config| {
        cfg.gateway.max_body_bytes = 64 * 1024;
        tweak(cfg);
    };
    let options = Options {
        sources,
        materializer,
        problems_under: Some("/v1"),
        ..Options::default()
    };
    Gateway::start("gw", configure, options).await
}

fn definition(n: u64) -> Value {
    json!({"nodes": {"fetch": {"type": "http_request", "config": {"n": n}},
                     "sum": {"type": "agent", "config": {}}},
           "edges": [{"from": "fetch", "to": "sum"}], "settings": {"max_hops": 10}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflows_and_patches_with_every_error_case() {
    let gw = start(|_| {}, Sources::default(), true).await;
    let ws = random_name("ws");
    let (write, read) = (
        gw.key(&ws, Permission::Write).await,
        gw.key(&ws, Permission::Read).await,
    );
    let other = gw.key(&random_name("ws"), Permission::Admin).await;
    let wf = format!("wf-{}", Uuid::now_v7().simple());
    let path = format!("/v1/workflows/{wf}");

    // Auth: no key, a malformed header, an unknown key → 401; a read key writing → 403.
    let a = gw.call(Method::GET, &path, None, &[], None).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let a = gw
        .call(
            Method::GET,
            &path,
            None,
            &[("authorization", "Basic eDp5")],
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let a = gw.get(&path, "weir_000000000000_nope").await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let a = gw
        .call(
            Method::PUT,
            &path,
            Some(&read),
            &[],
            Some(definition(1).to_string()),
        )
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);

    // Unknown workflow: 404 to read, to patch, to read a patch of.
    assert_eq!(gw.get(&path, &read).await.status, StatusCode::NOT_FOUND);
    let ops = json!([{"op": "replace", "path": "/nodes/fetch/config/n", "value": 2}]);
    assert_eq!(
        gw.post(&format!("{path}/patches"), &write, ops.clone())
            .await
            .status,
        StatusCode::NOT_FOUND
    );

    // Bad input: malformed JSON 400, an invalid definition 422 (with the materializer's code),
    // a bad id 400, a body over the limit 413.
    let a = gw
        .call(
            Method::PUT,
            &path,
            Some(&write),
            &[],
            Some("{\"nodes\":".into()),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let cyclic = json!({"nodes": {"a": {"type": "pure", "config": {}}}, "edges": [{"from": "a", "to": "a"}]});
    let a = gw
        .call(
            Method::PUT,
            &path,
            Some(&write),
            &[],
            Some(cyclic.to_string()),
        )
        .await;
    assert_eq!(
        (a.status, a.body["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_definition"))
    );
    let a = gw
        .call(
            Method::PUT,
            "/v1/workflows/bad%20id",
            Some(&write),
            &[],
            Some(definition(1).to_string()),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let huge = json!({"nodes": {"a": {"type": "pure", "config": {"pad": "x".repeat(70_000)}}}, "edges": []});
    let a = gw
        .call(
            Method::PUT,
            &path,
            Some(&write),
            &[],
            Some(huge.to_string()),
        )
        .await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);

    // Create (202 once in Kafka), then the materializer makes version 1.
    let a = gw
        .call(
            Method::PUT,
            &path,
            Some(&write),
            &[],
            Some(definition(1).to_string()),
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    let created: Uuid = a.body["patch_id"].as_str().unwrap().parse().unwrap();
    let head = gw
        .wait_for(&path, &read, |a| a.status == StatusCode::OK)
        .await;
    assert_eq!(head.body["version"], 1);
    assert_eq!(head.body["definition"], definition(1));
    assert_eq!(head.headers["etag"], "\"1\"");
    let a = gw
        .call(
            Method::GET,
            &path,
            Some(&read),
            &[("if-none-match", "\"1\"")],
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::NOT_MODIFIED);
    let a = gw.get(&format!("{path}/patches/{created}"), &read).await;
    assert_eq!(
        (a.body["status"].as_str(), a.body["version"].as_i64()),
        (Some("applied"), Some(1))
    );

    // `If-Match: 0` creates only: the workflow exists now.
    let a = gw
        .call(
            Method::PUT,
            &path,
            Some(&write),
            &[("if-match", "0")],
            Some(definition(5).to_string()),
        )
        .await;
    assert_eq!(a.status, StatusCode::PRECONDITION_FAILED);

    // Another workspace sees nothing and cannot write.
    assert_eq!(gw.get(&path, &other).await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        gw.get(&format!("{path}/patches/{created}"), &other)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        gw.post(&format!("{path}/patches"), &other, ops.clone())
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let a = gw
        .call(
            Method::PUT,
            &path,
            Some(&other),
            &[],
            Some(definition(9).to_string()),
        )
        .await;
    // Workflow ids are scoped per workspace: the same id elsewhere is another workflow, created
    // exactly as a free id would be (it/tests/hostile_tenancy.rs checks the isolation).
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);

    // Patches: invalid operations 422, a stale If-Match 412, a good one applies; the same
    // Idempotency-Key twice names one patch, applied once.
    let a = gw
        .post(
            &format!("{path}/patches"),
            &write,
            json!([{"op": "jump", "path": "/x"}]),
        )
        .await;
    assert_eq!(
        (a.status, a.body["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_operation"))
    );
    let a = gw
        .post(&format!("{path}/patches"), &write, json!({"op": "add"}))
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    let a = gw
        .call(
            Method::POST,
            &format!("{path}/patches"),
            Some(&write),
            &[("if-match", "\"7\"")],
            Some(ops.to_string()),
        )
        .await;
    assert_eq!(a.status, StatusCode::PRECONDITION_FAILED);
    let a = gw
        .call(
            Method::POST,
            &format!("{path}/patches"),
            Some(&write),
            &[("if-match", "nope")],
            Some(ops.to_string()),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let idem = [("if-match", "\"1\""), ("idempotency-key", "change-n-to-2")];
    let first = gw
        .call(
            Method::POST,
            &format!("{path}/patches"),
            Some(&write),
            &idem,
            Some(ops.to_string()),
        )
        .await;
    let again = gw
        .call(
            Method::POST,
            &format!("{path}/patches"),
            Some(&write),
            &idem[1..],
            Some(ops.to_string()),
        )
        .await;
    assert_eq!(
        (first.status, again.status),
        (StatusCode::ACCEPTED, StatusCode::ACCEPTED)
    );
    assert_eq!(
        first.body["patch_id"], again.body["patch_id"],
        "one idempotency key, one patch"
    );
    let patch = format!(
        "{path}/patches/{}",
        first.body["patch_id"].as_str().unwrap()
    );
    let a = gw
        .wait_for(&patch, &read, |a| a.body["status"] != "pending")
        .await;
    assert_eq!(
        (a.body["status"].as_str(), a.body["version"].as_i64()),
        (Some("applied"), Some(2))
    );
    // A patch that parses but does not apply is 202, then rejected by the materializer.
    let failing = json!([{"op": "test", "path": "/settings/max_hops", "value": 99}]);
    let a = gw.post(&format!("{path}/patches"), &write, failing).await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    let rejected = format!("{path}/patches/{}", a.body["patch_id"].as_str().unwrap());
    let a = gw
        .wait_for(&rejected, &read, |a| a.body["status"] != "pending")
        .await;
    assert_eq!(
        (a.body["status"].as_str(), a.body["code"].as_str()),
        (Some("rejected"), Some("test_failed"))
    );
    let head = gw.get(&path, &read).await;
    assert_eq!(
        head.body["version"], 2,
        "the duplicate and the failing patch made no version"
    );
    assert_eq!(head.body["definition"]["nodes"]["fetch"]["config"]["n"], 2);
    assert_eq!(
        gw.get(&format!("{path}/patches/not-a-uuid"), &read)
            .await
            .status,
        StatusCode::BAD_REQUEST
    );

    // Replace the whole definition (PUT on an existing workflow) with the right If-Match.
    let a = gw
        .call(
            Method::PUT,
            &path,
            Some(&write),
            &[("if-match", "2")],
            Some(definition(3).to_string()),
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    let head = gw.wait_for(&path, &read, |a| a.body["version"] == 3).await;
    assert_eq!(head.body["definition"], definition(3));

    // The events on weir.patches.v1: keyed by workflow id, in the key's workspace, authored
    // by the key, the PUT as a root replacement. The other workspace's PUT of the same id is
    // an event of its own workspace.
    let events: Vec<PatchSubmitted> = gw.events(6).await;
    let (events, others): (Vec<_>, Vec<_>) = events.into_iter().partition(|e| e.workspace_id == ws);
    assert_eq!(
        others.len(),
        1,
        "the other workspace's own workflow of the same id"
    );
    assert!(events
        .iter()
        .all(|e| e.workflow_id == wf && e.workspace_id == ws));
    assert_eq!(events[0].patch_id, created);
    let ops0: Value = serde_json::from_str(&events[0].operations_json).unwrap();
    assert_eq!(
        ops0,
        json!([{"op": "add", "path": "", "value": definition(1)}])
    );
    assert_eq!(
        events.iter().filter(|e| e.base_version == Some(1)).count(),
        1
    );

    // Unrouted paths and methods are problems too.
    assert_eq!(
        gw.get("/v1/nothing", &read).await.status,
        StatusCode::NOT_FOUND
    );
    let a = gw
        .call(Method::DELETE, &path, Some(&write), &[], None)
        .await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    for (p, want) in [("/healthz", 200), ("/readyz", 200), ("/openapi.json", 200)] {
        let a = gw.wait_for(p, &read, |a| a.status.as_u16() == want).await;
        assert_eq!(a.status.as_u16(), want, "{p}");
    }
    // Metrics are on the telemetry listener (this process's recorder), never on the API port.
    assert_eq!(
        gw.get("/metrics", &read).await.status,
        StatusCode::NOT_FOUND
    );
    assert!(weir_runtime::telemetry::metrics_handle()
        .render()
        .contains("weir_gateway_requests_total"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_completions_and_cache_entries_become_events() {
    let gw = start(|_| {}, Sources::default(), true).await;
    let ws = random_name("ws");
    let (write, read) = (
        gw.key(&ws, Permission::Write).await,
        gw.key(&ws, Permission::Read).await,
    );
    let other = gw.key(&random_name("ws"), Permission::Admin).await;
    let wf = format!("wf-{}", Uuid::now_v7().simple());
    let a = gw
        .call(
            Method::PUT,
            &format!("/v1/workflows/{wf}"),
            Some(&write),
            &[],
            Some(definition(1).to_string()),
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED);

    // Runs: 202 with a run id; the idempotency key names one run; errors.
    let run = json!({"workflow_id": wf, "inputs": {"url": "https://example.com"}, "idempotency_key": "r-1"});
    let a = gw.post("/v1/runs", &write, run.clone()).await;
    let b = gw.post("/v1/runs", &write, run.clone()).await;
    assert_eq!(
        (a.status, b.status),
        (StatusCode::ACCEPTED, StatusCode::ACCEPTED)
    );
    assert_eq!(
        a.body["run_id"], b.body["run_id"],
        "one idempotency key, one run"
    );
    let run_id = a.body["run_id"].as_str().unwrap().to_string();
    let c = gw
        .post(
            "/v1/runs",
            &write,
            json!({"workflow_id": wf, "version": 1, "inputs": {}}),
        )
        .await;
    assert_eq!(c.status, StatusCode::ACCEPTED);
    assert_ne!(c.body["run_id"], a.body["run_id"]);
    assert_eq!(
        gw.post("/v1/runs", &other, run.clone()).await.status,
        StatusCode::NOT_FOUND,
        "another workspace's workflow"
    );
    assert_eq!(
        gw.post("/v1/runs", &read, run.clone()).await.status,
        StatusCode::FORBIDDEN
    );
    let bad = [
        json!({"workflow_id": wf, "inputs": "text"}),
        json!({"workflow_id": wf}),
        json!({"workflow_id": wf, "inputs": {}, "version": 0}),
        json!({"workflow_id": wf, "inputs": {}, "colour": "red"}),
    ];
    for body in bad {
        assert_eq!(
            gw.post("/v1/runs", &write, body.clone()).await.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}"
        );
    }
    let unknown = gw
        .post(
            "/v1/runs",
            &write,
            json!({"workflow_id": "wf-none", "inputs": {}}),
        )
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    // Status needs the coordinator's read model: not configured here.
    let a = gw.get(&format!("/v1/runs/{run_id}"), &read).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.body["detail"], "run status not configured");
    assert!(a.headers.contains_key("retry-after"));

    // Completions and cancellation.
    let done = format!("/v1/runs/{run_id}/nodes/fetch/completions");
    let a = gw
        .post(
            &done,
            &write,
            json!({"attempt": 1, "status": "succeeded", "output": {"pages": 3}, "duration_ms": 40}),
        )
        .await;
    assert_eq!(
        (a.status, a.body["attempt"].as_i64()),
        (StatusCode::ACCEPTED, Some(1))
    );
    for body in [
        json!({"attempt": 0, "status": "succeeded"}),
        json!({"attempt": 1, "status": "maybe"}),
        json!({"attempt": 1, "status": "succeeded", "output": 1, "output_ref": format!("sha256:{}", "a".repeat(64))}),
        json!({"attempt": 1, "status": "failed", "output_ref": "nonsense"}),
        json!({"attempt": "one", "status": "failed"}),
    ] {
        assert_eq!(
            gw.post(&done, &write, body.clone()).await.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}"
        );
    }
    assert_eq!(
        gw.post("/v1/runs/not-a-run/cancel", &write, json!({}))
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    let a = gw
        .call(
            Method::POST,
            &format!("/v1/runs/{run_id}/cancel"),
            Some(&write),
            &[],
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    let a = gw
        .post(
            &format!("/v1/runs/{run_id}/cancel"),
            &write,
            json!({"reason": "changed my mind"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED);

    let events: Vec<CompletionEvent> = gw.events(6).await;
    let mut requested = 0;
    for e in &events {
        match e {
            CompletionEvent::RunRequested(r) => {
                requested += 1;
                assert_eq!(
                    (
                        r.workspace_id.as_str(),
                        r.workflow_id.as_str(),
                        r.permission.as_str()
                    ),
                    (ws.as_str(), wf.as_str(), "write")
                );
                if r.run_id == run_id {
                    assert_eq!(r.idempotency_key.as_deref(), Some("r-1"));
                    assert_eq!(
                        serde_json::from_str::<Value>(r.inputs_json.as_deref().unwrap()).unwrap(),
                        run["inputs"]
                    );
                } else {
                    assert_eq!(r.version, Some(1));
                }
            }
            CompletionEvent::NodeCompleted(c) => {
                assert_eq!(
                    (c.run_id.as_str(), c.node_id.as_str(), c.attempt, c.status),
                    (run_id.as_str(), "fetch", 1, NodeStatus::Succeeded)
                );
                assert_eq!(c.output_json.as_deref(), Some("{\"pages\":3}"));
                assert_eq!(c.duration_ms, 40);
            }
            CompletionEvent::RunCancelRequested(c) => assert_eq!(c.run_id, run_id),
        }
    }
    assert_eq!(
        requested, 3,
        "the retried run request is produced again, with the same run id"
    );
    let retried: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            CompletionEvent::RunRequested(r) if r.run_id == run_id => Some(r.event_id),
            _ => None,
        })
        .collect();
    assert_eq!(retried.len(), 2);
    assert_ne!(
        retried[0], retried[1],
        "event ids stay fresh UUIDv7s; the run id is the dedup key"
    );
    assert!(retried.iter().all(|id| id.get_version_num() == 7));

    // Cache entries (write) and lookups (read; not configured here).
    let entry = json!({"node_type": "agent", "config": {"model": "small"}, "inputs": {"q": 1},
                       "result": {"answer": 42}, "prompt": "what is it", "cost_ms": 900});
    let a = gw.post("/v1/cache/entries", &write, entry.clone()).await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    let request_id = a.body["request_id"].as_str().unwrap().to_string();
    assert_eq!(
        gw.post("/v1/cache/entries", &read, entry.clone())
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    let mut both = entry.clone();
    both["result_ref"] = json!(format!("sha256:{}", "b".repeat(64)));
    assert_eq!(
        gw.post("/v1/cache/entries", &write, both).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let a = gw
        .post(
            "/v1/cache/lookup",
            &read,
            json!({"node_type": "agent", "config": {}, "inputs": {}}),
        )
        .await;
    assert_eq!(
        (a.status, a.body["detail"].as_str()),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("cache lookup not configured")
        )
    );
    let a = gw
        .post(
            "/v1/cache/lookup",
            &read,
            json!({"node_type": 5, "config": {}, "inputs": {}}),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    let stored: Vec<CacheEvent> = gw.events(1).await;
    let CacheEvent::CacheStore(s) = &stored[0] else {
        panic!("expected CacheStore, got {:?}", stored[0])
    };
    assert_eq!(
        (
            s.request_id.as_str(),
            s.workspace_id.as_str(),
            s.node_type.as_str()
        ),
        (request_id.as_str(), ws.as_str(), "agent")
    );
    assert_eq!(
        (
            s.result_json.as_deref(),
            s.cost_ms,
            s.required_permission.as_str()
        ),
        (Some("{\"answer\":42}"), 900, "write")
    );
    assert_eq!(s.config_json, "{\"model\":\"small\"}");
}

/// The coordinator's run state is not built here; this in-memory read model stands in for it
/// so that the gateway's handling of a configured source is exercised.
struct Runs(HashMap<(String, Uuid), RunStatus>);

#[async_trait]
impl RunStatusSource for Runs {
    async fn run_status(&self, ws: &str, run_id: Uuid) -> Result<Option<RunStatus>, SourceError> {
        Ok(self.0.get(&(ws.to_string(), run_id)).cloned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_status_rate_limit_and_kafka_down() {
    let ws = random_name("ws");
    let run_id = Uuid::now_v7();
    let status = RunStatus {
        run_id,
        workflow_id: "wf".into(),
        version: Some(1),
        status: "running".into(),
        reason: None,
        nodes: vec![weir_model::run::NodeState {
            node_id: "fetch".into(),
            node_type: "http_request".into(),
            status: "running".into(),
            attempt: 1,
        }],
    };
    let runs = Runs(HashMap::from([((ws.clone(), run_id), status)]));
    let sources = Sources {
        run_status: Some(Arc::new(runs)),
        cache_lookup: None,
    };
    let gw = start(
        |c| {
            c.gateway.rate_limit_per_sec = 1;
            c.gateway.rate_limit_burst = 3;
        },
        sources,
        false,
    )
    .await;
    let read = gw.key(&ws, Permission::Read).await;
    let write = gw.key(&ws, Permission::Write).await;
    let other = gw.key(&random_name("ws"), Permission::Admin).await;

    let a = gw.get(&format!("/v1/runs/{run_id}"), &read).await;
    assert_eq!(
        (a.status, a.body["status"].as_str()),
        (StatusCode::OK, Some("running"))
    );
    assert_eq!(a.body["nodes"][0]["node_id"], "fetch");
    assert_eq!(
        gw.get(&format!("/v1/runs/{run_id}"), &other).await.status,
        StatusCode::NOT_FOUND
    );
    let missing = Uuid::now_v7();
    let a = gw
        .post(&format!("/v1/runs/{missing}/cancel"), &write, json!({}))
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "cancelling an unknown run");
    let a = gw
        .post(
            &format!("/v1/runs/{missing}/nodes/x/completions"),
            &write,
            json!({"attempt": 1, "status": "failed"}),
        )
        .await;
    assert_eq!(
        a.status,
        StatusCode::NOT_FOUND,
        "completing a node of an unknown run"
    );
    // The three requests of the burst are spent; the next is over the limit.
    let a = gw.get(&format!("/v1/runs/{run_id}"), &read).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(a.headers["retry-after"], "1");
    assert_eq!(
        gw.get(&format!("/v1/runs/{run_id}"), &other).await.status,
        StatusCode::NOT_FOUND,
        "other workspaces have their own bucket"
    );

    // Kafka unreachable: 503 with Retry-After, and nothing was accepted.
    let down = start(
        |c| {
            c.kafka.bootstrap_servers = "127.0.0.1:1".into();
            c.gateway.produce_timeout_ms = 1_500;
            c.gateway.max_in_flight = 1;
        },
        Sources::default(),
        false,
    )
    .await;
    let key = down.key(&random_name("ws"), Permission::Write).await;
    let wf = format!("wf-{}", Uuid::now_v7().simple());
    let a = down
        .call(
            Method::PUT,
            &format!("/v1/workflows/{wf}"),
            Some(&key),
            &[],
            Some(definition(1).to_string()),
        )
        .await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(a.headers.contains_key("retry-after"));
    // The bound on requests waiting for Kafka: while one waits, the next is refused at once.
    let body = definition(2).to_string();
    let (path_a, path_b) = (
        format!("/v1/workflows/{wf}-a"),
        format!("/v1/workflows/{wf}-b"),
    );
    let (slow, fast) = tokio::join!(
        down.call(Method::PUT, &path_a, Some(&key), &[], Some(body.clone())),
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let t = Instant::now();
            let a = down
                .call(Method::PUT, &path_b, Some(&key), &[], Some(body.clone()))
                .await;
            (a, t.elapsed())
        }
    );
    assert_eq!(slow.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(fast.0.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        fast.0.body["detail"],
        "too many requests are waiting for Kafka"
    );
    assert!(
        fast.1 < Duration::from_millis(1_000),
        "refused without waiting: {:?}",
        fast.1
    );
    let a = down
        .post(
            &format!("/v1/workflows/{wf}/patches"),
            &key,
            json!([{"op": "remove", "path": "/edges/0"}]),
        )
        .await;
    assert_eq!(
        a.status,
        StatusCode::NOT_FOUND,
        "the refused creation left nothing behind"
    );
    assert_eq!(
        down.get("/readyz", &key).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

/// The read models `weir run gateway` uses: run status from the coordinator's tables and
/// lookups in the result cache (with the built-in embedder).
async fn real_sources() -> Sources {
    let cfg = config("");
    let pool = weir_runtime::db::pool(&cfg.postgres).unwrap();
    let cas = weir_runtime::cas::Cas::from_config(&cfg).await.unwrap();
    let embedder = weir_cache::Embedder::from_config(&cfg.cache).await.unwrap();
    let cache = weir_cache::Cache::new(
        pool.clone(),
        cas,
        std::sync::Arc::new(cfg.cache.clone()),
        Some(embedder),
    )
    .await
    .unwrap();
    Sources {
        run_status: Some(std::sync::Arc::new(weir_wiring::CoordinatorRunStatus::new(
            pool,
        ))),
        cache_lookup: Some(std::sync::Arc::new(weir_wiring::ResultCacheLookup::new(
            cache,
        ))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_5xx_and_no_response_outside_the_document() {
    let venv = std::env::var("WEIR_CACHE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/weir")
        })
        .join("venv/bin/schemathesis");
    assert!(
        venv.exists(),
        "{} missing: run infra/local/prereqs",
        venv.display()
    );
    let gw = start(|_| {}, real_sources().await, true).await;
    let ws = random_name("ws");
    let key = gw.key(&ws, Permission::Write).await;
    // One workflow that exists, so that patch and run operations also reach their 202 path.
    let a = gw
        .call(
            Method::PUT,
            "/v1/workflows/wf-1",
            Some(&key),
            &[],
            Some(definition(1).to_string()),
        )
        .await;
    assert!(
        a.status == StatusCode::ACCEPTED || a.status == StatusCode::NOT_FOUND,
        "{}",
        a.body
    );
    let doc = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    let base = gw.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(venv)
            .args(["run", doc, "--url", &base, "--header", &format!("Authorization: Bearer {key}")])
            .args(["--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance"])
            // One worker: hypothesis's source introspection is not thread-safe on Python 3.11.
            .args(["--max-examples", "40", "--seed", "7", "--workers", "1", "--no-color"])
            // Live streams never end on their own: their own test (it/tests/streams.rs) covers them.
            .args(["--exclude-operation-id", "streamRunEvents", "--exclude-operation-id", "streamWorkflowEvents"])
            .env("SCHEMATHESIS_HOOKS", "")
            // schemathesis keeps a cache directory in its working directory.
            .current_dir(std::env::temp_dir())
            .output()
            .expect("run schemathesis")
    })
    .await
    .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis failed:\n{text}");
    assert!(!text.contains("Server error"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payloads_travel_through_the_cas() {
    let gw = start(
        |c| c.gateway.inline_max_bytes = 2_048,
        Sources::default(),
        true,
    )
    .await;
    let ws = random_name("ws");
    let write = gw.key(&ws, Permission::Write).await;
    let wf = format!("wf-{}", Uuid::now_v7().simple());
    let path = format!("/v1/workflows/{wf}");
    let mut big = definition(1);
    big["nodes"]["fetch"]["config"]["notes"] = json!("n".repeat(5_000));
    let a = gw
        .call(Method::PUT, &path, Some(&write), &[], Some(big.to_string()))
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    let head = gw
        .wait_for(&path, &write, |a| a.status == StatusCode::OK)
        .await;
    assert_eq!(
        head.body["definition"], big,
        "applied from the CAS reference"
    );
    let inputs = json!({"document": "d".repeat(5_000)});
    let a = gw
        .post(
            "/v1/runs",
            &write,
            json!({"workflow_id": wf, "inputs": inputs}),
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED);

    let patches: Vec<PatchSubmitted> = gw.events(1).await;
    assert_eq!(
        patches[0].operations_json, "",
        "operations by reference only"
    );
    assert!(patches[0].operations_ref.is_some());
    let runs: Vec<CompletionEvent> = gw.events(1).await;
    let CompletionEvent::RunRequested(r) = &runs[0] else {
        panic!("expected RunRequested, got {:?}", runs[0])
    };
    assert_eq!(r.inputs_json, None);
    let cas = weir_runtime::cas::Cas::from_config(&gw.cfg).await.unwrap();
    let stored: Value = cas
        .get_json(&r.inputs_ref.as_deref().unwrap().parse().unwrap())
        .await
        .unwrap();
    assert_eq!(stored, inputs);
}
