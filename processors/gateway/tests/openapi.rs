//! docs/openapi.json and the router agree: the document is served byte for byte, every
//! documented operation is routed (a /v1 route answers 401 without a key, not 404/405), and
//! every method the document does not list for a path is 405. Needs no running stack: the
//! gateway's clients connect lazily.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;
use weir_runtime::codec::Codec;
use weir_runtime::config::{CasBackend, Config};

fn router() -> axum::Router {
    let mut cfg = Config::default();
    cfg.cas.backend = CasBackend::Local;
    cfg.cas.local_dir = std::env::temp_dir()
        .join("weir-gateway-openapi-test")
        .display()
        .to_string();
    let cfg = Arc::new(cfg);
    let pool = weir_runtime::db::pool(&cfg.postgres).expect("lazy pool");
    let codec = Arc::new(Codec::new(&cfg.schema_registry, &cfg.kafka).expect("codec"));
    let producer = weir_gateway::produce::producer(&cfg).expect("producer");
    let cas = weir_runtime::cas::Cas::local(&cfg.cas).expect("local cas");
    let sender = weir_gateway::produce::Sender::new(&cfg, producer, codec);
    let state =
        weir_gateway::AppState::new(cfg, pool, cas, sender, weir_gateway::Sources::default());
    weir_gateway::router(state)
}

fn concrete(path: &str) -> String {
    path.replace("{workflow_id}", "wf-1")
        .replace("{patch_id}", "01a21fd5-e0ca-757b-bd78-086e7f4bc824")
        .replace("{run_id}", "01a21fd5-e0ca-757b-bd78-086e7f4bc825")
        .replace("{node_id}", "fetch")
}

async fn call(router: &axum::Router, method: Method, path: &str) -> (StatusCode, Vec<u8>, String) {
    let res = router
        .clone()
        .oneshot(
            Request::builder()
                .method(method)
                .uri(path)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = res.status();
    let ct = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (
        status,
        res.into_body().collect().await.unwrap().to_bytes().to_vec(),
        ct,
    )
}

#[tokio::test]
async fn the_document_is_served_and_matches_the_routes() {
    let router = router();
    let on_disk = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/openapi.json"
    ))
    .unwrap();
    let (status, served, ct) = call(&router, Method::GET, "/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ct, "application/json");
    assert!(
        served == on_disk,
        "/openapi.json differs from docs/openapi.json: rebuild"
    );
    let doc: Value = serde_json::from_slice(&on_disk).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");

    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 12, "every route is documented");
    let all = [
        Method::GET,
        Method::PUT,
        Method::POST,
        Method::DELETE,
        Method::PATCH,
    ];
    let mut checked = 0;
    for (path, item) in paths {
        let url = concrete(path);
        for method in &all {
            let name = method.as_str().to_ascii_lowercase();
            let (status, body, ct) = call(&router, method.clone(), &url).await;
            match item.get(&name) {
                Some(op) => {
                    checked += 1;
                    let secured = op.get("security").is_none();
                    if secured {
                        assert_eq!(
                            status,
                            StatusCode::UNAUTHORIZED,
                            "{name} {path} without a key"
                        );
                        assert_eq!(ct, "application/problem+json");
                        let p: Value = serde_json::from_slice(&body).unwrap();
                        assert_eq!(p["status"], 401);
                        assert!(
                            op["responses"]["401"].is_object(),
                            "{name} {path} documents 401"
                        );
                        assert!(
                            op["responses"]["503"].is_object(),
                            "{name} {path} documents 503"
                        );
                        if name == "put" || name == "post" {
                            for code in ["408", "413", "429"] {
                                assert!(
                                    op["responses"][code].is_object(),
                                    "{name} {path} documents {code}"
                                );
                            }
                        }
                    } else {
                        assert!(
                            status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE,
                            "{name} {path}: {status}"
                        );
                        assert!(
                            op["responses"][status.as_str()].is_object(),
                            "{name} {path} documents {status}"
                        );
                    }
                }
                None => assert_eq!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{name} {path} is not in the document, so it must not be routed"
                ),
            }
        }
    }
    assert_eq!(checked, 18, "18 operations");
    // Metrics are on the telemetry listener only, never on the API port.
    assert!(paths.get("/metrics").is_none());
    let (status, _, _) = call(&router, Method::GET, "/metrics").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "/metrics is not served here");
    let (status, _, ct) = call(&router, Method::GET, "/v1/nothing").await;
    assert_eq!(
        (status, ct.as_str()),
        (StatusCode::NOT_FOUND, "application/problem+json")
    );
}
