//! The live run view: one static HTML page and its script (processors/gateway/static),
//! compiled into the binary, served without a key (they hold no data: the page asks for the
//! run's stream with the key the user enters).
//!
//! Invariant: the page talks to its own origin only (the Content-Security-Policy says so), and
//! the key never travels in a URL: the script sends it in the Authorization header.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

const RUN_HTML: &str = include_str!("../../static/run.html");
const RUN_JS: &str = include_str!("../../static/run.js");
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; \
                   connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

/// `GET /ui/run`.
pub(super) async fn run_page() -> Response {
    asset("text/html; charset=utf-8", RUN_HTML)
}

/// `GET /ui/run.js`.
pub(super) async fn run_script() -> Response {
    asset("text/javascript; charset=utf-8", RUN_JS)
}
