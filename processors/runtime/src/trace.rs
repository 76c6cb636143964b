//! Trace context across HTTP and Kafka: W3C `traceparent`/`tracestate`, and the OpenTelemetry
//! export of weir's spans (OTLP over gRPC or HTTP).
//!
//! How a request is followed (docs/observability.md, "Following one request"):
//! - the gateway takes the caller's `traceparent`/`tracestate` headers (or starts a trace) and
//!   writes the context into every event it produces, in the event's fields and as Kafka
//!   headers;
//! - a consumer's batch span is a child of the first sampled record context it holds and links
//!   to the contexts of all of them (at most [`MAX_LINKS`]);
//! - an output event carries the context of the record that caused it; when that record is
//!   in the batch span's own trace, the batch span becomes the parent
//!   ([`continue_in_current_span`]), so the chain HTTP call → batch → publish stays one trace;
//! - the outbox keeps the context in the row's headers, and the relay publishes it as the
//!   `traceparent`/`tracestate` Kafka headers, under a publish span that is a child of it.
//!
//! Invariants:
//! - Export is off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set and
//!   neither `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none` says otherwise. Off, no
//!   OpenTelemetry layer is installed and every helper here returns at one relaxed atomic
//!   load ([`enabled`]): no span is built and no context is formatted beyond the event fields.
//! - Hostile input never fails a request or a batch: a malformed `traceparent` is ignored
//!   (a new trace starts), a malformed or oversized `tracestate` is dropped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Most span links a batch span carries (one per record context, in offset order).
pub const MAX_LINKS: usize = 64;

/// Longest `tracestate` kept, in bytes (W3C: at least 512 must be propagated).
pub const MAX_TRACESTATE_BYTES: usize = 512;

/// Most list members a `tracestate` may have (W3C).
pub const MAX_TRACESTATE_MEMBERS: usize = 32;

/// Kafka header (and outbox header) names of the context.
pub const TRACEPARENT: &str = "traceparent";
/// See [`TRACEPARENT`].
pub const TRACESTATE: &str = "tracestate";

static ENABLED: AtomicBool = AtomicBool::new(false);
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();
static TRACER: OnceLock<SdkTracer> = OnceLock::new();
/// The runtime a gRPC exporter's channel lives on: it must outlive every other runtime of the
/// process, since the export runs on the SDK's own thread.
static GRPC_RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

/// Whether spans are exported. One relaxed load: the hot path's only cost when off.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// A parsed W3C `traceparent` (version 00 semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// 16 bytes, never all zero.
    pub trace_id: [u8; 16],
    /// The parent span, 8 bytes, never all zero.
    pub parent_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

fn hex_nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        // W3C: lowercase only; uppercase is invalid.
        _ => None,
    }
}

fn hex_into(src: &[u8], out: &mut [u8]) -> Option<()> {
    if src.len() != out.len() * 2 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = hex_nibble(src[2 * i])? << 4 | hex_nibble(src[2 * i + 1])?;
    }
    Some(())
}

impl TraceParent {
    /// Parses a `traceparent` value strictly (W3C Trace Context level 1): version 00 is
    /// exactly 55 characters; a later version may carry more after a `-`; version ff,
    /// uppercase hex, an all-zero trace id or parent id are invalid. `None` when invalid.
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let mut version = [0u8; 1];
        hex_into(&b[0..2], &mut version)?;
        match version[0] {
            0xff => return None,
            0x00 if b.len() != 55 => return None,
            // A future version: parse what version 00 defines, ignore the rest.
            v if v != 0 && b.len() > 55 && b[55] != b'-' => return None,
            _ => {}
        }
        let mut t = TraceParent {
            trace_id: [0; 16],
            parent_id: [0; 8],
            flags: 0,
        };
        hex_into(&b[3..35], &mut t.trace_id)?;
        hex_into(&b[36..52], &mut t.parent_id)?;
        let mut flags = [0u8; 1];
        hex_into(&b[53..55], &mut flags)?;
        t.flags = flags[0];
        if t.trace_id == [0; 16] || t.parent_id == [0; 8] {
            return None;
        }
        Some(t)
    }

    /// A new trace: random trace and span ids.
    pub fn new_root(sampled: bool) -> Self {
        let mut t = TraceParent {
            trace_id: rand::random(),
            parent_id: rand::random(),
            flags: u8::from(sampled),
        };
        // All-zero ids are invalid; the chance is 2^-64, the fix is free.
        if t.trace_id == [0; 16] {
            t.trace_id[15] = 1;
        }
        if t.parent_id == [0; 8] {
            t.parent_id[7] = 1;
        }
        t
    }

    /// The same trace with `span` as the parent.
    pub fn with_parent(self, span: [u8; 8]) -> Self {
        Self {
            parent_id: span,
            ..self
        }
    }

    /// Whether the caller recorded (sampled) this trace.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// As an OpenTelemetry remote span context.
    pub fn span_context(&self, tracestate: Option<&str>) -> SpanContext {
        let state = tracestate
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        SpanContext::new(
            TraceId::from_bytes(self.trace_id),
            SpanId::from_bytes(self.parent_id),
            TraceFlags::new(self.flags),
            true,
            state,
        )
    }

    /// From an OpenTelemetry span context; `None` when it is invalid.
    pub fn from_span_context(cx: &SpanContext) -> Option<Self> {
        cx.is_valid().then(|| TraceParent {
            trace_id: cx.trace_id().to_bytes(),
            parent_id: cx.span_id().to_bytes(),
            flags: cx.trace_flags().to_u8(),
        })
    }
}

impl std::fmt::Display for TraceParent {
    /// Version 00 text: `00-<trace id>-<parent id>-<flags>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut buf = [0u8; 55];
        buf[..3].copy_from_slice(b"00-");
        // hex::encode_to_slice cannot fail on these exact lengths.
        let _ = hex::encode_to_slice(self.trace_id, &mut buf[3..35]);
        buf[35] = b'-';
        let _ = hex::encode_to_slice(self.parent_id, &mut buf[36..52]);
        buf[52] = b'-';
        let _ = hex::encode_to_slice([self.flags], &mut buf[53..55]);
        f.write_str(std::str::from_utf8(&buf).map_err(|_| std::fmt::Error)?)
    }
}

/// `s` if it is a valid `tracestate` within the bounds ([`MAX_TRACESTATE_BYTES`],
/// [`MAX_TRACESTATE_MEMBERS`]), trimmed; `None` otherwise (the caller drops it: W3C lets a
/// participant discard a tracestate it cannot propagate whole).
pub fn valid_tracestate(s: &str) -> Option<&str> {
    let s = s.trim_matches([' ', '\t']);
    if s.is_empty() || s.len() > MAX_TRACESTATE_BYTES {
        return None;
    }
    let mut members = 0usize;
    for member in s.split(',') {
        let member = member.trim_matches([' ', '\t']);
        if member.is_empty() {
            continue; // empty list members are allowed
        }
        members += 1;
        if members > MAX_TRACESTATE_MEMBERS {
            return None;
        }
        let (key, value) = member.split_once('=')?;
        if !valid_tracestate_key(key) || !valid_tracestate_value(value) {
            return None;
        }
    }
    (members > 0).then_some(s)
}

fn valid_tracestate_key(key: &str) -> bool {
    let simple = |k: &str, max: usize| {
        let b = k.as_bytes();
        !b.is_empty()
            && b.len() <= max
            && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-*/".contains(c))
    };
    match key.split_once('@') {
        None => simple(key, 256),
        Some((tenant, system)) => simple(tenant, 241) && simple(system, 14),
    }
}

fn valid_tracestate_value(value: &str) -> bool {
    let b = value.as_bytes();
    !b.is_empty()
        && b.len() <= 256
        && b.last() != Some(&b' ')
        && b.iter()
            .all(|c| (0x20..=0x7e).contains(c) && *c != b',' && *c != b'=')
}

/// The context a request or record carries, as text, validated: `(traceparent, tracestate)`.
/// `None` when `traceparent` is absent or invalid; a tracestate is kept only with a valid
/// traceparent.
pub fn parse_context<'a>(
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
) -> Option<(TraceParent, Option<&'a str>)> {
    let tp = TraceParent::parse(traceparent?.trim_matches([' ', '\t']))?;
    Some((tp, tracestate.and_then(valid_tracestate)))
}

/// The remote span context of a record's Kafka headers, if they carry a valid one.
pub fn header_context(headers: &[(String, Option<Vec<u8>>)]) -> Option<SpanContext> {
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .and_then(|v| std::str::from_utf8(v).ok())
    };
    let (tp, ts) = parse_context(get(TRACEPARENT), get(TRACESTATE))?;
    Some(tp.span_context(ts))
}

/// Makes `span` a child of the first sampled context in `contexts` (if any) and links it to
/// each of the others (at most [`MAX_LINKS`] contexts are looked at; the parent is not linked
/// again), then records its `trace_id`/`span_id` fields for the logs. Does nothing when export
/// is off. Call before the span is first entered.
pub fn start_batch_span(span: &tracing::Span, contexts: impl Iterator<Item = SpanContext>) {
    if !enabled() || span.is_disabled() {
        return;
    }
    let contexts: Vec<SpanContext> = contexts.take(MAX_LINKS).collect();
    let parent = contexts.iter().position(SpanContext::is_sampled);
    for (i, cx) in contexts.iter().enumerate() {
        if Some(i) != parent && parent.is_none_or(|p| contexts[p] != *cx) {
            span.add_link(cx.clone());
        }
    }
    if let Some(p) = parent {
        let cx = contexts[p].clone();
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(cx));
    }
    record_ids(span);
}

/// Makes `span` a child of `parent` (a caller's context) and records its ids for the logs.
/// Does nothing when export is off.
pub fn start_child_span(span: &tracing::Span, parent: Option<SpanContext>) {
    if !enabled() || span.is_disabled() {
        return;
    }
    if let Some(p) = parent {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(p));
    }
    record_ids(span);
}

/// Records `trace_id` and `span_id` (declared `Empty` on the span) from its OpenTelemetry
/// context, so log lines inside the span carry them (both log formats print span fields).
fn record_ids(span: &tracing::Span) {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.record("trace_id", tracing::field::display(sc.trace_id()));
        span.record("span_id", tracing::field::display(sc.span_id()));
    }
}

/// The `traceparent` of `span` (its own span as the parent), when export is on and the span
/// has a valid context.
pub fn traceparent_of(span: &tracing::Span) -> Option<TraceParent> {
    if !enabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    TraceParent::from_span_context(&sc)
}

/// The context an output event should carry when `cause` (the causing record's
/// `traceparent`) is in the current span's trace: the current span (the batch) as the parent.
/// `None` when export is off, `cause` is empty or invalid, or it is another trace (the event
/// then keeps the cause's own context, and the batch span only links to it).
pub fn continue_in_current_span(cause: &str) -> Option<String> {
    if !enabled() || cause.is_empty() {
        return None;
    }
    let tp = TraceParent::parse(cause)?;
    let current = traceparent_of(&tracing::Span::current())?;
    (current.trace_id == tp.trace_id && current.parent_id != tp.parent_id)
        .then(|| tp.with_parent(current.parent_id).to_string())
}

/// A producer span around the publication of one record (the relay's), ended by
/// [`PublishSpan::end`]. `None` when export is off.
pub struct PublishSpan(opentelemetry_sdk::trace::Span);

impl PublishSpan {
    /// A `publish <topic>` span, a child of the record's context (`traceparent`,
    /// `tracestate`) if it carries a valid one.
    pub fn start(
        traceparent: Option<&str>,
        tracestate: Option<&str>,
        topic: &str,
        outbox_id: i64,
    ) -> Option<Self> {
        if !enabled() {
            return None;
        }
        let tracer = TRACER.get()?;
        let parent = match parse_context(traceparent, tracestate) {
            Some((tp, ts)) => {
                opentelemetry::Context::new().with_remote_span_context(tp.span_context(ts))
            }
            None => opentelemetry::Context::new(),
        };
        let span = tracer
            .span_builder(format!("publish {topic}"))
            .with_kind(SpanKind::Producer)
            .with_attributes([
                KeyValue::new("messaging.system", "kafka"),
                KeyValue::new("messaging.operation.type", "send"),
                KeyValue::new("messaging.destination.name", topic.to_string()),
                KeyValue::new("weir.outbox.id", outbox_id),
            ])
            .start_with_context(tracer, &parent);
        Some(Self(span))
    }

    /// Ends the span: acknowledged by the broker, or not (an error status).
    pub fn end(mut self, acknowledged: bool) {
        use opentelemetry::trace::Span as _;
        if !acknowledged {
            self.0
                .set_status(Status::error("not acknowledged by the broker"));
        }
        self.0.end();
    }
}

/// What the OTLP exporter would use, read from the standard variables; `None` when export is
/// off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSettings {
    /// `grpc`, `http/protobuf` or `http/json`.
    pub protocol: String,
}

/// Reads the standard OpenTelemetry variables through `var`: export is on when
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set (non-empty),
/// unless `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
pub fn export_settings(var: impl Fn(&str) -> Option<String>) -> Option<ExportSettings> {
    let set = |k: &str| var(k).filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return None;
    }
    if set("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none")) {
        return None;
    }
    set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"))?;
    let protocol = set("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| set("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .map(|p| p.trim().to_ascii_lowercase())
        .unwrap_or_else(|| "http/protobuf".to_string());
    Some(ExportSettings { protocol })
}

/// Builds the exporting tracer from the environment and turns export on; `Ok(None)` when the
/// environment leaves it off. The OTLP exporter reads the rest of `OTEL_EXPORTER_OTLP_*`
/// (headers, timeout, compression), the SDK `OTEL_TRACES_SAMPLER*`, `OTEL_BSP_*` and
/// `OTEL_SPAN_*_LIMIT`, and the resource `OTEL_SERVICE_NAME` (default `weir`) and
/// `OTEL_RESOURCE_ATTRIBUTES`.
pub(crate) fn init_exporter() -> Result<Option<SdkTracer>, String> {
    let Some(settings) = export_settings(|k| std::env::var(k).ok()) else {
        return Ok(None);
    };
    if let Some(t) = TRACER.get() {
        return Ok(Some(t.clone()));
    }
    let exporter = match settings.protocol.as_str() {
        "grpc" => {
            use opentelemetry_otlp::WithExportConfig as _;
            let rt = match GRPC_RUNTIME.get() {
                Some(rt) => rt,
                None => {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(1)
                        .thread_name("otlp-grpc")
                        .enable_all()
                        .build()
                        .map_err(|e| format!("starting the OTLP gRPC runtime: {e}"))?;
                    GRPC_RUNTIME.get_or_init(|| rt)
                }
            };
            let _guard = rt.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_protocol(opentelemetry_otlp::Protocol::Grpc)
                .build()
        }
        "http/protobuf" => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build(),
        other => {
            return Err(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={other} is not supported (use grpc or http/protobuf)"
            ))
        }
    }
    .map_err(|e| format!("building the OTLP span exporter: {e}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").map_or(true, |v| v.trim().is_empty()) {
        resource = resource.with_service_name("weir");
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("weir");
    let _ = PROVIDER.set(provider);
    let _ = TRACER.set(tracer.clone());
    ENABLED.store(true, Ordering::Relaxed);
    Ok(Some(tracer))
}

/// Exports what is still buffered and stops the exporter, waiting at most `deadline`.
/// Harmless when export is off or already shut down.
pub fn shutdown(deadline: Duration) {
    if let Some(p) = PROVIDER.get() {
        ENABLED.store(false, Ordering::Relaxed);
        if let Err(e) = p.shutdown_with_timeout(deadline) {
            eprintln!("exporting the last spans: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_formats_version_00() {
        let t = TraceParent::parse(GOOD).unwrap();
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(t.sampled());
        assert_eq!(t.to_string(), GOOD);
        let child = t.with_parent([1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            child.to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0102030405060708-01"
        );
    }

    #[test]
    fn rejects_malformed_traceparents() {
        for bad in [
            "",
            "00",
            "garbage",
            // uppercase hex
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            // zero ids
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // version ff
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // version 00 with trailing data
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            // wrong separators and lengths
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            // a later version must separate what it adds
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            // non-ASCII, at a byte position a char boundary would not be
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        // A later version's extra fields are ignored.
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future";
        assert!(TraceParent::parse(later).is_some());
    }

    #[test]
    fn tracestate_is_validated_and_bounded() {
        assert_eq!(
            valid_tracestate("rojo=00f067aa0ba902b7"),
            Some("rojo=00f067aa0ba902b7")
        );
        assert_eq!(
            valid_tracestate(" congo=t61rcWkgMzE, ,rojo=1 "),
            Some("congo=t61rcWkgMzE, ,rojo=1")
        );
        assert!(valid_tracestate("t@sys=v").is_some());
        for bad in [
            "",
            "   ",
            "noequals",
            "Upper=1",
            "k=",
            "k=v,k2",
            "k=a=b",
            "k=\u{7f}",
            "k=ü",
            "a@toolongsystemname1=v",
        ] {
            assert_eq!(valid_tracestate(bad), None, "{bad:?}");
        }
        let many = (0..33)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(valid_tracestate(&many), None);
        let big = format!("k={}", "v".repeat(MAX_TRACESTATE_BYTES));
        assert_eq!(valid_tracestate(&big), None);
    }

    #[test]
    fn context_needs_a_valid_traceparent() {
        assert!(parse_context(None, Some("k=v")).is_none());
        assert!(parse_context(Some("bad"), Some("k=v")).is_none());
        let (tp, ts) = parse_context(Some(GOOD), Some("bad state")).unwrap();
        assert_eq!(tp.to_string(), GOOD);
        assert_eq!(ts, None);
        let headers = vec![
            ("traceparent".to_string(), Some(GOOD.as_bytes().to_vec())),
            ("tracestate".to_string(), Some(b"k=v".to_vec())),
        ];
        let sc = header_context(&headers).unwrap();
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(sc.trace_state().get("k"), Some("v"));
        assert!(header_context(&[("traceparent".into(), None)]).is_none());
        assert!(header_context(&[("traceparent".into(), Some(vec![0xff; 55]))]).is_none());
    }

    #[test]
    fn off_means_nothing_is_built() {
        // No exporter is installed in unit tests.
        assert!(!enabled());
        assert_eq!(continue_in_current_span(GOOD), None);
        assert!(PublishSpan::start(Some(GOOD), None, "t", 1).is_none());
        assert!(traceparent_of(&tracing::Span::current()).is_none());
    }

    #[test]
    fn export_follows_the_standard_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(export_settings(env(&[])), None);
        assert_eq!(
            export_settings(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])),
            None
        );
        let on = export_settings(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://h:4318")]));
        assert_eq!(on.unwrap().protocol, "http/protobuf");
        let grpc = export_settings(env(&[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://h:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "GRPC"),
        ]));
        assert_eq!(grpc.unwrap().protocol, "grpc");
        assert_eq!(
            export_settings(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://h:4318"),
                ("OTEL_SDK_DISABLED", "true"),
            ])),
            None
        );
        assert_eq!(
            export_settings(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://h:4318"),
                ("OTEL_TRACES_EXPORTER", "none"),
            ])),
            None
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_round_trips(s in ".{0,80}") {
            if let Some(t) = TraceParent::parse(&s) {
                prop_assert_eq!(TraceParent::parse(&t.to_string()), Some(t));
            }
            let _ = valid_tracestate(&s);
        }

        #[test]
        fn ids_round_trip(trace in any::<[u8; 16]>(), span in any::<[u8; 8]>(), flags in any::<u8>()) {
            let t = TraceParent { trace_id: trace, parent_id: span, flags };
            let parsed = TraceParent::parse(&t.to_string());
            if trace == [0; 16] || span == [0; 8] {
                prop_assert_eq!(parsed, None);
            } else {
                prop_assert_eq!(parsed, Some(t));
            }
        }
    }
}
