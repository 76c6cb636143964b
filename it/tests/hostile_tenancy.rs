//! Tenant isolation against the real stack (tenant scoping and CAS garbage collection):
//! workflow ids are scoped per workspace, CAS refs are owned per workspace, and
//! the cache's garbage collector never deletes a blob something still needs.
//!
//! Each test runs the gateway, the materializer and the coordinator in this process on fresh
//! topics, with a CAS in a temporary directory, and drives them as tenants would: over HTTP,
//! and by producing events straight to the topics (what a tenant with broker access, or a
//! buggy worker, could send). Each checks the hostile input's clear 4xx or dead letter, that
//! the processors keep running, and that another workspace's good record still applies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;
use weir_cache::maintenance::{gc_once, sweep_all, GcWindow};
use weir_cache::{Cache, Refusal, StoreOutcome, StoreRequest, StoreResult};
use weir_it::gateway::{Answer, Gateway, Options};
use weir_it::{produce, random_name};
use weir_model::CasRef;
use weir_model::Permission;
use weir_runtime::config::{CasBackend, Config};
use weir_runtime::events::{self, CompletionEvent, DeadLetter, NodeCompleted, NodeStatus};

/// The gateway, the materializer and the coordinator of one test.
struct Stack {
    gw: Gateway,
    producer: FutureProducer,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for Stack {
    type Target = Gateway;

    fn deref(&self) -> &Gateway {
        &self.gw
    }
}

async fn start(tweak: impl FnOnce(&mut Config)) -> Stack {
    let dir = tempfile::tempdir().unwrap();
    let configure = |cfg: &mut Config| {
        cfg.cas.backend = CasBackend::Local;
        cfg.cas.local_dir = dir.path().display().to_string();
        cfg.gateway.rate_limit_per_sec = 10_000;
        cfg.gateway.rate_limit_burst = 10_000;
        cfg.gateway.client_rate_limit_per_sec = 10_000;
        cfg.gateway.client_rate_limit_burst = 10_000;
        tweak(cfg);
    };
    let options = Options {
        materializer: true,
        coordinator: true,
        ..Options::default()
    };
    let gw = Gateway::start("tenancy", configure, options).await;
    Stack {
        producer: weir_runtime::kafka::producer(&gw.cfg.kafka).unwrap(),
        gw,
        _dir: dir,
    }
}

impl Stack {
    async fn key(&self, workspace: &str) -> String {
        self.gw.key(workspace, Permission::Write).await
    }

    async fn call(&self, method: Method, path: &str, key: &str, body: Option<Value>) -> Answer {
        let body = body.map(|b| b.to_string());
        self.gw.call(method, path, Some(key), &[], body).await
    }

    /// Polls `sql` (one bigint, bound to `binds`) until it is at least `want`.
    async fn wait_count(&self, sql: &str, binds: &[&str], want: i64) -> i64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut q = sqlx::query_scalar::<_, i64>(sql);
            for b in binds {
                q = q.bind(*b);
            }
            let n = q.fetch_one(&self.pool).await.unwrap();
            if n >= want || Instant::now() > deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Dead letters of this test's topics whose message contains `needle` (60 s at most).
    async fn dead_letter(&self, needle: &str) -> DeadLetter {
        let consumer = weir_it::reader(&self.cfg, &[&self.codec.topic::<DeadLetter>()]);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no dead letter mentioning {needle:?}");
            if let Ok(Ok(m)) = tokio::time::timeout(left, consumer.recv()).await {
                let d: DeadLetter = self.codec.decode(m.payload().unwrap()).await.unwrap();
                if d.error_message.contains(needle) {
                    return d;
                }
            }
        }
    }
}

fn definition(tag: &str) -> Value {
    json!({"nodes": {"s": {"type": "function", "config": {"tag": tag}}},
           "edges": [], "settings": {"max_hops": 5}})
}

/// `body` with every occurrence of `from` replaced by `to` (to compare problem bodies that
/// name the thing asked for).
fn renamed(body: &Value, from: &str, to: &str) -> Value {
    serde_json::from_str(&body.to_string().replace(from, to)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_ids_are_scoped_per_workspace_and_reveal_nothing() {
    let st = start(|_| {}).await;
    let (ws_a, ws_b) = (random_name("ws-a"), random_name("ws-b"));
    let (a, b) = (st.key(&ws_a).await, st.key(&ws_b).await);
    let x = format!("x-{}", Uuid::now_v7().simple());
    let free = format!("free-{}", Uuid::now_v7().simple());
    let path = format!("/v1/workflows/{x}");

    // A creates "x".
    let put = st
        .call(Method::PUT, &path, &a, Some(definition("a1")))
        .await;
    assert_eq!(put.status, StatusCode::ACCEPTED, "{:?}", put.body);
    st.wait_for(&path, &a, |r| r.status == StatusCode::OK).await;

    // B probing A's name gets exactly what a never-used name gets: same status, same body.
    for (method, suffix, body) in [
        (Method::GET, "", None),
        (
            Method::POST,
            "/patches",
            Some(json!([{"op": "add", "path": "/settings/max_hops", "value": 3}])),
        ),
        (
            Method::GET,
            &format!("/patches/{}", Uuid::now_v7()) as &str,
            None,
        ),
    ] {
        let taken = st
            .call(method.clone(), &format!("{path}{suffix}"), &b, body.clone())
            .await;
        let never = st
            .call(
                method.clone(),
                &format!("/v1/workflows/{free}{suffix}"),
                &b,
                body,
            )
            .await;
        assert_eq!(
            taken.status,
            StatusCode::NOT_FOUND,
            "{method} {suffix}: {:?}",
            taken.body
        );
        assert_eq!(
            (taken.status, renamed(&taken.body, &x, "NAME")),
            (never.status, renamed(&never.body, &free, "NAME")),
            "{method} {suffix}: a taken name must look like a free one"
        );
    }
    let run = st
        .call(
            Method::POST,
            "/v1/runs",
            &b,
            Some(json!({"workflow_id": x, "inputs": {}})),
        )
        .await;
    let never = st
        .call(
            Method::POST,
            "/v1/runs",
            &b,
            Some(json!({"workflow_id": free, "inputs": {}})),
        )
        .await;
    assert_eq!(
        (run.status, renamed(&run.body, &x, "NAME")),
        (never.status, renamed(&never.body, &free, "NAME"))
    );
    assert_eq!(run.status, StatusCode::NOT_FOUND);

    // B creates its own "x", create-only (If-Match: 0): accepted, as for a free name.
    let put_b = st
        .http
        .put(format!("{}{path}", st.base))
        .bearer_auth(&b)
        .header("if-match", "0")
        .header("content-type", "application/json")
        .body(definition("b1").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(put_b.status(), StatusCode::ACCEPTED);
    let got_b = st.wait_for(&path, &b, |r| r.status == StatusCode::OK).await;
    assert_eq!(
        got_b.body["definition"],
        definition("b1"),
        "B sees its own x"
    );
    assert_eq!(got_b.body["version"], 1);

    // A patches its "x"; B's stays at version 1 with its own definition, and vice versa.
    let patch = st
        .call(
            Method::POST,
            &format!("{path}/patches"),
            &a,
            Some(json!([{"op": "replace", "path": "/nodes/s/config/tag", "value": "a2"}])),
        )
        .await;
    assert_eq!(patch.status, StatusCode::ACCEPTED, "{:?}", patch.body);
    let got_a = st.wait_for(&path, &a, |r| r.body["version"] == 2).await;
    assert_eq!(got_a.body["definition"], definition("a2"));
    let got_b = st.call(Method::GET, &path, &b, None).await;
    assert_eq!(
        (
            got_b.body["version"].clone(),
            got_b.body["definition"].clone()
        ),
        (json!(1), definition("b1")),
        "A's patch never touches B's x"
    );
    let heads: Vec<(String, i64)> = sqlx::query_as(
        "SELECT workspace_id, version FROM weir_workflow_heads WHERE workflow_id = $1 ORDER BY version",
    )
    .bind(&x)
    .fetch_all(&st.pool)
    .await
    .unwrap();
    assert_eq!(heads, vec![(ws_b.clone(), 1), (ws_a.clone(), 2)]);

    // A patch event from B naming x, straight on the topic, applies to B's x only.
    let raw = weir_materializer::processor::patch_submitted(
        &x,
        &ws_b,
        "it",
        Some(1),
        &json!([{"op": "replace", "path": "/nodes/s/config/tag", "value": "b2"}]),
    );
    produce(&st.producer, &st.codec, &raw).await.unwrap();
    st.wait_for(&path, &b, |r| r.body["version"] == 2).await;
    let got_a = st.call(Method::GET, &path, &a, None).await;
    assert_eq!(
        got_a.body["definition"],
        definition("a2"),
        "B's patch left A's x alone"
    );

    // Runs pin each workspace's own definition.
    for (key, ws, tag) in [(&a, &ws_a, "a2"), (&b, &ws_b, "b2")] {
        let r = st
            .call(
                Method::POST,
                "/v1/runs",
                key,
                Some(json!({"workflow_id": x, "inputs": {}})),
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
        let n = st
            .wait_count(
                "SELECT count(*) FROM weir_coordinator_definitions
                 WHERE workspace_id = $1 AND workflow_id = $2 AND version = 2
                   AND definition->'nodes'->'s'->'config'->>'tag' = $3",
                &[ws, &x, tag],
                1,
            )
            .await;
        assert_eq!(n, 1, "{ws} pinned its own x v2");
    }

    // Replay is per workspace too.
    let limits = weir_model::definition::Limits::default();
    for (ws, tag) in [(&ws_a, "a2"), (&ws_b, "b2")] {
        let report = weir_materializer::replay::replay(&st.pool, &st.cas, ws, &x, None, &limits)
            .await
            .unwrap();
        assert!(
            report.differences.is_empty(),
            "{ws}: {:?}",
            report.differences
        );
        assert_eq!(report.definition, definition(tag));
    }
    let unknown =
        weir_materializer::replay::replay(&st.pool, &st.cas, &random_name("ws"), &x, None, &limits)
            .await;
    assert!(unknown.is_err(), "a third workspace has no x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_refs_are_accepted_only_from_their_workspace() {
    // Values above 64 bytes go to the CAS, owned by the workspace that sent them.
    let st = start(|c| c.gateway.inline_max_bytes = 64).await;
    let (ws_a, ws_b, ws_c) = (
        random_name("ws-a"),
        random_name("ws-b"),
        random_name("ws-c"),
    );
    let (a, b, c) = (
        st.key(&ws_a).await,
        st.key(&ws_b).await,
        st.key(&ws_c).await,
    );

    // A stores a large result: the gateway puts it in the CAS for A.
    let secret = json!({"secret": format!("only for A {}", "z".repeat(100))});
    let r_a = CasRef::of(secret.to_string().as_bytes());
    let entry = |result: Value| {
        json!({"node_type": "function", "config": {"f": 1}, "inputs": {"i": 1},
               "result": result, "cost_ms": 5})
    };
    let stored = st
        .call(
            Method::POST,
            "/v1/cache/entries",
            &a,
            Some(entry(secret.clone())),
        )
        .await;
    assert_eq!(stored.status, StatusCode::ACCEPTED, "{:?}", stored.body);
    assert!(
        st.cas.exists(&r_a).await.unwrap(),
        "the gateway stored A's blob"
    );
    // A blob that exists in the CAS but that no workspace stored through weir.
    let orphan = st.cas.put(&b"stored behind weir's back"[..]).await.unwrap();
    let never = CasRef::of(format!("never stored {}", Uuid::now_v7()).as_bytes());

    // B hands in A's ref, an orphan's and a never-stored one: the same 422 for all three.
    let by_ref = |r: &CasRef| {
        json!({"node_type": "function", "config": {"f": 1}, "inputs": {"i": 2},
               "result_ref": r.to_string(), "cost_ms": 5})
    };
    let mut answers = Vec::new();
    for r in [&r_a, &orphan, &never] {
        let ans = st
            .call(Method::POST, "/v1/cache/entries", &b, Some(by_ref(r)))
            .await;
        assert_eq!(
            ans.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{:?}",
            ans.body
        );
        assert_eq!(ans.body["code"], "unknown_ref", "{:?}", ans.body);
        answers.push(renamed(&ans.body, &r.to_string(), "REF"));
    }
    assert!(
        answers.iter().all(|x| *x == answers[0]),
        "an unknown ref looks the same whether or not the blob exists: {answers:?}"
    );
    let run_id = Uuid::now_v7();
    let done = format!("/v1/runs/{run_id}/nodes/s/completions");
    let completion =
        |r: &CasRef| json!({"attempt": 1, "status": "succeeded", "output_ref": r.to_string()});
    let ans = st
        .call(Method::POST, &done, &b, Some(completion(&r_a)))
        .await;
    assert_eq!(
        (ans.status, ans.body["code"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!("unknown_ref")),
        "{:?}",
        ans.body
    );
    // A may hand in its own ref.
    let own = st
        .call(Method::POST, "/v1/cache/entries", &a, Some(by_ref(&r_a)))
        .await;
    assert_eq!(own.status, StatusCode::ACCEPTED, "{:?}", own.body);

    // The cache's store path (what the cache processor applies) refuses B's use of A's blob
    // as a bad blob, unread; A's own use is stored.
    let cache = Cache::new(
        st.pool.clone(),
        st.cas.clone(),
        Arc::new(st.cfg.cache.clone()),
        None,
    )
    .await
    .unwrap();
    let store = |ws: &str, r: CasRef| StoreRequest {
        request_id: random_name("st"),
        workspace_id: ws.into(),
        requester: format!("{ws}-worker"),
        permission: Permission::Write,
        node_type: "function".into(),
        config: json!({"f": 1}),
        inputs: json!({"i": 3}),
        result: StoreResult::Ref(r),
        prompt: None,
        embedding: None,
        cost_ms: 5,
        required_permission: Permission::Write,
    };
    assert_eq!(
        cache.store(&store(&ws_b, r_a)).await.unwrap(),
        StoreOutcome::Refused(Refusal::BadBlob),
        "B cannot cache A's blob"
    );
    assert_eq!(
        cache.store(&store(&ws_b, orphan)).await.unwrap(),
        StoreOutcome::Refused(Refusal::BadBlob),
        "nor a blob nobody stored through weir"
    );
    assert!(matches!(
        cache.store(&store(&ws_a, r_a)).await.unwrap(),
        StoreOutcome::Stored { .. }
    ));

    // The coordinator dead-letters a completion naming A's blob for B, straight on the topic,
    // and a good request of another workspace right after still applies.
    let forged = CompletionEvent::NodeCompleted(NodeCompleted {
        event_id: events::new_event_id(),
        occurred_at: events::now_micros(),
        workspace_id: ws_b.clone(),
        traceparent: String::new(),
        tracestate: None,
        run_id: Uuid::now_v7().to_string(),
        node_id: "s".into(),
        attempt: 1,
        status: NodeStatus::Succeeded,
        output_json: None,
        output_ref: Some(r_a.to_string().into()),
        error: None,
        duration_ms: 1,
        worker_id: "forger".into(),
        from_cache: false,
    });
    produce(&st.producer, &st.codec, &forged).await.unwrap();
    // And the materializer rejects a patch whose operations are A's blob exactly as one whose
    // operations blob does not exist, without reading it.
    let x = format!("x-{}", Uuid::now_v7().simple());
    let mut forged_patches = Vec::new();
    for r in [&r_a, &never] {
        let mut patch =
            weir_materializer::processor::patch_submitted(&x, &ws_b, "it", None, &json!([]));
        patch.operations_json = String::new();
        patch.operations_ref = Some(r.to_string().into());
        produce(&st.producer, &st.codec, &patch).await.unwrap();
        forged_patches.push((patch.patch_id, r.to_string()));
    }

    let put = st
        .call(
            Method::PUT,
            &format!("/v1/workflows/{x}"),
            &c,
            Some(definition("c")),
        )
        .await;
    assert_eq!(put.status, StatusCode::ACCEPTED);
    st.wait_for(&format!("/v1/workflows/{x}"), &c, |r| {
        r.status == StatusCode::OK
    })
    .await;
    let run = st
        .call(
            Method::POST,
            "/v1/runs",
            &c,
            Some(json!({"workflow_id": x, "inputs": {}})),
        )
        .await;
    assert_eq!(run.status, StatusCode::ACCEPTED);
    let started = st
        .wait_count(
            "SELECT count(*) FROM weir_runs WHERE workspace_id = $1 AND run_id = $2",
            &[&ws_c, run.body["run_id"].as_str().unwrap()],
            1,
        )
        .await;
    assert_eq!(
        started, 1,
        "the coordinator is up and applies another workspace's run"
    );

    let letter = st.dead_letter("unknown_ref").await;
    assert_eq!(letter.source_topic, st.codec.topic::<CompletionEvent>());
    let mut reasons = Vec::new();
    for (patch_id, r) in &forged_patches {
        let (status, code, reason): (String, Option<String>, Option<String>) = sqlx::query_as(
            "SELECT status, reason_code, reason FROM weir_workflow_patches
             WHERE workspace_id = $1 AND workflow_id = $2 AND patch_id = $3",
        )
        .bind(&ws_b)
        .bind(&x)
        .bind(patch_id)
        .fetch_one(&st.pool)
        .await
        .expect("the forged patch is decided, before C's creation of the same id");
        assert_eq!(
            (status.as_str(), code.as_deref()),
            ("rejected", Some("blob_missing"))
        );
        reasons.push(reason.unwrap_or_default().replace(r.as_str(), "REF"));
    }
    assert_eq!(reasons[0], reasons[1], "A's blob looks like no blob at all");
    let b_heads: i64 =
        sqlx::query_scalar("SELECT count(*) FROM weir_workflow_heads WHERE workspace_id = $1")
            .bind(&ws_b)
            .fetch_one(&st.pool)
            .await
            .unwrap();
    assert_eq!(b_heads, 0, "the forged patch created nothing");
    let b_runs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM weir_run_nodes n JOIN weir_runs r USING (run_id) WHERE r.workspace_id = $1",
    )
    .bind(&ws_b)
    .fetch_one(&st.pool)
    .await
    .unwrap();
    assert_eq!(b_runs, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_gc_never_deletes_a_blob_a_run_needs() {
    // Definitions above 16 bytes go to the CAS; cache entries live one second.
    let st = start(|c| {
        c.materializer.inline_definition_max_bytes = 16;
        c.cache.default_ttl_secs = 1;
        c.cache.ttl_secs.clear();
        c.cache.semantic_ttl_secs.clear();
    })
    .await;
    let (ws_a, ws_b) = (random_name("ws-a"), random_name("ws-b"));
    let a = st.key(&ws_a).await;
    let x = format!("x-{}", Uuid::now_v7().simple());
    let path = format!("/v1/workflows/{x}");
    // Letters only: digits could look like a phone number to the cache's PII guard.
    let tag: String = Uuid::now_v7()
        .simple()
        .to_string()
        .chars()
        .map(|c| (b'a' + c.to_digit(16).unwrap_or(0) as u8) as char)
        .collect();
    let def = definition(&tag);
    let canonical = weir_model::definition::canonical_json_verbatim_numbers(&def);
    let pinned_ref = CasRef::of(canonical.as_bytes());

    // A's workflow, its definition in the CAS; a run pins it.
    assert_eq!(
        st.call(Method::PUT, &path, &a, Some(def.clone()))
            .await
            .status,
        StatusCode::ACCEPTED
    );
    st.wait_for(&path, &a, |r| r.status == StatusCode::OK).await;
    let run = st
        .call(
            Method::POST,
            "/v1/runs",
            &a,
            Some(json!({"workflow_id": x, "inputs": {}})),
        )
        .await;
    assert_eq!(run.status, StatusCode::ACCEPTED);
    let run_id = run.body["run_id"].as_str().unwrap().to_string();
    let pinned = st
        .wait_count(
            "SELECT count(*) FROM weir_coordinator_definitions
             WHERE workspace_id = $1 AND workflow_id = $2 AND definition_ref = $3",
            &[&ws_a, &x, &pinned_ref.to_string()],
            1,
        )
        .await;
    assert_eq!(pinned, 1, "the run pinned the CAS-held definition");
    // The head moves on: only the run's snapshot still names the blob.
    assert_eq!(
        st.call(Method::PUT, &path, &a, Some(definition("next")))
            .await
            .status,
        StatusCode::ACCEPTED
    );
    st.wait_for(&path, &a, |r| r.body["version"] == 2).await;

    // The cache stores results whose bytes are: the run's definition (in another workspace),
    // a blob that a node of the run then reports as its output, and a blob nothing else uses.
    let cache = Cache::new(
        st.pool.clone(),
        st.cas.clone(),
        Arc::new(st.cfg.cache.clone()),
        None,
    )
    .await
    .unwrap();
    let inline = |ws: &str, inputs: Value, text: String| StoreRequest {
        request_id: random_name("st"),
        workspace_id: ws.into(),
        requester: format!("{ws}-worker"),
        permission: Permission::Write,
        node_type: "pure".into(),
        config: json!({}),
        inputs,
        result: StoreResult::Json(text),
        prompt: None,
        embedding: None,
        cost_ms: 5,
        required_permission: Permission::Write,
    };
    let output = json!({"output": tag}).to_string();
    let output_ref = CasRef::of(output.as_bytes());
    let lonely = json!({"nobody": tag}).to_string();
    let lonely_ref = CasRef::of(lonely.as_bytes());
    for (ws, n, text) in [
        (&ws_b, 1, canonical.clone()),
        (&ws_a, 2, output.clone()),
        (&ws_b, 3, lonely.clone()),
    ] {
        let out = cache
            .store(&inline(ws, json!({"n": n}), text))
            .await
            .unwrap();
        assert!(matches!(out, StoreOutcome::Stored { .. }), "{out:?}");
    }
    // A's worker reports the cached blob as the output of node s: a reference from a run.
    let done = st
        .call(
            Method::POST,
            &format!("/v1/runs/{run_id}/nodes/s/completions"),
            &a,
            Some(
                json!({"attempt": 1, "status": "succeeded", "output_ref": output_ref.to_string()}),
            ),
        )
        .await;
    assert_eq!(done.status, StatusCode::ACCEPTED, "{:?}", done.body);
    let recorded = st
        .wait_count(
            "SELECT count(*) FROM weir_run_nodes WHERE run_id = $1 AND output_ref = $2",
            &[&run_id, &output_ref.to_string()],
            1,
        )
        .await;
    assert_eq!(
        recorded, 1,
        "the run holds the cached blob as a node output"
    );

    // Let the entries expire, sweep them, collect with no grace at all.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    sweep_all(&st.pool, 10_000).await.unwrap();
    let window = GcWindow {
        grace: Duration::ZERO,
        hold: Duration::ZERO,
    };
    for _ in 0..20 {
        gc_once(&st.pool, &st.cas, window, 10_000).await.unwrap();
        if !st.cas.exists(&lonely_ref).await.unwrap() {
            break;
        }
    }
    assert!(
        !st.cas.exists(&lonely_ref).await.unwrap(),
        "a blob nothing references, past the grace period, is collected"
    );
    let owners: i64 =
        sqlx::query_scalar("SELECT count(*) FROM weir_cas_owners WHERE blob_ref = $1")
            .bind(lonely_ref.to_string())
            .fetch_one(&st.pool)
            .await
            .unwrap();
    assert_eq!(owners, 0, "its ownership went with it");
    assert_eq!(
        weir_model::definition::canonical_json_verbatim_numbers(
            &st.cas
                .get_json::<Value>(&pinned_ref)
                .await
                .expect("the pinned definition is intact")
        ),
        canonical
    );
    assert_eq!(
        st.cas
            .get(&output_ref)
            .await
            .expect("the run's output is intact")
            .to_vec(),
        output.as_bytes().to_vec()
    );

    // The run still works: the coordinator reads its pinned definition after the collection.
    let n = st
        .wait_count(
            "SELECT count(*) FROM weir_runs WHERE run_id = $1 AND status = 'completed'",
            &[&run_id],
            1,
        )
        .await;
    assert_eq!(
        n, 1,
        "the run completed from its snapshot and its node output"
    );
    let again = st
        .call(
            Method::POST,
            "/v1/runs",
            &a,
            Some(json!({"workflow_id": x, "version": 1, "inputs": {}})),
        )
        .await;
    assert_eq!(again.status, StatusCode::ACCEPTED);
    let n = st
        .wait_count(
            "SELECT count(*) FROM weir_runs WHERE run_id = $1 AND version = 1 AND status = 'running'",
            &[again.body["run_id"].as_str().unwrap()],
            1,
        )
        .await;
    assert_eq!(n, 1, "a new run of the collected-around version 1 starts");
}
