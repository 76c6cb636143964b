//! Layering: built-in defaults, then the TOML file, then the standard variables
//! (`DATABASE_URL`, ...), then `WEIR__SECTION__KEY` variables, later layers winning. The
//! `config` crate parses the file, reads the `WEIR__` variables (prefix and separator `__`) and
//! merges the layers; what it cannot do as weir needs stays here, one line each:
//! - it stops at the first error and coerces loosely (`"yes"` is the number 1, `1.5` an
//!   integer), so the merged tree is checked here, strictly and key by key, with serde_json:
//!   every problem (unknown keys, wrong types) is reported at once;
//! - its keys are paths split on dots, and librdkafka option names hold dots, so the defaults,
//!   the standard variables and the `WEIR__` variables of the free-form maps
//!   ([`FREE_FORM`]) enter as [`Literal`] layers of ours;
//! - a variable's value is a string: it takes the type of the key's default
//!   (`WEIR__RUNTIME__MAX_BATCH=500` is a number, `true`/`1`/`yes` a bool; no lists);
//! - the file is read here, because the crate would load `NAME.toml` when `NAME` is missing.
//!
//! Invariants: every struct denies unknown fields and the merged tree is checked against the
//! defaults before it is deserialized, so no key is silently ignored; the layers apply in the
//! order above whatever the order of the variables.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::Value as Json;

use super::*;

/// Sections whose values are free-form maps (librdkafka and topic options).
const FREE_FORM: &[&str] = &[
    "kafka.topic_partitions",
    "kafka.topic_config",
    "kafka.consumer",
    "kafka.producer",
    "cache.ttl_secs",
    "cache.semantic_ttl_secs",
    "cache.threshold_overrides",
    "cache.cost_per_hit",
];

/// Standard variables that operators already set for other tools, mapped to config keys.
const STANDARD_ENV: &[(&str, &str)] = &[
    ("KAFKA_BOOTSTRAP_SERVERS", "kafka.bootstrap_servers"),
    ("DATABASE_URL", "postgres.url"),
    ("S3_ENDPOINT_URL", "s3.endpoint_url"),
    ("S3_BUCKET", "s3.bucket"),
    ("AWS_REGION", "s3.region"),
    ("AWS_ACCESS_KEY_ID", "s3.access_key_id"),
    ("AWS_SECRET_ACCESS_KEY", "s3.secret_access_key"),
    ("SCHEMA_REGISTRY_URL", "schema_registry.url"),
];

impl Config {
    /// Like [`Config::load`] with an explicit environment (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        let defaults = serde_json::to_value(Config::default()).map_err(|e| ConfigError {
            problems: vec![format!("defaults: {e}")],
        })?;

        let mut builder = ::config::Config::builder().add_source(Literal(table_of(&defaults)));
        if let Some(path) = file {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    // Parsed alone first, so that a broken file is one problem among the
                    // others instead of the end of the build.
                    let source = ::config::File::from_str(&text, ::config::FileFormat::Toml);
                    match ::config::Config::builder()
                        .add_source(source.clone())
                        .build()
                    {
                        Ok(_) => builder = builder.add_source(source),
                        Err(e) => problems.push(format!("{}: {e}", path.display())),
                    }
                }
                Err(e) => problems.push(format!("{}: cannot read: {e}", path.display())),
            }
        }
        let env = EnvLayers::split(env, &mut problems);
        let layered = builder
            .add_source(env.standard)
            .add_source(
                ::config::Environment::with_prefix("WEIR")
                    .prefix_separator("__")
                    .separator("__")
                    .source(Some(env.weir)),
            )
            .add_source(env.options)
            .build()
            .map_err(|e| {
                problems.push(e.to_string());
                ConfigError {
                    problems: problems.clone(),
                }
            })?;

        let mut merged = to_json(&layered.cache);
        for path in &env.typed {
            if let Some(Json::String(raw)) = lookup(&merged, path) {
                let typed = typed_like(lookup(&defaults, path), &raw.clone());
                set(&mut merged, path, typed);
            }
        }

        unknown_keys(&defaults, &merged, "", &mut problems);
        field_errors(&defaults, &merged, &mut problems);

        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        let config: Config = serde_json::from_value(merged).map_err(|e| ConfigError {
            problems: vec![e.to_string()],
        })?;
        let invalid = config.validate();
        if invalid.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems: invalid })
        }
    }
}

/// A layer whose keys are taken as they are, nested tables merged into the layers below
/// (the `config` crate would split a key such as `fetch.wait.max.ms` into tables).
#[derive(Debug, Clone, Default)]
struct Literal(::config::Map<String, ::config::Value>);

impl ::config::Source for Literal {
    fn clone_into_box(&self) -> Box<dyn ::config::Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<::config::Map<String, ::config::Value>, ::config::ConfigError> {
        Ok(self.0.clone())
    }
}

impl Literal {
    /// Sets `value` at `path`, creating the tables on the way.
    fn insert(&mut self, path: &[String], value: &str) {
        fn walk(
            table: &mut ::config::Map<String, ::config::Value>,
            path: &[String],
            value: ::config::Value,
        ) {
            let [key, rest @ ..] = path else { return };
            if rest.is_empty() {
                table.insert(key.clone(), value);
                return;
            }
            let entry = table.entry(key.clone()).or_insert_with(|| {
                ::config::Value::new(None, ::config::ValueKind::Table(Default::default()))
            });
            if !matches!(entry.kind, ::config::ValueKind::Table(_)) {
                entry.kind = ::config::ValueKind::Table(Default::default());
            }
            if let ::config::ValueKind::Table(inner) = &mut entry.kind {
                walk(inner, rest, value);
            }
        }
        let value = ::config::Value::new(None, ::config::ValueKind::String(value.to_string()));
        walk(&mut self.0, path, value);
    }
}

/// The environment, split into the layers it feeds.
struct EnvLayers {
    /// The standard variables, at their keys.
    standard: Literal,
    /// `WEIR__` variables of ordinary keys, for the `config` crate's environment source.
    weir: ::config::Map<String, String>,
    /// `WEIR__` variables of the free-form maps, whose last part is an option name with dots.
    options: Literal,
    /// Dotted keys set by `weir`, whose string values take the type of their default.
    typed: Vec<String>,
}

impl EnvLayers {
    fn split(env: impl IntoIterator<Item = (String, String)>, problems: &mut Vec<String>) -> Self {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let mut layers = EnvLayers {
            standard: Literal::default(),
            weir: Default::default(),
            options: Literal::default(),
            typed: Vec::new(),
        };
        for (var, key) in STANDARD_ENV {
            if let Some((_, value)) = env.iter().find(|(k, _)| k == var) {
                let path: Vec<String> = key.split('.').map(str::to_string).collect();
                layers.standard.insert(&path, value);
            }
        }
        let mut weir_env: Vec<_> = env
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("WEIR__").map(|rest| (rest, v)))
            .collect();
        weir_env.sort();
        for (rest, value) in weir_env {
            let parts: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            if parts.len() < 2 || parts.iter().any(String::is_empty) {
                problems.push(format!(
                    "WEIR__{rest}: expected WEIR__SECTION__KEY (two or more parts)"
                ));
                continue;
            }
            let map = parts[..2].join(".");
            if parts.len() > 2 && FREE_FORM.contains(&map.as_str()) {
                // librdkafka option names use dots, which variable names cannot hold.
                let option = parts[2..].join("_").replace('_', ".");
                layers
                    .options
                    .insert(&[parts[0].clone(), parts[1].clone(), option], value);
            } else {
                layers.typed.push(parts.join("."));
                layers.weir.insert(format!("WEIR__{rest}"), value.clone());
            }
        }
        layers
    }
}

/// The defaults as a `config` table, keys as they are.
fn table_of(defaults: &Json) -> ::config::Map<String, ::config::Value> {
    fn value_of(json: &Json) -> ::config::Value {
        use ::config::ValueKind as K;
        let kind = match json {
            Json::Null => K::Nil,
            Json::Bool(b) => K::Boolean(*b),
            Json::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => K::I64(i),
                (None, Some(u), _) => K::U64(u),
                (None, None, Some(f)) => K::Float(f),
                (None, None, None) => K::Nil,
            },
            Json::String(s) => K::String(s.clone()),
            Json::Array(a) => K::Array(a.iter().map(value_of).collect()),
            Json::Object(o) => K::Table(o.iter().map(|(k, v)| (k.clone(), value_of(v))).collect()),
        };
        ::config::Value::new(None, kind)
    }
    match value_of(defaults).kind {
        ::config::ValueKind::Table(t) => t,
        _ => Default::default(),
    }
}

/// The merged tree as JSON, values with the types their layer gave them (a TOML integer stays
/// an integer, a variable's value a string until it is typed).
fn to_json(value: &::config::Value) -> Json {
    use ::config::ValueKind as K;
    match &value.kind {
        K::Nil => Json::Null,
        K::Boolean(b) => Json::Bool(*b),
        K::I64(i) => Json::from(*i),
        K::U64(u) => Json::from(*u),
        K::I128(i) => i64::try_from(*i)
            .map(Json::from)
            .or_else(|_| u64::try_from(*i).map(Json::from))
            .unwrap_or_else(|_| Json::String(i.to_string())),
        K::U128(u) => u64::try_from(*u)
            .map(Json::from)
            .unwrap_or_else(|_| Json::String(u.to_string())),
        // NaN and the infinities are not JSON: null, refused like any wrong type.
        K::Float(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        K::String(s) => Json::String(s.clone()),
        K::Array(a) => Json::Array(a.iter().map(to_json).collect()),
        K::Table(t) => Json::Object(t.iter().map(|(k, v)| (k.clone(), to_json(v))).collect()),
    }
}

fn set(root: &mut Json, dotted: &str, value: Json) {
    let mut cur = root;
    let mut parts = dotted.split('.').peekable();
    while let Some(part) = parts.next() {
        let Json::Object(map) = cur else { return };
        if parts.peek().is_none() {
            map.insert(part.to_string(), value);
            return;
        }
        let Some(next) = map.get_mut(part) else {
            return;
        };
        cur = next;
    }
}

fn lookup<'a>(root: &'a Json, dotted: &str) -> Option<&'a Json> {
    dotted.split('.').try_fold(root, |v, k| v.get(k))
}

/// Environment values are strings; give them the type the default has so that
/// `WEIR__RUNTIME__MAX_BATCH=500` is a number.
fn typed_like(default: Option<&Json>, raw: &str) -> Json {
    match default {
        Some(Json::Number(_)) => serde_json::from_str::<serde_json::Number>(raw)
            .map(Json::Number)
            .unwrap_or_else(|_| Json::String(raw.into())),
        Some(Json::Bool(_)) => match raw.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Json::Bool(true),
            "false" | "0" | "no" => Json::Bool(false),
            _ => Json::String(raw.into()),
        },
        _ => Json::String(raw.into()),
    }
}

fn unknown_keys(defaults: &Json, given: &Json, prefix: &str, problems: &mut Vec<String>) {
    let (Json::Object(d), Json::Object(g)) = (defaults, given) else {
        return;
    };
    for (k, v) in g {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        if FREE_FORM.contains(&path.as_str()) {
            continue;
        }
        match d.get(k) {
            None => problems.push(format!("{path}: unknown key")),
            Some(dv) => unknown_keys(dv, v, &path, problems),
        }
    }
}

/// Type-checks each given leaf on its own against the defaults, so that every wrong value is
/// reported, not just the first serde meets.
fn field_errors(defaults: &Json, merged: &Json, problems: &mut Vec<String>) {
    fn check<T: DeserializeOwned>(
        section: &str,
        defaults: &Json,
        merged: &Json,
        problems: &mut Vec<String>,
    ) {
        let (Some(Json::Object(d)), Some(Json::Object(m))) =
            (defaults.get(section), merged.get(section))
        else {
            if merged.get(section).is_some_and(|v| !v.is_object()) {
                problems.push(format!("{section}: must be a table"));
            }
            return;
        };
        for (key, value) in m {
            if !d.contains_key(key) {
                continue; // reported as unknown
            }
            let mut probe = d.clone();
            probe.insert(key.clone(), value.clone());
            if let Err(e) = serde_json::from_value::<T>(Json::Object(probe)) {
                problems.push(format!("{section}.{key}: {e}"));
            }
        }
    }
    check::<KafkaConfig>("kafka", defaults, merged, problems);
    check::<PostgresConfig>("postgres", defaults, merged, problems);
    check::<S3Config>("s3", defaults, merged, problems);
    check::<RegistryConfig>("schema_registry", defaults, merged, problems);
    check::<RuntimeConfig>("runtime", defaults, merged, problems);
    check::<OutboxConfig>("outbox", defaults, merged, problems);
    check::<TelemetryConfig>("telemetry", defaults, merged, problems);
    check::<CasConfig>("cas", defaults, merged, problems);
    check::<RelayConfig>("relay", defaults, merged, problems);
    check::<MaterializerConfig>("materializer", defaults, merged, problems);
    check::<GatewayConfig>("gateway", defaults, merged, problems);
    check::<CoordinatorConfig>("coordinator", defaults, merged, problems);
    check::<CacheConfig>("cache", defaults, merged, problems);
}
