//! The live run view in a real browser: Debian's headless Chromium, driven over WebDriver
//! (chromedriver, plain HTTP), opens the gateway's page for a run of a demo-shaped workflow
//! and follows it to completion while a worker completes the nodes through the gateway. The
//! test checks the page's final state (the run completed, every node succeeded, the stream
//! finished) and that the page showed a node running on the way, and saves a screenshot
//! (`$CARGO_TARGET_TMPDIR/run-view.png`; with `WEIR_SCREENSHOT_TO=<path>` also there, which is
//! how docs/img/run-view.png is made). Chromium and chromedriver come from
//! `infra/local/prereqs`.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;
use weir_it::gateway::{Gateway, Options, Setup};
use weir_it::{random_name, ChildGuard};
use weir_model::Permission;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A WebDriver session (W3C protocol over HTTP).
struct Browser {
    http: reqwest::Client,
    base: String,
    session: String,
    _driver: ChildGuard,
}

impl Browser {
    async fn start(profile: &std::path::Path) -> Browser {
        for bin in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                std::path::Path::new(bin).exists(),
                "{bin} missing: run infra/local/prereqs"
            );
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = ChildGuard(
            Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start chromedriver"),
        );
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = http
                .get(format!("{base}/status"))
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success());
            if ready.is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1100,470",
                         "--hide-scrollbars", format!("--user-data-dir={}", profile.display())]
            }
        }}});
        let v: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_string();
        Browser {
            http,
            base,
            session,
            _driver: driver,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut req = self.http.request(method, url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    async fn eval(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    async fn screenshot(&self) -> Vec<u8> {
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await;
        base64_decode(v.as_str().expect("a base64 screenshot"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The driver process is killed by its guard; the browser goes with its session.
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let _ = reqwest::Client::new().delete(url).send().await;
            });
        })
        .join();
    }
}

/// Standard base64 (the WebDriver screenshot encoding).
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let clean: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(clean.len() / 4 * 3);
    for chunk in clean.chunks(4) {
        let data: Vec<u8> = chunk.iter().copied().filter(|&c| c != b'=').collect();
        let mut n = 0u32;
        for (i, c) in data.iter().enumerate() {
            n |= val(*c) << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..data.len()]);
    }
    out
}

/// The page's state, read in the page.
const READ_PAGE: &str = r#"
  const s = document.getElementById('run-status');
  return {
    run: s.getAttribute('data-status'),
    connection: document.getElementById('connection').textContent,
    error: document.getElementById('error').textContent,
    nodes: Array.from(document.querySelectorAll('g.node')).map(g => ({
      id: g.getAttribute('data-node'), status: g.getAttribute('data-status'),
      attempt: g.getAttribute('data-attempt'), text: g.textContent })),
    edges: document.querySelectorAll('path.edge').length,
  };
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_run_view_follows_a_demo_run_to_completion() {
    let setup = Setup::new("runview", |c| c.gateway.stream_heartbeat_ms = 1000).await;
    let relay = weir_relay::Relay::new(
        setup.cfg.clone(),
        weir_runtime::db::pool(&setup.cfg.postgres).unwrap(),
        weir_relay::producer(&setup.cfg.kafka).unwrap(),
        weir_runtime::telemetry::Health::default(),
        random_name("relay"),
    );
    tokio::spawn(relay.run(setup.shutdown.clone()));
    let run_status = weir_wiring::CoordinatorRunStatus::new(setup.pool.clone());
    let gw: Gateway = setup
        .serve(Options {
            sources: weir_gateway::Sources {
                run_status: Some(Arc::new(run_status)),
                cache_lookup: None,
            },
            materializer: true,
            coordinator: true,
            ..Options::default()
        })
        .await;
    let ws = random_name("ws");
    let write = gw.key(&ws, Permission::Write).await;
    let read = gw.key(&ws, Permission::Read).await;
    // The demo's shape: fetch, then summarize and classify side by side, then a report.
    let wf = format!("demo-{}", Uuid::now_v7().simple());
    let def = json!({"nodes": {
        "fetch": {"type": "http_request", "config": {"url": "https://example.com"}},
        "summarize": {"type": "agent", "config": {"model": "small"}},
        "classify": {"type": "function", "config": {}},
        "report": {"type": "pure", "config": {}}},
      "edges": [{"from": "fetch", "to": "summarize"}, {"from": "fetch", "to": "classify"},
                {"from": "summarize", "to": "report"}, {"from": "classify", "to": "report"}]});
    let a = gw
        .call(
            reqwest::Method::PUT,
            &format!("/v1/workflows/{wf}"),
            Some(&write),
            &[],
            Some(def.to_string()),
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    gw.wait_for(&format!("/v1/workflows/{wf}"), &read, |a| {
        a.status == StatusCode::OK
    })
    .await;
    let a = gw
        .post("/v1/runs", &write, json!({"workflow_id": wf, "inputs": {}}))
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    let run = a.body["run_id"].as_str().unwrap().to_string();
    gw.wait_for(&format!("/v1/runs/{run}"), &read, |a| {
        a.status == StatusCode::OK
    })
    .await;

    let profile = tempfile::tempdir().unwrap();
    let browser = Browser::start(profile.path()).await;
    // The key travels in the fragment, which the browser never sends to the server.
    browser
        .goto(&format!("{}/ui/run#run={run}&key={read}", gw.base))
        .await;

    // A worker: completes each running node a moment after the page could see it run.
    let worker = {
        let (http, base, write, run) =
            (gw.http.clone(), gw.base.clone(), write.clone(), run.clone());
        tokio::spawn(async move {
            loop {
                let st: Value = http
                    .get(format!("{base}/v1/runs/{run}"))
                    .bearer_auth(&write)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if st["status"] != "running" {
                    return;
                }
                for n in st["nodes"].as_array().into_iter().flatten() {
                    if n["status"] == "running" {
                        tokio::time::sleep(Duration::from_millis(700)).await;
                        let node = n["node_id"].as_str().unwrap();
                        let body = json!({"attempt": n["attempt"], "status": "succeeded",
                                          "output": {"node": node}, "duration_ms": 700});
                        http.post(format!("{base}/v1/runs/{run}/nodes/{node}/completions"))
                            .bearer_auth(&write)
                            .json(&body)
                            .send()
                            .await
                            .unwrap();
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    let deadline = Instant::now() + Duration::from_secs(90);
    let mut saw_running = false;
    let page = loop {
        let page = browser.eval(READ_PAGE).await;
        saw_running |= page["nodes"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n["status"] == "running"));
        if page["run"] == "completed" && page["connection"] == "finished" {
            break page;
        }
        assert!(
            Instant::now() < deadline,
            "the page did not follow the run: {page}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    };
    worker.await.unwrap();
    assert!(saw_running, "the page never showed a node running: {page}");
    // The gateway now remembers the run as its workspace's (the worker's completions): another
    // workspace's key is still told there is no such run, and so is an unknown run id.
    let late = json!({"attempt": 1, "status": "succeeded", "output": {}, "duration_ms": 1});
    let other = gw.key(&random_name("ws"), Permission::Write).await;
    let path = format!("/v1/runs/{run}/nodes/report/completions");
    let a = gw.post(&path, &other, late.clone()).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.body);
    let unknown = format!("/v1/runs/{}/nodes/report/completions", Uuid::now_v7());
    let a = gw.post(&unknown, &write, late.clone()).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.body);
    // The owner's late duplicate is accepted (the coordinator ignores it).
    let a = gw.post(&path, &write, late).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    let nodes = page["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 4, "{page}");
    assert_eq!(page["edges"], 4, "{page}");
    for n in nodes {
        assert_eq!(n["status"], "succeeded", "{page}");
        assert_eq!(n["attempt"], "1", "{page}");
        assert!(n["text"].as_str().unwrap().contains("took"), "{page}");
    }
    assert_eq!(page["error"], "", "{page}");

    let png = browser.screenshot().await;
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG screenshot");
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("run-view.png");
    std::fs::write(&out, &png).unwrap();
    if let Ok(to) = std::env::var("WEIR_SCREENSHOT_TO") {
        std::fs::write(to, &png).unwrap();
    }
    eprintln!("screenshot: {}", out.display());
}
