//! The transactional outbox writer. A processor pushes its output events while it applies a
//! batch; the runtime writes them with one statement in the batch's transaction, so an
//! event exists if and only if the effect that caused it committed. The relay publishes
//! the rows to Kafka.
//!
//! Invariant: all events of one key land in the same lane (`lane_of`), in push order, so a
//! relay that publishes each lane in id order keeps per-key order.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::codec::Codec;
use crate::copy::CopyRows;
use crate::error::EncodeError;
use crate::events::TopicEvent;

/// One encoded output event, ready to insert.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Full topic name.
    pub topic: String,
    /// Kafka key.
    pub key: Vec<u8>,
    /// Confluent wire-format value.
    pub payload: Vec<u8>,
    /// Kafka headers as the text of a JSON object of strings.
    pub headers: String,
    /// Ordering lane.
    pub lane: i32,
}

/// The lane of a key: FNV-1a 32-bit, stable across processes, versions and languages.
pub fn lane_of(key: &[u8], lanes: i32) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % lanes.max(1) as u32) as i32
}

/// The outbox headers of an event: `{"event_id": ..., "workspace_id": ...}` as JSON text,
/// plus `traceparent` and `tracestate` when the event carries a trace context (the relay
/// publishes them as Kafka headers). Written directly rather than through a
/// `serde_json::Value`: one small object per event, and building the map costs more than the
/// text.
fn headers_json(
    event_id: Uuid,
    workspace_id: &str,
    traceparent: &str,
    tracestate: Option<&str>,
) -> String {
    let mut headers = String::with_capacity(80 + workspace_id.len() + traceparent.len());
    headers.push_str("{\"event_id\":\"");
    headers.push_str(
        event_id
            .hyphenated()
            .encode_lower(&mut Uuid::encode_buffer()),
    );
    headers.push_str("\",\"workspace_id\":");
    // A JSON string literal, escaped by serde_json.
    headers.push_str(&serde_json::Value::from(workspace_id).to_string());
    if !traceparent.is_empty() {
        headers.push_str(",\"traceparent\":");
        if traceparent
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'-')
        {
            // The usual case, a well-formed context: nothing to escape.
            headers.push('"');
            headers.push_str(traceparent);
            headers.push('"');
        } else {
            // A record's context is input, whatever produced it: escaped.
            headers.push_str(&serde_json::Value::from(traceparent).to_string());
        }
        if let Some(ts) = tracestate.filter(|t| !t.is_empty()) {
            headers.push_str(",\"tracestate\":");
            headers.push_str(&serde_json::Value::from(ts).to_string());
        }
    }
    headers.push('}');
    headers
}

/// Output events of one batch.
pub struct Outbox<'a> {
    codec: &'a Codec,
    lanes: i32,
    rows: Vec<OutboxRow>,
}

impl<'a> Outbox<'a> {
    /// An empty outbox for one batch.
    pub fn new(codec: &'a Codec, lanes: i32) -> Self {
        Self {
            codec,
            lanes,
            rows: Vec::new(),
        }
    }

    /// Encodes `event` for its topic and queues it, keyed by `event.key()`. Its trace context
    /// goes into the row's headers; with export on, an event whose cause is in the current
    /// (batch) span's trace is re-parented under that span first (`trace`).
    pub async fn push<E: TopicEvent>(&mut self, event: &E) -> Result<(), EncodeError> {
        let reparented = crate::trace::continue_in_current_span(event.traceparent())
            .and_then(|tp| event.with_traceparent(tp));
        let event = reparented.as_ref().unwrap_or(event);
        let payload = self.codec.encode(event).await?;
        let key = event.key().as_bytes().to_vec();
        let headers = headers_json(
            event.event_id(),
            event.workspace_id(),
            event.traceparent(),
            event.tracestate(),
        );
        self.rows.push(OutboxRow {
            topic: self.codec.topic::<E>(),
            lane: lane_of(&key, self.lanes),
            key,
            payload,
            headers,
        });
        Ok(())
    }

    /// Queued rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Inserts every queued row with one statement (ids follow push order) and empties the
    /// outbox: an `INSERT` of arrays up to [`SMALL_BATCH`] rows, else a binary COPY.
    pub async fn flush(&mut self, conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
        if self.rows.is_empty() {
            return Ok(0);
        }
        let rows = std::mem::take(&mut self.rows);
        let n = rows.len();
        if n <= SMALL_BATCH {
            let a = Arrays::of(&rows);
            let done = sqlx::query!(
                r#"INSERT INTO weir_outbox (lane, topic, key, payload, headers)
                   SELECT lane, topic, key, payload, headers::jsonb
                   FROM UNNEST($1::int[], $2::text[], $3::bytea[], $4::bytea[], $5::text[])
                        WITH ORDINALITY AS r(lane, topic, key, payload, headers, ord)
                   ORDER BY ord"#,
                &a.lanes,
                &a.topics as &[&str],
                &a.keys as &[&[u8]],
                &a.payloads as &[&[u8]],
                &a.headers as &[&str],
            )
            .execute(conn)
            .await?
            .rows_affected();
            metrics::counter!(crate::metrics::OUTBOX_WRITTEN).increment(n as u64);
            return Ok(done);
        }
        copy_rows(conn, &rows).await
    }

    /// Takes the queued rows out, leaving the outbox empty (for a caller that writes them
    /// together with other rows: see `BatchConsumer`).
    pub(crate) fn take_rows(&mut self) -> Vec<OutboxRow> {
        std::mem::take(&mut self.rows)
    }
}

/// Inserts `rows` with one binary COPY (ids follow their order).
pub(crate) async fn copy_rows(
    conn: &mut PgConnection,
    rows: &[OutboxRow],
) -> Result<u64, sqlx::Error> {
    let n = rows.len();
    let mut copy = CopyRows::new(5);
    for r in rows {
        copy.row()
            .int4(r.lane)
            .text(&r.topic)
            .bytea(&r.key)
            .bytea(&r.payload)
            .jsonb(&r.headers);
    }
    // COPY appends in stream order, so the identity ids keep push order.
    let done = copy
        .copy_in(
            conn,
            "COPY weir_outbox (lane, topic, key, payload, headers) FROM STDIN (FORMAT binary)",
        )
        .await?;
    metrics::counter!(crate::metrics::OUTBOX_WRITTEN).increment(n as u64);
    Ok(done)
}

/// Batches up to this many rows are inserted with one `INSERT` of arrays rather than COPY.
/// A COPY is two round trips (the statement, then the data), an `INSERT` one; at an idle
/// pipeline's batches of one or a few events that round trip is a good part of the latency,
/// while past a few dozen rows COPY's cheaper per-row parsing wins.
pub const SMALL_BATCH: usize = 32;

/// The columns of outbox rows as arrays, for statements that insert them with `UNNEST ...
/// WITH ORDINALITY ... ORDER BY ord` (the identity ids are drawn in that order, so they follow
/// push order as with COPY).
pub(crate) struct Arrays<'r> {
    pub(crate) lanes: Vec<i32>,
    pub(crate) topics: Vec<&'r str>,
    pub(crate) keys: Vec<&'r [u8]>,
    pub(crate) payloads: Vec<&'r [u8]>,
    pub(crate) headers: Vec<&'r str>,
}

impl<'r> Arrays<'r> {
    pub(crate) fn of(rows: &'r [OutboxRow]) -> Self {
        let mut a = Self {
            lanes: Vec::with_capacity(rows.len()),
            topics: Vec::with_capacity(rows.len()),
            keys: Vec::with_capacity(rows.len()),
            payloads: Vec::with_capacity(rows.len()),
            headers: Vec::with_capacity(rows.len()),
        };
        for r in rows {
            a.lanes.push(r.lane);
            a.topics.push(&r.topic);
            a.keys.push(&r.key);
            a.payloads.push(&r.payload);
            a.headers.push(&r.headers);
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::{headers_json, lane_of};

    #[test]
    fn headers_are_a_json_object_of_strings() {
        let id = uuid::Uuid::now_v7();
        for ws in ["ws-1", "", "quote\" back\\ nl\n ü \u{1}"] {
            let v: serde_json::Value =
                serde_json::from_str(&headers_json(id, ws, "", Some("ignored"))).unwrap();
            assert_eq!(
                v,
                serde_json::json!({"event_id": id.to_string(), "workspace_id": ws}),
                "{ws:?}"
            );
        }
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let hostile = "00-\"},\"x\":\"1";
        let v: serde_json::Value =
            serde_json::from_str(&headers_json(id, "ws", hostile, None)).unwrap();
        assert_eq!(v["traceparent"], hostile);
        for ts in [None, Some(""), Some("k=v\"}")] {
            let v: serde_json::Value =
                serde_json::from_str(&headers_json(id, "ws", tp, ts)).unwrap();
            let mut want = serde_json::json!({"event_id": id.to_string(), "workspace_id": "ws",
                "traceparent": tp});
            if let Some(ts) = ts.filter(|t| !t.is_empty()) {
                want["tracestate"] = ts.into();
            }
            assert_eq!(v, want, "{ts:?}");
        }
    }

    #[test]
    fn lanes_are_stable_and_in_range() {
        // Fixed values: changing the hash would reorder keys across a deploy.
        assert_eq!(lane_of(b"", 64), (0x811c_9dc5u32 % 64) as i32);
        assert_eq!(lane_of(b"run-1", 64), lane_of(b"run-1", 64));
        for k in 0..1000 {
            let l = lane_of(format!("wf-{k}").as_bytes(), 7);
            assert!((0..7).contains(&l));
        }
        assert_eq!(lane_of(b"anything", 1), 0);
    }
}
