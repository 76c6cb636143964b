//! Layering: built-in defaults, then the TOML file, then the standard variables, then
//! `WEIR__SECTION__KEY` variables; every problem is collected before anything is reported.

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
        let mut merged = defaults.clone();

        if let Some(path) = file {
            match std::fs::read_to_string(path) {
                Ok(text) => match toml::from_str::<toml::Value>(&text) {
                    Ok(value) => match serde_json::to_value(value) {
                        Ok(json) => merge(&mut merged, json),
                        Err(e) => problems.push(format!("{}: {e}", path.display())),
                    },
                    Err(e) => problems.push(format!("{}: {e}", path.display())),
                },
                Err(e) => problems.push(format!("{}: cannot read: {e}", path.display())),
            }
        }

        let env: Vec<(String, String)> = env.into_iter().collect();
        for (var, key) in STANDARD_ENV {
            if let Some((_, value)) = env.iter().find(|(k, _)| k == var) {
                set_path(&mut merged, key, Json::String(value.clone()));
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
            let mut key = parts[..2].join(".");
            if parts.len() > 2 {
                // librdkafka option names use dots, which variable names cannot hold.
                key = format!("{key}.{}", parts[2..].join("_").replace('_', "."));
            }
            let free = FREE_FORM.iter().any(|f| key.starts_with(&format!("{f}.")));
            let typed = if free {
                Json::String(value.clone())
            } else {
                typed_like(lookup(&defaults, &key), value)
            };
            set_path(&mut merged, &key, typed);
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

fn merge(base: &mut Json, over: Json) {
    match (base, over) {
        (Json::Object(b), Json::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

fn set_path(root: &mut Json, dotted: &str, value: Json) {
    // Free-form maps take the rest of the path as one key ("kafka.consumer.fetch.wait.max.ms").
    let head: Vec<&str> = dotted.splitn(3, '.').collect();
    let path: Vec<&str> = if head.len() == 3 && FREE_FORM.contains(&head[..2].join(".").as_str()) {
        head
    } else {
        dotted.split('.').collect()
    };
    let mut cur = root;
    for (i, part) in path.iter().enumerate() {
        if !cur.is_object() {
            *cur = Json::Object(Default::default());
        }
        let Json::Object(map) = cur else { return };
        if i + 1 == path.len() {
            map.insert((*part).to_string(), value);
            return;
        }
        cur = map
            .entry((*part).to_string())
            .or_insert_with(|| Json::Object(Default::default()));
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
