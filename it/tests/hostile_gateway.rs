//! The HTTP gateway against hostile clients, on the real stack: the API port serves no
//! metrics and labels stay bounded; floods of bad keys are throttled before they cost lookups
//! and never displace valid keys; slow clients are cut off; Idempotency-Key reuse with another
//! body, `\u0000`, events too large for Kafka and a `required_permission` above the caller
//! are 4xx problems; keys are listed and revoked with the `weir` binary.
//!
//! Every test ends the same way: the gateway is still up, and a good request of another
//! workspace is accepted and materialized within seconds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;
use weir_gateway::{create_key, Sources};
use weir_it::gateway::{Gateway, Options};
use weir_it::{config, random_name, weir_bin};
use weir_model::Permission;
use weir_runtime::config::Config;

/// A gateway, a materializer and the telemetry listener in this process, on fresh topics.
async fn start(tweak: impl FnOnce(&mut Config), sources: Sources) -> Gateway {
    let options = Options {
        sources,
        materializer: true,
        telemetry: true,
        // Below every idle timeout the tests set, so a pooled connection is never reused
        // just as the gateway closes it.
        pool_idle_timeout: Some(Duration::from_millis(800)),
        problems_under: Some("/"),
        ..Options::default()
    };
    Gateway::start("hgw", tweak, options).await
}

/// What every test ends with.
trait StillServes {
    /// The gateway answers, and a good request of a new workspace (from a fresh client
    /// address when the gateway reads X-Forwarded-For) is accepted and materialized within
    /// seconds.
    async fn still_serves_others(&self);
}

impl StillServes for Gateway {
    async fn still_serves_others(&self) {
        let h = self.http.get(format!("{}/healthz", self.base)).send().await;
        assert_eq!(h.unwrap().status(), StatusCode::OK, "the gateway is up");
        let ws = random_name("ws-good");
        let key = self.key(&ws, Permission::Write).await;
        let wf = format!("wf-{}", Uuid::now_v7().simple());
        let path = format!("/v1/workflows/{wf}");
        let fresh = format!("203.0.113.{}", rand::random::<u8>());
        let xff = [("x-forwarded-for", fresh.as_str())];
        let start = Instant::now();
        let a = self
            .call(
                Method::PUT,
                &path,
                Some(&key),
                &xff,
                Some(definition().to_string()),
            )
            .await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
        loop {
            let a = self.call(Method::GET, &path, Some(&key), &xff, None).await;
            if a.status == StatusCode::OK {
                assert_eq!(a.body["version"], 1);
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "another workspace's workflow was not applied: {} {}",
                a.status,
                a.body
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn definition() -> Value {
    json!({"nodes": {"fetch": {"type": "http_request", "config": {"url": "https://example.com"}},
                     "sum": {"type": "agent", "config": {}}},
           "edges": [{"from": "fetch", "to": "sum"}], "settings": {"max_hops": 10}})
}

/// A key in the shape `weir keys create` makes, not stored anywhere.
fn random_key() -> String {
    format!(
        "weir_{}_{}",
        hex(&rand::random::<[u8; 6]>()),
        hex(&rand::random::<[u8; 24]>())
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A cache lookup source over the real result cache, without an embedder (exact lookups).
async fn cache_sources() -> Sources {
    let cfg = config("");
    let pool = weir_runtime::db::pool(&cfg.postgres).unwrap();
    let cas = weir_runtime::cas::Cas::from_config(&cfg).await.unwrap();
    let cache = weir_cache::Cache::new(pool, cas, Arc::new(cfg.cache.clone()), None)
        .await
        .unwrap();
    Sources {
        run_status: None,
        cache_lookup: Some(Arc::new(weir_wiring::ResultCacheLookup::new(cache))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_off_the_api_port_and_labels_stay_bounded() {
    let gw = start(|_| {}, cache_sources().await).await;
    let ws = random_name("ws");
    let read = gw.key(&ws, Permission::Read).await;

    // Not on the API port, with or without a key.
    for key in [None, Some(read.as_str())] {
        let a = gw.call(Method::GET, "/metrics", key, &[], None).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND);
    }

    // Caller-chosen values: a run id in the path, a junk node type in a cache lookup.
    let run_id = Uuid::now_v7();
    let a = gw
        .call(
            Method::GET,
            &format!("/v1/runs/{run_id}"),
            Some(&read),
            &[],
            None,
        )
        .await;
    assert_eq!(
        a.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "no run source here"
    );
    let junk = format!("junk-{}", Uuid::now_v7().simple());
    let a = gw
        .call(
            Method::POST,
            "/v1/cache/lookup",
            Some(&read),
            &[],
            Some(
                json!({"node_type": junk, "config": {}, "inputs": {"a": 1}, "semantic": false})
                    .to_string(),
            ),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["hit"], false);

    let text = gw.metrics().await;
    assert!(text.contains("weir_gateway_requests_total"), "{text}");
    assert!(
        text.contains(r#"route="/v1/runs/{run_id}""#),
        "routes are templates"
    );
    for leaked in [run_id.to_string(), junk.clone(), read.clone()] {
        assert!(
            !text.contains(&leaked),
            "{leaked} must not be a label value"
        );
    }
    let key_id = read.split('_').nth(1).unwrap();
    assert!(
        !text.contains(&format!("\"{key_id}\"")),
        "no key ids as labels"
    );
    assert!(
        text.lines().any(
            |l| l.starts_with("weir_cache_lookups_total") && l.contains(r#"node_type="other""#)
        ),
        "a junk node type counts as other:\n{}",
        text.lines()
            .filter(|l| l.starts_with("weir_cache_lookups_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    gw.still_serves_others().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_keys_is_throttled_and_never_displaces_valid_keys() {
    let gw = start(
        |c| {
            c.gateway.client_ip_from_forwarded_for = true;
            c.gateway.max_negative_keys = 16;
            c.gateway.negative_key_cache_ttl_ms = 1_000;
            c.gateway.unknown_key_rate_per_sec = 5;
            c.gateway.unknown_key_burst = 50;
        },
        Sources::default(),
    )
    .await;
    let ws = random_name("ws");
    let known = gw.key(&ws, Permission::Read).await;
    let other_ws = random_name("ws");
    let fresh = gw.key(&other_ws, Permission::Read).await;
    let attacker = [("x-forwarded-for", "198.51.100.7")];
    let path = "/v1/workflows/nothing-here";

    // The valid key is used once (and so known) before the flood.
    let a = gw
        .call(Method::GET, path, Some(&known), &attacker, None)
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);

    // 600 random, well-formed keys from one client, 16 at a time.
    let started = Instant::now();
    let gw = Arc::new(gw);
    let mut statuses = Vec::new();
    for _ in 0..(600 / 16 + 1) {
        let batch = (0..16).map(|_| {
            let gw = gw.clone();
            tokio::spawn(async move {
                let a = gw
                    .call(Method::GET, path, Some(&random_key()), &attacker, None)
                    .await;
                if a.status == StatusCode::TOO_MANY_REQUESTS {
                    assert!(a.headers.get("retry-after").is_some());
                }
                a.status
            })
        });
        for h in futures::future::join_all(batch).await {
            statuses.push(h.unwrap());
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let unauthorized = statuses
        .iter()
        .filter(|s| **s == StatusCode::UNAUTHORIZED)
        .count();
    let throttled = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(
        unauthorized + throttled,
        statuses.len(),
        "only 401 or 429: {statuses:?}"
    );
    // Each 401 cost one lookup: at most the burst plus what refilled meanwhile (plus the
    // lookups in flight when the budget ran out).
    let budget = 50.0 + 5.0 * elapsed + 16.0;
    assert!(
        (unauthorized as f64) <= budget,
        "{unauthorized} lookups in {elapsed:.1} s"
    );
    assert!(throttled >= 400, "the flood was throttled: {throttled}");

    // From the same client, at once: the known key still works (never displaced by the
    // negative cache, which overflowed), a malformed key is a plain 401.
    let a = gw
        .call(Method::GET, path, Some(&known), &attacker, None)
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.body);
    let a = gw
        .call(Method::GET, path, Some("garbage"), &attacker, None)
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    // A key this gateway never saw, from another client: at once.
    let a = gw
        .call(
            Method::GET,
            path,
            Some(&fresh),
            &[("x-forwarded-for", "198.51.100.8")],
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.body);
    // ... and from the flooding client as soon as its budget refills (5/s).
    let other_fresh = gw.key(&other_ws, Permission::Read).await;
    let t = Instant::now();
    loop {
        let a = gw
            .call(Method::GET, path, Some(&other_fresh), &attacker, None)
            .await;
        if a.status == StatusCode::NOT_FOUND {
            break;
        }
        assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(t.elapsed() < Duration::from_secs(3), "not promptly");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A key tried before it existed works once its negative entry expired.
    let key = random_key();
    let client = [("x-forwarded-for", "198.51.100.9")];
    let a = gw.call(Method::GET, path, Some(&key), &client, None).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    sqlx::query(
        "INSERT INTO weir_api_keys (key_sha256, key_id, workspace_id, permission)
         VALUES ($1, $2, $3, 'read')",
    )
    .bind(weir_gateway::auth::key_hash(&key))
    .bind(key.split('_').nth(1).unwrap())
    .bind(&other_ws)
    .execute(&gw.pool)
    .await
    .unwrap();
    let t = Instant::now();
    loop {
        let a = gw.call(Method::GET, path, Some(&key), &client, None).await;
        if a.status == StatusCode::NOT_FOUND {
            break;
        }
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        assert!(
            t.elapsed() < Duration::from_millis(2_500),
            "the negative entry outlived its TTL"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    gw.still_serves_others().await;

    // The per-client request bucket, before authentication: its own client only.
    drop(gw);
    let gw = start(
        |c| {
            c.gateway.client_ip_from_forwarded_for = true;
            c.gateway.client_rate_limit_per_sec = 1;
            c.gateway.client_rate_limit_burst = 5;
        },
        Sources::default(),
    )
    .await;
    let noisy = [("x-forwarded-for", "10.1.2.3, 198.51.100.20")];
    let mut codes = Vec::new();
    for _ in 0..8 {
        codes.push(
            gw.call(Method::GET, path, Some(&random_key()), &noisy, None)
                .await
                .status,
        );
    }
    assert_eq!(
        codes
            .iter()
            .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
            .count(),
        3,
        "{codes:?}"
    );
    let a = gw.call(Method::GET, path, Some(&known), &noisy, None).await;
    assert_eq!(
        a.status,
        StatusCode::TOO_MANY_REQUESTS,
        "refused before authentication"
    );
    gw.still_serves_others().await;
}

/// Reads until the server closes the connection or `wait` passes: (bytes, closed).
async fn read_until_closed(s: &mut TcpStream, wait: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let end = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(end, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into(), false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off() {
    let gw = start(
        |c| {
            c.gateway.header_read_timeout_ms = 1_000;
            c.gateway.idle_timeout_ms = 3_000;
            c.gateway.body_read_timeout_ms = 1_000;
        },
        Sources::default(),
    )
    .await;
    let key = gw.key(&random_name("ws"), Permission::Write).await;

    // Slowloris: a head one byte every 100 ms is cut off after the header timeout.
    let mut slow = TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "GET /v1/workflows/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(100)
    );
    let t = Instant::now();
    let mut cut = false;
    for b in head.bytes() {
        if slow.write_all(&[b]).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if t.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    if !cut {
        cut = read_until_closed(&mut slow, Duration::from_secs(2)).await.1;
    }
    assert!(cut, "the slow head was not cut off");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "cut off after {:?}",
        t.elapsed()
    );

    // A connection that never sends anything is closed after the header timeout too.
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    let t = Instant::now();
    assert!(
        read_until_closed(&mut silent, Duration::from_secs(3))
            .await
            .1
    );
    assert!(t.elapsed() >= Duration::from_millis(900));

    // A body promised and not sent: 408 after the body timeout, as a problem.
    let mut body = TcpStream::connect(gw.addr).await.unwrap();
    let req = format!(
        "PUT /v1/workflows/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"nodes\":"
    );
    body.write_all(req.as_bytes()).await.unwrap();
    let (answer, _) = read_until_closed(&mut body, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");

    // An oversized head: 431, closed.
    let mut big = TcpStream::connect(gw.addr).await.unwrap();
    let req = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let _ = big.write_all(req.as_bytes()).await;
    let (answer, _) = read_until_closed(&mut big, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // Keep-alive: served, still open past the header timeout, closed after the idle one.
    let mut idle = TcpStream::connect(gw.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (answer, closed) = read_until_closed(&mut idle, Duration::from_millis(1_500)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(!closed, "an idle connection outlives the header timeout");
    let (_, closed) = read_until_closed(&mut idle, Duration::from_secs(3)).await;
    assert!(closed, "and is closed after the idle timeout");

    let text = gw.metrics().await;
    assert!(
        text.contains(r#"weir_gateway_connections_closed_total{reason="header_timeout"}"#),
        "{text}"
    );
    gw.still_serves_others().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_nul_oversized_events_and_permissions_are_4xx() {
    let gw = start(
        |c| {
            // Room for a body whose event is over Kafka's 1 MB message.max.bytes.
            c.gateway.max_body_bytes = 4 * 1024 * 1024;
        },
        Sources::default(),
    )
    .await;
    let ws = random_name("ws");
    let write = gw.key(&ws, Permission::Write).await;
    let wf = format!("wf-{}", Uuid::now_v7().simple());
    let path = format!("/v1/workflows/{wf}");
    let put = |key: &'static str, body: String| {
        let (gw, write, path) = (&gw, write.clone(), path.clone());
        async move {
            gw.call(
                Method::PUT,
                &path,
                Some(&write),
                &[("idempotency-key", key)],
                Some(body),
            )
            .await
        }
    };

    // Idempotency-Key: the same body is the same answer; another body is 422.
    let first = put("k-1", definition().to_string()).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.body);
    let again = put("k-1", definition().to_string()).await;
    assert_eq!(again.status, StatusCode::ACCEPTED);
    assert_eq!(again.body, first.body, "a replay answers the same");
    let mut changed = definition();
    changed["settings"]["max_hops"] = json!(11);
    let reused = put("k-1", changed.to_string()).await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused.body["code"], "idempotency_key_reused");
    let other_key = put("k-2", changed.to_string()).await;
    assert_eq!(other_key.status, StatusCode::ACCEPTED);
    assert_ne!(other_key.body["patch_id"], first.body["patch_id"]);
    // A rejected first attempt does not hold its key: a corrected retry goes through.
    let bad = gw
        .call(
            Method::POST,
            &format!("{path}/patches"),
            Some(&write),
            &[("idempotency-key", "p-1")],
            Some(r#"[{"op": "frobnicate", "path": "/x"}]"#.into()),
        )
        .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    let fixed = gw
        .call(
            Method::POST,
            &format!("{path}/patches"),
            Some(&write),
            &[("idempotency-key", "p-1")],
            Some(r#"[{"op": "replace", "path": "/settings/max_hops", "value": 12}]"#.into()),
        )
        .await;
    assert_eq!(fixed.status, StatusCode::ACCEPTED, "{}", fixed.body);
    // The body key of a run works the same way.
    let run = |inputs: Value| {
        let (gw, write, wf) = (&gw, write.clone(), wf.clone());
        async move {
            gw.call(
                Method::POST,
                "/v1/runs",
                Some(&write),
                &[],
                Some(
                    json!({"workflow_id": wf, "inputs": inputs, "idempotency_key": "r-1"})
                        .to_string(),
                ),
            )
            .await
        }
    };
    let r1 = run(json!({"a": 1})).await;
    assert_eq!(r1.status, StatusCode::ACCEPTED, "{}", r1.body);
    assert_eq!(run(json!({"a": 1})).await.body, r1.body);
    let r3 = run(json!({"a": 2})).await;
    assert_eq!(r3.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r3.body["code"], "idempotency_key_reused");

    // \u0000 anywhere: 400 naming the pointer, before anything is produced.
    let mut nul = definition();
    nul["nodes"]["fetch"]["config"]["url"] = json!("https://x\u{0}y");
    let a = put("nul-1", nul.to_string()).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.body["code"], "nul_character");
    assert!(
        a.body["detail"]
            .as_str()
            .unwrap()
            .contains("/nodes/fetch/config/url"),
        "{}",
        a.body
    );
    let a = gw
        .call(
            Method::POST,
            "/v1/cache/entries",
            Some(&write),
            &[],
            Some(
                r#"{"node_type": "function", "config": {"k\u0000": 1}, "inputs": {}, "result": 1, "cost_ms": 1}"#
                    .into(),
            ),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.body["code"], "nul_character");

    // required_permission above the caller's own: 403; at or below: accepted.
    let entry = |level: &str| {
        json!({"node_type": "function", "config": {"f": "sum"}, "inputs": {"a": 1},
               "result": {"s": 1}, "cost_ms": 5, "required_permission": level})
        .to_string()
    };
    let a = gw
        .call(
            Method::POST,
            "/v1/cache/entries",
            Some(&write),
            &[],
            Some(entry("admin")),
        )
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(a.body["code"], "permission_above_caller");
    for level in ["read", "write"] {
        let a = gw
            .call(
                Method::POST,
                "/v1/cache/entries",
                Some(&write),
                &[],
                Some(entry(level)),
            )
            .await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{level}: {}", a.body);
    }

    // An event larger than Kafka takes: 413, not 503.
    let big = json!({"node_type": "function", "config": {}, "inputs": {"blob": "x".repeat(1_500_000)},
                     "result": 1, "cost_ms": 1});
    let a = gw
        .call(
            Method::POST,
            "/v1/cache/entries",
            Some(&write),
            &[],
            Some(big.to_string()),
        )
        .await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", a.body);
    assert_eq!(a.body["code"], "event_too_large");

    gw.still_serves_others().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_listed_and_revoked_with_the_binary() {
    // A TTL far longer than the test: the revocation must arrive by notification.
    let gw = start(|c| c.gateway.key_cache_ttl_ms = 60_000, Sources::default()).await;
    let ws = random_name("ws");
    let a = create_key(&gw.pool, &ws, Permission::Write).await.unwrap();
    let b = create_key(&gw.pool, &ws, Permission::Read).await.unwrap();
    let path = "/v1/workflows/none";
    for k in [&a.key, &b.key] {
        let r = gw.call(Method::GET, path, Some(k), &[], None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "the key works");
    }
    let weir = |args: &[&str]| {
        let out = std::process::Command::new(weir_bin())
            .args(args)
            .env("WEIR__KAFKA__TOPIC_PREFIX", &gw.cfg.kafka.topic_prefix)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };

    let (code, out, err) = weir(&["keys", "list", "--workspace", &ws, "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let rows: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert_eq!(rows[0]["key_id"], a.key_id.as_str());
    assert_eq!(rows[0]["permission"], "write");
    assert_eq!(rows[1]["permission"], "read");
    assert!(rows.iter().all(|r| r["workspace_id"] == ws.as_str()
        && r["created_at"].is_string()
        && r["revoked_at"].is_null()));
    for secret in [&a.key, &b.key] {
        let hash = weir_gateway::auth::key_hash(secret);
        let secret_part = secret.rsplit('_').next().unwrap();
        assert!(
            !out.contains(secret_part) && !out.contains(&hash),
            "never a key or its hash"
        );
    }
    let (code, table, _) = weir(&["keys", "list", "--workspace", &ws]);
    assert_eq!(code, Some(0));
    assert!(
        table.starts_with("KEY_ID") && table.contains(&b.key_id),
        "{table}"
    );

    // Revoke: the gateway forgets the key as soon as the revocation commits (LISTEN/NOTIFY),
    // long before key_cache_ttl_ms.
    let (code, _, err) = weir(&["keys", "revoke", &a.key_id]);
    assert_eq!(code, Some(0), "{err}");
    let revoked = Instant::now();
    loop {
        let r = gw.call(Method::GET, path, Some(&a.key), &[], None).await;
        if r.status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert!(
            revoked.elapsed() < Duration::from_millis(1_500),
            "the revoked key still works after {:?}",
            revoked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = gw.call(Method::GET, path, Some(&b.key), &[], None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "the other key still works");
    let (_, out, _) = weir(&["keys", "list", "--workspace", &ws, "--json"]);
    let first: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert!(first["revoked_at"].is_string(), "{first}");
    let (code, _, err) = weir(&["keys", "revoke", &a.key_id]);
    assert_eq!(code, Some(0), "revoking twice is fine: {err}");
    assert!(err.contains("already"), "{err}");
    let (code, _, _) = weir(&["keys", "revoke", "000000000000"]);
    assert_eq!(code, Some(1), "an unknown key id fails");

    gw.still_serves_others().await;
}
