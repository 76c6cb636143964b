//! Server-sent events framing (the `text/event-stream` format of the HTML standard).
//!
//! Invariant: a frame's `data` is one line of JSON (serde_json writes no newline), so a
//! frame is always one event; ids and event names are weir's own ASCII, never client text.

use bytes::Bytes;
use serde::Serialize;

/// One event: `id`, `event` name and JSON `data`, ended by a blank line.
pub fn event(id: &str, name: &str, data: &impl Serialize) -> Bytes {
    let json = serde_json::to_string(data).unwrap_or_else(|_| "null".to_string());
    Bytes::from(format!("id: {id}\nevent: {name}\ndata: {json}\n\n"))
}

/// A comment line: ignored by clients, keeps proxies and the connection alive.
pub fn comment(text: &str) -> Bytes {
    Bytes::from(format!(": {text}\n\n"))
}

/// The first frame of every stream: how long a client waits before reconnecting (ms).
pub fn retry(ms: u64) -> Bytes {
    Bytes::from(format!("retry: {ms}\n\n"))
}

/// A `Last-Event-ID` that is not an id a weir stream sends (a number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Last-Event-ID must be an id this stream sent")]
pub struct BadLastEventId;

/// `Last-Event-ID` as a number: `None` when absent or empty (a fresh stream), an error when
/// it is anything but a number.
pub fn last_event_id(headers: &axum::http::HeaderMap) -> Result<Option<u64>, BadLastEventId> {
    let Some(v) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let s = v.to_str().map_err(|_| BadLastEventId)?.trim();
    if s.is_empty() {
        return Ok(None);
    }
    s.parse::<u64>().map(Some).map_err(|_| BadLastEventId)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_one_event_each() {
        let f = event("7", "state", &serde_json::json!({"a": "x\ny"}));
        assert_eq!(
            &f[..],
            b"id: 7\nevent: state\ndata: {\"a\":\"x\\ny\"}\n\n".as_slice()
        );
        assert_eq!(&comment("hb")[..], b": hb\n\n".as_slice());
    }

    #[test]
    fn last_event_id_is_a_number_or_refused() {
        let mut h = axum::http::HeaderMap::new();
        assert_eq!(last_event_id(&h), Ok(None));
        h.insert("last-event-id", "12".parse().unwrap());
        assert_eq!(last_event_id(&h), Ok(Some(12)));
        h.insert("last-event-id", "x".parse().unwrap());
        assert_eq!(last_event_id(&h), Err(BadLastEventId));
    }
}
