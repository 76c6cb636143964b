//! The contract's tests: every schema parses, every record mirrors its schema field for field
//! and round-trips through the binary encoding, union branches are chosen by name.

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema::{SchemaKind, UuidSchema};
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;

use super::*;

fn meta(ws: &str) -> (Uuid, i64, String, String, Option<String>) {
    (
        new_event_id(),
        now_micros(),
        ws.to_owned(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        Some("rojo=00f067aa0ba902b7".to_owned()),
    )
}

/// Fills the five common fields, then the given ones, and checks that the struct's fields
/// are the schema's fields in the schema's order (nested records included).
macro_rules! ev {
    ($ty:ident, $ws:expr, { $($f:ident : $v:expr),* $(,)? }) => {{
        let (event_id, occurred_at, workspace_id, traceparent, tracestate) = meta($ws);
        let e = $ty { event_id, occurred_at, workspace_id, traceparent, tracestate, $($f: $v),* };
        check_field_order(&e);
        e
    }};
}

fn check_field_order<R: Record>(record: &R) {
    let schema = ALL_TOPICS
        .iter()
        .find_map(|(t, _)| topic_schema(t).unwrap().record_schema(R::FULL_NAME))
        .unwrap_or_else(|| panic!("{} is in no topic schema", R::FULL_NAME));
    same_shape(
        R::FULL_NAME,
        &apache_avro::to_value(record).unwrap(),
        schema,
    );
}

fn same_shape(at: &str, value: &Value, schema: &Schema) {
    match (value, schema) {
        (Value::Record(fields), Schema::Record(r)) => {
            let rust: Vec<_> = fields.iter().map(|(k, _)| k.as_str()).collect();
            let avro: Vec<_> = r.fields.iter().map(|f| f.name.as_str()).collect();
            assert_eq!(rust, avro, "{at}: Rust fields = schema fields, in order");
            for ((k, v), f) in fields.iter().zip(&r.fields) {
                same_shape(&format!("{at}.{k}"), v, &f.schema);
            }
        }
        (Value::Array(items), Schema::Array(a)) => {
            items.iter().for_each(|v| same_shape(at, v, &a.items));
        }
        (Value::Union(_, inner), Schema::Union(u)) if **inner != Value::Null => {
            let non_null: Vec<_> = u
                .variants()
                .iter()
                .filter(|v| !matches!(v, Schema::Null))
                .collect();
            assert_eq!(non_null.len(), 1, "{at}: nullable = [null, T]");
            same_shape(at, inner, non_null[0]);
        }
        _ => {}
    }
}

fn s(x: &str) -> String {
    x.to_owned()
}

fn patch() -> PatchSubmitted {
    ev!(PatchSubmitted, "ws-1", {
        patch_id: new_event_id(), workflow_id: s("wf-1"), author: s("ada"),
        base_version: Some(3),
        operations_json: s(r#"[{"op":"add","path":"/nodes/a","value":{"type":"pure"}}]"#),
        operations_ref: None,
    })
}

fn workflow_events() -> Vec<WorkflowEvent> {
    vec![
        ev!(WorkflowMaterialized, "ws-1", {
            workflow_id: s("wf-1"), version: 4, definition_json: Some(s("{\"nodes\":{}}")),
            definition_ref: None, patch_ids: vec![new_event_id(), new_event_id()],
            definition_sha256: s("ab".repeat(32).as_str()),
        })
        .into(),
        ev!(PatchRejected, "ws-1", {
            workflow_id: s("wf-1"), patch_id: new_event_id(), base_version: None,
            head_version: 4, reason_code: s("test_failed"), reason: s("/a is not 1"),
        })
        .into(),
    ]
}

fn completion_events() -> Vec<CompletionEvent> {
    vec![
        ev!(RunRequested, "ws-1", {
            run_id: s("run-1"), workflow_id: s("wf-1"), version: None, requester: s("ada"),
            permission: s("write"), inputs_json: Some(s("{\"x\":1}")), inputs_ref: None,
            idempotency_key: Some(s("k-1")),
        })
        .into(),
        ev!(NodeCompleted, "ws-1", {
            run_id: s("run-1"), node_id: s("fetch"), attempt: 2, status: NodeStatus::Failed,
            output_json: None, output_ref: Some(s("sha256:00ff").into()), error: Some(s("timeout")),
            duration_ms: 1234, worker_id: s("w-7"), from_cache: true,
        })
        .into(),
        ev!(RunCancelRequested, "ws-1", {
            run_id: s("run-1"), reason: Some(s("user")), requester: s("ada"),
        })
        .into(),
    ]
}

fn node_ready() -> NodeReady {
    ev!(NodeReady, "ws-1", {
        run_id: s("run-1"), workflow_id: s("wf-1"), version: 4, node_id: s("summarize"),
        node_type: s("agent"), config_json: s("{\"model\":\"m\"}"),
        inputs: vec![
            NodeInput { node_id: s("fetch"), output_json: Some(s("{}")), output_ref: None },
            NodeInput { node_id: s("b"), output_json: None, output_ref: Some(s("sha256:ab").into()) },
        ],
        attempt: 1, hop: 2, deadline_at: Some(now_micros() + 30_000_000),
        run_inputs_json: None, run_inputs_ref: Some(s("sha256:cd").into()),
    })
}

fn run_events() -> Vec<RunEvent> {
    vec![
        ev!(RunStarted, "ws-1", {
            run_id: s("run-1"), workflow_id: s("wf-1"), version: 4, requester: s("ada"),
        })
        .into(),
        ev!(RunCompleted, "ws-1", {
            run_id: s("run-1"), workflow_id: s("wf-1"), version: 4, duration_ms: 99,
            outputs_json: Some(s("{}")), outputs_ref: None,
        })
        .into(),
        ev!(RunFailed, "ws-1", {
            run_id: s("run-1"), workflow_id: s("wf-1"), version: 4,
            failed_node_id: Some(s("fetch")), reason: s("attempts exhausted"),
        })
        .into(),
        // Shaped so that structural matching would take it for a RunFailed.
        ev!(RunCancelled, "ws-1", {
            run_id: s("run-1"), workflow_id: s("wf-1"), version: 4, reason: Some(s("user")),
        })
        .into(),
        ev!(NodeRetried, "ws-1", {
            run_id: s("run-1"), workflow_id: s("wf-1"), version: 4, node_id: s("fetch"),
            failed_attempt: 1, next_attempt: 2, retry_at: now_micros() + 500_000,
            error: None,
        })
        .into(),
        ev!(RunStalled, "ws-1", {
            run_id: s("run-1"), workflow_id: s("wf-1"), version: 4, idle_ms: 60_000,
            last_progress_at: now_micros() - 60_000_000,
        })
        .into(),
    ]
}

fn cache_events() -> Vec<CacheEvent> {
    vec![
        ev!(CacheStore, "ws-2", {
            request_id: s("rq-1"), requester: s("bob"), permission: s("admin"),
            node_type: s("agent"), config_json: s("{}"), inputs_json: s("{}"),
            result_json: Some(s("\"hi\"")), result_ref: None, prompt: Some(s("say hi")),
            embedding: Some(vec![0.25, -1.5, 3.0]), cost_ms: 800,
            required_permission: s("write"),
        })
        .into(),
        ev!(CacheLookup, "ws-2", {
            request_id: s("rq-2"), requester: s("bob"), permission: s("read"),
            node_type: s("agent"), config_json: s("{}"), inputs_json: s("{}"),
            prompt: Some(s("say hello")), embedding: None, semantic: false,
        })
        .into(),
    ]
}

fn cache_answers() -> Vec<CacheAnswer> {
    vec![
        ev!(CacheAnswer, "ws-2", {
            request_id: s("rq-2"), hit: true, kind: Some(CacheKind::Semantic),
            similarity: Some(0.95), result_ref: Some(s("sha256:ee").into()), saved_ms: 800,
            entry_key: Some(s("k")),
        }),
        ev!(CacheAnswer, "ws-2", {
            request_id: s("rq-3"), hit: false, kind: None, similarity: None,
            result_ref: None, saved_ms: 0, entry_key: None,
        }),
    ]
}

fn dead_letter() -> DeadLetter {
    ev!(DeadLetter, "", {
        source_topic: s("weir.patches.v1"), source_partition: 7, source_offset: 1 << 40,
        consumer_group: s("weir-materializer"), error_class: s("decode"),
        error_message: s("bad magic byte"), original_key: Some(b"wf-1".to_vec()),
        original_value: Some(vec![0xff, 0, 1, 2]),
        original_headers: vec![
            Header { key: s("traceparent"), value: Some(b"00-ab".to_vec()) },
            Header { key: s("empty"), value: None },
        ],
    })
}

/// The explicit path the codec takes: to_record → wrap by name → binary → decode → unwrap
/// by index → from_record. Returns the decoded branch name.
fn roundtrip<E: TopicEvent + PartialEq + std::fmt::Debug>(event: &E) -> String {
    let schema = Schema::parse_str(E::SCHEMA).unwrap();
    let branches: Vec<String> = match &schema {
        Schema::Union(u) => u
            .variants()
            .iter()
            .map(|v| v.name().unwrap().fullname(None))
            .collect(),
        s => vec![s.name().unwrap().fullname(None)],
    };
    let (name, record) = event.to_record().unwrap();
    assert!(
        matches!(record, Value::Record(_)),
        "{name}: to_record gives a record"
    );
    let index = branches
        .iter()
        .position(|b| b == name)
        .expect("branch by name");
    let value = match &schema {
        Schema::Union(_) => Value::Union(index as u32, Box::new(record)),
        _ => record,
    };
    let bytes = GenericDatumWriter::builder(&schema)
        .build()
        .unwrap()
        .write_value_to_vec(value)
        .unwrap();
    let decoded = GenericDatumReader::builder(&schema)
        .build()
        .unwrap()
        .read_value(&mut &bytes[..])
        .unwrap();
    let (i, record) = match (&schema, decoded) {
        (Schema::Union(_), Value::Union(i, v)) => (i as usize, *v),
        (Schema::Union(_), other) => panic!("expected a union, got {other:?}"),
        (_, v) => (0, v),
    };
    assert_eq!(i, index, "{name}: union index survives");
    let back = E::from_record(&branches[i], record).unwrap();
    assert_eq!(&back, event, "{name}: round trip");
    // The library helpers agree with the explicit path.
    assert_eq!(encode(event).unwrap(), bytes, "{name}: encode");
    assert_eq!(
        encode_via_value(event).unwrap(),
        bytes,
        "{name}: the generic path"
    );
    assert_eq!(&decode::<E>(&bytes, None).unwrap(), event, "{name}: decode");
    name.to_owned()
}

#[test]
fn every_schema_parses_and_lists_unique_records() {
    let expected = [
        ("weir.patches.v1", vec!["weir.patches.PatchSubmitted"]),
        (
            "weir.workflows.v1",
            vec![
                "weir.workflows.WorkflowMaterialized",
                "weir.workflows.PatchRejected",
            ],
        ),
        (
            "weir.completions.v1",
            vec![
                "weir.runs.RunRequested",
                "weir.runs.NodeCompleted",
                "weir.runs.RunCancelled",
            ],
        ),
        ("weir.node-ready.v1", vec!["weir.runs.NodeReady"]),
        (
            "weir.run-events.v1",
            vec![
                "weir.run_events.RunStarted",
                "weir.run_events.RunCompleted",
                "weir.run_events.RunFailed",
                "weir.run_events.RunCancelled",
                "weir.run_events.NodeRetried",
                "weir.run_events.RunStalled",
            ],
        ),
        (
            "weir.cache.v1",
            vec!["weir.cache.CacheStore", "weir.cache.CacheLookup"],
        ),
        ("weir.cache-answers.v1", vec!["weir.cache.CacheAnswer"]),
        ("weir.dlq.v1", vec!["weir.dlq.DeadLetter"]),
    ];
    assert_eq!(ALL_TOPICS.len(), expected.len());
    for ((topic, text), (want_topic, want_branches)) in ALL_TOPICS.iter().zip(&expected) {
        assert_eq!(topic, want_topic);
        Schema::parse_str(text).unwrap_or_else(|e| panic!("{topic}: {e}"));
        let ts = topic_schema(topic).unwrap();
        assert_eq!(ts.branches(), want_branches.as_slice(), "{topic}");
        assert_eq!(ts.is_union(), want_branches.len() > 1, "{topic}");
        let mut unique = ts.branches().to_vec();
        unique.sort();
        unique.dedup();
        assert_eq!(
            unique.len(),
            ts.branches().len(),
            "{topic}: branch names unique"
        );
        // Every record and enum has a doc (the registry and analytics readers rely on it).
        let json: serde_json::Value = serde_json::from_str(text).unwrap();
        let mut named = Vec::new();
        collect_named(&json, &mut named);
        for n in &named {
            assert!(
                n.get("doc")
                    .and_then(|d| d.as_str())
                    .is_some_and(|d| !d.is_empty()),
                "{topic}: {n} has no doc"
            );
        }
    }
    // Distinct topic names.
    let mut topics: Vec<_> = ALL_TOPICS.iter().map(|(t, _)| *t).collect();
    topics.sort();
    topics.dedup();
    assert_eq!(topics.len(), ALL_TOPICS.len());
}

fn collect_named<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
    match v {
        serde_json::Value::Object(m) => {
            if matches!(
                m.get("type").and_then(|t| t.as_str()),
                Some("record" | "enum")
            ) {
                out.push(v);
            }
            m.values().for_each(|x| collect_named(x, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_named(x, out)),
        _ => {}
    }
}

#[test]
fn every_record_starts_with_the_common_fields() {
    let mut records = 0;
    for (topic, _) in ALL_TOPICS {
        let ts = topic_schema(topic).unwrap();
        for name in ts.branches() {
            records += 1;
            let Some(Schema::Record(r)) = ts.record_schema(name) else {
                panic!("{name}")
            };
            let f: Vec<_> = r.fields.iter().take(5).collect();
            let names: Vec<_> = f.iter().map(|f| f.name.as_str()).collect();
            assert_eq!(
                names,
                [
                    "event_id",
                    "occurred_at",
                    "workspace_id",
                    "traceparent",
                    "tracestate"
                ],
                "{name}"
            );
            assert!(
                matches!(f[0].schema, Schema::Uuid(UuidSchema::String)),
                "{name}.event_id"
            );
            assert!(
                matches!(f[1].schema, Schema::TimestampMicros),
                "{name}.occurred_at"
            );
            assert!(matches!(f[2].schema, Schema::String), "{name}.workspace_id");
            assert!(matches!(f[3].schema, Schema::String), "{name}.traceparent");
            match &f[4].schema {
                Schema::Union(u) => assert!(
                    matches!(u.variants(), [Schema::Null, Schema::String]),
                    "{name}"
                ),
                other => panic!("{name}.tracestate: {:?}", SchemaKind::from(other)),
            }
            assert_eq!(
                f[4].default,
                Some(serde_json::Value::Null),
                "{name}.tracestate default"
            );
            for field in &r.fields {
                assert!(
                    field
                        .name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                    "{name}.{} is snake_case",
                    field.name
                );
                // Nullable fields are ["null", T] with default null.
                if let Schema::Union(u) = &field.schema {
                    assert!(
                        matches!(u.variants()[0], Schema::Null),
                        "{name}.{}",
                        field.name
                    );
                    assert_eq!(
                        field.default,
                        Some(serde_json::Value::Null),
                        "{name}.{}",
                        field.name
                    );
                }
            }
        }
    }
    assert_eq!(records, 17);
}

#[test]
fn every_record_round_trips_through_avro_binary() {
    let mut seen = Vec::new();
    seen.push(roundtrip(&patch()));
    for e in workflow_events() {
        seen.push(roundtrip(&e));
    }
    for e in completion_events() {
        seen.push(roundtrip(&e));
    }
    seen.push(roundtrip(&node_ready()));
    for e in run_events() {
        seen.push(roundtrip(&e));
    }
    for e in cache_events() {
        seen.push(roundtrip(&e));
    }
    for e in cache_answers() {
        seen.push(roundtrip(&e));
    }
    seen.push(roundtrip(&dead_letter()));
    seen.sort();
    seen.dedup();
    let all: usize = ALL_TOPICS
        .iter()
        .map(|(t, _)| topic_schema(t).unwrap().branches().len())
        .sum();
    assert_eq!(seen.len(), all, "every record type covered: {seen:?}");

    // Unknown record names are refused with the topic named.
    let (_, v) = patch().to_record().unwrap();
    let err = RunEvent::from_record("weir.patches.PatchSubmitted", v).unwrap_err();
    assert!(
        matches!(err, EventError::UnknownRecord(ref n, "weir.run-events.v1") if n == "weir.patches.PatchSubmitted"),
        "{err}"
    );
    // Trailing garbage and truncated datums are errors, not silently accepted.
    let mut bytes = encode(&dead_letter()).unwrap();
    assert!(decode::<DeadLetter>(&bytes[..bytes.len() - 1], None).is_err());
    bytes.push(0);
    assert!(decode::<DeadLetter>(&bytes, None).is_err());
}

#[test]
fn wire_types_are_the_avro_logical_types() {
    // A consumer with stock deserializers sees uuid text and timestamp-micros longs.
    let p = patch();
    let (_, Value::Record(fields)) = p.to_record().unwrap() else {
        panic!()
    };
    let get = |n: &str| {
        fields
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    assert_eq!(get("event_id"), Value::Uuid(p.event_id));
    assert_eq!(get("patch_id"), Value::Uuid(p.patch_id));
    assert_eq!(get("occurred_at"), Value::TimestampMicros(p.occurred_at));
    assert_eq!(
        get("base_version"),
        Value::Union(1, Box::new(Value::Long(3)))
    );
    assert_eq!(
        get("operations_ref"),
        Value::Union(0, Box::new(Value::Null))
    );
    assert_eq!(p.event_id.get_version_num(), 7);
    // The uuid travels as its 36-character text right after the record start.
    let bytes = encode(&p).unwrap();
    assert_eq!(bytes[0], 72, "zigzag length 36");
    assert_eq!(&bytes[1..37], p.event_id.to_string().as_bytes());

    let n = node_ready();
    let (_, Value::Record(fields)) = n.to_record().unwrap() else {
        panic!()
    };
    let deadline = fields
        .iter()
        .find(|(k, _)| k == "deadline_at")
        .unwrap()
        .1
        .clone();
    assert_eq!(
        deadline,
        Value::Union(1, Box::new(Value::TimestampMicros(n.deadline_at.unwrap())))
    );

    let (_, Value::Record(fields)) = completion_events()[1].to_record().unwrap() else {
        panic!()
    };
    let status = fields
        .iter()
        .find(|(k, _)| k == "status")
        .unwrap()
        .1
        .clone();
    assert_eq!(status, Value::Enum(1, s("failed")));

    // now_micros is microseconds (not millis or nanos).
    let now = now_micros();
    assert!(
        now > 1_700_000_000_000_000 && now < 4_000_000_000_000_000,
        "{now}"
    );
}

#[test]
fn union_branches_are_chosen_by_name_not_by_shape() {
    // A RunCancelled value also resolves against RunFailed (reason: string, failed_node_id
    // defaulted); by-name wrapping keeps it a RunCancelled.
    let cancelled = run_events().remove(3);
    assert!(matches!(cancelled, RunEvent::RunCancelled(_)));
    let ts = topic_schema(RunEvent::TOPIC).unwrap();
    let (name, record) = cancelled.to_record().unwrap();
    assert_eq!(name, "weir.run_events.RunCancelled");
    let structural = record.clone().resolve(ts.schema()).unwrap();
    let Value::Union(i, _) = structural else {
        panic!()
    };
    assert_eq!(
        ts.branches()[i as usize],
        "weir.run_events.RunFailed",
        "structural matching is ambiguous"
    );
    assert_eq!(
        ts.wrap(name, record).unwrap().clone(),
        to_topic_value(&cancelled).unwrap()
    );
    assert_eq!(
        decode::<RunEvent>(&encode(&cancelled).unwrap(), None).unwrap(),
        cancelled
    );
}

#[test]
fn decoding_with_an_older_writer_schema_fills_defaults() {
    // An older CompletionEvent schema without from_cache (added later with default false).
    let mut json: serde_json::Value = serde_json::from_str(CompletionEvent::SCHEMA).unwrap();
    let fields = json[1]["fields"].as_array_mut().unwrap();
    fields.retain(|f| f["name"] != "from_cache");
    let old = TopicSchema::parse(&json.to_string()).unwrap();
    let CompletionEvent::NodeCompleted(mut done) = completion_events().remove(1) else {
        panic!()
    };
    let (name, record) = CompletionEvent::NodeCompleted(done.clone())
        .to_record()
        .unwrap();
    let Value::Record(mut fields) = record else {
        panic!()
    };
    fields.retain(|(k, _)| k != "from_cache");
    let old_value = old.wrap(name, Value::Record(fields)).unwrap();
    let bytes = GenericDatumWriter::builder(old.schema())
        .build()
        .unwrap()
        .write_value_to_vec(old_value)
        .unwrap();
    let back = decode::<CompletionEvent>(&bytes, Some(&old)).unwrap();
    done.from_cache = false;
    assert_eq!(back, CompletionEvent::NodeCompleted(done));
}

#[test]
fn an_envelope_continues_its_cause() {
    let cause = patch();
    let e = Envelope::caused_by(&cause);
    assert_ne!(e.event_id, cause.event_id, "a new event id");
    assert_eq!(e.event_id.get_version_num(), 7);
    assert!(
        e.occurred_at >= cause.occurred_at,
        "now, not the cause's time"
    );
    assert_eq!(e.workspace_id, cause.workspace_id);
    assert_eq!(e.traceparent, cause.traceparent);
    assert_eq!(e.tracestate, cause.tracestate);
    assert_eq!(e.clone().at(42).occurred_at, 42);

    let i = Envelope::at_ingress(
        "ws-2",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        None,
    );
    assert_eq!((i.workspace_id.as_str(), i.tracestate), ("ws-2", None));

    // Spread into a record: the five fields are the envelope's, the rest as given, and the
    // datum is the one a struct literal with the same fields encodes to.
    let r = new_event!(PatchRejected {
        envelope: e.clone(),
        workflow_id: s("wf-1"),
        patch_id: cause.patch_id,
        base_version: None,
        head_version: 4,
        reason_code: s("test_failed"),
        reason: s("/a is not 1"),
    });
    assert_eq!(
        (
            r.event_id,
            r.occurred_at,
            &r.workspace_id,
            &r.traceparent,
            &r.tracestate
        ),
        (
            e.event_id,
            e.occurred_at,
            &e.workspace_id,
            &e.traceparent,
            &e.tracestate
        )
    );
    let literal = PatchRejected {
        event_id: e.event_id,
        occurred_at: e.occurred_at,
        workspace_id: e.workspace_id.clone(),
        traceparent: e.traceparent.clone(),
        tracestate: e.tracestate.clone(),
        workflow_id: s("wf-1"),
        patch_id: cause.patch_id,
        base_version: None,
        head_version: 4,
        reason_code: s("test_failed"),
        reason: s("/a is not 1"),
    };
    let (a, b): (WorkflowEvent, WorkflowEvent) = (r.into(), literal.into());
    assert_eq!(encode(&a).unwrap(), encode(&b).unwrap());
}

#[test]
fn keys_and_metadata_follow_the_contract() {
    let p = patch();
    assert_eq!(p.key(), "wf-1");
    assert_eq!(TopicEvent::event_id(&p), p.event_id);
    for e in workflow_events() {
        assert_eq!(e.key(), "wf-1");
        assert_eq!(e.workspace_id(), "ws-1");
    }
    for e in completion_events() {
        assert_eq!(e.key(), "run-1");
    }
    assert_eq!(node_ready().key(), "run-1");
    for e in run_events() {
        assert_eq!(e.key(), "run-1");
    }
    for e in cache_events() {
        assert_eq!(e.key(), "ws-2");
    }
    for e in cache_answers() {
        assert_eq!(e.key(), "ws-2");
    }
    let d = dead_letter();
    assert_eq!(d.key(), "weir.patches.v1");
    assert_eq!(TopicEvent::workspace_id(&d), "");
    // Event ids are v7 and increase with time.
    let (a, b) = (new_event_id(), new_event_id());
    assert!(a < b && a.get_version_num() == 7);
}

proptest::proptest! {
    /// The direct serializer writes exactly the generic path's bytes for the hot output
    /// events, whatever their strings, numbers and optional fields hold.
    #[test]
    fn direct_encoding_equals_the_generic_path(
        text in ".{0,40}",
        version in proptest::num::i64::ANY,
        definition in proptest::option::of(".{0,200}"),
        ids in 0usize..4,
        base in proptest::option::of(proptest::num::i64::ANY),
    ) {
        let m: WorkflowEvent = WorkflowMaterialized {
            event_id: new_event_id(),
            occurred_at: version,
            workspace_id: text.clone(),
            traceparent: text.clone(),
            tracestate: definition.clone(),
            workflow_id: text.clone(),
            version,
            definition_ref: definition.is_none().then(|| format!("sha256:{text}").into()),
            definition_json: definition,
            patch_ids: (0..ids).map(|_| new_event_id()).collect(),
            definition_sha256: text.clone(),
        }
        .into();
        let r: WorkflowEvent = PatchRejected {
            event_id: new_event_id(),
            occurred_at: -version,
            workspace_id: text.clone(),
            traceparent: String::new(),
            tracestate: None,
            workflow_id: text.clone(),
            patch_id: new_event_id(),
            base_version: base,
            head_version: version,
            reason_code: "test_failed".into(),
            reason: text,
        }
        .into();
        for e in [m, r] {
            let bytes = encode(&e).unwrap();
            proptest::prop_assert_eq!(&bytes, &encode_via_value(&e).unwrap());
            proptest::prop_assert_eq!(decode::<WorkflowEvent>(&bytes, None).unwrap(), e);
        }
    }
}

proptest::proptest! {
    /// A CAS ref field is an Avro string on the wire whatever text it holds, valid or not: the
    /// bytes carry exactly that text, decode back to it, and a valid ref comes out typed.
    #[test]
    fn a_ref_field_is_its_text_on_the_wire(text in proptest::prelude::any::<String>()) {
        let (event_id, occurred_at, workspace_id, traceparent, tracestate) = meta("ws-1");
        let e: CompletionEvent = NodeCompleted {
            event_id, occurred_at, workspace_id, traceparent, tracestate,
            run_id: s("r-1"), node_id: s("n"), attempt: 1, status: NodeStatus::Succeeded,
            output_json: None, output_ref: Some(text.clone().into()), error: None,
            duration_ms: 1, worker_id: s("w"), from_cache: false,
        }
        .into();
        let bytes = encode(&e).unwrap();
        proptest::prop_assert_eq!(&bytes, &encode_via_value(&e).unwrap());
        let schema = Schema::parse_str(CompletionEvent::SCHEMA).unwrap();
        let generic = GenericDatumReader::builder(&schema)
            .build()
            .unwrap()
            .read_value(&mut &bytes[..])
            .unwrap();
        let Value::Union(_, record) = &generic else { panic!("{generic:?}") };
        let Value::Record(fields) = &**record else { panic!("{record:?}") };
        let field = &fields.iter().find(|(k, _)| k == "output_ref").unwrap().1;
        proptest::prop_assert_eq!(field, &Value::Union(1, Box::new(Value::String(text.clone()))));
        let rewritten = GenericDatumWriter::builder(&schema)
            .build()
            .unwrap()
            .write_value_to_vec(generic.clone())
            .unwrap();
        proptest::prop_assert_eq!(&rewritten, &bytes);
        let CompletionEvent::NodeCompleted(back) = decode::<CompletionEvent>(&bytes, None).unwrap()
        else {
            panic!()
        };
        let back = back.output_ref.unwrap();
        proptest::prop_assert_eq!(back.as_str(), text.as_str());
        proptest::prop_assert_eq!(back.get(), text.parse::<weir_model::CasRef>());
    }
}
