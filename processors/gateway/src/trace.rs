//! The trace context of a request: the caller's W3C `traceparent`/`tracestate` headers, or a
//! new trace when there is none, handed to the handlers as [`RequestTrace`] and written into
//! every event the request produces (fields and Kafka headers).
//!
//! Invariants:
//! - A malformed `traceparent` (or two of them) is ignored and a new trace starts; a
//!   malformed or oversized `tracestate` is dropped. Neither ever fails a request.
//! - With span export on, the request runs in a server span, a child of the caller's context,
//!   and the events carry that span as their parent; with it off, no span is built and the
//!   events carry the caller's context (or a new root with the sampled flag set, so a
//!   processor that exports records the trace).

use std::convert::Infallible;

use axum::extract::{FromRequestParts, MatchedPath, Request};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;
use weir_runtime::events::Envelope;
use weir_runtime::trace::{self, TraceParent, MAX_TRACESTATE_BYTES};

/// The context the events of one request carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestTrace {
    /// W3C traceparent, always valid.
    pub traceparent: String,
    /// W3C tracestate, validated and bounded.
    pub tracestate: Option<String>,
}

/// The caller's context, as parsed from the headers (before a span exists).
#[derive(Debug, Clone)]
struct Incoming(Option<(TraceParent, Option<String>)>);

/// The caller's context in `headers`: exactly one valid `traceparent`, and the `tracestate`
/// headers joined (W3C allows splitting it) if valid within the bound.
fn incoming(headers: &HeaderMap) -> Option<(TraceParent, Option<String>)> {
    let mut tps = headers.get_all(trace::TRACEPARENT).iter();
    let tp = tps.next()?;
    if tps.next().is_some() {
        return None;
    }
    let tp = TraceParent::parse(tp.to_str().ok()?.trim_matches([' ', '\t']))?;
    let mut state = String::new();
    for v in headers.get_all(trace::TRACESTATE) {
        let Ok(v) = v.to_str() else {
            return Some((tp, None));
        };
        if state.len() + v.len() + 1 > MAX_TRACESTATE_BYTES {
            return Some((tp, None));
        }
        if !state.is_empty() {
            state.push(',');
        }
        state.push_str(v);
    }
    let state = trace::valid_tracestate(&state).map(str::to_string);
    Some((tp, state))
}

impl RequestTrace {
    /// The envelope of an event this request produces in `workspace_id`: a new event id, now,
    /// and this trace context ([`Envelope::at_ingress`]).
    pub fn envelope(&self, workspace_id: &str) -> Envelope {
        Envelope::at_ingress(workspace_id, &self.traceparent, self.tracestate.as_deref())
    }

    fn from_incoming(incoming: Option<(TraceParent, Option<String>)>) -> Self {
        match incoming {
            Some((tp, tracestate)) => Self {
                traceparent: tp.to_string(),
                tracestate,
            },
            None => Self {
                traceparent: TraceParent::new_root(true).to_string(),
                tracestate: None,
            },
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RequestTrace {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        if let Some(t) = parts.extensions.get::<RequestTrace>() {
            return Ok(t.clone());
        }
        let incoming = match parts.extensions.get::<Incoming>() {
            Some(i) => i.0.clone(),
            None => incoming(&parts.headers),
        };
        Ok(Self::from_incoming(incoming))
    }
}

/// Middleware: reads the caller's context; with export on, runs the request in a server span
/// (child of that context) whose context the events carry.
pub async fn trace_request(matched: Option<MatchedPath>, mut req: Request, next: Next) -> Response {
    let caller = incoming(req.headers());
    if !trace::enabled() {
        // Without a caller's context the handler starts a trace only if it produces an event.
        if caller.is_some() {
            req.extensions_mut().insert(Incoming(caller));
        }
        return next.run(req).await;
    }
    let route = matched.as_ref().map_or("unmatched", |m| m.as_str());
    let method = req.method().clone();
    let span = tracing::info_span!("http.request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = route,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty);
    let state = caller.as_ref().and_then(|(_, s)| s.clone());
    trace::start_child_span(
        &span,
        caller.as_ref().map(|(tp, s)| tp.span_context(s.as_deref())),
    );
    let own = match trace::traceparent_of(&span) {
        Some(tp) => RequestTrace {
            traceparent: tp.to_string(),
            tracestate: state,
        },
        None => RequestTrace::from_incoming(caller),
    };
    req.extensions_mut().insert(own);
    let res = next.run(req).instrument(span.clone()).await;
    span.record(
        "http.response.status_code",
        i64::from(res.status().as_u16()),
    );
    if res.status().is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_callers_context_is_kept() {
        let (tp, ts) = incoming(&headers(&[
            ("traceparent", GOOD),
            ("tracestate", "a=1"),
            ("tracestate", "b=2"),
        ]))
        .unwrap();
        assert_eq!(tp.to_string(), GOOD);
        assert_eq!(ts.as_deref(), Some("a=1,b=2"));
        let t = RequestTrace::from_incoming(Some((tp, ts)));
        assert_eq!(t.traceparent, GOOD);
    }

    #[test]
    fn malformed_headers_start_a_new_trace() {
        for h in [
            headers(&[]),
            headers(&[("traceparent", "garbage")]),
            headers(&[("traceparent", GOOD), ("traceparent", GOOD)]),
            headers(&[(
                "traceparent",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            )]),
            headers(&[("tracestate", "a=1")]),
        ] {
            let i = incoming(&h);
            assert!(i.is_none(), "{h:?}");
            let t = RequestTrace::from_incoming(i);
            let tp = TraceParent::parse(&t.traceparent).expect("a valid new context");
            assert!(tp.sampled());
            assert_ne!(t.traceparent, GOOD);
            assert_eq!(t.tracestate, None);
        }
        // Two new traces differ.
        assert_ne!(
            RequestTrace::from_incoming(None).traceparent,
            RequestTrace::from_incoming(None).traceparent
        );
    }

    #[test]
    fn a_bad_or_oversized_tracestate_is_dropped() {
        let big = format!("k={}", "v".repeat(600));
        for ts in ["Bad=1", "k", big.as_str()] {
            let (tp, state) = incoming(&headers(&[("traceparent", GOOD), ("tracestate", ts)]))
                .expect("the traceparent stays");
            assert_eq!(tp.to_string(), GOOD);
            assert_eq!(state, None, "{ts}");
        }
        let mut h = headers(&[("traceparent", GOOD)]);
        h.append("tracestate", HeaderValue::from_bytes(b"k=\xff").unwrap());
        assert_eq!(incoming(&h).unwrap().1, None);
    }
}
