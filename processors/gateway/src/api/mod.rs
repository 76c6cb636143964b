//! The HTTP API: the router, the middleware every request passes, and the handlers, one
//! module per resource: [`workflows`], [`runs`], [`cache`]. What handlers take from a request
//! is checked once, in [`extract`]; the shared state and its helpers are in [`state`].
//!
//! Invariants:
//! - every request but the health, metrics and document routes carries a valid key
//!   (401 otherwise) whose permission covers the route (403); everything it names is looked
//!   up inside the key's workspace only, so another workspace's workflow or run is 404;
//! - workflow ids are unique per workspace: a workspace may create any id, whether or not
//!   another workspace has one of that name, and no answer depends on other workspaces;
//! - a CAS ref a caller gives (`output_ref`, `result_ref`) is accepted only if its workspace
//!   stored the blob (`weir_cas_owners`), with the same 422 whether or not the blob exists
//!   for another workspace; every blob the gateway puts is recorded as its workspace's first;
//! - a 202 is sent only after the broker acknowledged the request's single event;
//! - every error is an RFC 9457 problem; a client mistake is a 4xx, never a 5xx.

mod cache;
mod extract;
mod runs;
mod state;
mod streams;
mod view;
mod workflows;

#[cfg(test)]
mod tests;

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::limit::ClientId;
use crate::metrics;
use crate::problem::Problem;
use crate::server::PeerAddr;

pub use extract::derived_id;
pub use state::{AppState, Sources};

use cache::{cache_lookup, post_cache_entry};
use runs::{cancel_run, get_run, post_completion, post_run};
use workflows::{get_patch, get_workflow, post_patches, put_workflow};

/// The OpenAPI 3.1 document, served at /openapi.json; the file is docs/openapi.json.
pub const OPENAPI: &str = include_str!("../../../../docs/openapi.json");

/// Builds the router.
pub fn router(state: AppState) -> Router {
    let limit = state.0.cfg.gateway.max_body_bytes;
    Router::new()
        .route(
            "/v1/workflows/{workflow_id}",
            get(get_workflow).put(put_workflow),
        )
        .route(
            "/v1/workflows/{workflow_id}/patches",
            post(post_patches).get(streams::list_patches),
        )
        .route(
            "/v1/workflows/{workflow_id}/events",
            get(streams::workflow_events),
        )
        .route(
            "/v1/workflows/{workflow_id}/patches/{patch_id}",
            get(get_patch),
        )
        .route("/v1/runs", post(post_run))
        .route("/v1/runs/{run_id}", get(get_run))
        .route("/v1/runs/{run_id}/cancel", post(cancel_run))
        .route("/v1/runs/{run_id}/events", get(streams::run_events))
        .route(
            "/v1/runs/{run_id}/nodes/{node_id}/completions",
            post(post_completion),
        )
        .route("/v1/cache/entries", post(post_cache_entry))
        .route("/v1/cache/lookup", post(cache_lookup))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
        .route("/ui/run", get(view::run_page))
        .route("/ui/run.js", get(view::run_script))
        .fallback(|| async { Problem::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "this route does not accept that method",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            client_gate,
        ))
        .layer(axum::middleware::from_fn(crate::trace::trace_request))
        .layer(axum::middleware::from_fn(track))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Who sent a request, for the per-client limits: the TCP peer, or with
/// `gateway.client_ip_from_forwarded_for` the last `X-Forwarded-For` entry (the one the load
/// balancer appended; entries before it are whatever the client claimed).
fn client_of(req: &Request, forwarded_for: bool) -> Option<ClientId> {
    if forwarded_for {
        let last = req
            .headers()
            .get_all("x-forwarded-for")
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|ip| ip.trim().parse::<std::net::IpAddr>().ok());
        if let Some(ip) = last {
            return Some(ClientId::new(ip));
        }
    }
    req.extensions()
        .get::<PeerAddr>()
        .map(|p| ClientId::new(p.0.ip()))
}

/// The per-client request limit, before authentication (and before the body is read): a
/// client over it costs one map lookup. Requests that did not come through
/// [`crate::server`] (in-process tests) have no client and are not limited here.
async fn client_gate(State(s): State<AppState>, mut req: Request, next: Next) -> Response {
    if let Some(client) = client_of(&req, s.0.cfg.gateway.client_ip_from_forwarded_for) {
        if !s.0.clients.allow(&client, Instant::now()) {
            ::metrics::counter!(metrics::CLIENT_LIMITED, "reason" => "requests").increment(1);
            return Problem::client_limited(
                "this address is over its request rate; retry later",
                s.retry_after(),
            )
            .into_response();
        }
        req.extensions_mut().insert(client);
    }
    next.run(req).await
}

/// Counts and times every request by route.
async fn track(matched: Option<MatchedPath>, req: Request, next: Next) -> Response {
    let route = matched.map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let start = Instant::now();
    let res = next.run(req).await;
    ::metrics::histogram!(metrics::REQUEST_SECONDS, "route" => route.clone())
        .record(start.elapsed().as_secs_f64());
    ::metrics::counter!(metrics::REQUESTS, "route" => route, "status" => res.status().as_u16().to_string())
        .increment(1);
    res
}

async fn readyz(State(s): State<AppState>) -> Response {
    if s.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        OPENAPI,
    )
        .into_response()
}
