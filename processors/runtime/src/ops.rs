//! Operator commands that are more than a call: `weir schemas check|register` and
//! `weir doctor`. They print for people and return whether everything is fine; the binary
//! turns that into the exit code.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use crate::config::Config;
use crate::events::ALL_TOPICS;
use crate::registry::{backward_problems, value_subject, RegistryClient, RegistryError};

/// The schemas to check or register: from `dir` (files `<topic>.avsc`) when given, else
/// the ones compiled into this binary. Keys are unprefixed topic names.
pub fn load_schemas(dir: Option<&Path>) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (topic, text) in ALL_TOPICS {
        let text = match dir {
            Some(d) => {
                let path = d.join(format!("{topic}.avsc"));
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?
            }
            None => text.to_string(),
        };
        apache_avro::Schema::parse_str(&text)
            .map_err(|e| format!("{topic}: schema does not parse: {e}"))?;
        out.insert(topic.to_string(), text);
    }
    Ok(out)
}

/// Result of checking one subject.
#[derive(Debug)]
pub enum SchemaStatus {
    /// Not registered yet: any schema is acceptable.
    New,
    /// Exactly the registered latest version.
    Current {
        /// Registered version.
        version: u32,
    },
    /// Differs from the latest version but can read everything it wrote.
    Compatible {
        /// Registered version it was checked against.
        version: u32,
    },
    /// Cannot read data written with the latest version; why, field by field.
    Incompatible {
        /// Registered version it was checked against.
        version: u32,
        /// Field-level reasons.
        problems: Vec<String>,
    },
}

/// Checks each schema against the latest registered version of its subject (BACKWARD).
pub async fn check_schemas(
    cfg: &Config,
    schemas: &BTreeMap<String, String>,
) -> Result<Vec<(String, SchemaStatus)>, RegistryError> {
    let registry = RegistryClient::new(&cfg.schema_registry)?;
    let mut out = Vec::new();
    for (topic, text) in schemas {
        let subject = value_subject(&cfg.kafka.topic(topic));
        let status = match registry.latest(&subject).await? {
            None => SchemaStatus::New,
            Some(latest) => {
                let same = apache_avro::Schema::parse_str(&latest.schema)
                    .ok()
                    .zip(apache_avro::Schema::parse_str(text).ok())
                    .is_some_and(|(a, b)| a.canonical_form() == b.canonical_form());
                if same {
                    SchemaStatus::Current {
                        version: latest.version,
                    }
                } else {
                    let problems = backward_problems(text, &latest.schema)?;
                    if problems.is_empty() {
                        SchemaStatus::Compatible {
                            version: latest.version,
                        }
                    } else {
                        SchemaStatus::Incompatible {
                            version: latest.version,
                            problems,
                        }
                    }
                }
            }
        };
        out.push((subject, status));
    }
    Ok(out)
}

/// A line of a schema report on stdout. The work goes on whatever becomes of the output: a
/// reader that stops early (`weir schemas register | head`) must not stop a registration half
/// way, so a failed write is ignored rather than a panic.
macro_rules! report {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// Prints a check; returns false if any schema is incompatible.
pub fn print_check(results: &[(String, SchemaStatus)]) -> bool {
    let mut ok = true;
    for (subject, status) in results {
        match status {
            SchemaStatus::New => report!("{subject:<45} new (not registered yet)"),
            SchemaStatus::Current { version } => {
                report!("{subject:<45} unchanged (version {version})")
            }
            SchemaStatus::Compatible { version } => {
                report!("{subject:<45} BACKWARD compatible with version {version}")
            }
            SchemaStatus::Incompatible { version, problems } => {
                ok = false;
                report!("{subject:<45} INCOMPATIBLE with version {version}:");
                for p in problems {
                    report!("    - {p}");
                }
            }
        }
    }
    ok
}

/// Registers every schema whose check passed, with BACKWARD compatibility on its subject.
/// Refuses all of them if any is incompatible.
pub async fn register_schemas(
    cfg: &Config,
    schemas: &BTreeMap<String, String>,
) -> Result<bool, RegistryError> {
    let checked = check_schemas(cfg, schemas).await?;
    if !print_check(&checked) {
        eprintln!("refusing to register: fix the incompatible schemas above (add defaults, keep fields and union branches)");
        return Ok(false);
    }
    let registry = RegistryClient::new(&cfg.schema_registry)?;
    for (topic, text) in schemas {
        let subject = value_subject(&cfg.kafka.topic(topic));
        // Before registering, so the registry enforces the rule on the first change too.
        // Registries that do not support per-subject config still work; weir checks itself.
        if let Err(e) = registry.set_compatibility(&subject, "BACKWARD").await {
            tracing::debug!(%subject, error = %e, "setting compatibility");
        }
        let id = registry.register(&subject, text).await?;
        report!("registered {subject} (schema id {id})");
    }
    Ok(true)
}

/// One line of the doctor's table.
struct Check {
    name: String,
    ok: bool,
    detail: String,
    fix: String,
}

/// Checks every dependency, prints a table, returns whether all passed. `Err` only when
/// stdout cannot be written (a reader that stopped early: `weir doctor | head`).
pub async fn doctor(cfg: &Config) -> std::io::Result<bool> {
    let mut checks = Vec::new();
    checks.extend(check_kafka(cfg).await);
    checks.extend(check_postgres(cfg).await);
    checks.push(check_bucket(cfg).await);
    checks.extend(check_registry(cfg).await);

    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(10);
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:<width$}  {:<6}  DETAIL", "CHECK", "STATUS")?;
    for c in &checks {
        writeln!(
            out,
            "{:<width$}  {:<6}  {}",
            c.name,
            if c.ok { "ok" } else { "FAIL" },
            c.detail
        )?;
    }
    let failed: Vec<_> = checks.iter().filter(|c| !c.ok).collect();
    if failed.is_empty() {
        writeln!(out, "\nall {} checks passed", checks.len())?;
        Ok(true)
    } else {
        writeln!(
            out,
            "\n{} of {} checks failed. To fix:",
            failed.len(),
            checks.len()
        )?;
        for c in failed {
            writeln!(out, "  - {}: {}", c.name, c.fix)?;
        }
        Ok(false)
    }
}

fn check(name: &str, ok: bool, detail: impl Into<String>, fix: &str) -> Check {
    Check {
        name: name.to_string(),
        ok,
        detail: detail.into(),
        fix: fix.to_string(),
    }
}

async fn check_kafka(cfg: &Config) -> Vec<Check> {
    const FIX_UP: &str = "start Kafka (infra/local/up) or set KAFKA_BOOTSTRAP_SERVERS";
    let kafka = cfg.kafka.clone();
    let metadata = tokio::task::spawn_blocking(move || {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &kafka.bootstrap_servers);
        for (k, v) in &kafka.consumer {
            c.set(k, v);
        }
        let consumer: BaseConsumer = c.create().map_err(|e| e.to_string())?;
        let md = consumer
            .fetch_metadata(None, Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        let topics: BTreeMap<String, usize> = md
            .topics()
            .iter()
            .map(|t| (t.name().to_string(), t.partitions().len()))
            .collect();
        Ok::<_, String>((md.brokers().len(), topics))
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    match metadata {
        Err(e) => vec![check("kafka", false, e, FIX_UP)],
        Ok((brokers, topics)) => {
            let mut out = vec![check(
                "kafka",
                true,
                format!("{brokers} broker(s) at {}", cfg.kafka.bootstrap_servers),
                FIX_UP,
            )];
            let missing: Vec<String> = crate::kafka::planned_topics(&cfg.kafka)
                .into_iter()
                .filter(|(t, _)| !topics.contains_key(t))
                .map(|(t, _)| t)
                .collect();
            out.push(if missing.is_empty() {
                check(
                    "kafka topics",
                    true,
                    format!("all {} present", ALL_TOPICS.len()),
                    "",
                )
            } else {
                check(
                    "kafka topics",
                    false,
                    format!("missing: {}", missing.join(", ")),
                    "run `weir topics create`",
                )
            });
            out
        }
    }
}

async fn check_postgres(cfg: &Config) -> Vec<Check> {
    const FIX_UP: &str = "start Postgres (infra/local/up) or set DATABASE_URL";
    let pool = match crate::db::pool(&cfg.postgres) {
        Ok(p) => p,
        Err(e) => return vec![check("postgres", false, e.to_string(), FIX_UP)],
    };
    let version = tokio::time::timeout(
        Duration::from_secs(5),
        sqlx::query!(
            r#"SELECT current_setting('server_version') AS "version!",
                      current_setting('server_version_num') AS "version_num!""#
        )
        .fetch_one(&pool),
    )
    .await;
    let (version, version_num) = match version {
        Ok(Ok(v)) => (v.version, v.version_num),
        Ok(Err(e)) => return vec![check("postgres", false, e.to_string(), FIX_UP)],
        Err(_) => return vec![check("postgres", false, "timed out after 5 s", FIX_UP)],
    };
    let mut out = vec![match crate::versions::check_postgres(&version_num) {
        Ok(()) => check("postgres", true, format!("server {version}"), FIX_UP),
        Err(e) => check(
            "postgres",
            false,
            e,
            "upgrade PostgreSQL (on RDS: db_engine_version)",
        ),
    }];
    let vector =
        sqlx::query_scalar!("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            .fetch_optional(&pool)
            .await;
    out.push(match vector {
        Ok(Some(v)) => match crate::versions::check_pgvector(&v) {
            Ok(()) => check("pgvector", true, format!("vector {v}"), ""),
            Err(e) => check(
                "pgvector",
                false,
                e,
                "ALTER EXTENSION vector UPDATE (on RDS: a db_engine_version shipping pgvector 0.8)",
            ),
        },
        Ok(None) => {
            let available = sqlx::query_scalar!(
                "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"
            )
            .fetch_optional(&pool)
            .await
            .ok()
            .flatten()
            .flatten();
            match available {
                Some(v) => check(
                    "pgvector",
                    false,
                    format!("available ({v}) but not created"),
                    "run `weir migrate`",
                ),
                None => check(
                    "pgvector",
                    false,
                    "not installed on the server",
                    "install pgvector 0.8 (infra/local/up builds it)",
                ),
            }
        }
        Err(e) => check(
            "pgvector",
            false,
            e.to_string(),
            "check the database role's rights",
        ),
    });
    // `_sqlx_migrations` is sqlx's bookkeeping, made by `weir migrate`, not by a file in
    // sql/: the compile-time check's database has no such table, so this one stays unchecked.
    let applied: Result<Vec<i64>, _> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(&pool)
            .await;
    let expected: Vec<i64> = crate::db::MIGRATOR.iter().map(|m| m.version).collect();
    out.push(match applied {
        Ok(applied) => {
            let missing: Vec<String> = expected
                .iter()
                .filter(|v| !applied.contains(v))
                .map(|v| v.to_string())
                .collect();
            if missing.is_empty() {
                check(
                    "migrations",
                    true,
                    format!("{} applied", expected.len()),
                    "",
                )
            } else {
                check(
                    "migrations",
                    false,
                    format!("pending: {}", missing.join(", ")),
                    "run `weir migrate`",
                )
            }
        }
        Err(_) => check("migrations", false, "none applied", "run `weir migrate`"),
    });
    pool.close().await;
    out
}

async fn check_bucket(cfg: &Config) -> Check {
    const FIX: &str = "start the S3 server (infra/local/up), create the bucket, or fix S3_* / \
                       AWS_* settings (the local stack needs WEIR__S3__PROFILE=local: \
                       eval \"$(infra/local/env)\")";
    let client = crate::s3::client(&cfg.s3).await;
    let key = format!(".weir-doctor/{}", uuid::Uuid::now_v7());
    let put = tokio::time::timeout(
        Duration::from_secs(10),
        client
            .put_object()
            .bucket(&cfg.s3.bucket)
            .key(&key)
            .body(aws_sdk_s3::primitives::ByteStream::from_static(
                b"weir doctor",
            ))
            .send(),
    )
    .await;
    match put {
        Err(_) => check("s3 bucket", false, "timed out after 10 s", FIX),
        Ok(Err(e)) => check(
            "s3 bucket",
            false,
            format!(
                "{} ({} profile, {}): {}",
                cfg.s3.bucket,
                match cfg.s3.profile {
                    crate::config::S3Profile::Aws => "aws",
                    crate::config::S3Profile::Local => "local",
                },
                cfg.s3.effective_endpoint().unwrap_or("AWS endpoint"),
                aws_sdk_s3::error::DisplayErrorContext(&e)
            ),
            FIX,
        ),
        Ok(Ok(_)) => {
            let _ = client
                .delete_object()
                .bucket(&cfg.s3.bucket)
                .key(&key)
                .send()
                .await;
            check(
                "s3 bucket",
                true,
                format!("{} writable", cfg.s3.bucket),
                FIX,
            )
        }
    }
}

async fn check_registry(cfg: &Config) -> Vec<Check> {
    const FIX_UP: &str = "start the schema registry (infra/local/up) or set SCHEMA_REGISTRY_URL";
    let registry = match RegistryClient::new(&cfg.schema_registry) {
        Ok(r) => r,
        Err(e) => return vec![check("schema registry", false, e.to_string(), FIX_UP)],
    };
    let subjects = match registry.subjects().await {
        Ok(s) => s,
        Err(e) => return vec![check("schema registry", false, e.to_string(), FIX_UP)],
    };
    let mut out = vec![check(
        "schema registry",
        true,
        format!(
            "{} subject(s) at {}",
            subjects.len(),
            cfg.schema_registry.url
        ),
        FIX_UP,
    )];
    let mut missing = Vec::new();
    for (topic, schema) in ALL_TOPICS {
        let subject = value_subject(&cfg.kafka.topic(topic));
        match registry.lookup(&subject, schema).await {
            Ok(Some(_)) => {}
            Ok(None) => missing.push(subject),
            Err(e) => missing.push(format!("{subject} ({e})")),
        }
    }
    out.push(if missing.is_empty() {
        check(
            "schemas",
            true,
            format!("all {} subjects registered", ALL_TOPICS.len()),
            "",
        )
    } else {
        check(
            "schemas",
            false,
            format!("not registered: {}", missing.join(", ")),
            "run `weir schemas register`",
        )
    });
    out
}
