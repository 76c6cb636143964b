//! Live streams against the real stack (gateway, materializer, coordinator and a relay in
//! this process, on fresh topics): a run's state events in order, resumed with
//! Last-Event-ID after a dropped connection with no gap and no repeat, workspace isolation,
//! the stream limits, and the client-side fold of the patch log compared with the head byte
//! for byte.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;
use weir_it::gateway::{Gateway, Options, Setup};
use weir_it::random_name;
use weir_model::definition::canonical_json_verbatim_numbers;
use weir_model::fold::sha256_hex;
use weir_model::patch::apply_patch;
use weir_model::Permission;
use weir_runtime::config::Config;

/// One server-sent event.
#[derive(Debug, Clone)]
struct Ev {
    id: u64,
    event: String,
    data: Value,
}

/// A server-sent events reader over a streaming response.
struct Sse {
    res: reqwest::Response,
    buf: String,
    ended: bool,
}

impl Sse {
    /// The next event within `wait`: `Err(())` on timeout, `Ok(None)` when the stream ended.
    async fn next(&mut self, wait: Duration) -> Result<Option<Ev>, ()> {
        let deadline = Instant::now() + wait;
        loop {
            while let Some(cut) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..cut + 2).collect();
                let (mut id, mut event, mut data) = (None, String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.parse::<u64>().expect("numeric id"));
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event = v.to_string();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                if let Some(id) = id {
                    let data = serde_json::from_str(&data).expect("JSON data");
                    return Ok(Some(Ev { id, event, data }));
                }
            }
            if self.ended {
                return Ok(None);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.res.chunk()).await {
                Err(_) => return Err(()),
                Ok(Ok(Some(c))) => self.buf.push_str(std::str::from_utf8(&c).unwrap()),
                Ok(Ok(None)) | Ok(Err(_)) => self.ended = true,
            }
        }
    }

    async fn expect(&mut self) -> Ev {
        self.next(Duration::from_secs(30))
            .await
            .expect("an event within 30 s")
            .expect("the stream goes on")
    }
}

type Refusal = (StatusCode, reqwest::header::HeaderMap, String);

/// Opens `path` as a stream with `key` (and `Last-Event-ID`): the stream, or the answer.
async fn open(gw: &Gateway, path: &str, key: &str, last: Option<u64>) -> Result<Sse, Refusal> {
    open_at(&gw.http, &gw.base, path, key, last).await
}

/// [`open`] on the gateway instance at `base`.
async fn open_at(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    key: &str,
    last: Option<u64>,
) -> Result<Sse, Refusal> {
    let mut req = http.get(format!("{base}{path}")).bearer_auth(key);
    if let Some(l) = last {
        req = req.header("last-event-id", l.to_string());
    }
    let res = req.send().await.unwrap();
    if res.status() == StatusCode::OK {
        assert_eq!(
            res.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Ok(Sse {
            res,
            buf: String::new(),
            ended: false,
        })
    } else {
        let (status, headers) = (res.status(), res.headers().clone());
        Err((status, headers, res.text().await.unwrap_or_default()))
    }
}

/// Gateway, materializer, coordinator, a relay (so the processors' events reach Kafka and
/// the gateway's feed) and the coordinator's run status.
async fn stack(configure: impl FnOnce(&mut Config)) -> Gateway {
    let setup = Setup::new("streams", |c| {
        c.gateway.stream_heartbeat_ms = 300;
        configure(c);
    })
    .await;
    let relay = weir_relay::Relay::new(
        setup.cfg.clone(),
        weir_runtime::db::pool(&setup.cfg.postgres).unwrap(),
        weir_relay::producer(&setup.cfg.kafka).unwrap(),
        weir_runtime::telemetry::Health::default(),
        random_name("relay"),
    );
    tokio::spawn(relay.run(setup.shutdown.clone()));
    let sources = weir_gateway::Sources {
        run_status: Some(Arc::new(weir_wiring::CoordinatorRunStatus::new(
            setup.pool.clone(),
        ))),
        cache_lookup: None,
    };
    setup
        .serve(Options {
            sources,
            materializer: true,
            coordinator: true,
            ..Options::default()
        })
        .await
}

async fn create_workflow(gw: &Gateway, key: &str, wf: &str, def: Value) {
    let a = gw
        .call(
            Method::PUT,
            &format!("/v1/workflows/{wf}"),
            Some(key),
            &[],
            Some(def.to_string()),
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    gw.wait_for(&format!("/v1/workflows/{wf}"), key, |a| {
        a.status == StatusCode::OK
    })
    .await;
}

/// Reports the running attempt of `node` of `run` as succeeded, once the coordinator
/// dispatched it.
async fn complete(gw: &Gateway, key: &str, run: &str, node: &str) {
    let a = gw
        .wait_for(&format!("/v1/runs/{run}"), key, |a| {
            a.body["nodes"].as_array().is_some_and(|n| {
                n.iter()
                    .any(|n| n["node_id"] == node && n["status"] == "running")
            })
        })
        .await;
    let attempt = a.body["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == node)
        .unwrap()["attempt"]
        .as_i64()
        .unwrap();
    let a = gw
        .post(
            &format!("/v1/runs/{run}/nodes/{node}/completions"),
            key,
            json!({"attempt": attempt, "status": "succeeded", "output": {"node": node}}),
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
}

fn node_status(ev: &Ev, node: &str) -> String {
    ev.data["run"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == node)
        .map(|n| n["status"].as_str().unwrap().to_string())
        .unwrap()
}

/// Reads state events until `done` holds for one, checking ids only grow.
async fn until(s: &mut Sse, last: &mut u64, done: impl Fn(&Ev) -> bool) -> Ev {
    loop {
        let ev = s.expect().await;
        assert_eq!(ev.event, "state");
        assert!(
            ev.id > *last,
            "id {} after {}: a repeat or a reorder",
            ev.id,
            last
        );
        assert_eq!(ev.data["progress"].as_u64(), Some(ev.id));
        *last = ev.id;
        if done(&ev) {
            return ev;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_stream_is_ordered_resumes_without_gap_or_repeat_and_stays_in_its_workspace() {
    // Heartbeats (which also read the state again) far apart: every change below must come
    // through the instances' Kafka feeds.
    let gw = stack(|c| c.gateway.stream_heartbeat_ms = 60_000).await;
    let ws = random_name("ws");
    let write = gw.key(&ws, Permission::Write).await;
    let read = gw.key(&ws, Permission::Read).await;
    let other = gw.key(&random_name("ws"), Permission::Admin).await;
    let wf = format!("wf-{}", Uuid::now_v7().simple());
    let def = json!({"nodes": {"a": {"type": "function", "config": {}},
                               "b": {"type": "function", "config": {}},
                               "c": {"type": "function", "config": {}}},
                     "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}]});
    create_workflow(&gw, &write, &wf, def).await;
    let a = gw
        .post("/v1/runs", &write, json!({"workflow_id": wf, "inputs": {}}))
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    let run = a.body["run_id"].as_str().unwrap().to_string();
    gw.wait_for(&format!("/v1/runs/{run}"), &read, |a| {
        a.status == StatusCode::OK
    })
    .await;
    let path = format!("/v1/runs/{run}/events");

    // Another workspace's key: 404 exactly like a run that does not exist.
    let (s1, _, b1) = open(&gw, &path, &other, None).await.err().unwrap();
    let missing = format!("/v1/runs/{}/events", Uuid::now_v7());
    let (s2, _, b2) = open(&gw, &missing, &read, None).await.err().unwrap();
    assert_eq!((s1, s2), (StatusCode::NOT_FOUND, StatusCode::NOT_FOUND));
    let detail = |b: &str| serde_json::from_str::<Value>(b).unwrap()["title"].clone();
    assert_eq!(detail(&b1), detail(&b2));

    // The first event is the state so far, with the DAG's edges; then one per change.
    let mut s = open(&gw, &path, &read, None).await.unwrap();
    let mut last = 0;
    let first = until(&mut s, &mut last, |_| true).await;
    assert_eq!(first.data["run"]["status"], "running");
    assert_eq!(
        first.data["edges"].as_array().map(Vec::len),
        Some(2),
        "{}",
        first.data
    );
    if node_status(&first, "a") != "running" {
        until(&mut s, &mut last, |e| node_status(e, "a") == "running").await;
    }
    complete(&gw, &write, &run, "a").await;
    let ev = until(&mut s, &mut last, |e| node_status(e, "b") == "running").await;
    assert_eq!(node_status(&ev, "a"), "succeeded");
    assert!(
        ev.data.get("edges").is_none(),
        "edges only in a connection's first event"
    );

    // The connection drops; the run moves on meanwhile.
    drop(s);
    let seen = last;
    complete(&gw, &write, &run, "b").await;
    gw.wait_for(&format!("/v1/runs/{run}"), &read, |a| {
        a.body["nodes"].as_array().is_some_and(|n| {
            n.iter()
                .any(|n| n["node_id"] == "b" && n["status"] == "succeeded")
        })
    })
    .await;
    // Resumed on another gateway instance (no sticky sessions: each instance reads every
    // partition): nothing at or below the last id, and the missed change is there.
    let other_instance = {
        let sources = weir_gateway::Sources {
            run_status: Some(Arc::new(weir_wiring::CoordinatorRunStatus::new(
                gw.pool.clone(),
            ))),
            cache_lookup: None,
        };
        let state = weir_gateway::state(gw.cfg.clone(), sources).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = weir_gateway::spawn(listener, state, gw.shutdown.clone()).unwrap();
        format!("http://{}", running.addr)
    };
    let mut s = open_at(&gw.http, &other_instance, &path, &read, Some(seen))
        .await
        .unwrap();
    let ev = until(&mut s, &mut last, |e| node_status(e, "c") == "running").await;
    assert_eq!(node_status(&ev, "b"), "succeeded");
    drop(s);

    // Resumed at the current state, on the second instance too: only heartbeats until
    // something changes (no repeat), then the change, live through that instance's feed.
    let mut s = open_at(&gw.http, &other_instance, &path, &read, Some(last))
        .await
        .unwrap();
    assert!(
        s.next(Duration::from_millis(1200)).await.is_err(),
        "an event although nothing changed after Last-Event-ID"
    );
    complete(&gw, &write, &run, "c").await;
    let done = until(&mut s, &mut last, |e| e.data["run"]["status"] != "running").await;
    assert_eq!(done.data["run"]["status"], "completed");
    for n in ["a", "b", "c"] {
        assert_eq!(node_status(&done, n), "succeeded");
    }
    // The stream ends after the final state; resuming after it is 204 (EventSource stops).
    assert!(matches!(s.next(Duration::from_secs(10)).await, Ok(None)));
    let (st, _, _) = open(&gw, &path, &read, Some(last)).await.err().unwrap();
    assert_eq!(st, StatusCode::NO_CONTENT);
    // A fresh connection gets the final state once, then the end.
    let mut s = open(&gw, &path, &read, None).await.unwrap();
    assert_eq!(s.expect().await.id, last);
    assert!(matches!(s.next(Duration::from_secs(10)).await, Ok(None)));

    // A bad Last-Event-ID is 400.
    let (st, _, _) = gw
        .http
        .get(format!("{}{path}", gw.base))
        .bearer_auth(&read)
        .header("last-event-id", "x")
        .send()
        .await
        .map(|r| (r.status(), (), ()))
        .unwrap();
    assert_eq!(st, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_limits_refuse_the_next_stream_with_retry_after_and_places_come_back() {
    let gw = stack(|c| {
        c.gateway.max_streams = 3;
        c.gateway.max_streams_per_workspace = 2;
    })
    .await;
    let (a, b, c) = (random_name("ws"), random_name("ws"), random_name("ws"));
    let (ka, kb, kc) = (
        gw.key(&a, Permission::Write).await,
        gw.key(&b, Permission::Write).await,
        gw.key(&c, Permission::Write).await,
    );
    let wf = "wf-limits";
    let def = json!({"nodes": {"a": {"type": "function", "config": {}}}, "edges": []});
    for k in [&ka, &kb, &kc] {
        create_workflow(&gw, k, wf, def.clone()).await;
    }
    let path = format!("/v1/workflows/{wf}/events");
    let mut held = vec![
        open(&gw, &path, &ka, None).await.unwrap(),
        open(&gw, &path, &ka, None).await.unwrap(),
    ];
    // The workspace's third: 429 with Retry-After.
    let (st, h, body) = open(&gw, &path, &ka, None).await.err().unwrap();
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(h.contains_key("retry-after"));
    // Another workspace is not slowed down by it.
    held.push(open(&gw, &path, &kb, None).await.unwrap());
    // The instance's fourth: 503 with Retry-After.
    let (st, h, body) = open(&gw, &path, &kc, None).await.err().unwrap();
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(h.contains_key("retry-after"));
    for s in &mut held {
        assert_eq!(s.expect().await.event, "head");
    }
    // A client that goes away frees its place (noticed at its next heartbeat at the latest).
    held.truncate(1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match open(&gw, &path, &kc, None).await {
            Ok(mut s) => {
                assert_eq!(s.expect().await.event, "head");
                break;
            }
            Err((st, _, _)) if Instant::now() < deadline => {
                assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no place came back: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_folds_the_patch_log_forward_to_the_head_byte_for_byte() {
    let gw = stack(|_| {}).await;
    let ws = random_name("ws");
    let write = gw.key(&ws, Permission::Write).await;
    let read = gw.key(&ws, Permission::Read).await;
    let other = gw.key(&random_name("ws"), Permission::Admin).await;
    let wf = format!("wf-{}", Uuid::now_v7().simple());
    let def = json!({"nodes": {"fetch": {"type": "http_request", "config": {"url": "http://x", "n": 1.50}}},
                     "edges": [], "settings": {"max_hops": 10}});
    create_workflow(&gw, &write, &wf, def).await;
    let patches = [
        json!([{"op": "add", "path": "/nodes/sum", "value": {"type": "agent", "config": {"model": "m"}}}]),
        json!([{"op": "add", "path": "/edges/-", "value": {"from": "fetch", "to": "sum"}}]),
        json!([{"op": "replace", "path": "/nodes/fetch/config/n", "value": 2e3}]),
        json!([{"op": "add", "path": "/nodes/sum/retry", "value": {"max_attempts": 3, "backoff_ms": 10}},
               {"op": "test", "path": "/settings/max_hops", "value": 10}]),
    ];
    // A workflow stream from version 2: the versions after it in order, then live ones.
    let events = format!("/v1/workflows/{wf}/events");
    let mut stream = open(&gw, &events, &read, Some(2)).await.unwrap();
    for p in &patches {
        let a = gw
            .post(&format!("/v1/workflows/{wf}/patches"), &write, p.clone())
            .await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    }
    let head = gw
        .wait_for(&format!("/v1/workflows/{wf}"), &read, |a| {
            a.body["version"] == 5
        })
        .await;
    for v in 3..=5 {
        let ev = stream.expect().await;
        assert_eq!((ev.id, ev.event.as_str()), (v, "version"), "{}", ev.data);
        assert_eq!(ev.data["version"], v);
        assert!(ev.data["operations"].is_array());
    }
    drop(stream);

    // Fold forward from nothing (version 0) in pages of 2, checking every version's sha256.
    let mut doc = Value::Null;
    let mut at = 0;
    loop {
        let a = gw
            .get(
                &format!("/v1/workflows/{wf}/patches?after_version={at}&limit=2"),
                &read,
            )
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        assert_eq!(a.body["head_version"], 5);
        let page = a.body["patches"].as_array().unwrap().clone();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        for p in page {
            assert_eq!(p["version"], at + 1, "contiguous versions");
            doc = apply_patch(&doc, &p["operations"]).expect("the log's operations apply");
            let canonical = canonical_json_verbatim_numbers(&doc);
            assert_eq!(
                sha256_hex(&canonical),
                p["definition_sha256"].as_str().unwrap()
            );
            at += 1;
        }
    }
    assert_eq!(at, 5);
    // The folded document is the head, byte for byte in canonical form.
    assert_eq!(
        canonical_json_verbatim_numbers(&doc),
        canonical_json_verbatim_numbers(&head.body["definition"])
    );
    assert_eq!(
        sha256_hex(&canonical_json_verbatim_numbers(&doc)),
        a_head_sha(&gw, &ws, &wf).await
    );

    // Another workspace: 404, as for a workflow that does not exist.
    let a = gw
        .get(
            &format!("/v1/workflows/{wf}/patches?after_version=0"),
            &other,
        )
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let (st, _, _) = open(&gw, &events, &other, None).await.err().unwrap();
    assert_eq!(st, StatusCode::NOT_FOUND);
    let a = gw
        .get(
            &format!("/v1/workflows/{wf}/patches?after_version=-1"),
            &read,
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);

    // The log no longer covers versions 1 and 2 (pruned): a client at 0 is told to fetch
    // the head (410, and a `gap` event on a stream); one at 2 still folds forward.
    sqlx::query("DELETE FROM weir_workflow_patches WHERE workspace_id = $1 AND workflow_id = $2 AND version <= 2")
        .bind(&ws)
        .bind(&wf)
        .execute(&gw.pool)
        .await
        .unwrap();
    let a = gw
        .get(
            &format!("/v1/workflows/{wf}/patches?after_version=0"),
            &read,
        )
        .await;
    assert_eq!(a.status, StatusCode::GONE, "{}", a.body);
    assert_eq!(a.body["code"], "patch_log_gap");
    let a = gw
        .get(
            &format!("/v1/workflows/{wf}/patches?after_version=2"),
            &read,
        )
        .await;
    assert_eq!(a.body["patches"].as_array().map(Vec::len), Some(3));
    let mut s = open(&gw, &events, &read, Some(0)).await.unwrap();
    let ev = s.expect().await;
    assert_eq!(
        (ev.event.as_str(), &ev.data["head_version"]),
        ("gap", &json!(5))
    );
    assert!(matches!(s.next(Duration::from_secs(10)).await, Ok(None)));
}

async fn a_head_sha(gw: &Gateway, ws: &str, wf: &str) -> String {
    sqlx::query_scalar(
        "SELECT definition_sha256 FROM weir_workflow_heads WHERE workspace_id = $1 AND workflow_id = $2",
    )
    .bind(ws)
    .bind(wf)
    .fetch_one(&gw.pool)
    .await
    .unwrap()
}
