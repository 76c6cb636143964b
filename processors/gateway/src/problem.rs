//! RFC 9457 problem details: every error the gateway answers is one of these, with
//! `Content-Type: application/problem+json`. Internal causes (database, broker, CAS) are
//! logged, never put in the body.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// One problem answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    /// A URI naming the kind of problem (`urn:weir:problem:<kind>`).
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary of the kind.
    pub title: &'static str,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
    /// Machine-readable reason, e.g. the materializer's `invalid_definition`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    /// Seconds to wait before retrying (also sent as `Retry-After`).
    #[serde(skip)]
    pub retry_after: Option<u32>,
}

impl Problem {
    /// A problem of `status` and `kind`.
    pub fn new(
        status: StatusCode,
        kind: &str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            kind: format!("urn:weir:problem:{kind}"),
            title,
            status: status.as_u16(),
            detail: detail.into(),
            code: None,
            retry_after: None,
        }
    }
    /// With a machine-readable code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    /// 400: the body is not JSON, or a header or parameter is malformed.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "Bad request",
            detail,
        )
    }
    /// 401: no key, or not a valid one.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Missing or invalid API key",
            detail,
        )
    }
    /// 403: the key's permission is too low.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "Permission too low",
            detail,
        )
    }
    /// 404: no such resource in the caller's workspace.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }
    /// 412: If-Match does not match the current version.
    pub fn precondition_failed(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PRECONDITION_FAILED,
            "precondition-failed",
            "Version mismatch",
            detail,
        )
    }
    /// 413: the body is over `gateway.max_body_bytes`.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "Body too large",
            format!("the request body is larger than the limit of {limit} bytes"),
        )
    }
    /// 413: the event this request makes is larger than Kafka takes (the producer's or the
    /// broker's `message.max.bytes`).
    pub fn event_too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "Event too large",
            "the event this request makes is larger than Kafka accepts; send large values \
             by reference (a CAS ref) or split them",
        )
        .with_code("event_too_large")
    }
    /// 408: the body did not arrive within `gateway.body_read_timeout_ms`.
    pub fn request_timeout(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "request-timeout",
            "Request body too slow",
            detail,
        )
    }
    /// 422: valid JSON that is not an acceptable request.
    pub fn unprocessable(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-request",
            "Invalid request",
            detail,
        )
    }
    /// 429: the workspace's rate limit.
    pub fn rate_limited(retry_after: u32) -> Self {
        let mut p = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Rate limit exceeded",
            "the workspace is over its request rate; retry later",
        );
        p.retry_after = Some(retry_after);
        p
    }
    /// 429: the client address is over its request rate, or sent too many unknown keys;
    /// refused before the key was looked up.
    pub fn client_limited(detail: impl Into<String>, retry_after: u32) -> Self {
        let mut p = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Rate limit exceeded",
            detail,
        );
        p.retry_after = Some(retry_after);
        p
    }
    /// 503: a dependency (Kafka, Postgres, the CAS) is unavailable or saturated; nothing was
    /// accepted.
    pub fn unavailable(detail: impl Into<String>, retry_after: u32) -> Self {
        let mut p = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
            detail,
        );
        p.retry_after = Some(retry_after);
        p
    }
    /// 500: data weir stored is missing or damaged (a blob a head points to); logged with
    /// its cause. Never a client mistake, and retrying will not help.
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            detail,
        )
    }
    /// The HTTP status.
    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut res = (status, body).into_response();
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}
