"""Reads weir's output topics with stock Confluent deserializers and checks every event.

The analytics side of the event contract (docs/analytics.md): a consumer that knows nothing
about weir but the registry URL decodes every output record, with its logical types (uuid,
timestamp-micros), and the records obey the rules the docs promise.

Invariants:
- ``RECORDS`` has one entry per output record type in schemas/ and names every field of it;
  ``self_check`` fails when a schema gains, loses or renames a record or field the table
  does not know, so the table cannot silently fall behind the contract.
- Checks never depend on arrival order across partitions or topics, only on per-key order
  (all events of one key are in one partition, in order) and on first occurrences: delivery
  is at least once, duplicates (same ``event_id``) must be identical and are then ignored.

Usage: ``python weir_analytics_check.py SPEC.json``, where the spec names the topics to read
and how many distinct events of each record type to expect (see ``run``). Prints a JSON
report on stdout; exits 0 when every check passed, 1 otherwise, 2 on a bad spec.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import sys
import time
import uuid
from collections import defaultdict
from typing import Any, Callable, Optional

UTC = dt.timezone.utc
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
CAS_REF = re.compile(r"^sha256:[0-9a-f]{64}$")
TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")

# Unprefixed output topic -> record full names it may carry (union order of schemas/).
OUTPUT_TOPICS: dict[str, list[str]] = {
    "weir.workflows.v1": ["weir.workflows.WorkflowMaterialized", "weir.workflows.PatchRejected"],
    "weir.node-ready.v1": ["weir.runs.NodeReady"],
    "weir.run-events.v1": [
        "weir.run_events.RunStarted",
        "weir.run_events.RunCompleted",
        "weir.run_events.RunFailed",
        "weir.run_events.RunCancelled",
        "weir.run_events.NodeRetried",
        "weir.run_events.RunStalled",
    ],
    "weir.cache-answers.v1": ["weir.cache.CacheAnswer"],
    "weir.dlq.v1": ["weir.dlq.DeadLetter"],
}

Check = Callable[[Any], Optional[str]]


# --- field checks: each returns None when fine, else what is wrong -----------------------
def string(v: Any) -> Optional[str]:
    return None if isinstance(v, str) else f"expected str, got {type(v).__name__}"


def nonempty(v: Any) -> Optional[str]:
    return string(v) or (None if v else "must not be empty")


def long_(v: Any) -> Optional[str]:
    ok = isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63
    return None if ok else f"expected a long, got {v!r}"


def int_(v: Any) -> Optional[str]:
    ok = isinstance(v, int) and not isinstance(v, bool) and -(2**31) <= v < 2**31
    return None if ok else f"expected an int, got {v!r}"


def at_least(n: int, base: Check = long_) -> Check:
    return lambda v: base(v) or (None if v >= n else f"must be >= {n}, got {v}")


def boolean(v: Any) -> Optional[str]:
    return None if isinstance(v, bool) else f"expected bool, got {v!r}"


def double(v: Any) -> Optional[str]:
    return None if isinstance(v, float) else f"expected float (double), got {v!r}"


def raw_bytes(v: Any) -> Optional[str]:
    return None if isinstance(v, bytes) else f"expected bytes, got {type(v).__name__}"


def uuid7(v: Any) -> Optional[str]:
    """logicalType uuid decodes to uuid.UUID (not str): the writer schema kept it."""
    if not isinstance(v, uuid.UUID):
        return f"expected uuid.UUID (logicalType uuid), got {type(v).__name__} {v!r}"
    return None if v.version == 7 else f"expected a UUIDv7, got version {v.version}"


def uuid_any(v: Any) -> Optional[str]:
    return None if isinstance(v, uuid.UUID) else f"expected uuid.UUID, got {type(v).__name__}"


def timestamp(v: Any) -> Optional[str]:
    """logicalType timestamp-micros decodes to an aware UTC datetime."""
    if not isinstance(v, dt.datetime):
        return f"expected datetime (logicalType timestamp-micros), got {type(v).__name__} {v!r}"
    if v.tzinfo is None or v.utcoffset() != dt.timedelta(0):
        return f"expected a UTC datetime, got tzinfo {v.tzinfo!r}"
    return None


def json_text(kind: type = object) -> Check:
    def check(v: Any) -> Optional[str]:
        if e := string(v):
            return e
        try:
            parsed = json.loads(v)
        except ValueError as e:
            return f"not JSON text: {e}"
        return None if isinstance(parsed, kind) else f"JSON is not a {kind.__name__}"

    return check


def cas_ref(v: Any) -> Optional[str]:
    return string(v) or (None if CAS_REF.match(v) else f"not a CAS ref sha256:<hex>: {v!r}")


def sha256_hex(v: Any) -> Optional[str]:
    return string(v) or (None if SHA256_HEX.match(v) else f"not lowercase hex sha256: {v!r}")


def traceparent(v: Any) -> Optional[str]:
    ok = isinstance(v, str) and (v == "" or TRACEPARENT.match(v))
    return None if ok else f"not a W3C traceparent or empty: {v!r}"


def optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def one_of(*symbols: str) -> Check:
    return lambda v: None if v in symbols else f"expected one of {symbols}, got {v!r}"


def array(item: Check) -> Check:
    def check(v: Any) -> Optional[str]:
        if not isinstance(v, list):
            return f"expected a list, got {type(v).__name__}"
        for i, x in enumerate(v):
            if e := item(x):
                return f"[{i}]: {e}"
        return None

    return check


def record(fields: dict[str, Check], rule: Optional[Callable[[dict], Optional[str]]] = None) -> Check:
    def check(v: Any) -> Optional[str]:
        if not isinstance(v, dict):
            return f"expected a record (dict), got {type(v).__name__}"
        errors = field_errors(fields, v)
        if not errors and rule:
            if e := rule(v):
                errors.append(e)
        return "; ".join(errors) or None

    return check


def field_errors(fields: dict[str, Check], value: dict) -> list[str]:
    errors = []
    if set(value) != set(fields):
        errors.append(
            f"fields differ from the contract: extra {sorted(set(value) - set(fields))}, "
            f"missing {sorted(set(fields) - set(value))}"
        )
    for name, check in fields.items():
        if name in value and (e := check(value[name])):
            errors.append(f"{name}: {e}")
    return errors


# --- rules inside one record ---------------------------------------------------------------
def at_most_one(*names: str) -> Callable[[dict], Optional[str]]:
    def rule(r: dict) -> Optional[str]:
        set_ = [n for n in names if r.get(n) is not None]
        return None if len(set_) <= 1 else f"claim check: at most one of {names} may be set, got {set_}"

    return rule


def exactly_one(*names: str) -> Callable[[dict], Optional[str]]:
    def rule(r: dict) -> Optional[str]:
        set_ = [n for n in names if r.get(n) is not None]
        return None if len(set_) == 1 else f"claim check: exactly one of {names} must be set, got {set_}"

    return rule


def rules(*rs: Callable[[dict], Optional[str]]) -> Callable[[dict], Optional[str]]:
    def rule(r: dict) -> Optional[str]:
        return "; ".join(e for f in rs if (e := f(r))) or None

    return rule


def definition_matches_sha(r: dict) -> Optional[str]:
    sha = r["definition_sha256"]
    if r["definition_json"] is not None:
        got = hashlib.sha256(r["definition_json"].encode()).hexdigest()
        if got != sha:
            return f"sha256(definition_json) {got} != definition_sha256 {sha}"
        if not isinstance(json.loads(r["definition_json"]).get("nodes"), dict):
            return "definition_json has no nodes object"
    if r["definition_ref"] is not None and r["definition_ref"] != f"sha256:{sha}":
        return f"definition_ref {r['definition_ref']} is not sha256:{sha} (the CAS address of the definition)"
    if len(set(r["patch_ids"])) != len(r["patch_ids"]) or not r["patch_ids"]:
        return f"patch_ids must be non-empty and distinct: {r['patch_ids']}"
    return None


def cache_answer_rule(r: dict) -> Optional[str]:
    if r["hit"]:
        if r["kind"] is None or r["result_ref"] is None or r["entry_key"] is None:
            return "a hit has kind, result_ref and entry_key"
        if r["kind"] == "semantic" and r["similarity"] is None:
            return "a semantic hit has a similarity"
        if r["kind"] == "exact" and r["similarity"] is not None:
            return "an exact hit has no similarity"
    elif r["kind"] is not None or r["result_ref"] is not None or r["entry_key"] is not None or r["saved_ms"] != 0:
        return "a miss has no kind, result_ref or entry_key, and saved_ms 0"
    if r["similarity"] is not None and not -1.0 <= r["similarity"] <= 1.0:
        return f"similarity {r['similarity']} outside [-1, 1]"
    return None


def node_ready_rule(r: dict) -> Optional[str]:
    names = [i["node_id"] for i in r["inputs"]]
    if len(set(names)) != len(names):
        return f"inputs name a predecessor twice: {names}"
    if r["node_id"] in names:
        return "a node is not its own input"
    if r["deadline_at"] is not None and r["deadline_at"] <= r["occurred_at"]:
        return "deadline_at is not after occurred_at"
    return at_most_one("run_inputs_json", "run_inputs_ref")(r)


def node_retried_rule(r: dict) -> Optional[str]:
    if r["next_attempt"] != r["failed_attempt"] + 1:
        return f"next_attempt {r['next_attempt']} != failed_attempt + 1"
    if r["retry_at"] < r["occurred_at"] - dt.timedelta(seconds=1):
        return "retry_at is before the event"
    return None


def stalled_rule(r: dict) -> Optional[str]:
    return None if r["last_progress_at"] <= r["occurred_at"] else "last_progress_at is after the event"


# --- the contract: every output record type and every one of its fields --------------------
COMMON: dict[str, Check] = {
    "event_id": uuid7,
    "occurred_at": timestamp,
    "workspace_id": nonempty,
    "traceparent": traceparent,
    "tracestate": optional(string),
}
RUN: dict[str, Check] = {"run_id": nonempty, "workflow_id": nonempty, "version": at_least(1)}

NODE_INPUT = record(
    {"node_id": nonempty, "output_json": optional(json_text()), "output_ref": optional(cas_ref)},
    at_most_one("output_json", "output_ref"),
)
HEADER = record({"key": string, "value": optional(raw_bytes)})

RECORDS: dict[str, tuple[dict[str, Check], Optional[Callable[[dict], Optional[str]]]]] = {
    "weir.workflows.WorkflowMaterialized": (
        {
            **COMMON,
            "workflow_id": nonempty,
            "version": at_least(1),
            "definition_json": optional(json_text(dict)),
            "definition_ref": optional(cas_ref),
            "patch_ids": array(uuid_any),
            "definition_sha256": sha256_hex,
        },
        rules(exactly_one("definition_json", "definition_ref"), definition_matches_sha),
    ),
    "weir.workflows.PatchRejected": (
        {
            **COMMON,
            "workflow_id": nonempty,
            "patch_id": uuid_any,
            "base_version": optional(at_least(0)),
            "head_version": at_least(0),
            "reason_code": nonempty,
            "reason": nonempty,
        },
        None,
    ),
    "weir.runs.NodeReady": (
        {
            **COMMON,
            **RUN,
            "node_id": nonempty,
            "node_type": nonempty,
            "config_json": json_text(dict),
            "inputs": array(NODE_INPUT),
            "attempt": at_least(1, int_),
            "hop": at_least(0, int_),
            "deadline_at": optional(timestamp),
            "run_inputs_json": optional(json_text()),
            "run_inputs_ref": optional(cas_ref),
        },
        node_ready_rule,
    ),
    "weir.run_events.RunStarted": ({**COMMON, **RUN, "requester": string}, None),
    "weir.run_events.RunCompleted": (
        {
            **COMMON,
            **RUN,
            "duration_ms": at_least(0),
            "outputs_json": optional(json_text()),
            "outputs_ref": optional(cas_ref),
        },
        at_most_one("outputs_json", "outputs_ref"),
    ),
    "weir.run_events.RunFailed": (
        # version 0: the run never started (unknown workflow or version).
        {**COMMON, **RUN, "version": at_least(0), "failed_node_id": optional(nonempty), "reason": nonempty},
        None,
    ),
    "weir.run_events.RunCancelled": ({**COMMON, **RUN, "version": at_least(0), "reason": optional(string)}, None),
    "weir.run_events.NodeRetried": (
        {
            **COMMON,
            **RUN,
            "node_id": nonempty,
            "failed_attempt": at_least(1, int_),
            "next_attempt": at_least(2, int_),
            "retry_at": timestamp,
            "error": optional(string),
        },
        node_retried_rule,
    ),
    "weir.run_events.RunStalled": (
        {**COMMON, **RUN, "idle_ms": at_least(0), "last_progress_at": timestamp},
        stalled_rule,
    ),
    "weir.cache.CacheAnswer": (
        {
            **COMMON,
            "request_id": nonempty,
            "hit": boolean,
            "kind": optional(one_of("exact", "semantic")),
            "similarity": optional(double),
            "result_ref": optional(cas_ref),
            "saved_ms": at_least(0),
            "entry_key": optional(nonempty),
        },
        cache_answer_rule,
    ),
    "weir.dlq.DeadLetter": (
        {
            **COMMON,
            # "" when the original could not be decoded (the usual reason to be here).
            "workspace_id": string,
            "source_topic": nonempty,
            "source_partition": at_least(0, int_),
            "source_offset": at_least(0),
            "consumer_group": nonempty,
            "error_class": nonempty,
            "error_message": nonempty,
            "original_key": optional(raw_bytes),
            "original_value": optional(raw_bytes),
            "original_headers": array(HEADER),
        },
        None,
    ),
}

# The field carrying each record's Kafka key (DeadLetter: the original key, see key_of).
KEY_FIELD = {
    "weir.workflows.WorkflowMaterialized": "workflow_id",
    "weir.workflows.PatchRejected": "workflow_id",
    "weir.cache.CacheAnswer": "workspace_id",
}
# Headers of a dead letter that repeat its fields.
DLQ_HEADERS = {
    "weir.dlq.source.topic": "source_topic",
    "weir.dlq.source.partition": "source_partition",
    "weir.dlq.source.offset": "source_offset",
    "weir.dlq.consumer.group": "consumer_group",
    "weir.dlq.error.class": "error_class",
    "weir.dlq.error.message": "error_message",
}
TERMINAL = {"weir.run_events.RunCompleted", "weir.run_events.RunFailed", "weir.run_events.RunCancelled"}


def check_record(name: str, value: Any) -> list[str]:
    """Field checks of one decoded record; [] when it satisfies the contract."""
    if name not in RECORDS:
        return [f"unknown record type {name}"]
    fields, rule = RECORDS[name]
    if not isinstance(value, dict):
        return [f"expected a record (dict), got {type(value).__name__}"]
    errors = field_errors(fields, value)
    if not errors and rule and (e := rule(value)):
        errors.append(e)
    return errors


def expected_key(name: str, value: dict) -> bytes:
    if name == "weir.dlq.DeadLetter":
        # The original record's key; a keyless original is keyed by its topic.
        return value["original_key"] if value["original_key"] is not None else value["source_topic"].encode()
    return value[KEY_FIELD.get(name, "run_id")].encode()


# --- the contract against schemas/ ---------------------------------------------------------
def self_check(schemas_dir: str) -> list[str]:
    """Every output record type and field in schemas/ has a check here, and nothing more."""
    errors = []
    for topic, names in OUTPUT_TOPICS.items():
        with open(os.path.join(schemas_dir, f"{topic}.avsc")) as f:
            schema = json.load(f)
        branches = schema if isinstance(schema, list) else [schema]
        got = [f"{b['namespace']}.{b['name']}" for b in branches]
        if got != names:
            errors.append(f"{topic}: schema records {got}, checker knows {names}")
        for b in branches:
            name = f"{b['namespace']}.{b['name']}"
            if name not in RECORDS:
                continue
            in_schema = [fl["name"] for fl in b["fields"]]
            if set(in_schema) != set(RECORDS[name][0]):
                errors.append(f"{name}: schema fields {sorted(in_schema)} != checked {sorted(RECORDS[name][0])}")
    return errors


# --- reading -------------------------------------------------------------------------------
class Event:
    """One delivered record, decoded."""

    def __init__(self, topic: str, partition: int, offset: int, key: Optional[bytes], headers: dict, name: str, value: dict):
        self.topic, self.partition, self.offset = topic, partition, offset
        self.key, self.headers, self.name, self.value = key, headers, name, value


def read(spec: dict, report: dict) -> list[Event]:
    """Reads the spec's topics from the beginning until every expected count is reached and
    `settle_s` passed without news (or `timeout_s`)."""
    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    # A bounded wait per registry request (retried by the client): a request the registry
    # never answers must fail the check, not hang it.
    registry = SchemaRegistryClient({"url": spec["schema_registry_url"], "timeout": 10})
    # Stock deserializer; return_record_name tells which union branch the writer used.
    deserializer = AvroDeserializer(registry, return_record_name=True)
    consumer = Consumer(
        {
            "bootstrap.servers": spec["bootstrap_servers"],
            "group.id": f"weir-analytics-check-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    topics = spec["topics"]  # unprefixed -> actual name
    by_actual = {actual: base for base, actual in topics.items()}
    assignment = []
    for actual in topics.values():
        meta = consumer.list_topics(actual, timeout=10).topics[actual]
        if meta.error is not None:
            raise RuntimeError(f"topic {actual}: {meta.error}")
        assignment += [TopicPartition(actual, p, -2) for p in meta.partitions]  # -2: beginning
    consumer.assign(assignment)

    expect: dict[str, int] = spec["expect"]
    seen_ids: dict[str, set] = defaultdict(set)
    events: list[Event] = []
    deadline = time.monotonic() + spec.get("timeout_s", 120)
    settle = spec.get("settle_s", 2.0)
    last_news = time.monotonic()
    try:
        while time.monotonic() < deadline:
            done = all(len(seen_ids[n]) >= c for n, c in expect.items())
            if done and time.monotonic() - last_news >= settle:
                break
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error():
                report["errors"].append(f"consume: {msg.error()}")
                continue
            last_news = time.monotonic()
            base = by_actual[msg.topic()]
            where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
            try:
                decoded = deserializer(msg.value(), SerializationContext(msg.topic(), MessageField.VALUE))
            except Exception as e:  # noqa: BLE001 -- any decode failure is a contract failure
                report["errors"].append(f"{where}: stock AvroDeserializer failed: {e!r}")
                continue
            if isinstance(decoded, tuple):
                name, value = decoded
            else:  # a single-record topic: the record itself
                name, value = OUTPUT_TOPICS[base][0], decoded
            if name not in OUTPUT_TOPICS[base]:
                report["errors"].append(f"{where}: {name} does not belong on {base}")
                continue
            headers = {k: v for k, v in (msg.headers() or [])}
            events.append(Event(msg.topic(), msg.partition(), msg.offset(), msg.key(), headers, name, value))
            if isinstance(value, dict) and "event_id" in value:
                seen_ids[name].add(value["event_id"])
    finally:
        consumer.close()
    return events


# --- checks across records -----------------------------------------------------------------
def check_events(events: list[Event], spec: dict, report: dict) -> None:
    errors = report["errors"]
    since = dt.datetime.fromtimestamp(spec.get("since_micros", 0) / 1e6, UTC) - dt.timedelta(minutes=1)
    now = dt.datetime.now(UTC) + dt.timedelta(minutes=1)
    first: dict[Any, Event] = {}
    distinct: list[Event] = []  # first occurrences, in per-partition order
    for ev in sorted(events, key=lambda e: (e.topic, e.partition, e.offset)):
        where = f"{ev.topic}[{ev.partition}]@{ev.offset} {ev.name}"
        problems = check_record(ev.name, ev.value)
        if problems:
            errors += [f"{where}: {p}" for p in problems]
            continue
        v = ev.value
        eid = v["event_id"]
        if eid in first:
            if first[eid].value != v or first[eid].name != ev.name:
                errors.append(f"{where}: duplicate event_id {eid} with different content")
            report["duplicates"] += 1
            continue
        first[eid] = ev
        distinct.append(ev)
        if not since <= v["occurred_at"] <= now:
            errors.append(f"{where}: occurred_at {v['occurred_at']} outside this run")
        # A UUIDv7 carries its creation time in ms; weir makes the id when the event happens.
        id_time = dt.datetime.fromtimestamp((eid.int >> 80) / 1000, UTC)
        if abs(id_time - v["occurred_at"]) > dt.timedelta(seconds=60):
            errors.append(f"{where}: event_id time {id_time} far from occurred_at {v['occurred_at']}")
        key = expected_key(ev.name, v)
        if ev.key != key:
            errors.append(f"{where}: Kafka key {ev.key!r}, expected {key!r}")
        if ev.name == "weir.dlq.DeadLetter":
            # The same facts as headers, for tools that do not decode Avro.
            for header, field in DLQ_HEADERS.items():
                if ev.headers.get(header) != str(v[field]).encode():
                    errors.append(f"{where}: header {header} {ev.headers.get(header)!r} != {field} {v[field]!r}")
        else:
            # The relay publishes the outbox headers: event_id and workspace_id for dedupe and routing.
            if ev.headers.get("event_id") != str(eid).encode():
                errors.append(f"{where}: header event_id {ev.headers.get('event_id')!r} != {eid}")
            if ev.headers.get("workspace_id") != v["workspace_id"].encode():
                errors.append(f"{where}: header workspace_id {ev.headers.get('workspace_id')!r}")
    counts: dict[str, int] = defaultdict(int)
    for ev in distinct:
        counts[ev.name] += 1
    # What the run exercised, so a test can demand both sides of the claim checks etc.
    report["facts"] = {
        "inline_definitions": sum(1 for e in distinct if e.value.get("definition_json") is not None),
        "definition_refs": sum(1 for e in distinct if e.value.get("definition_ref") is not None),
        "with_traceparent": sum(1 for e in distinct if e.value["traceparent"]),
        "keyless_dead_letters": sum(1 for e in distinct if e.name == "weir.dlq.DeadLetter" and e.value["original_key"] is None),
    }
    report["counts"] = dict(sorted(counts.items()))
    for name, want in spec["expect"].items():
        if counts.get(name, 0) != want:
            errors.append(f"{name}: {counts.get(name, 0)} distinct events, expected {want}")
    for name in counts:
        if name not in spec["expect"]:
            errors.append(f"{name}: {counts[name]} unexpected events")
    check_workflows([e for e in distinct if e.name.startswith("weir.workflows.")], spec, errors)
    check_runs(distinct, spec, errors)
    check_cache([e for e in distinct if e.name == "weir.cache.CacheAnswer"], spec, errors)
    check_dead_letters([e for e in distinct if e.name == "weir.dlq.DeadLetter"], spec, errors)


def check_workflows(events: list[Event], spec: dict, errors: list[str]) -> None:
    """Per workflow, in order: versions 1, 2, 3, ...; a rejection names the head at that point.
    A workflow is (workspace_id, workflow_id): ids are unique per workspace only."""
    head: dict[str, int] = {}
    applied: dict[uuid.UUID, str] = {}
    rejected: dict[uuid.UUID, str] = {}
    for ev in events:
        v = ev.value
        wf = f"{v['workspace_id']}/{v['workflow_id']}"
        if ev.name == "weir.workflows.WorkflowMaterialized":
            if v["version"] != head.get(wf, 0) + 1:
                errors.append(f"{wf}: version {v['version']} after {head.get(wf, 0)} (must be contiguous, in order)")
            head[wf] = v["version"]
            for p in v["patch_ids"]:
                if p in applied or p in rejected:
                    errors.append(f"{wf}: patch {p} decided twice")
                applied[p] = wf
        else:
            if v["head_version"] != head.get(wf, 0):
                errors.append(f"{wf}: PatchRejected.head_version {v['head_version']}, head was {head.get(wf, 0)}")
            if v["patch_id"] in applied or v["patch_id"] in rejected:
                errors.append(f"{wf}: patch {v['patch_id']} decided twice")
            rejected[v["patch_id"]] = v["reason_code"]
    for pid, code in spec.get("rejected_patches", {}).items():
        got = rejected.get(uuid.UUID(pid))
        if got != code:
            errors.append(f"patch {pid}: expected PatchRejected {code}, got {got}")
    for pid in spec.get("applied_patches", []):
        if uuid.UUID(pid) not in applied:
            errors.append(f"patch {pid}: expected in a WorkflowMaterialized")


def check_runs(distinct: list[Event], spec: dict, errors: list[str]) -> None:
    """Run lifecycle per run_id: RunStarted first, one terminal event last, one pinned
    version; NodeReady attempts per node count up from 1 and belong to a started run."""
    runs: dict[str, list[Event]] = defaultdict(list)
    ready: dict[str, list[Event]] = defaultdict(list)
    for ev in distinct:
        if ev.name.startswith("weir.run_events."):
            runs[ev.value["run_id"]].append(ev)
        elif ev.name == "weir.runs.NodeReady":
            ready[ev.value["run_id"]].append(ev)
    reading_lifecycle = "weir.run-events.v1" in spec["topics"]
    for run, evs in runs.items():
        started = evs[0]
        never_started = len(evs) == 1 and started.name in TERMINAL - {"weir.run_events.RunCompleted"}
        if started.name != "weir.run_events.RunStarted" and not never_started:
            errors.append(f"run {run}: first event is {started.name}, not RunStarted")
        pinned = {(e.value["workflow_id"], e.value["version"], e.value["workspace_id"]) for e in evs + ready.get(run, [])}
        if len(pinned) != 1:
            errors.append(f"run {run}: workflow/version/workspace not constant: {sorted(pinned)}")
        terminals = [i for i, e in enumerate(evs) if e.name in TERMINAL]
        if len(terminals) > 1 or (terminals and terminals[0] != len(evs) - 1):
            errors.append(f"run {run}: terminal events {[evs[i].name for i in terminals]} must be one, and last")
        for e in evs:
            if e.name == "weir.run_events.RunCompleted":
                span_ms = (e.value["occurred_at"] - started.value["occurred_at"]) / dt.timedelta(milliseconds=1)
                if e.value["duration_ms"] > span_ms + 5_000:
                    errors.append(f"run {run}: duration_ms {e.value['duration_ms']} exceeds RunStarted..RunCompleted {span_ms:.0f} ms")
                retried = {(r.value["node_id"], r.value["next_attempt"]) for r in evs if r.name == "weir.run_events.NodeRetried"}
                dispatched = {(r.value["node_id"], r.value["attempt"]) for r in ready.get(run, [])}
                if "weir.node-ready.v1" in spec["topics"] and not retried <= dispatched:
                    errors.append(f"run {run}: completed, but retries {sorted(retried - dispatched)} were never dispatched")
                if "weir.node-ready.v1" in spec["topics"] and not dispatched:
                    errors.append(f"run {run}: completed without any NodeReady")
    for run, evs in ready.items():
        if reading_lifecycle and run not in runs:
            errors.append(f"run {run}: NodeReady without RunStarted")
        last: dict[str, int] = {}
        for e in evs:
            node, attempt = e.value["node_id"], e.value["attempt"]
            if attempt != last.get(node, 0) + 1:
                errors.append(f"run {run} node {node}: attempt {attempt} after {last.get(node, 0)}")
            last[node] = attempt


def check_cache(events: list[Event], spec: dict, errors: list[str]) -> None:
    """One answer per lookup; the expected hits and misses when the spec names them."""
    answers: dict[str, dict] = {}
    for ev in events:
        rid = ev.value["request_id"]
        if rid in answers:
            errors.append(f"cache request {rid}: answered twice")
        answers[rid] = ev.value
    for rid, want in spec.get("cache_answers", {}).items():
        got = answers.get(rid)
        if got is None:
            errors.append(f"cache request {rid}: no answer")
        elif got["hit"] != want["hit"] or got["kind"] != want.get("kind"):
            errors.append(f"cache request {rid}: hit={got['hit']} kind={got['kind']}, expected {want}")


def check_dead_letters(events: list[Event], spec: dict, errors: list[str]) -> None:
    """Each expected poison record is there, byte for byte, with where it came from."""
    letters = [e.value for e in events]
    for want in spec.get("dead_letters", []):
        original = bytes.fromhex(want["original_value_hex"])
        match = [
            d
            for d in letters
            if d["source_topic"] == want["source_topic"]
            and d["original_value"] == original
            and d["source_offset"] == want.get("source_offset", d["source_offset"])
        ]
        if len(match) != 1:
            errors.append(f"dead letter {want}: {len(match)} matching DeadLetter events, expected 1")
            continue
        d = match[0]
        if "error_class" in want and d["error_class"] != want["error_class"]:
            errors.append(f"dead letter from {d['source_topic']}@{d['source_offset']}: error_class {d['error_class']}, expected {want['error_class']}")
        if "original_key" in want and d["original_key"] != want["original_key"].encode():
            errors.append(f"dead letter from {d['source_topic']}@{d['source_offset']}: original_key {d['original_key']!r}")


def run(spec: dict) -> dict:
    """Spec keys: bootstrap_servers, schema_registry_url, schemas_dir, topics (unprefixed
    output topic -> actual name), expect (record full name -> distinct events expected; any
    other type is an error), and optionally since_micros, timeout_s, settle_s,
    applied_patches [patch_id], rejected_patches {patch_id: reason_code},
    dead_letters [{source_topic, original_value_hex, source_offset?, error_class?, original_key?}],
    cache_answers {request_id: {hit, kind}}."""
    report: dict[str, Any] = {"ok": False, "errors": [], "duplicates": 0, "counts": {}, "facts": {}}
    report["errors"] += self_check(spec["schemas_dir"])
    for base in spec["topics"]:
        if base not in OUTPUT_TOPICS:
            raise ValueError(f"not an output topic: {base}")
    for name in spec["expect"]:
        if name not in RECORDS:
            raise ValueError(f"not an output record type: {name}")
    events = read(spec, report)
    check_events(events, spec, report)
    report["ok"] = not report["errors"]
    return report


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        spec = json.load(f)
    try:
        report = run(spec)
    except (KeyError, ValueError) as e:
        print(f"bad spec: {e!r}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
