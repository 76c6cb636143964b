//! The way out of the dead-letter topic, behind `weir dlq list | show | redrive`: read what
//! was dead-lettered and why, and send chosen records back to the topic they came from once
//! the cause is fixed.
//!
//! Reading uses a plain assigned consumer (no group membership, nothing committed), bounded
//! by a scan window per partition, so looking never disturbs anything. A redriven record is
//! the original key, value and headers, plus `weir.redrive.from` naming the dead letter
//! (`<dlq topic>/<partition>/<offset>`); each redrive is recorded in `weir_dlq_redrives`,
//! and a second redrive of the same dead letter is refused unless forced, so a repeated
//! command does not apply a record twice by accident (it would be a new record, with a new
//! offset: positions cannot tell it from a fresh one).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use sqlx::PgPool;

use crate::codec::Codec;
use crate::config::Config;
use crate::events::DeadLetter;

/// Header a redriven record carries: the dead letter it came from.
pub const REDRIVE_HEADER: &str = "weir.redrive.from";

/// Something `weir dlq` could not do.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// Kafka.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Postgres (the redrive log).
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// A dead letter was asked for that is not there.
    #[error("no dead letter at {0} (outside the topic, or deleted by retention)")]
    NotFound(String),
    /// A bad argument.
    #[error("{0}")]
    Usage(String),
}

/// Which dead letters to look at.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only letters from this source topic (full name, with the prefix).
    pub source_topic: Option<String>,
    /// Only letters of this consumer group.
    pub group: Option<String>,
    /// Only letters of this error class (`avro`, `invalid`, `apply`, ...).
    pub class: Option<String>,
    /// Only letters whose reason contains this text.
    pub reason_contains: Option<String>,
}

impl Filter {
    fn matches(&self, l: &DeadLetter) -> bool {
        self.source_topic
            .as_ref()
            .is_none_or(|t| *t == l.source_topic)
            && self.group.as_ref().is_none_or(|g| *g == l.consumer_group)
            && self.class.as_ref().is_none_or(|c| *c == l.error_class)
            && self
                .reason_contains
                .as_ref()
                .is_none_or(|r| l.error_message.contains(r.as_str()))
    }
}

/// Where a dead letter lives in the DLQ topic: `<partition>:<offset>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct DlqPosition {
    /// DLQ partition.
    pub partition: i32,
    /// DLQ offset.
    pub offset: i64,
}

impl std::str::FromStr for DlqPosition {
    type Err = DlqError;
    fn from_str(s: &str) -> Result<Self, DlqError> {
        let bad = || DlqError::Usage(format!("{s:?}: expected <partition>:<offset>, e.g. 2:117"));
        let (p, o) = s.split_once(':').ok_or_else(bad)?;
        Ok(Self {
            partition: p.trim().parse().map_err(|_| bad())?,
            offset: o.trim().parse().map_err(|_| bad())?,
        })
    }
}

impl std::fmt::Display for DlqPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.partition, self.offset)
    }
}

/// One dead letter as read.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Its place in the DLQ topic.
    pub at: DlqPosition,
    /// Broker timestamp, ms since the epoch.
    pub timestamp_ms: Option<i64>,
    /// Source topic of the original record.
    pub source_topic: String,
    /// Its partition.
    pub source_partition: i32,
    /// Its offset.
    pub source_offset: i64,
    /// The consumer group that gave up on it.
    pub consumer_group: String,
    /// Error class (`framing`, `unknown_schema`, `avro`, `invalid`, `apply`).
    pub error_class: String,
    /// Why.
    pub error_message: String,
    /// When it was dead-lettered, µs since the epoch.
    pub occurred_at: i64,
    /// The same, RFC 3339 in UTC.
    pub time: String,
    /// Original key (lossy UTF-8).
    pub original_key: Option<String>,
    /// Original value size in bytes (absent for a tombstone).
    pub original_value_bytes: Option<usize>,
    /// Original headers (values lossy UTF-8).
    pub original_headers: Vec<(String, Option<String>)>,
    /// When it was redriven, if it was (from `weir_dlq_redrives`).
    pub redriven_at: Option<String>,
    #[serde(skip)]
    letter: DeadLetter,
}

impl Entry {
    fn new(at: DlqPosition, timestamp_ms: Option<i64>, letter: DeadLetter) -> Self {
        let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        Self {
            at,
            timestamp_ms,
            source_topic: letter.source_topic.clone(),
            source_partition: letter.source_partition,
            source_offset: letter.source_offset,
            consumer_group: letter.consumer_group.clone(),
            error_class: letter.error_class.clone(),
            error_message: letter.error_message.clone(),
            occurred_at: letter.occurred_at,
            time: chrono::DateTime::from_timestamp_micros(letter.occurred_at)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .unwrap_or_else(|| letter.occurred_at.to_string()),
            original_key: letter.original_key.as_deref().map(lossy),
            original_value_bytes: letter.original_value.as_ref().map(Vec::len),
            original_headers: letter
                .original_headers
                .iter()
                .map(|h| (h.key.clone(), h.value.as_deref().map(lossy)))
                .collect(),
            redriven_at: None,
            letter,
        }
    }

    /// The original value's bytes.
    pub fn original_value(&self) -> Option<&[u8]> {
        self.letter.original_value.as_deref()
    }
}

/// What [`read`] found.
#[derive(Debug, Default)]
pub struct Listing {
    /// Matching letters, by partition and offset.
    pub entries: Vec<Entry>,
    /// Records scanned.
    pub scanned: usize,
    /// Records of the DLQ topic that are not dead letters weir can decode.
    pub undecodable: usize,
}

fn reader(cfg: &Config) -> Result<BaseConsumer, DlqError> {
    // Assigned, never subscribed: the group id is only librdkafka's requirement, nothing is
    // committed and no group is joined.
    let mut c = crate::kafka::consumer_config(&cfg.kafka, "weir-dlq-reader", 0);
    c.set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    Ok(c.create()?)
}

/// Reads the dead letters matching `filter` among the last `scan` records of each DLQ
/// partition (or exactly `at`, when given), at most `limit` of them, each annotated with
/// its redrive, if any.
pub async fn read(
    cfg: &Config,
    codec: &Codec,
    pool: Option<&PgPool>,
    filter: &Filter,
    at: &[DlqPosition],
    scan: i64,
    limit: usize,
) -> Result<Listing, DlqError> {
    let topic = codec.topic::<DeadLetter>();
    let consumer = reader(cfg)?;
    let timeout = Duration::from_secs(10);
    let md = consumer.fetch_metadata(Some(&topic), timeout)?;
    let partitions: Vec<i32> = md
        .topics()
        .first()
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    // Partition → [from, to) to read.
    let mut ranges: HashMap<i32, (i64, i64)> = HashMap::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(&topic, p, timeout)?;
        let wanted: Vec<i64> = at
            .iter()
            .filter(|a| a.partition == p)
            .map(|a| a.offset)
            .collect();
        let range = if at.is_empty() {
            (low.max(high - scan.max(1)), high)
        } else if let (Some(min), Some(max)) = (wanted.iter().min(), wanted.iter().max()) {
            (low.max(*min), high.min(max + 1))
        } else {
            continue;
        };
        if range.0 < range.1 {
            ranges.insert(p, range);
        }
    }
    for a in at {
        if !ranges
            .get(&a.partition)
            .is_some_and(|(from, to)| (*from..*to).contains(&a.offset))
        {
            return Err(DlqError::NotFound(a.to_string()));
        }
    }

    let mut listing = Listing::default();
    if ranges.is_empty() {
        return Ok(listing);
    }
    let mut tpl = TopicPartitionList::new();
    for (p, (from, _)) in &ranges {
        tpl.add_partition_offset(&topic, *p, Offset::Offset(*from))?;
    }
    consumer.assign(&tpl)?;
    let mut open: HashMap<i32, i64> = ranges.iter().map(|(p, (_, to))| (*p, *to)).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !open.is_empty() && Instant::now() < deadline {
        let Some(msg) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let msg = msg?;
        let (p, o) = (msg.partition(), msg.offset());
        let Some(end) = open.get(&p).copied() else {
            continue;
        };
        if o + 1 >= end {
            open.remove(&p);
        }
        if o >= end {
            continue;
        }
        let here = DlqPosition {
            partition: p,
            offset: o,
        };
        if !at.is_empty() && !at.contains(&here) {
            continue;
        }
        listing.scanned += 1;
        let letter = match msg.payload() {
            Some(bytes) => codec.decode::<DeadLetter>(bytes).await.ok(),
            None => None,
        };
        let Some(letter) = letter else {
            listing.undecodable += 1;
            continue;
        };
        if filter.matches(&letter) {
            listing
                .entries
                .push(Entry::new(here, msg.timestamp().to_millis(), letter));
        }
    }
    if !open.is_empty() {
        tracing::warn!(
            partitions = open.len(),
            "DLQ read timed out; the listing is partial"
        );
    }
    listing.entries.sort_by_key(|e| e.at);
    // The newest matches, when there are more than asked for.
    if listing.entries.len() > limit {
        let cut = listing.entries.len() - limit;
        listing.entries.drain(..cut);
    }
    if let Some(pool) = pool {
        annotate(pool, &topic, &mut listing.entries).await?;
    }
    Ok(listing)
}

async fn annotate(pool: &PgPool, topic: &str, entries: &mut [Entry]) -> Result<(), DlqError> {
    if entries.is_empty() {
        return Ok(());
    }
    let parts: Vec<i32> = entries.iter().map(|e| e.at.partition).collect();
    let offsets: Vec<i64> = entries.iter().map(|e| e.at.offset).collect();
    let rows = sqlx::query!(
        r#"SELECT r.dlq_partition, r.dlq_offset, r.redriven_at::text AS "at!"
           FROM weir_dlq_redrives r
           JOIN UNNEST($2::int[], $3::bigint[]) AS k(p, o) ON r.dlq_partition = k.p AND r.dlq_offset = k.o
           WHERE r.dlq_topic = $1"#,
        topic,
        &parts,
        &offsets,
    )
    .fetch_all(pool)
    .await?;
    let done: HashMap<(i32, i64), String> = rows
        .into_iter()
        .map(|r| ((r.dlq_partition, r.dlq_offset), r.at))
        .collect();
    for e in entries {
        e.redriven_at = done.get(&(e.at.partition, e.at.offset)).cloned();
    }
    Ok(())
}

/// What happened to one dead letter in [`redrive`].
#[derive(Debug, Clone, Serialize)]
pub struct Redriven {
    /// The dead letter.
    pub at: DlqPosition,
    /// The topic it was sent to.
    pub topic: String,
    /// Where the new record landed (partition, offset); `None` when skipped.
    pub landed: Option<(i32, i64)>,
    /// Why it was skipped, if it was.
    pub skipped: Option<String>,
}

/// Sends `entries` back to their source topics (original key, value and headers, plus
/// [`REDRIVE_HEADER`]), in DLQ order, each acknowledged before the next is sent so that
/// records of one key keep their order. A letter already redriven is skipped unless `force`;
/// a source topic that is not one of this deployment's topics is refused.
pub async fn redrive(
    cfg: &Config,
    pool: &PgPool,
    producer: &FutureProducer,
    codec: &Codec,
    entries: &[Entry],
    force: bool,
) -> Result<Vec<Redriven>, DlqError> {
    let dlq_topic = codec.topic::<DeadLetter>();
    let ours: Vec<String> = crate::kafka::planned_topics(&cfg.kafka)
        .into_iter()
        .map(|(t, _)| t)
        .filter(|t| *t != dlq_topic)
        .collect();
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let skip = |why: String| Redriven {
            at: e.at,
            topic: e.source_topic.clone(),
            landed: None,
            skipped: Some(why),
        };
        if !ours.contains(&e.source_topic) {
            out.push(skip(format!(
                "source topic {} is not one of this deployment's topics (kafka.topic_prefix?)",
                e.source_topic
            )));
            continue;
        }
        if let (Some(at), false) = (&e.redriven_at, force) {
            out.push(skip(format!(
                "already redriven at {at}; --force sends it again"
            )));
            continue;
        }
        let Some(value) = e.letter.original_value.as_deref() else {
            // Sent without a value it would be a tombstone: on a compacted topic it deletes
            // the key's records, and it comes straight back as undecodable.
            out.push(skip(format!(
                "the letter holds no value (a tombstone, or left out as too large); the \
                 original is at {}/{}/{}",
                e.source_topic, e.letter.source_partition, e.letter.source_offset
            )));
            continue;
        };
        let from = format!("{dlq_topic}/{}/{}", e.at.partition, e.at.offset);
        let mut headers = OwnedHeaders::new();
        for h in &e.letter.original_headers {
            if h.key == REDRIVE_HEADER {
                continue;
            }
            headers = headers.insert(Header {
                key: &h.key,
                value: h.value.as_deref(),
            });
        }
        headers = headers.insert(Header {
            key: REDRIVE_HEADER,
            value: Some(from.as_str()),
        });
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&e.source_topic)
            .headers(headers)
            .payload(value);
        if let Some(k) = e.letter.original_key.as_deref() {
            record = record.key(k);
        }
        let delivered = producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(err, _)| DlqError::Kafka(err))?;
        sqlx::query!(
            r#"INSERT INTO weir_dlq_redrives (dlq_topic, dlq_partition, dlq_offset, source_topic,
                                              target_partition, target_offset)
               VALUES ($1, $2, $3, $4, $5, $6)
               ON CONFLICT (dlq_topic, dlq_partition, dlq_offset) DO UPDATE
               SET redriven_at = now(), times = weir_dlq_redrives.times + 1,
                   target_partition = EXCLUDED.target_partition, target_offset = EXCLUDED.target_offset"#,
            dlq_topic,
            e.at.partition,
            e.at.offset,
            e.source_topic,
            delivered.partition,
            delivered.offset,
        )
        .execute(pool)
        .await?;
        out.push(Redriven {
            at: e.at,
            topic: e.source_topic.clone(),
            landed: Some((delivered.partition, delivered.offset)),
            skipped: None,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse_and_print() {
        let p: DlqPosition = "2:117".parse().unwrap();
        assert_eq!(
            p,
            DlqPosition {
                partition: 2,
                offset: 117
            }
        );
        assert_eq!(p.to_string(), "2:117");
        for bad in ["", "2", "x:1", "1:y", "1:2:3"] {
            assert!(bad.parse::<DlqPosition>().is_err(), "{bad}");
        }
    }

    #[test]
    fn filters_match_every_given_field() {
        let letter = DeadLetter {
            event_id: uuid::Uuid::nil(),
            occurred_at: 0,
            workspace_id: String::new(),
            traceparent: String::new(),
            tracestate: None,
            source_topic: "weir.completions.v1".into(),
            source_partition: 0,
            source_offset: 9,
            consumer_group: "weir-coordinator".into(),
            error_class: "apply".into(),
            error_message: "value too long".into(),
            original_key: None,
            original_value: None,
            original_headers: vec![],
        };
        assert!(Filter::default().matches(&letter));
        let f = Filter {
            source_topic: Some("weir.completions.v1".into()),
            group: Some("weir-coordinator".into()),
            class: Some("apply".into()),
            reason_contains: Some("too long".into()),
        };
        assert!(f.matches(&letter));
        for f in [
            Filter {
                class: Some("avro".into()),
                ..Filter::default()
            },
            Filter {
                group: Some("other".into()),
                ..Filter::default()
            },
            Filter {
                reason_contains: Some("nope".into()),
                ..Filter::default()
            },
        ] {
            assert!(!f.matches(&letter));
        }
    }
}
