//! Producing one event per accepted request and waiting for the broker's acknowledgement
//! (acks=all, idempotent producer): a 202 is only sent once the event is durable.
//!
//! Bounded: at most `gateway.max_in_flight` requests wait for acknowledgements and
//! librdkafka's queue is bounded too; either being full answers 503 with Retry-After at once
//! instead of queueing without limit. An event larger than Kafka takes (`message.max.bytes`
//! of the producer, or the broker's limit) is the client's doing: 413, never 503. Each request is one event, so nothing is half accepted;
//! an event whose acknowledgement timed out may still land, which is why clients retry with
//! an Idempotency-Key (see docs/gateway.md).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::Semaphore;
use weir_runtime::codec::Codec;
use weir_runtime::config::Config;
use weir_runtime::events::TopicEvent;

use crate::metrics;
use crate::problem::Problem;

/// The gateway producer's `linger.ms` unless `kafka.producer` sets one.
pub const DEFAULT_LINGER_MS: &str = "0";

/// The gateway's producer: weir's settings (idempotent, acks=all) with the gateway's batching
/// and bounds; operator overrides in `kafka.producer` win. No linger: a request's event is
/// sent at once, since the client waits for its acknowledgement; under load the events
/// accepted while earlier requests are in flight (at most five per broker with idempotence)
/// go together in the next, so batches grow with the load without a timer. A fractional
/// `linger.ms` (e.g. `"0.5"`) trades that much latency for fewer produce requests. No
/// compression by default: the events are small JSON-in-Avro records in small batches,
/// where librdkafka's per-batch zstd context costs more CPU than the bytes it saves
/// (docs/benchmarks.md).
pub fn producer(cfg: &Config) -> Result<FutureProducer, KafkaError> {
    let mut c = weir_runtime::kafka::producer_config(&cfg.kafka);
    let g = &cfg.gateway;
    let defaults = [
        ("linger.ms", DEFAULT_LINGER_MS.to_string()),
        ("compression.type", "none".to_string()),
        ("batch.num.messages", "10000".to_string()),
        (
            "queue.buffering.max.messages",
            (g.max_in_flight * 2).max(1000).to_string(),
        ),
        ("message.timeout.ms", g.produce_timeout_ms.to_string()),
    ];
    for (k, v) in defaults {
        if !cfg.kafka.producer.contains_key(k) {
            c.set(k, v);
        }
    }
    c.create()
}

/// 413 for an event Kafka refuses for its size: the client's request made it, so retrying
/// cannot help (a 503 would invite retries forever).
fn too_large(bytes: usize) -> Problem {
    ::metrics::counter!(metrics::PRODUCE_REFUSED, "reason" => "too_large").increment(1);
    tracing::info!(bytes, "an event is larger than Kafka accepts");
    Problem::event_too_large()
}

/// Sends events and awaits their acknowledgement.
#[derive(Clone)]
pub struct Sender {
    producer: FutureProducer,
    codec: Arc<Codec>,
    in_flight: Arc<Semaphore>,
    retry_after: u32,
    timeout: Duration,
}

impl Sender {
    /// A sender over `producer`.
    pub fn new(cfg: &Config, producer: FutureProducer, codec: Arc<Codec>) -> Self {
        Self {
            producer,
            codec,
            in_flight: Arc::new(Semaphore::new(cfg.gateway.max_in_flight)),
            retry_after: cfg.gateway.retry_after_secs,
            // librdkafka fails the message at message.timeout.ms; this is only a backstop.
            timeout: Duration::from_millis(cfg.gateway.produce_timeout_ms + 1_000),
        }
    }

    /// The producer (for readiness checks).
    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    fn refused(&self, reason: &'static str, detail: &str) -> Problem {
        ::metrics::counter!(metrics::PRODUCE_REFUSED, "reason" => reason).increment(1);
        Problem::unavailable(detail.to_string(), self.retry_after)
    }

    /// Encodes `event`, produces it keyed by its key and waits for the acknowledgement.
    pub async fn send<E: TopicEvent>(&self, event: &E) -> Result<(), Problem> {
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return Err(self.refused("in_flight", "too many requests are waiting for Kafka"));
        };
        let bytes = self.codec.encode(event).await.map_err(|e| {
            tracing::error!(error = %e, topic = E::TOPIC, "encoding an event failed");
            self.refused(
                "encode",
                "the event could not be encoded (schema registry unavailable?)",
            )
        })?;
        let topic = self.codec.topic::<E>();
        let start = Instant::now();
        let mut record = FutureRecord::to(&topic).key(event.key()).payload(&bytes);
        // The event's trace context, also as Kafka headers: a consumer joins the trace
        // without decoding the value.
        let traceparent = event.traceparent();
        if !traceparent.is_empty() {
            let mut headers = OwnedHeaders::new_with_capacity(2).insert(Header {
                key: weir_runtime::trace::TRACEPARENT,
                value: Some(traceparent),
            });
            if let Some(ts) = event.tracestate() {
                headers = headers.insert(Header {
                    key: weir_runtime::trace::TRACESTATE,
                    value: Some(ts),
                });
            }
            record = record.headers(headers);
        }
        let delivery = match self.producer.send_result(record) {
            Ok(d) => d,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                return Err(self.refused("queue_full", "the Kafka producer queue is full"));
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _)) => {
                return Err(too_large(bytes.len()));
            }
            Err((e, _)) => {
                tracing::error!(error = %e, %topic, "producing failed");
                return Err(self.refused("kafka", "Kafka refused the event"));
            }
        };
        match tokio::time::timeout(self.timeout, delivery).await {
            Ok(Ok(Ok(delivery))) => {
                ::metrics::histogram!(metrics::PRODUCE_SECONDS, "topic" => E::TOPIC)
                    .record(start.elapsed().as_secs_f64());
                tracing::debug!(
                    messaging.system = "kafka",
                    %topic,
                    partition = delivery.partition,
                    offset = delivery.offset,
                    event_id = %event.event_id(),
                    "event acknowledged"
                );
                Ok(())
            }
            Ok(Ok(Err((
                KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
                _,
            )))) => {
                // The broker's (or the topic's) max.message.bytes is below the producer's.
                Err(too_large(bytes.len()))
            }
            Ok(Ok(Err((e, _)))) => {
                tracing::warn!(error = %e, %topic, messaging.system = "kafka", "the broker did not acknowledge an event");
                Err(self.refused("kafka", "Kafka is unavailable"))
            }
            Ok(Err(_)) => Err(self.refused("kafka", "the producer shut down")),
            Err(_) => Err(self.refused("timeout", "Kafka did not acknowledge in time")),
        }
    }
}
