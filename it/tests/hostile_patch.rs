//! Hostile patches against the real stack (bounded work per patch): a 2 KB patch of 40
//! `copy` operations from the root (each doubling the document), thousands of `copy`
//! operations nesting it deeper and deeper, a patch nested past the JSON parser's limit, a
//! patch whose operations blob does not exist or is damaged, and a patch of a workflow whose
//! stored head blob is lost. Each must end as a rejection with its reason
//! code (patch log row and `PatchRejected` event), with `weir run materializer` still up and a
//! good patch of another workspace, sent right after, applied within seconds. The gateway
//! answers 422 to what it can tell without the document (operation count, pointer depth,
//! value depth) with the materializer's own check, and `weir patch apply` refuses the same
//! patches with exit code 1 instead of aborting.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::message::Message;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;
use weir_it::{config, prepare, produce, random_name, spawn_weir_run, weir_bin, ChildGuard};
use weir_materializer::processor::patch_submitted;
use weir_model::CasRef;
use weir_runtime::cas::Cas;
use weir_runtime::codec::Codec;
use weir_runtime::events::{PatchSubmitted, WorkflowEvent};

fn spawn_weir(prefix: &str, what: &str) -> ChildGuard {
    let env = [("WEIR__KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "6000")];
    spawn_weir_run(prefix, what, &env)
}

fn definition(tag: &str) -> Value {
    json!({"nodes": {"s": {"type": "function", "config": {"tag": tag}}}, "edges": [],
           "settings": {"max_hops": 5}})
}

/// The copy bomb: 40 `copy` from `""`, about 2 KB.
fn bomb() -> Value {
    Value::Array(
        (0..40)
            .map(|i| json!({"op": "copy", "from": "", "path": format!("/a{i}")}))
            .collect(),
    )
}

/// `n` `copy` operations into one path, each nesting the document one level deeper.
fn nest(n: usize) -> Value {
    Value::Array(vec![json!({"op": "copy", "from": "", "path": "/a"}); n])
}

/// A patch whose `value` is nested `n` levels deep (as text: serde_json refuses to build it
/// past 128 levels, which is the point).
fn deep_value_text(n: usize) -> String {
    format!(
        r#"[{{"op":"add","path":"/deep","value":{}1{}}}]"#,
        "[".repeat(n),
        "]".repeat(n)
    )
}

/// The decided status and reason code of a patch, once it has a patch log row.
async fn decided(pool: &PgPool, patch_id: Uuid) -> Option<(String, Option<String>)> {
    sqlx::query_as("SELECT status, reason_code FROM weir_workflow_patches WHERE patch_id = $1")
        .bind(patch_id)
        .fetch_optional(pool)
        .await
        .unwrap()
}

async fn wait_decided(
    pool: &PgPool,
    patch_id: Uuid,
    timeout: Duration,
) -> Option<(String, Option<String>)> {
    let start = Instant::now();
    loop {
        if let Some(d) = decided(pool, patch_id).await {
            return Some(d);
        }
        if start.elapsed() > timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `PatchRejected` reason codes by patch id, read from the workflows topic until every one of
/// `want` is seen (or a timeout).
async fn rejected_events(
    cfg: &weir_runtime::Config,
    codec: &Codec,
    want: &[Uuid],
) -> HashMap<Uuid, String> {
    let consumer = weir_it::reader(cfg, &[&codec.topic::<WorkflowEvent>()]);
    let mut out = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !want.iter().all(|p| out.contains_key(p)) && Instant::now() < deadline {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await {
            if let Ok(WorkflowEvent::PatchRejected(r)) = codec
                .decode::<WorkflowEvent>(m.payload().unwrap_or_default())
                .await
            {
                out.insert(r.patch_id, r.reason_code);
            }
        }
    }
    out
}

fn with_text(mut e: PatchSubmitted, text: String) -> PatchSubmitted {
    e.operations_json = text;
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_patches_are_rejected_and_the_materializer_carries_on() {
    let prefix = format!("{}.", random_name("hpatch"));
    let cfg = config(&prefix);
    let codec = prepare(&cfg).await.expect("prepare");
    let pool = weir_runtime::db::pool(&cfg.postgres).unwrap();
    let producer = weir_runtime::kafka::producer(&cfg.kafka).unwrap();
    let cas = Cas::from_config(&cfg).await.expect("cas");
    let mut materializer = spawn_weir(&prefix, "materializer");
    let _relay = spawn_weir(&prefix, "relay");

    let (ws_a, ws_b) = (random_name("ws-a"), random_name("ws-b"));
    let (wf_a, wf_b) = (random_name("wf-a"), random_name("wf-b"));
    let create_a = patch_submitted(
        &wf_a,
        &ws_a,
        "it",
        None,
        &json!([{"op": "add", "path": "", "value": definition("a")}]),
    );
    produce(&producer, &codec, &create_a).await.unwrap();
    assert_eq!(
        wait_decided(&pool, create_a.patch_id, Duration::from_secs(60)).await,
        Some(("applied".into(), None)),
        "the workflow under attack is created"
    );

    // 30,000 nested copies are 1.1 MB of text, over Kafka's default record size: they go
    // through the CAS, as the gateway sends large patches, with the owner recorded first.
    let nest_30k = nest(30_000).to_string();
    let nest_ref = cas.put(nest_30k.clone().into_bytes()).await.expect("put");
    weir_runtime::cas::owners::record_on_pool(&pool, &ws_a, &nest_ref, true)
        .await
        .expect("owner");
    // A blob the workspace recorded but that was never stored (lost, or collected).
    let lost: CasRef = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
    weir_runtime::cas::owners::record_on_pool(&pool, &ws_a, &lost, true)
        .await
        .expect("owner");

    // A blob damaged after it was stored: an object of other bytes under its key.
    assert!(
        matches!(cfg.cas.backend, weir_runtime::config::CasBackend::S3),
        "the stack's CAS is S3"
    );
    let damaged_ref = cas
        .put(
            json!([{"op": "test", "path": "/edges", "value": [], "run": ws_a}])
                .to_string()
                .into_bytes(),
        )
        .await
        .expect("put");
    weir_runtime::cas::owners::record_on_pool(&pool, &ws_a, &damaged_ref, true)
        .await
        .expect("owner");
    weir_runtime::s3::client(&cfg.s3)
        .await
        .put_object()
        .bucket(&cfg.s3.bucket)
        .key(cas.key(&damaged_ref))
        .body(b"definitely not zstd".to_vec().into())
        .send()
        .await
        .expect("overwrite the object");

    // A workflow whose stored head is a CAS blob that is gone: its patches are rejected
    // `head_unavailable`, the materializer does not stop.
    let wf_lost = random_name("wf-lost");
    sqlx::query(
        "INSERT INTO weir_workflow_heads
             (workflow_id, workspace_id, version, definition, definition_ref, definition_sha256)
         VALUES ($1, $2, 3, NULL, $3, $4)",
    )
    .bind(&wf_lost)
    .bind(&ws_a)
    .bind(format!("sha256:{}", "cd".repeat(32)))
    .bind("cd".repeat(32))
    .execute(&pool)
    .await
    .expect("insert a head whose blob is lost");

    let hostile: Vec<(PatchSubmitted, &str)> = vec![
        (
            patch_submitted(
                &wf_lost,
                &ws_a,
                "it",
                None,
                &json!([{"op": "replace", "path": "/settings/max_hops", "value": 6}]),
            ),
            "head_unavailable",
        ),
        (
            patch_submitted(&wf_a, &ws_a, "it", None, &bomb()),
            "budget_bytes",
        ),
        (
            patch_submitted(&wf_a, &ws_a, "it", None, &nest(5_000)),
            "budget_depth",
        ),
        (
            PatchSubmitted {
                operations_json: String::new(),
                operations_ref: Some(nest_ref.to_string().into()),
                ..patch_submitted(&wf_a, &ws_a, "it", None, &json!([]))
            },
            "budget_ops",
        ),
        (
            with_text(
                patch_submitted(&wf_a, &ws_a, "it", None, &json!([])),
                deep_value_text(100),
            ),
            "budget_depth",
        ),
        (
            with_text(
                patch_submitted(&wf_a, &ws_a, "it", None, &json!([])),
                deep_value_text(50_000),
            ),
            "invalid_operation",
        ),
        (
            PatchSubmitted {
                operations_json: String::new(),
                operations_ref: Some(lost.to_string().into()),
                ..patch_submitted(&wf_a, &ws_a, "it", None, &json!([]))
            },
            "blob_missing",
        ),
        (
            PatchSubmitted {
                operations_json: String::new(),
                operations_ref: Some(damaged_ref.to_string().into()),
                ..patch_submitted(&wf_a, &ws_a, "it", None, &json!([]))
            },
            "blob_corrupt",
        ),
    ];
    assert!(
        hostile[0].0.operations_json.len() < 2_100,
        "the bomb is about 2 KB"
    );
    for (e, _) in &hostile {
        produce(&producer, &codec, e).await.unwrap();
    }
    // Right after: a good patch of another workspace, and a good one of the attacked workflow.
    let sent = Instant::now();
    let create_b = patch_submitted(
        &wf_b,
        &ws_b,
        "it",
        None,
        &json!([{"op": "add", "path": "", "value": definition("b")}]),
    );
    produce(&producer, &codec, &create_b).await.unwrap();
    let fix_a = patch_submitted(
        &wf_a,
        &ws_a,
        "it",
        Some(1),
        &json!([{"op": "replace", "path": "/nodes/s/config/tag", "value": "a2"}]),
    );
    produce(&producer, &codec, &fix_a).await.unwrap();

    assert_eq!(
        wait_decided(&pool, create_b.patch_id, Duration::from_secs(30)).await,
        Some(("applied".into(), None)),
        "another workspace's patch applies right after the hostile ones"
    );
    let took = sent.elapsed();
    assert!(took < Duration::from_secs(15), "applied after {took:?}");

    for (e, code) in &hostile {
        assert_eq!(
            wait_decided(&pool, e.patch_id, Duration::from_secs(30)).await,
            Some(("rejected".into(), Some(code.to_string()))),
            "patch {} ({} bytes inline)",
            e.patch_id,
            e.operations_json.len()
        );
    }
    assert_eq!(
        wait_decided(&pool, fix_a.patch_id, Duration::from_secs(30)).await,
        Some(("applied".into(), None)),
        "the attacked workflow still takes good patches, at the version the attack left it"
    );
    let (version, tag): (i64, String) = sqlx::query_as(
        "SELECT version, definition #>> '{nodes,s,config,tag}' FROM weir_workflow_heads
         WHERE workspace_id = $1 AND workflow_id = $2",
    )
    .bind(&ws_a)
    .bind(&wf_a)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((version, tag.as_str()), (2, "a2"));

    // The rejections reach the workflows topic with their codes.
    let ids: Vec<Uuid> = hostile.iter().map(|(e, _)| e.patch_id).collect();
    let events = rejected_events(&cfg, &codec, &ids).await;
    for (e, code) in &hostile {
        assert_eq!(
            events.get(&e.patch_id).map(String::as_str),
            Some(*code),
            "PatchRejected for {}",
            e.patch_id
        );
    }

    assert!(
        materializer.0.try_wait().unwrap().is_none(),
        "the materializer is still running"
    );
    // ... and still consuming: one more good patch, after everything.
    let last = patch_submitted(
        &wf_b,
        &ws_b,
        "it",
        Some(1),
        &json!([{"op": "add", "path": "/nodes/t", "value": {"type": "pure", "config": {}}}]),
    );
    produce(&producer, &codec, &last).await.unwrap();
    assert_eq!(
        wait_decided(&pool, last.patch_id, Duration::from_secs(30)).await,
        Some(("applied".into(), None))
    );
    let applied_a: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM weir_workflow_patches WHERE workspace_id = $1 AND status = 'applied'",
    )
    .bind(&ws_a)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        applied_a, 2,
        "only the creation and the fix applied in workspace A"
    );
}

#[test]
fn weir_patch_apply_refuses_the_bomb_and_the_deep_patch() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let doc = write("doc.json", definition("x").to_string());
    for (patch, code) in [
        (bomb().to_string(), "budget_bytes"),
        (nest(30_000).to_string(), "budget_ops"),
        (nest(5_000).to_string(), "budget_depth"),
        (deep_value_text(50_000), "invalid_operation"),
    ] {
        let patch = write("patch.json", patch);
        let out = Command::new(weir_bin())
            .args(["patch", "apply"])
            .arg(&doc)
            .arg(&patch)
            .output()
            .expect("run weir patch apply");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{code}: {stderr}");
        assert!(
            stderr.contains(&format!("error ({code})")),
            "{code}: {stderr}"
        );
        if code.starts_with("budget_") {
            assert!(stderr.contains("over the patch budget"), "{stderr}");
            assert!(stderr.contains("materializer.patch_max_"), "{stderr}");
        }
        assert!(out.stdout.is_empty(), "nothing printed on failure");
    }
    // A good patch still prints the result.
    let good = write(
        "patch.json",
        json!([{"op": "copy", "from": "/nodes/s", "path": "/nodes/t"}]).to_string(),
    );
    let out = Command::new(weir_bin())
        .args(["patch", "apply"])
        .arg(&doc)
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["nodes"]["t"], definition("x")["nodes"]["s"]);
}

/// The gateway, in this process with a materializer, on fresh topics: the bomb is accepted
/// (nothing about it is visible without the document) and then rejected `budget_bytes`;
/// what the budget rejects statically is a 422 problem with its `budget_*` code; the
/// gateway still serves, and another workspace's workflow is materialized within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_refuses_what_it_can_know_and_forwards_the_rest() {
    use reqwest::StatusCode;
    use weir_it::gateway::{Gateway, Options};

    let options = Options {
        materializer: true,
        ..Options::default()
    };
    let gw = &Gateway::start("hpgw", |_| {}, options).await;
    let key = |ws: String| async move { gw.key(&ws, weir_model::Permission::Write).await };
    let call = |method: reqwest::Method, path: String, key: String, body: Option<String>| async move {
        let a = gw.call(method, &path, Some(&key), &[], body).await;
        (a.status, a.problem, a.body)
    };
    // Waits until a workflow's version is `want`.
    let wait_version = |path: String, key: String, want: i64| {
        let call = &call;
        async move {
            let start = Instant::now();
            loop {
                let (status, _, body) =
                    call(reqwest::Method::GET, path.clone(), key.clone(), None).await;
                if status == StatusCode::OK && body["version"] == want {
                    return start.elapsed();
                }
                assert!(start.elapsed() < Duration::from_secs(30), "{status} {body}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    let ws_a = random_name("ws-a");
    let key_a = key(ws_a.clone()).await;
    let wf = format!("/v1/workflows/{}", random_name("wf"));
    let (status, _, body) = call(
        reqwest::Method::PUT,
        wf.clone(),
        key_a.clone(),
        Some(definition("a").to_string()),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    wait_version(wf.clone(), key_a.clone(), 1).await;

    // Static: 422 with the materializer's code, nothing produced.
    let pointer = format!("/{}", vec!["a"; 65].join("/"));
    let mut deep_definition = definition("d");
    let mut config = json!(1);
    for _ in 0..70 {
        config = json!([config]);
    }
    deep_definition["nodes"]["s"]["config"] = json!({ "deep": config });
    let statically = [
        (
            "POST",
            Value::Array(vec![json!({"op": "test", "path": "", "value": 1}); 10_001]).to_string(),
            "budget_ops",
        ),
        (
            "POST",
            json!([{"op": "add", "path": pointer, "value": 1}]).to_string(),
            "budget_pointer",
        ),
        ("POST", deep_value_text(100), "budget_depth"),
        ("PUT", deep_definition.to_string(), "budget_depth"),
    ];
    for (method, body, code) in statically {
        let (method, path) = match method {
            "PUT" => (reqwest::Method::PUT, wf.clone()),
            _ => (reqwest::Method::POST, format!("{wf}/patches")),
        };
        let (status, problem, answer) = call(method, path, key_a.clone(), Some(body)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{code}: {answer}");
        assert!(problem, "{answer}");
        assert_eq!(
            answer["type"], "urn:weir:problem:patch-over-budget",
            "{answer}"
        );
        assert_eq!(answer["title"], "Patch over budget");
        assert_eq!(answer["code"], code, "{answer}");
    }

    // The bomb: accepted, then rejected by the materializer with its code.
    let (status, _, body) = call(
        reqwest::Method::POST,
        format!("{wf}/patches"),
        key_a.clone(),
        Some(bomb().to_string()),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let patch_id = body["patch_id"].as_str().unwrap().to_string();
    let start = Instant::now();
    let verdict = loop {
        let (_, _, b) = call(
            reqwest::Method::GET,
            format!("{wf}/patches/{patch_id}"),
            key_a.clone(),
            None,
        )
        .await;
        if b["status"] != "pending" {
            break b;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(verdict["status"], "rejected", "{verdict}");
    assert_eq!(verdict["code"], "budget_bytes", "{verdict}");

    // Still serving: another workspace's workflow is materialized within seconds.
    let ws_b = random_name("ws-b");
    let key_b = key(ws_b).await;
    let wf_b = format!("/v1/workflows/{}", random_name("wf"));
    let (status, _, body) = call(
        reqwest::Method::PUT,
        wf_b.clone(),
        key_b.clone(),
        Some(definition("b").to_string()),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let took = wait_version(wf_b, key_b, 1).await;
    assert!(took < Duration::from_secs(15), "{took:?}");
}
