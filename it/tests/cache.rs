//! The result cache against the real stack: randomized isolation (workspaces, permission
//! levels, exact and semantic, the coordinator's batch lookup), TTL expiry and the sweeper,
//! the PII guard, a corrupted CAS blob, the CAS GC, and the processor end to end (`weir run
//! cache` + `weir run relay`) with the real local model. Needs the local stack
//! (`infra/local/up`), its environment (`infra/local/env`) and the model files
//! (`infra/local/prereqs`).

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::message::Message;
use serde_json::{json, Value};
use weir_cache::embed::normalize;
use weir_cache::maintenance::{gc_once, purge, sweep_all, GcWindow};
use weir_cache::pii::PiiKind;
use weir_cache::{
    exact_lookup_batch, Cache, ExactRequest, LookupRequest, Refusal, StoreOutcome, StoreRequest,
    StoreResult, UnitVector,
};
use weir_it::{config, prepare, produce_in_order, random_name, weir_bin, ChildGuard};
use weir_model::CasRef;
use weir_model::Permission;
use weir_runtime::cas::Cas;
use weir_runtime::config::{CasBackend, Config};
use weir_runtime::events::{
    new_event_id, now_micros, CacheAnswer, CacheEvent, CacheKind, CacheLookup, CacheStore,
};

/// A cache on the stack's Postgres with a local-directory CAS in `dir` (so a test can corrupt
/// a blob on disk), no embedder (events carry vectors).
async fn local_cache(dir: &std::path::Path, tweak: impl FnOnce(&mut Config)) -> (Cache, Config) {
    let mut cfg = config("it-cache");
    cfg.cas.backend = CasBackend::Local;
    cfg.cas.local_dir = dir.display().to_string();
    tweak(&mut cfg);
    let pool = weir_runtime::db::pool(&cfg.postgres).unwrap();
    weir_runtime::db::MIGRATOR.run(&pool).await.unwrap();
    let cas = Cas::local(&cfg.cas).unwrap();
    let cache = Cache::new(pool, cas, Arc::new(cfg.cache.clone()), None)
        .await
        .unwrap();
    (cache, cfg)
}

fn store(ws: &str, nt: &str, inputs: Value, result: Value, required: Permission) -> StoreRequest {
    StoreRequest {
        request_id: random_name("st"),
        workspace_id: ws.into(),
        requester: format!("{ws}-producer"),
        permission: Permission::Admin,
        node_type: nt.into(),
        config: json!({"model": "m", "temperature": 0.0}),
        inputs,
        result: StoreResult::Json(result.to_string()),
        prompt: None,
        embedding: None,
        cost_ms: 250,
        required_permission: required,
    }
}

fn lookup(ws: &str, nt: &str, inputs: Value, perm: Permission) -> LookupRequest {
    LookupRequest {
        request_id: random_name("lk"),
        workspace_id: ws.into(),
        requester: format!("{ws}-reader"),
        permission: perm,
        node_type: nt.into(),
        // Same config, spelled differently: canonical hashing must not care.
        config: json!({"temperature": 0, "model": "m"}),
        inputs,
        prompt: None,
        embedding: None,
        semantic: false,
    }
}

fn random_unit(rng: &mut StdRng, d: usize) -> Vec<f32> {
    normalize((0..d).map(|_| rng.random::<f32>() - 0.5).collect())
}

/// `v` moved a little, as the cache takes it.
fn jittered(rng: &mut StdRng, v: &[f32]) -> UnitVector {
    let moved = v.iter().map(|x| x + (rng.random::<f32>() - 0.5) * 0.002);
    UnitVector::new(moved.collect(), 384).unwrap()
}

fn perm(rng: &mut StdRng) -> Permission {
    Permission::ALL[rng.random_range(0..3)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_isolation_never_crosses_workspace_or_permission() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, _) = local_cache(dir.path(), |c| c.cache.similarity_threshold = 0.8).await;
    let tag = random_name("iso");
    let wss: Vec<String> = (0..3).map(|w| format!("{tag}-w{w}")).collect();
    let mut rng = StdRng::seed_from_u64(rand::random());
    // Prompt vectors shared by every workspace: the globally nearest entry of a semantic
    // lookup is usually in another workspace, which the SQL must never return.
    let base: Vec<Vec<f32>> = (0..6).map(|_| random_unit(&mut rng, 384)).collect();
    // (ws, node type, k, level) → result value; the last store of a key wins.
    let mut model: HashMap<(usize, &str, usize, Permission), i64> = HashMap::new();
    for i in 0..80 {
        let (w, k, level) = (
            rng.random_range(0..3),
            rng.random_range(0..6),
            perm(&mut rng),
        );
        let nt = if rng.random_bool(0.5) {
            "agent"
        } else {
            "pure"
        };
        let mut s = store(&wss[w], nt, json!({"k": k}), json!({"v": i}), level);
        if nt == "agent" {
            s.prompt = Some(format!("prompt {k}"));
            s.embedding = Some(jittered(&mut rng, &base[k]));
        }
        let out = cache.store(&s).await.unwrap();
        assert!(matches!(out, StoreOutcome::Stored { .. }), "{out:?}");
        model.insert((w, nt, k, level), i);
    }
    let expected = |w: usize, nt: &str, k: usize, p: Permission| -> Vec<i64> {
        p.and_below()
            .filter_map(|l| model.get(&(w, nt, k, l)).copied())
            .collect()
    };
    let mut hits = 0;
    for _ in 0..300 {
        let (w, k, p) = (
            rng.random_range(0..3),
            rng.random_range(0..6),
            perm(&mut rng),
        );
        let nt = if rng.random_bool(0.5) {
            "agent"
        } else {
            "pure"
        };
        let semantic_only = nt == "agent" && rng.random_bool(0.5);
        let mut q = lookup(&wss[w], nt, json!({"k": k}), p);
        if nt == "agent" {
            // The exact key covers the prompt: the same question is the same prompt.
            q.prompt = Some(format!("prompt {k}"));
        }
        if semantic_only {
            // Different inputs: the exact cache misses, only the prompt vector can match.
            q.inputs = json!({"k": k, "rephrased": true});
            q.semantic = true;
            q.embedding = Some(jittered(&mut rng, &base[k]));
        }
        let a = cache.lookup(&q).await.unwrap();
        let want = expected(w, nt, k, p);
        assert_eq!(
            a.hit,
            !want.is_empty(),
            "ws {w} {nt} k {k} {p:?} semantic {semantic_only}: {a:?}"
        );
        if !a.hit {
            continue;
        }
        hits += 1;
        assert_eq!(
            a.kind,
            Some(if semantic_only {
                CacheKind::Semantic
            } else {
                CacheKind::Exact
            })
        );
        let table = if semantic_only {
            "cache_semantic"
        } else {
            "cache_entries"
        };
        let key = hex_decode(a.entry_key.as_deref().unwrap());
        let (ws, level): (String, i16) = sqlx::query_as(&format!(
            "SELECT workspace_id, required_permission FROM {table} WHERE entry_key = $1"
        ))
        .bind(&key)
        .fetch_one(cache.pool())
        .await
        .unwrap();
        assert_eq!(ws, wss[w], "an entry of another workspace was served");
        assert!(
            level <= p.level(),
            "an entry above the requester's level was served"
        );
        let v: Value = cache
            .cas()
            .get_json(a.result_ref.as_ref().unwrap())
            .await
            .unwrap();
        assert!(
            want.contains(&v["v"].as_i64().unwrap()),
            "served {v} not one of {want:?}"
        );
    }
    assert!(hits > 20, "too few hits to mean anything: {hits}");

    // The coordinator's batch lookup, in a transaction, agrees with the model.
    let reqs: Vec<ExactRequest> = (0..40)
        .map(|i| {
            let (w, k, p) = (
                rng.random_range(0..3),
                rng.random_range(0..6),
                perm(&mut rng),
            );
            ExactRequest {
                workspace_id: wss[w].clone(),
                permission: p,
                node_type: "pure".into(),
                config: json!({"model": "m", "temperature": 0}),
                inputs: json!({"k": k}),
                prompt: None,
                requester: "run:it".into(),
                request_id: format!("node-{i}"),
            }
        })
        .collect();
    let mut tx = cache.pool().begin().await.unwrap();
    let got = exact_lookup_batch(&mut tx, cache.cas(), &reqs)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut batch_hits = 0;
    for (r, h) in reqs.iter().zip(&got) {
        let w = wss.iter().position(|x| *x == r.workspace_id).unwrap();
        let want = expected(
            w,
            "pure",
            r.inputs["k"].as_u64().unwrap() as usize,
            r.permission,
        );
        assert_eq!(h.is_some(), !want.is_empty(), "{r:?}");
        if let Some(h) = h {
            batch_hits += 1;
            assert!(want.contains(&h.result_json.as_ref().unwrap()["v"].as_i64().unwrap()));
            assert_eq!(h.saved_ms, 250);
        }
    }
    // One audit row per served hit, naming who used whose entry (and one per store).
    let (audits, foreign, stores): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE kind IN ('exact', 'semantic')),
                count(*) FILTER (WHERE owner NOT LIKE workspace_id || '-%'),
                count(*) FILTER (WHERE kind = 'store')
         FROM cache_audit WHERE workspace_id LIKE $1",
    )
    .bind(format!("{tag}-%"))
    .fetch_one(cache.pool())
    .await
    .unwrap();
    assert_eq!(audits, (hits + batch_hits) as i64);
    assert_eq!(foreign, 0);
    assert_eq!(stores, 80, "every store is audited");
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_pii_corrupt_blobs_and_collection() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, cfg) = local_cache(dir.path(), |c| {
        c.cache.ttl_secs.insert("pure".into(), 1);
    })
    .await;
    let ws = random_name("ttl");
    let pool = cache.pool().clone();

    // TTL: served while fresh, never after, then swept.
    let s = store(
        &ws,
        "pure",
        json!({"x": 1}),
        // Unique bytes per run: another test's live entry with the same result would keep
        // the blob (GC counts every reference), and the database is shared across runs.
        json!({"sum": 3, "ws": ws}),
        Permission::Read,
    );
    assert!(matches!(
        cache.store(&s).await.unwrap(),
        StoreOutcome::Stored { .. }
    ));
    let q = lookup(&ws, "pure", json!({"x": 1.0}), Permission::Read);
    assert!(
        cache.lookup(&q).await.unwrap().hit,
        "fresh entry (1 and 1.0 are the same input)"
    );
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    assert!(
        !cache.lookup(&q).await.unwrap().hit,
        "expired entries are never served"
    );
    assert!(sweep_all(&pool, 100).await.unwrap() >= 1);
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM cache_entries WHERE workspace_id = $1")
            .bind(&ws)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(left, 0, "the sweeper deleted the expired entry");

    // PII guard and the allow-list of node types.
    let refusals = [
        (
            json!({"to": "jane.doe@example.com"}),
            "function",
            Refusal::Pii(PiiKind::Email),
        ),
        (
            json!({"card": "4111 1111 1111 1111"}),
            "function",
            Refusal::Pii(PiiKind::CardNumber),
        ),
        (
            json!({"ssn": "078-05-1120"}),
            "function",
            Refusal::Pii(PiiKind::NationalId),
        ),
        (
            json!({"key": "AKIAIOSFODNN7EXAMPLE"}),
            "function",
            Refusal::Pii(PiiKind::Secret),
        ),
        (json!({"ok": true}), "human", Refusal::NotCacheable),
    ];
    for (i, (result, nt, want)) in refusals.into_iter().enumerate() {
        let s = store(&ws, nt, json!({"pii": i}), result, Permission::Read);
        assert_eq!(cache.store(&s).await.unwrap(), StoreOutcome::Refused(want));
        assert!(
            !cache
                .lookup(&lookup(&ws, nt, json!({"pii": i}), Permission::Admin))
                .await
                .unwrap()
                .hit
        );
    }

    // A corrupted blob is detected, not served, and its entry removed.
    let s = store(
        &ws,
        "function",
        json!({"c": 1}),
        json!({"big": "result"}),
        Permission::Read,
    );
    assert!(matches!(
        cache.store(&s).await.unwrap(),
        StoreOutcome::Stored { .. }
    ));
    let q = lookup(&ws, "function", json!({"c": 1}), Permission::Read);
    let good = cache.lookup(&q).await.unwrap();
    assert!(good.hit);
    let r: CasRef = good.result_ref.unwrap();
    let path = dir.path().join(cache.cas().key(&r));
    std::fs::write(
        &path,
        zstd::encode_all(&b"{\"big\":\"forged\"}"[..], 3).unwrap(),
    )
    .unwrap();
    let bad = cache.lookup(&q).await.unwrap();
    assert!(!bad.hit, "a corrupt blob must not be served");
    let (entries, audits): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM cache_entries WHERE workspace_id = $1 AND node_type = 'function'),
                (SELECT count(*) FROM cache_audit WHERE workspace_id = $1 AND node_type = 'function'
                                                   AND kind IN ('exact', 'semantic'))",
    )
    .bind(&ws)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (entries, audits),
        (0, 1),
        "entry deleted; only the good hit is audited"
    );

    // GC: an unreferenced blob goes (grace 0), a referenced one stays.
    let keep = store(
        &ws,
        "pure",
        json!({"keep": 1}),
        json!({"kept": true}),
        Permission::Read,
    );
    cache.store(&keep).await.unwrap();
    let kept = CasRef::of(json!({"kept": true}).to_string().as_bytes());
    let gone = CasRef::of(json!({"sum": 3, "ws": ws}).to_string().as_bytes());
    assert!(cache.cas().exists(&gone).await.unwrap());
    purge(&pool, &ws, Some("function")).await.unwrap();
    let mut collected = 0;
    for _ in 0..20 {
        let window = GcWindow {
            grace: Duration::ZERO,
            hold: Duration::ZERO,
        };
        collected += gc_once(&pool, cache.cas(), window, 10_000).await.unwrap();
        if !cache.cas().exists(&gone).await.unwrap() {
            break;
        }
    }
    assert!(collected >= 1);
    assert!(
        !cache.cas().exists(&gone).await.unwrap(),
        "the expired entry's blob was collected"
    );
    assert!(
        cache.cas().exists(&kept).await.unwrap(),
        "a referenced blob stays"
    );
    let p = purge(&pool, &ws, None).await.unwrap();
    assert_eq!((p.exact, p.semantic), (1, 0));
    let _ = cfg;
}

fn spawn_weir(prefix: &str, what: &str) -> ChildGuard {
    ChildGuard(
        Command::new(weir_bin())
            .args(["run", what])
            .env("WEIR__KAFKA__TOPIC_PREFIX", prefix)
            .env("WEIR__TELEMETRY__LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn weir"),
    )
}

fn event_store(ws: &str, prompt: &str, inputs: Value, result: Value) -> CacheEvent {
    CacheEvent::CacheStore(CacheStore {
        event_id: new_event_id(),
        occurred_at: now_micros(),
        workspace_id: ws.into(),
        traceparent: String::new(),
        tracestate: None,
        request_id: random_name("st"),
        requester: "alice".into(),
        permission: "write".into(),
        node_type: "agent".into(),
        config_json: json!({"model": "small"}).to_string(),
        inputs_json: inputs.to_string(),
        result_json: Some(result.to_string()),
        result_ref: None,
        prompt: Some(prompt.into()),
        embedding: None,
        cost_ms: 1_800,
        required_permission: "read".into(),
    })
}

fn event_lookup(ws: &str, id: &str, prompt: &str, inputs: Value, permission: &str) -> CacheEvent {
    CacheEvent::CacheLookup(CacheLookup {
        event_id: new_event_id(),
        occurred_at: now_micros(),
        workspace_id: ws.into(),
        traceparent: String::new(),
        tracestate: None,
        request_id: id.into(),
        requester: "bob".into(),
        permission: permission.into(),
        node_type: "agent".into(),
        config_json: json!({"model": "small"}).to_string(),
        inputs_json: inputs.to_string(),
        prompt: Some(prompt.into()),
        embedding: None,
        semantic: true,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_answers_exact_and_semantic_lookups_with_the_real_model() {
    let prefix = format!("{}.", random_name("cache"));
    let cfg = {
        let mut c = config(&prefix);
        c.kafka.topic_prefix = prefix.clone();
        c
    };
    let codec = prepare(&cfg).await.unwrap();
    let pool = weir_runtime::db::pool(&cfg.postgres).unwrap();
    let producer = weir_runtime::kafka::producer(&cfg.kafka).unwrap();
    let mut cache = spawn_weir(&prefix, "cache");
    let mut relay = spawn_weir(&prefix, "relay");
    let ws = random_name("ws");
    let other = random_name("ws");

    let cached = json!({"answer": "Open Settings, choose Security, then Reset password."});
    produce_in_order(
        &producer,
        &codec,
        &[event_store(
            &ws,
            "How do I reset my password?",
            json!({"q": 1}),
            cached.clone(),
        )],
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM cache_semantic WHERE workspace_id = $1")
                .bind(&ws)
                .fetch_one(&pool)
                .await
                .unwrap();
        if n == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the store was not applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lookups = [
        event_lookup(
            &ws,
            "exact",
            "How do I reset my password?",
            json!({"q": 1}),
            "read",
        ),
        event_lookup(
            &ws,
            "paraphrase",
            "How can I reset my password?",
            json!({"q": 2}),
            "read",
        ),
        event_lookup(
            &ws,
            "unrelated",
            "Write a haiku about autumn leaves.",
            json!({"q": 3}),
            "read",
        ),
        event_lookup(
            &other,
            "other-workspace",
            "How do I reset my password?",
            json!({"q": 1}),
            "admin",
        ),
        event_lookup(&ws, "bad-permission", "x", json!({}), "root"),
    ];
    produce_in_order(&producer, &codec, &lookups).await.unwrap();

    let consumer = weir_it::reader(&cfg, &[&codec.topic::<CacheAnswer>()]);
    let mut answers: HashMap<String, CacheAnswer> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while answers.len() < 4 && Instant::now() < deadline {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await {
            let a: CacheAnswer = codec.decode(m.payload().unwrap()).await.unwrap();
            answers.insert(a.request_id.clone(), a);
        }
    }
    cache.kill();
    relay.kill();
    assert_eq!(answers.len(), 4, "answers: {answers:?}");
    let exact = &answers["exact"];
    assert!(
        exact.hit && exact.kind == Some(CacheKind::Exact) && exact.saved_ms == 1_800,
        "{exact:?}"
    );
    let r: CasRef = exact.result_ref.as_ref().unwrap().parse().unwrap();
    assert_eq!(r, CasRef::of(cached.to_string().as_bytes()));
    let para = &answers["paraphrase"];
    assert!(
        para.hit && para.kind == Some(CacheKind::Semantic),
        "{para:?}"
    );
    assert!(
        para.similarity.unwrap() >= 0.92 && para.result_ref == exact.result_ref,
        "{para:?}"
    );
    let unrelated = &answers["unrelated"];
    assert!(
        !unrelated.hit && unrelated.similarity.unwrap() < 0.5,
        "{unrelated:?}"
    );
    assert!(!answers["other-workspace"].hit, "never across workspaces");
    assert!(
        !answers.contains_key("bad-permission"),
        "an invalid lookup is dead-lettered, not answered"
    );
    let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM cache_audit WHERE workspace_id = $1 AND requester = 'bob' AND owner = 'alice'")
        .bind(&ws)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(audited, 2);
}
