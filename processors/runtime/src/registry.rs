//! The Confluent-compatible schema registry: the few calls weir makes (register, look up,
//! latest version, list subjects) and the BACKWARD compatibility check that guards every
//! schema change.
//!
//! Subjects follow the Confluent TopicNameStrategy (`<topic>-value`), so the stock Java and
//! Python deserializers find the schemas with no weir-specific setup. The compatibility check
//! is computed here, not only delegated to the registry, so that a refusal names the exact
//! field that broke it.
//!
//! weir's own client rather than schema_registry_converter's, which only asks the registry
//! for a yes/no compatibility answer and cannot look up a schema's id without registering it.

use std::collections::HashMap;
use std::time::Duration;

use apache_avro::schema::{Name, RecordSchema};
use apache_avro::Schema;
use serde::Deserialize;
use serde_json::json;

use crate::config::RegistryConfig;

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// The subject of a topic's value schema.
pub fn value_subject(topic: &str) -> String {
    format!("{topic}-value")
}

/// A registry call failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Network or 5xx: worth retrying.
    #[error("registry unreachable: {0}")]
    Unavailable(String),
    /// The registry refused the request (4xx other than not-found).
    #[error("registry refused: HTTP {status}: {body}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Response body.
        body: String,
    },
    /// A schema text does not parse.
    #[error("schema does not parse: {0}")]
    Parse(String),
}

impl crate::error::Classify for RegistryError {
    /// An unreachable registry is waited out; a refusal or a schema that does not parse is
    /// the deployment's to fix.
    fn disposition(&self) -> crate::error::Disposition {
        match self {
            RegistryError::Unavailable(_) => crate::error::Disposition::Retry,
            RegistryError::Refused { .. } | RegistryError::Parse(_) => {
                crate::error::Disposition::Fatal
            }
        }
    }
}

/// One registered version of a subject.
#[derive(Debug, Clone, Deserialize)]
pub struct Registered {
    /// Global schema id (what the wire format carries).
    pub id: u32,
    /// Version within the subject.
    #[serde(default)]
    pub version: u32,
    /// Schema text.
    pub schema: String,
}

/// A small client for the Confluent REST API.
#[derive(Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    base: String,
    auth: Option<(String, String)>,
}

impl RegistryClient {
    /// Builds a client from config.
    pub fn new(cfg: &RegistryConfig) -> Result<Self, RegistryError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .no_proxy()
            .build()
            .map_err(|e| RegistryError::Unavailable(e.to_string()))?;
        let auth = (!cfg.username.is_empty())
            .then(|| (cfg.username.clone(), cfg.password.expose().clone()));
        Ok(Self {
            http,
            base: cfg.url.trim_end_matches('/').to_string(),
            auth,
        })
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .header("Accept", CONTENT_TYPE);
        match &self.auth {
            Some((u, p)) => r.basic_auth(u, Some(p)),
            None => r,
        }
    }

    async fn send(
        &self,
        rb: reqwest::RequestBuilder,
    ) -> Result<Option<serde_json::Value>, RegistryError> {
        let resp = rb
            .send()
            .await
            .map_err(|e| RegistryError::Unavailable(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .text()
            .await
            .map_err(|e| RegistryError::Unavailable(e.to_string()))?;
        if status.as_u16() == 404 {
            return Ok(None);
        }
        if status.is_server_error() {
            return Err(RegistryError::Unavailable(format!("HTTP {status}: {body}")));
        }
        if !status.is_success() {
            return Err(RegistryError::Refused {
                status: status.as_u16(),
                body,
            });
        }
        serde_json::from_str(&body)
            .map(Some)
            .map_err(|e| RegistryError::Unavailable(format!("bad response {body:?}: {e}")))
    }

    /// Registers `schema` under `subject` (a no-op returning the existing id if it is already
    /// there).
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let rb = self
            .req(
                reqwest::Method::POST,
                &format!("/subjects/{subject}/versions"),
            )
            .header("Content-Type", CONTENT_TYPE)
            .json(&json!({ "schema": schema, "schemaType": "AVRO" }));
        let v = self.send(rb).await?.ok_or_else(|| RegistryError::Refused {
            status: 404,
            body: format!("subject {subject} not found"),
        })?;
        v.get("id")
            .and_then(|id| id.as_u64())
            .map(|id| id as u32)
            .ok_or_else(|| RegistryError::Unavailable(format!("no id in {v}")))
    }

    /// The id of exactly this schema under `subject`, or None if it is not registered.
    pub async fn lookup(
        &self,
        subject: &str,
        schema: &str,
    ) -> Result<Option<Registered>, RegistryError> {
        let rb = self
            .req(reqwest::Method::POST, &format!("/subjects/{subject}"))
            .header("Content-Type", CONTENT_TYPE)
            .json(&json!({ "schema": schema, "schemaType": "AVRO" }));
        match self.send(rb).await? {
            None => Ok(None),
            Some(v) => serde_json::from_value(v)
                .map(Some)
                .map_err(|e| RegistryError::Unavailable(e.to_string())),
        }
    }

    /// The latest version of `subject`, or None if the subject does not exist.
    pub async fn latest(&self, subject: &str) -> Result<Option<Registered>, RegistryError> {
        let rb = self.req(
            reqwest::Method::GET,
            &format!("/subjects/{subject}/versions/latest"),
        );
        match self.send(rb).await? {
            None => Ok(None),
            Some(v) => serde_json::from_value(v)
                .map(Some)
                .map_err(|e| RegistryError::Unavailable(e.to_string())),
        }
    }

    /// Every subject.
    pub async fn subjects(&self) -> Result<Vec<String>, RegistryError> {
        let v = self
            .send(self.req(reqwest::Method::GET, "/subjects"))
            .await?
            .unwrap_or_else(|| json!([]));
        serde_json::from_value(v).map_err(|e| RegistryError::Unavailable(e.to_string()))
    }

    /// Sets the subject's compatibility level (BACKWARD for weir's topics), so the registry
    /// enforces the same rule as [`backward_problems`].
    pub async fn set_compatibility(&self, subject: &str, level: &str) -> Result<(), RegistryError> {
        let rb = self
            .req(reqwest::Method::PUT, &format!("/config/{subject}"))
            .header("Content-Type", CONTENT_TYPE)
            .json(&json!({ "compatibility": level }));
        self.send(rb).await.map(|_| ())
    }
}

/// Why a new schema cannot read data written with the old one. Empty means BACKWARD
/// compatible. Each entry names the path of the field that broke it.
pub fn backward_problems(new: &str, old: &str) -> Result<Vec<String>, RegistryError> {
    let reader = Schema::parse_str(new).map_err(|e| RegistryError::Parse(e.to_string()))?;
    let writer = Schema::parse_str(old).map_err(|e| RegistryError::Parse(e.to_string()))?;
    let mut ctx = Compat {
        reader_names: names(&reader),
        writer_names: names(&writer),
        problems: Vec::new(),
        seen: Vec::new(),
    };
    ctx.check(&reader, &writer, "");
    Ok(ctx.problems)
}

fn names(schema: &Schema) -> HashMap<String, Schema> {
    fn walk(s: &Schema, out: &mut HashMap<String, Schema>) {
        match s {
            Schema::Record(r) if out.insert(full(&r.name), s.clone()).is_none() => {
                for f in &r.fields {
                    walk(&f.schema, out);
                }
            }
            Schema::Enum(e) => {
                out.insert(full(&e.name), s.clone());
            }
            Schema::Fixed(f) => {
                out.insert(full(&f.name), s.clone());
            }
            Schema::Array(a) => walk(&a.items, out),
            Schema::Map(m) => walk(&m.types, out),
            Schema::Union(u) => u.variants().iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = HashMap::new();
    walk(schema, &mut out);
    out
}

fn full(name: &Name) -> String {
    name.fullname(None)
}

/// The primitive an Avro type is stored as, so logical types compare by representation.
fn base(s: &Schema) -> &'static str {
    match s {
        Schema::Null => "null",
        Schema::Boolean => "boolean",
        Schema::Int | Schema::Date | Schema::TimeMillis => "int",
        Schema::Long
        | Schema::TimeMicros
        | Schema::TimestampMillis
        | Schema::TimestampMicros
        | Schema::TimestampNanos
        | Schema::LocalTimestampMillis
        | Schema::LocalTimestampMicros
        | Schema::LocalTimestampNanos => "long",
        Schema::Float => "float",
        Schema::Double => "double",
        Schema::Bytes | Schema::BigDecimal | Schema::Decimal(_) => "bytes",
        Schema::String | Schema::Uuid(_) => "string",
        Schema::Array(_) => "array",
        Schema::Map(_) => "map",
        Schema::Union(_) => "union",
        Schema::Record(_) => "record",
        Schema::Enum(_) => "enum",
        Schema::Fixed(_) | Schema::Duration(_) => "fixed",
        Schema::Ref { .. } => "ref",
    }
}

fn label(s: &Schema) -> String {
    match s {
        Schema::Record(r) => full(&r.name),
        Schema::Enum(e) => full(&e.name),
        Schema::Fixed(f) => full(&f.name),
        Schema::Ref { name } => full(name),
        other => base(other).to_string(),
    }
}

struct Compat {
    reader_names: HashMap<String, Schema>,
    writer_names: HashMap<String, Schema>,
    problems: Vec<String>,
    /// Record pairs being checked, to stop on recursive types.
    seen: Vec<(String, String)>,
}

impl Compat {
    fn deref(&self, s: &Schema, reader: bool) -> Option<Schema> {
        match s {
            Schema::Ref { name } => {
                let map = if reader {
                    &self.reader_names
                } else {
                    &self.writer_names
                };
                map.get(&full(name)).cloned()
            }
            _ => None,
        }
    }

    /// Whether `reader` can read `writer` without recording problems (for union matching).
    fn quietly(&mut self, reader: &Schema, writer: &Schema) -> bool {
        let before = self.problems.len();
        self.check(reader, writer, "");
        let ok = self.problems.len() == before;
        self.problems.truncate(before);
        ok
    }

    fn check(&mut self, reader: &Schema, writer: &Schema, path: &str) {
        if let Some(r) = self.deref(reader, true) {
            return self.check(&r, writer, path);
        }
        if let Some(w) = self.deref(writer, false) {
            return self.check(reader, &w, path);
        }
        let at = if path.is_empty() { "<root>" } else { path };
        match (reader, writer) {
            (_, Schema::Union(wu)) => {
                // Every branch the writer may have used must be readable.
                for w in wu.variants() {
                    let wpath = if path.is_empty() {
                        label(w)
                    } else {
                        format!("{path}<{}>", label(w))
                    };
                    match reader {
                        Schema::Union(ru) => {
                            let named = ru.variants().iter().find(|r| {
                                matches!(r, Schema::Record(_) | Schema::Enum(_) | Schema::Fixed(_))
                                    && label(r) == label(w)
                            });
                            if let Some(r) = named {
                                let r = r.clone();
                                self.check(&r, w, &wpath);
                            } else if !ru.variants().iter().any(|r| self.quietly(r, w)) {
                                self.problems.push(format!(
                                    "{wpath}: union branch {} was removed or changed incompatibly",
                                    label(w)
                                ));
                            }
                        }
                        other => self.check(other, w, &wpath),
                    }
                }
            }
            (Schema::Union(ru), w) => {
                let named = ru.variants().iter().find(|r| {
                    matches!(w, Schema::Record(_) | Schema::Enum(_) | Schema::Fixed(_))
                        && label(r) == label(w)
                });
                if let Some(r) = named {
                    let r = r.clone();
                    self.check(&r, w, path);
                } else if !ru.variants().iter().any(|r| self.quietly(r, w)) {
                    self.problems.push(format!(
                        "{at}: written as {}, which no branch of the new union can read",
                        label(w)
                    ));
                }
            }
            (Schema::Record(r), Schema::Record(w)) => self.records(r, w, path),
            (Schema::Enum(r), Schema::Enum(w)) => {
                if r.default.is_none() {
                    for s in &w.symbols {
                        if !r.symbols.contains(s) {
                            self.problems.push(format!(
                                "{at}: enum symbol {s:?} was removed (and the enum has no default)"
                            ));
                        }
                    }
                }
            }
            (Schema::Fixed(r), Schema::Fixed(w)) => {
                if r.size != w.size {
                    self.problems.push(format!(
                        "{at}: fixed size changed from {} to {}",
                        w.size, r.size
                    ));
                }
            }
            (Schema::Array(r), Schema::Array(w)) => {
                self.check(&r.items, &w.items, &format!("{path}[]"))
            }
            (Schema::Map(r), Schema::Map(w)) => {
                self.check(&r.types, &w.types, &format!("{path}{{}}"))
            }
            (r, w) => {
                let (rb, wb) = (base(r), base(w));
                let promotable = rb == wb
                    || matches!(
                        (wb, rb),
                        ("int", "long" | "float" | "double")
                            | ("long", "float" | "double")
                            | ("float", "double")
                            | ("string", "bytes")
                            | ("bytes", "string")
                    );
                if !promotable {
                    self.problems.push(format!(
                        "{at}: type changed from {} to {}, which cannot read the old data",
                        label(w),
                        label(r)
                    ));
                }
            }
        }
    }

    fn records(&mut self, r: &RecordSchema, w: &RecordSchema, path: &str) {
        let key = (full(&r.name), full(&w.name));
        if self.seen.contains(&key) {
            return;
        }
        self.seen.push(key);
        let prefix = if path.is_empty() {
            full(&r.name)
        } else {
            path.to_string()
        };
        if r.name.name() != w.name.name()
            && !r
                .aliases
                .as_ref()
                .is_some_and(|a| a.iter().any(|a| a.name() == w.name.name()))
        {
            self.problems.push(format!(
                "{prefix}: record renamed from {} to {} without an alias",
                full(&w.name),
                full(&r.name)
            ));
        }
        for rf in &r.fields {
            let wf = w
                .fields
                .iter()
                .find(|wf| wf.name == rf.name || rf.aliases.contains(&wf.name));
            let fpath = format!("{prefix}.{}", rf.name);
            match wf {
                Some(wf) => self.check(&rf.schema, &wf.schema, &fpath),
                None if rf.default.is_some() => {}
                None => self.problems.push(format!(
                    "{fpath}: field added without a default, so old records cannot be read"
                )),
            }
        }
        self.seen.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = r#"{"type":"record","name":"NodeCompleted","namespace":"weir.runs","fields":[
        {"name":"run_id","type":"string"},
        {"name":"attempt","type":"int"},
        {"name":"status","type":{"type":"enum","name":"NodeStatus","symbols":["succeeded","failed"]}},
        {"name":"error","type":["null","string"],"default":null}]}"#;

    fn with(fields: &str) -> String {
        format!(
            r#"{{"type":"record","name":"NodeCompleted","namespace":"weir.runs","fields":[{fields}]}}"#
        )
    }

    #[test]
    fn backward_rules_name_the_field() {
        assert!(
            backward_problems(V1, V1).unwrap().is_empty(),
            "identity is compatible"
        );

        let added_with_default = with(
            r#"{"name":"run_id","type":"string"},{"name":"attempt","type":"long"},
               {"name":"status","type":{"type":"enum","name":"NodeStatus","symbols":["succeeded","failed","skipped"]}},
               {"name":"worker","type":"string","default":""}"#,
        );
        assert!(
            backward_problems(&added_with_default, V1).unwrap().is_empty(),
            "adding a defaulted field, dropping a field, widening int to long, adding a symbol: all fine"
        );

        let added_without_default = with(
            r#"{"name":"run_id","type":"string"},{"name":"attempt","type":"int"},
               {"name":"status","type":{"type":"enum","name":"NodeStatus","symbols":["succeeded","failed"]}},
               {"name":"worker_id","type":"string"}"#,
        );
        let p = backward_problems(&added_without_default, V1).unwrap();
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("weir.runs.NodeCompleted.worker_id"),
            "{p:?}"
        );

        let narrowed = with(
            r#"{"name":"run_id","type":"string"},{"name":"attempt","type":"string"},
               {"name":"status","type":{"type":"enum","name":"NodeStatus","symbols":["succeeded"]}}"#,
        );
        let p = backward_problems(&narrowed, V1).unwrap();
        assert!(
            p.iter()
                .any(|x| x.contains(".attempt") && x.contains("int to string")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|x| x.contains(".status") && x.contains("\"failed\"")),
            "{p:?}"
        );
    }

    #[test]
    fn unions_of_records_are_matched_by_name() {
        let old = format!(
            r#"[{V1}, {{"type":"record","name":"RunCancelled","namespace":"weir.runs","fields":[{{"name":"run_id","type":"string"}}]}}]"#
        );
        let dropped_branch = format!("[{V1}]");
        let p = backward_problems(&dropped_branch, &old).unwrap();
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("weir.runs.RunCancelled"), "{p:?}");

        let grown = format!(
            r#"[{V1}, {{"type":"record","name":"RunCancelled","namespace":"weir.runs","fields":[{{"name":"run_id","type":"string"}},{{"name":"why","type":"string"}}]}}]"#
        );
        let p = backward_problems(&grown, &old).unwrap();
        assert_eq!(p, vec!["weir.runs.RunCancelled.why: field added without a default, so old records cannot be read".to_string()]);

        let added_branch = format!(
            r#"{}, {{"type":"record","name":"RunPaused","namespace":"weir.runs","fields":[]}}]"#,
            old.trim_end_matches(']')
        );
        assert!(backward_problems(&added_branch, &old).unwrap().is_empty());
    }
}
