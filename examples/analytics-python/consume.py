"""Reads weir's output topics with stock Confluent deserializers and prints each event once.

The worked Python example of docs/analytics.md. Nothing here is weir-specific: the registry's
Confluent-compatible URL, the topic names, and deduplication by event_id.

    pip install 'confluent-kafka[avro,schemaregistry]' fastavro
    python consume.py --bootstrap 127.0.0.1:9092 \
        --registry http://127.0.0.1:8081/apis/ccompat/v7 \
        [--prefix dev.] [--group my-analytics] [--idle-exit 10] [TOPIC ...]
"""

import argparse
import json
import uuid

from confluent_kafka import DeserializingConsumer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer

# Topics with a single record type: the deserializer returns the record without its name.
SINGLE = {
    "weir.node-ready.v1": "weir.runs.NodeReady",
    "weir.cache-answers.v1": "weir.cache.CacheAnswer",
    "weir.dlq.v1": "weir.dlq.DeadLetter",
}
OUTPUT_TOPICS = [
    "weir.workflows.v1",
    "weir.node-ready.v1",
    "weir.run-events.v1",
    "weir.cache-answers.v1",
    "weir.dlq.v1",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--registry", default="http://127.0.0.1:8081/apis/ccompat/v7")
    ap.add_argument("--prefix", default="", help="kafka.topic_prefix of the weir environment")
    ap.add_argument("--group", default=f"analytics-example-{uuid.uuid4()}")
    ap.add_argument("--idle-exit", type=float, default=0, help="stop after this many idle seconds (0: never)")
    ap.add_argument("topics", nargs="*", default=OUTPUT_TOPICS)
    args = ap.parse_args()

    # Bound every registry request (seconds): a registry that never answers fails the read.
    registry = SchemaRegistryClient({"url": args.registry, "timeout": 10})
    consumer = DeserializingConsumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": args.group,
            "auto.offset.reset": "earliest",
            # No key deserializer: keys arrive as bytes. They are UTF-8 strings (workflow_id,
            # run_id, workspace_id), not Avro; on the DLQ they are the original record's key
            # bytes, which need not be UTF-8 (StringDeserializer would raise on those).
            # Union topics: return_record_name gives (full record name, record), e.g.
            # ("weir.workflows.PatchRejected", {...}); single-record topics give the record.
            "value.deserializer": AvroDeserializer(registry, return_record_name=True),
        }
    )
    consumer.subscribe([args.prefix + t for t in args.topics])
    seen: set[uuid.UUID] = set()  # at least once: dedupe on event_id (bound this in production)
    idle = 0.0
    try:
        while args.idle_exit <= 0 or idle < args.idle_exit:
            msg = consumer.poll(1.0)
            if msg is None:
                idle += 1.0
                continue
            idle = 0.0
            if msg.error():
                raise SystemExit(f"consume error: {msg.error()}")
            value = msg.value()
            name, event = value if isinstance(value, tuple) else (SINGLE[msg.topic().removeprefix(args.prefix)], value)
            if event["event_id"] in seen:
                continue  # a re-delivery (relay restart); identical content
            seen.add(event["event_id"])
            # Logical types arrive typed: event_id is a uuid.UUID, occurred_at an aware UTC datetime.
            print(
                json.dumps(
                    {
                        "topic": msg.topic(),
                        "partition": msg.partition(),
                        "offset": msg.offset(),
                        "key": msg.key().decode("utf-8", "backslashreplace") if msg.key() else None,
                        "type": name,
                        "event": event,
                    },
                    default=lambda v: v.hex() if isinstance(v, bytes) else str(v),
                )
            )
    finally:
        consumer.close()


if __name__ == "__main__":
    main()
