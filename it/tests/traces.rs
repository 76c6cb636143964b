//! Traces end to end on the real stack, exported to a real OTLP endpoint (Jaeger v2, built
//! by `infra/local/prereqs` into the weir cache, started here on free ports):
//! the gateway, materializer, coordinator and relay run as four `weir run` processes with
//! `OTEL_EXPORTER_OTLP_ENDPOINT` set (the gateway over gRPC, the others over HTTP), and
//! Jaeger's query API must show ONE trace for
//! - a patch POST carrying our `traceparent` → the materializer's batch → the relay's publish
//!   of the WorkflowMaterialized it caused, and
//! - a completion POST → the coordinator's batch → the relay's publish of the next NodeReady;
//!
//! each a chain of parent → child spans in the trace id we sent. The records in Kafka carry
//! the same trace id in their `traceparent` header and in the event's field.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::message::{Headers as _, Message as _};
use serde_json::{json, Value};
use uuid::Uuid;
use weir_gateway::create_key;
use weir_it::{config, prepare, random_name, reader, spawn_weir_run, ChildGuard};
use weir_model::Permission;
use weir_runtime::codec::Codec;
use weir_runtime::events::{NodeReady, TopicEvent, WorkflowEvent};

/// A port free right now on the loopback.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Jaeger v2 with in-memory storage on free loopback ports; killed on drop.
struct Jaeger {
    child: Child,
    /// OTLP/gRPC receiver, `http://127.0.0.1:<port>`.
    otlp_grpc: String,
    /// OTLP/HTTP receiver, `http://127.0.0.1:<port>`.
    otlp_http: String,
    /// Query API, `http://127.0.0.1:<port>`.
    query: String,
    _dir: tempfile::TempDir,
}

impl Drop for Jaeger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const JAEGER_CONFIG: &str = r#"
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    traces:
      level: none
    logs:
      level: warn
extensions:
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: "127.0.0.1:${env:WEIR_JAEGER_QUERY_PORT}"
    grpc:
      endpoint: "127.0.0.1:${env:WEIR_JAEGER_QUERY_GRPC_PORT}"
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 10000
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: "127.0.0.1:${env:WEIR_JAEGER_OTLP_GRPC_PORT}"
      http:
        endpoint: "127.0.0.1:${env:WEIR_JAEGER_OTLP_HTTP_PORT}"
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"#;

impl Jaeger {
    fn binary() -> PathBuf {
        let cache = std::env::var_os("WEIR_CACHE_DIR").map_or_else(
            || PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/weir"),
            PathBuf::from,
        );
        let bin = cache.join("tools/jaeger-1.75.0");
        assert!(
            bin.exists(),
            "{} missing: run infra/local/prereqs (it builds Jaeger once)",
            bin.display()
        );
        bin
    }

    async fn start() -> Jaeger {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("jaeger.yaml");
        std::fs::write(&config, JAEGER_CONFIG).unwrap();
        let (query, query_grpc, grpc, http) = (free_port(), free_port(), free_port(), free_port());
        let child = Command::new(Self::binary())
            .arg("--config")
            .arg(format!("file:{}", config.display()))
            .env("WEIR_JAEGER_QUERY_PORT", query.to_string())
            .env("WEIR_JAEGER_QUERY_GRPC_PORT", query_grpc.to_string())
            .env("WEIR_JAEGER_OTLP_GRPC_PORT", grpc.to_string())
            .env("WEIR_JAEGER_OTLP_HTTP_PORT", http.to_string())
            .stdout(Stdio::null())
            .spawn()
            .expect("start jaeger");
        let j = Jaeger {
            child,
            otlp_grpc: format!("http://127.0.0.1:{grpc}"),
            otlp_http: format!("http://127.0.0.1:{http}"),
            query: format!("http://127.0.0.1:{query}"),
            _dir: dir,
        };
        let http_client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = http_client
                .get(format!("{}/api/services", j.query))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            // The OTLP receivers start with the query service; check one to be sure.
            if up && std::net::TcpStream::connect(("127.0.0.1", grpc)).is_ok() {
                return j;
            }
            assert!(Instant::now() < deadline, "jaeger did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The trace `trace_id` once `done` holds for it (60 s at most): its spans by id, and
    /// each span's service.
    async fn trace_until(&self, trace_id: &str, done: impl Fn(&Trace) -> bool) -> Trace {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = Value::Null;
        loop {
            if let Ok(r) = http
                .get(format!("{}/api/traces/{trace_id}", self.query))
                .send()
                .await
            {
                if r.status().is_success() {
                    last = r.json().await.unwrap_or(Value::Null);
                    let t = Trace::from_jaeger(&last);
                    if done(&t) {
                        return t;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "trace {trace_id} never completed; last answer: {last}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// One span as Jaeger's query API shows it.
#[derive(Debug, Clone)]
struct Span {
    id: String,
    name: String,
    service: String,
    /// The CHILD_OF reference, if any.
    parent: Option<String>,
    links: Vec<String>,
    tags: HashMap<String, Value>,
}

#[derive(Debug, Default)]
struct Trace {
    spans: Vec<Span>,
}

impl Trace {
    fn from_jaeger(v: &Value) -> Trace {
        let Some(t) = v["data"].as_array().and_then(|d| d.first()) else {
            return Trace::default();
        };
        let services: HashMap<&str, &str> = t["processes"]
            .as_object()
            .map(|p| {
                p.iter()
                    .map(|(k, v)| (k.as_str(), v["serviceName"].as_str().unwrap_or("")))
                    .collect()
            })
            .unwrap_or_default();
        let spans = t["spans"]
            .as_array()
            .map(|spans| {
                spans
                    .iter()
                    .map(|s| {
                        let refs = s["references"].as_array().cloned().unwrap_or_default();
                        let of = |kind: &str| {
                            refs.iter()
                                .filter(|r| r["refType"] == kind)
                                .filter_map(|r| r["spanID"].as_str().map(str::to_string))
                                .collect::<Vec<_>>()
                        };
                        Span {
                            id: s["spanID"].as_str().unwrap_or("").to_string(),
                            name: s["operationName"].as_str().unwrap_or("").to_string(),
                            service: services
                                .get(s["processID"].as_str().unwrap_or(""))
                                .copied()
                                .unwrap_or("")
                                .to_string(),
                            parent: of("CHILD_OF").into_iter().next(),
                            links: of("FOLLOWS_FROM"),
                            tags: s["tags"]
                                .as_array()
                                .map(|tags| {
                                    tags.iter()
                                        .filter_map(|t| {
                                            Some((
                                                t["key"].as_str()?.to_string(),
                                                t["value"].clone(),
                                            ))
                                        })
                                        .collect()
                                })
                                .unwrap_or_default(),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        Trace { spans }
    }

    fn find(&self, pred: impl Fn(&Span) -> bool) -> Option<&Span> {
        self.spans.iter().find(|s| pred(s))
    }

    /// The chain HTTP request span (child of `caller_span`) → batch span of `service` →
    /// the relay's publish span to `topic`, if the trace holds it.
    fn chain(
        &self,
        caller_span: &str,
        route: &str,
        service: &str,
        topic: &str,
    ) -> Option<(Span, Span, Span)> {
        let http = self.find(|s| {
            s.service == "weir-gateway"
                && s.name == route
                && s.parent.as_deref() == Some(caller_span)
        })?;
        let batch = self.find(|s| {
            s.service == service && s.name == "batch" && s.parent.as_deref() == Some(&http.id)
        })?;
        let publish = self.find(|s| {
            s.service == "weir-relay"
                && s.name == format!("publish {topic}")
                && s.parent.as_deref() == Some(&batch.id)
        })?;
        Some((http.clone(), batch.clone(), publish.clone()))
    }
}

/// A `traceparent` of ours: a fresh trace id and caller span id.
fn our_traceparent() -> (String, String, String) {
    let trace = hex(&rand::random::<[u8; 16]>());
    let span = hex(&rand::random::<[u8; 8]>());
    (format!("00-{trace}-{span}-01"), trace, span)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The trace id inside a `traceparent`.
fn trace_id_of(traceparent: &str) -> &str {
    traceparent.get(3..35).unwrap_or("")
}

/// Reads `topic` from the start until `pick` accepts a record (60 s at most); returns what
/// it picked and the record's `traceparent` header.
async fn record_where<E: TopicEvent, T>(
    cfg: &weir_runtime::Config,
    codec: &Codec,
    pick: impl Fn(&E) -> Option<T>,
) -> (T, Option<String>) {
    let topic = codec.topic::<E>();
    let consumer = reader(cfg, &[&topic]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no matching record on {topic}");
        let Ok(Ok(m)) = tokio::time::timeout(left, consumer.recv()).await else {
            continue;
        };
        let e: E = codec.decode(m.payload().unwrap()).await.unwrap();
        if let Some(t) = pick(&e) {
            let header = m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == "traceparent")
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            });
            return (t, header);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_the_http_call_through_kafka_to_every_event_it_caused() {
    let jaeger = Jaeger::start().await;
    let prefix = format!("{}.", random_name("traces"));
    let cfg = config(&prefix);
    let codec = prepare(&cfg).await.expect("prepare the stack");
    let pool = weir_runtime::db::pool(&cfg.postgres).unwrap();

    let gateway_port = free_port();
    let listen = format!("127.0.0.1:{gateway_port}");
    let spawn = |what: &str, service: &str, endpoint: &str, protocol: &str| -> ChildGuard {
        spawn_weir_run(
            &prefix,
            what,
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
                ("OTEL_SERVICE_NAME", service),
                // Export quickly: the test waits for the spans.
                ("OTEL_BSP_SCHEDULE_DELAY", "100"),
                ("WEIR__GATEWAY__LISTEN", &listen),
                ("WEIR__COORDINATOR__TIMER_POLL_MS", "100"),
            ],
        )
    };
    let _processes = [
        spawn("gateway", "weir-gateway", &jaeger.otlp_grpc, "grpc"),
        spawn(
            "materializer",
            "weir-materializer",
            &jaeger.otlp_http,
            "http/protobuf",
        ),
        spawn(
            "coordinator",
            "weir-coordinator",
            &jaeger.otlp_http,
            "http/protobuf",
        ),
        spawn("relay", "weir-relay", &jaeger.otlp_http, "http/protobuf"),
    ];

    let ws = random_name("ws");
    let key = create_key(&pool, &ws, Permission::Write).await.unwrap().key;
    let http = reqwest::Client::new();
    let base = format!("http://{listen}");
    let deadline = Instant::now() + Duration::from_secs(90);
    while !http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < deadline, "the gateway never became ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let send = |method: reqwest::Method, path: String, body: Value, tp: Option<String>| {
        let mut req = http
            .request(method, format!("{base}{path}"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(tp) = tp {
            req = req
                .header("traceparent", tp)
                .header("tracestate", "weirtest=1");
        }
        async move {
            let r = req.send().await.unwrap();
            let status = r.status();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{path}: {body}");
            body
        }
    };

    // A workflow (no traceparent: the gateway starts a trace), materialized as version 1.
    let wf = format!("wf-{}", Uuid::now_v7().simple());
    let definition = json!({"nodes": {"fetch": {"type": "http_request", "config": {}},
                                      "sum": {"type": "agent", "config": {}}},
                            "edges": [{"from": "fetch", "to": "sum"}]});
    send(
        reqwest::Method::PUT,
        format!("/v1/workflows/{wf}"),
        definition,
        None,
    )
    .await;
    let wf_of = |v: i64| {
        let wf = wf.clone();
        move |e: &WorkflowEvent| match e {
            WorkflowEvent::WorkflowMaterialized(m) if m.workflow_id == wf && m.version == v => {
                Some(m.traceparent.clone())
            }
            _ => None,
        }
    };
    let (field, header) = record_where(&cfg, &codec, wf_of(1)).await;
    assert!(
        weir_runtime::trace::TraceParent::parse(&field).is_some(),
        "a trace the gateway started: {field:?}"
    );
    assert_eq!(header.as_deref(), Some(field.as_str()), "header = field");

    // 1. The patch POST with our traceparent → materializer batch → relay publish.
    let (tp1, trace1, caller1) = our_traceparent();
    send(
        reqwest::Method::POST,
        format!("/v1/workflows/{wf}/patches"),
        json!([{"op": "add", "path": "/settings", "value": {"max_hops": 10}}]),
        Some(tp1.clone()),
    )
    .await;
    let (field, header) = record_where(&cfg, &codec, wf_of(2)).await;
    assert_eq!(trace_id_of(&field), trace1, "the event's field: {field}");
    let header = header.expect("a traceparent header on the published record");
    assert_eq!(trace_id_of(&header), trace1, "the Kafka header: {header}");
    assert_eq!(header, field, "header and field carry one context");
    assert_ne!(field, tp1, "re-parented under weir's own spans");

    let workflows = codec.topic::<WorkflowEvent>();
    let route = "POST /v1/workflows/{workflow_id}/patches";
    let t = jaeger
        .trace_until(&trace1, |t| {
            t.chain(&caller1, route, "weir-materializer", &workflows)
                .is_some()
        })
        .await;
    let (http_span, batch, publish) = t
        .chain(&caller1, route, "weir-materializer", &workflows)
        .unwrap();
    assert_eq!(
        field.get(36..52),
        Some(batch.id.as_str()),
        "the event's parent is the materializer's batch span"
    );
    assert_eq!(http_span.tags["http.response.status_code"], json!(202));
    assert_eq!(batch.tags["messaging.system"], json!("kafka"));
    assert_eq!(
        batch.tags["messaging.destination.name"],
        json!(codec.topic::<weir_runtime::events::PatchSubmitted>())
    );
    for tag in [
        "messaging.destination.partition.id",
        "messaging.kafka.offset",
        "messaging.consumer.group.name",
    ] {
        assert!(batch.tags.contains_key(tag), "{tag}: {:?}", batch.tags);
    }
    assert!(
        batch.links.is_empty(),
        "its one record is its parent, not linked again: {batch:?}"
    );
    assert_eq!(publish.tags["messaging.system"], json!("kafka"));

    // 2. A run; then a completion POST → coordinator batch → relay publish of the next
    //    NodeReady.
    let run = send(
        reqwest::Method::POST,
        "/v1/runs".into(),
        json!({"workflow_id": wf, "inputs": {}}),
        None,
    )
    .await;
    let run_id = run["run_id"].as_str().unwrap().to_string();
    let ready_of = |node: &'static str| {
        let run_id = run_id.clone();
        move |e: &NodeReady| {
            (e.run_id == run_id && e.node_id == node).then(|| e.traceparent.clone())
        }
    };
    record_where(&cfg, &codec, ready_of("fetch")).await;
    let (tp2, trace2, caller2) = our_traceparent();
    send(
        reqwest::Method::POST,
        format!("/v1/runs/{run_id}/nodes/fetch/completions"),
        json!({"attempt": 1, "status": "succeeded", "output": {"pages": 3}, "duration_ms": 5}),
        Some(tp2),
    )
    .await;
    let (field, header) = record_where(&cfg, &codec, ready_of("sum")).await;
    assert_eq!(trace_id_of(&field), trace2, "NodeReady's field: {field}");
    let header = header.expect("a traceparent header on NodeReady");
    assert_eq!(header, field, "header and field carry one context");

    let ready = codec.topic::<NodeReady>();
    let route = "POST /v1/runs/{run_id}/nodes/{node_id}/completions";
    let t = jaeger
        .trace_until(&trace2, |t| {
            t.chain(&caller2, route, "weir-coordinator", &ready)
                .is_some()
        })
        .await;
    let (_, batch, _) = t
        .chain(&caller2, route, "weir-coordinator", &ready)
        .unwrap();
    assert_eq!(field.get(36..52), Some(batch.id.as_str()));
    assert_eq!(
        batch.tags["messaging.destination.name"],
        json!(codec.topic::<weir_runtime::events::CompletionEvent>())
    );
    // Nothing of the other trace leaked into this one.
    assert!(t.spans.iter().all(|s| s.service.starts_with("weir-")));
    assert!(
        t.find(|s| s.service == "weir-materializer").is_none(),
        "{:?}",
        t.spans
    );
}
