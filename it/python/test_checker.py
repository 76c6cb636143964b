"""The checker itself: a valid event of every output record type passes after an Avro round
trip through schemas/ (fastavro, as AvroDeserializer decodes), and each broken variant fails.

These samples are what the end-to-end test cannot produce yet for types whose processor is
not running in it; the field checks for those types are exercised here.
Run: python -m unittest discover -s it/python   (it/tests/analytics.rs does).
"""

import copy
import datetime as dt
import hashlib
import io
import json
import os
import unittest
import uuid

import fastavro

import weir_analytics_check as c

SCHEMAS = os.path.join(os.path.dirname(__file__), "..", "..", "schemas")
NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=123456)


def uuid7() -> uuid.UUID:
    ms = int(NOW.timestamp() * 1000)
    rand = uuid.uuid4().int & ((1 << 74) - 1)
    value = (ms << 80) | (0x7 << 76) | ((rand >> 62) << 64) | (0b10 << 62) | (rand & ((1 << 62) - 1))
    return uuid.UUID(int=value)


def common(ws: str = "ws-1") -> dict:
    return {
        "event_id": uuid7(),
        "occurred_at": NOW,
        "workspace_id": ws,
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": None,
    }


DEFINITION = json.dumps({"edges": [], "nodes": {"a": {"config": {}, "type": "function"}}}, separators=(",", ":"))
SHA = hashlib.sha256(DEFINITION.encode()).hexdigest()
RUN = {"run_id": "run-1", "workflow_id": "wf-1", "version": 3}

SAMPLES = {
    "weir.workflows.WorkflowMaterialized": {
        **common(), "workflow_id": "wf-1", "version": 1, "definition_json": DEFINITION,
        "definition_ref": None, "patch_ids": [uuid7()], "definition_sha256": SHA,
    },
    "weir.workflows.PatchRejected": {
        **common(), "workflow_id": "wf-1", "patch_id": uuid7(), "base_version": 7,
        "head_version": 1, "reason_code": "version_conflict", "reason": "base 7, head 1",
    },
    "weir.runs.NodeReady": {
        **common(), **RUN, "node_id": "b", "node_type": "pure", "config_json": "{}",
        "inputs": [{"node_id": "a", "output_json": "{\"x\":1}", "output_ref": None}],
        "attempt": 1, "hop": 1, "deadline_at": NOW + dt.timedelta(seconds=30),
        "run_inputs_json": None, "run_inputs_ref": "sha256:" + SHA,
    },
    "weir.run_events.RunStarted": {**common(), **RUN, "requester": "ada"},
    "weir.run_events.RunCompleted": {
        **common(), **RUN, "duration_ms": 0, "outputs_json": "{\"b\":{}}", "outputs_ref": None,
    },
    "weir.run_events.RunFailed": {**common(), **RUN, "failed_node_id": "b", "reason": "attempts exhausted"},
    "weir.run_events.RunCancelled": {**common(), **RUN, "reason": None},
    "weir.run_events.NodeRetried": {
        **common(), **RUN, "node_id": "b", "failed_attempt": 1, "next_attempt": 2,
        "retry_at": NOW + dt.timedelta(seconds=2), "error": "deadline exceeded",
    },
    "weir.run_events.RunStalled": {
        **common(), **RUN, "idle_ms": 60_000, "last_progress_at": NOW - dt.timedelta(minutes=1),
    },
    "weir.cache.CacheAnswer": {
        **common(), "request_id": "req-1", "hit": True, "kind": "semantic", "similarity": 0.97,
        "result_ref": "sha256:" + SHA, "saved_ms": 1200, "entry_key": "entry-1",
    },
    "weir.dlq.DeadLetter": {
        **common(""), "source_topic": "weir.patches.v1", "source_partition": 2, "source_offset": 41,
        "consumer_group": "weir-materializer", "error_class": "decode", "error_message": "bad magic byte",
        "original_key": b"wf-1", "original_value": b"not avro",
        "original_headers": [{"key": "event_id", "value": None}],
    },
}

# (record, field, value, what the error mentions): each must fail the checks.
BROKEN = [
    ("weir.workflows.WorkflowMaterialized", "definition_sha256", "0" * 64, "sha256(definition_json)"),
    ("weir.workflows.WorkflowMaterialized", "definition_ref", "sha256:" + SHA, "exactly one of"),
    ("weir.workflows.WorkflowMaterialized", "patch_ids", [], "patch_ids"),
    ("weir.workflows.WorkflowMaterialized", "version", 0, "version"),
    ("weir.workflows.PatchRejected", "reason_code", "", "reason_code"),
    ("weir.runs.NodeReady", "attempt", 0, "attempt"),
    ("weir.runs.NodeReady", "config_json", "[1]", "config_json"),
    ("weir.runs.NodeReady", "run_inputs_json", "{}", "at most one of"),
    ("weir.runs.NodeReady", "deadline_at", NOW - dt.timedelta(seconds=1), "deadline_at"),
    ("weir.runs.NodeReady", "inputs", [{"node_id": "a", "output_json": "{}", "output_ref": "sha256:" + SHA}], "inputs"),
    ("weir.run_events.RunCompleted", "outputs_ref", "sha256:" + SHA, "at most one of"),
    ("weir.run_events.RunCompleted", "duration_ms", -1, "duration_ms"),
    ("weir.run_events.NodeRetried", "next_attempt", 3, "next_attempt"),
    ("weir.run_events.RunStalled", "last_progress_at", NOW + dt.timedelta(minutes=1), "last_progress_at"),
    ("weir.cache.CacheAnswer", "result_ref", None, "a hit has"),
    ("weir.cache.CacheAnswer", "similarity", None, "semantic hit"),
    ("weir.cache.CacheAnswer", "kind", "fuzzy", "kind"),
    ("weir.dlq.DeadLetter", "source_offset", -1, "source_offset"),
    ("weir.dlq.DeadLetter", "error_class", "", "error_class"),
]


def parsed_topic_schemas() -> dict:
    named: dict = {}
    out = {}
    # node-ready defines NodeInput, dlq defines Header: parse each topic with shared names.
    for topic in c.OUTPUT_TOPICS:
        with open(os.path.join(SCHEMAS, f"{topic}.avsc")) as f:
            out[topic] = fastavro.parse_schema(json.load(f), named_schemas=named)
    return out


def round_trip(schema, name: str, value: dict):
    """Writes `value` as branch `name` and reads it back as AvroDeserializer does."""
    buf = io.BytesIO()
    datum = (name, value) if isinstance(schema, list) else value
    fastavro.schemaless_writer(buf, schema, datum)
    buf.seek(0)
    return fastavro.schemaless_reader(buf, schema, schema, return_record_name=True)


def event(name: str, value: dict, partition: int = 0, offset: int = 0) -> c.Event:
    key = c.expected_key(name, value)
    headers = {"event_id": str(value["event_id"]).encode(), "workspace_id": value["workspace_id"].encode()}
    if name == "weir.dlq.DeadLetter":
        headers = {h: str(value[f]).encode() for h, f in c.DLQ_HEADERS.items()}
    return c.Event("t", partition, offset, key, headers, name, value)


class RecordChecks(unittest.TestCase):
    def test_the_table_covers_every_output_record_and_field(self):
        self.assertEqual(c.self_check(SCHEMAS), [])
        self.assertEqual(set(SAMPLES), set(c.RECORDS))

    def test_every_record_type_passes_after_an_avro_round_trip(self):
        schemas = parsed_topic_schemas()
        for topic, names in c.OUTPUT_TOPICS.items():
            for name in names:
                decoded = round_trip(schemas[topic], name, SAMPLES[name])
                if isinstance(decoded, tuple):
                    self.assertEqual(decoded[0], name)
                    decoded = decoded[1]
                self.assertEqual(c.check_record(name, decoded), [], name)
                # Logical types survive: uuid and timestamp-micros come back typed.
                self.assertIsInstance(decoded["event_id"], uuid.UUID)
                self.assertEqual(decoded["occurred_at"], NOW)

    def test_each_broken_variant_fails(self):
        for name, field, value, mention in BROKEN:
            bad = copy.deepcopy(SAMPLES[name])
            bad[field] = value
            errors = c.check_record(name, bad)
            self.assertTrue(any(mention in e for e in errors), f"{name}.{field}={value!r}: {errors}")

    def test_wrong_types_and_lost_logical_types_fail(self):
        ok = SAMPLES["weir.run_events.RunStarted"]
        for field, value in [
            ("event_id", str(ok["event_id"])),  # uuid as plain string: logical type lost
            ("event_id", uuid.uuid4()),  # not a v7
            ("occurred_at", int(NOW.timestamp() * 1e6)),  # timestamp-micros as a plain long
            ("occurred_at", NOW.replace(tzinfo=None)),
            ("traceparent", "garbage"),
            ("version", "3"),
        ]:
            bad = dict(ok, **{field: value})
            self.assertNotEqual(c.check_record("weir.run_events.RunStarted", bad), [], field)
        extra = dict(ok, surprise=1)
        self.assertIn("extra ['surprise']", c.check_record("weir.run_events.RunStarted", extra)[0])
        missing = {k: v for k, v in ok.items() if k != "requester"}
        self.assertIn("missing ['requester']", c.check_record("weir.run_events.RunStarted", missing)[0])


class RelationChecks(unittest.TestCase):
    def spec(self, expect: dict, topics=("weir.workflows.v1", "weir.run-events.v1", "weir.node-ready.v1")) -> dict:
        return {"expect": expect, "topics": {t: t for t in topics}, "since_micros": 0}

    def materialized(self, version: int, **kw) -> dict:
        return dict(copy.deepcopy(SAMPLES["weir.workflows.WorkflowMaterialized"]), **common(), version=version, patch_ids=[uuid7()], **kw)

    def check(self, events, expect) -> list:
        report = {"errors": [], "duplicates": 0}
        c.check_events(events, self.spec(expect), report)
        return report["errors"]

    def test_workflow_versions_and_rejections_follow_the_head(self):
        m = "weir.workflows.WorkflowMaterialized"
        r = "weir.workflows.PatchRejected"
        v1, v2 = self.materialized(1), self.materialized(2)
        rej = dict(SAMPLES[r], **common(), head_version=2)
        good = [event(m, v1, 0, 0), event(m, v1, 0, 1), event(m, v2, 0, 2), event(r, rej, 0, 3)]
        self.assertEqual(self.check(good, {m: 2, r: 1}), [])
        gap = [event(m, v1, 0, 0), event(m, self.materialized(3), 0, 1)]
        self.assertTrue(any("contiguous" in e for e in self.check(gap, {m: 2})))
        stale = [event(m, v1, 0, 0), event(m, v2, 0, 1), event(r, dict(rej, head_version=1), 0, 2)]
        self.assertTrue(any("head_version" in e for e in self.check(stale, {m: 2, r: 1})))
        self.assertTrue(any("expected 3" in e for e in self.check(good, {m: 3, r: 1})))
        changed = dict(v1, version=2, event_id=v1["event_id"])
        self.assertTrue(any("different content" in e for e in self.check([event(m, v1), event(m, changed, 0, 1)], {m: 1})))

    def test_keys_and_headers_must_match_the_record(self):
        m = "weir.workflows.WorkflowMaterialized"
        ev = event(m, self.materialized(1))
        ev.key = b"another-workflow"
        ev.headers["event_id"] = b"x"
        errors = self.check([ev], {m: 1})
        self.assertTrue(any("Kafka key" in e for e in errors))
        self.assertTrue(any("header event_id" in e for e in errors))

    def test_run_lifecycle(self):
        names = {n.split(".")[-1]: n for n in c.RECORDS}

        def ev(n, offset, **kw):
            return event(names[n], dict(copy.deepcopy(SAMPLES[names[n]]), **common(), **kw), 0, offset)

        ready = [ev("NodeReady", 0, attempt=1), ev("NodeReady", 1, attempt=2)]
        life = [ev("RunStarted", 0), ev("NodeRetried", 1), ev("RunStalled", 2), ev("RunCompleted", 3)]
        expect = {names["NodeReady"]: 2, names["RunStarted"]: 1, names["NodeRetried"]: 1, names["RunStalled"]: 1, names["RunCompleted"]: 1}
        for e in life:
            e.topic = "life"
        self.assertEqual(self.check(ready + life, expect), [])
        errors = self.check(ready[1:] + life, dict(expect, **{names["NodeReady"]: 1}))
        self.assertTrue(any("attempt 2 after 0" in e for e in errors), errors)
        errors = self.check(ready[:1] + life, dict(expect, **{names["NodeReady"]: 1}))
        self.assertTrue(any("never dispatched" in e for e in errors), errors)
        wrong = [ev("RunCompleted", 0), ev("RunStarted", 1)]
        for e in wrong:
            e.topic = "life"
        errors = self.check(wrong, {names["RunCompleted"]: 1, names["RunStarted"]: 1})
        self.assertTrue(any("not RunStarted" in e for e in errors), errors)
        self.assertTrue(any("must be one, and last" in e for e in errors), errors)
        only_failed = [ev("RunFailed", 0, version=0, failed_node_id=None)]
        self.assertEqual(self.check(only_failed, {names["RunFailed"]: 1}), [])
        other_version = ready + [ev("RunStarted", 0, version=9)]
        other_version[-1].topic = "life"
        errors = self.check(other_version, {names["NodeReady"]: 2, names["RunStarted"]: 1})
        self.assertTrue(any("not constant" in e for e in errors), errors)

    def test_cache_answers_and_dead_letters_match_what_was_asked(self):
        a = "weir.cache.CacheAnswer"
        d = "weir.dlq.DeadLetter"
        answer = dict(SAMPLES[a], **common())
        letter = dict(SAMPLES[d], **common(""))
        spec = self.spec({a: 1, d: 1}, topics=("weir.cache-answers.v1", "weir.dlq.v1"))
        spec["cache_answers"] = {"req-1": {"hit": True, "kind": "semantic"}}
        spec["dead_letters"] = [{"source_topic": "weir.patches.v1", "original_value_hex": b"not avro".hex(), "error_class": "decode"}]
        report = {"errors": [], "duplicates": 0}
        c.check_events([event(a, answer), event(d, letter, 1)], spec, report)
        self.assertEqual(report["errors"], [])
        spec["cache_answers"] = {"req-1": {"hit": False}, "req-2": {"hit": False}}
        spec["dead_letters"][0]["error_class"] = "invalid"
        report = {"errors": [], "duplicates": 0}
        bad_header = event(d, letter, 1)
        bad_header.headers["weir.dlq.source.offset"] = b"40"
        c.check_events([event(a, answer), bad_header], spec, report)
        self.assertEqual(len(report["errors"]), 4, report["errors"])
        self.assertTrue(any("weir.dlq.source.offset" in e for e in report["errors"]), report["errors"])


if __name__ == "__main__":
    unittest.main()
