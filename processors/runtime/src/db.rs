//! The Postgres pool and the migrations in `sql/`, embedded in the binary.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::config::PostgresConfig;

/// The migrations of `sql/`, applied by `weir migrate`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../sql");

/// Connects a pool. Connections are made lazily so a process can start (and report not
/// ready) while Postgres is still down.
pub fn pool(cfg: &PostgresConfig) -> Result<PgPool, sqlx::Error> {
    let (pool, options) = options(cfg)?;
    Ok(pool.connect_lazy_with(options))
}

/// The pool and connection options every weir pool starts from.
fn options(cfg: &PostgresConfig) -> Result<(PgPoolOptions, PgConnectOptions), sqlx::Error> {
    let options: PgConnectOptions = cfg.url.expose().parse()?;
    let pool = PgPoolOptions::new()
        .max_connections(cfg.max_connections)
        .acquire_timeout(Duration::from_millis(cfg.acquire_timeout_ms));
    Ok((pool, options.application_name("weir")))
}

/// A connection idle longer than this is pinged before a batch uses it.
const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Connects the pool of a batch processor (consumers, the coordinator's timers). Like
/// [`pool`], but a connection is pinged before use only when it sat idle for a second or more:
/// under load the ping is one more round trip on every batch's path (each batch acquires a
/// connection), and a connection used a moment ago is almost always alive.
///
/// A connection that broke meanwhile (a Postgres restart, a failover) fails the first
/// statement of the batch with an I/O error, which the runtime retries as transient; sqlx
/// then discards that connection when it is returned (its release ping fails), and the retry
/// gets another one. Nothing is applied twice or lost: the batch's transaction never began.
pub fn batch_pool(cfg: &PostgresConfig) -> Result<PgPool, sqlx::Error> {
    let (pool, options) = options(cfg)?;
    Ok(pool
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_AFTER_IDLE {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(options))
}

/// Private copies of some of the deployment's tables, beside a live deployment: a schema
/// `weir_private_<label>_<uuid>` holding `CREATE TABLE .. (LIKE <table> INCLUDING ALL)`
/// copies, and a pool whose sessions find those names there first (`search_path = <schema>,
/// <the deployment's schema>`: every other table is the deployment's).
///
/// Benchmarks write through it so that a running deployment is left alone (its relays never
/// see a benchmark's outbox rows, its lookups never walk a benchmark's cache entries, its
/// indexes are never dropped or rebuilt).
///
/// # Invariants
/// - [`PrivateSchema::drop_all`] removes the schema with everything in it. A run killed before
///   that leaves the schema behind, harmless and found by its name prefix.
/// - DDL through the private pool must name the private schema explicitly
///   ([`PrivateSchema::qualified`]): an unqualified `DROP INDEX x` that the private schema
///   lacks resolves to the deployment's. Never run migrations through it.
pub struct PrivateSchema {
    schema: String,
    pool: PgPool,
    admin: PgPool,
}

impl PrivateSchema {
    /// Creates the schema with copies of `tables` and a pool that uses them. `label` (letters,
    /// digits and `_` are kept) names it for humans.
    pub async fn create(
        cfg: &PostgresConfig,
        label: &str,
        tables: &[&str],
    ) -> Result<Self, sqlx::Error> {
        let label: String = label
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(20)
            .collect::<String>()
            .to_ascii_lowercase();
        let schema = format!("weir_private_{label}_{}", uuid::Uuid::now_v7().simple());
        let admin = pool(cfg)?;
        let home: String = sqlx::query_scalar("SELECT current_schema()::text")
            .fetch_one(&admin)
            .await?;
        let (s, h) = (quote_ident(&schema), quote_ident(&home));
        let mut ddl = format!("CREATE SCHEMA {s};");
        for t in tables {
            let t = quote_ident(t);
            ddl.push_str(&format!(
                "CREATE TABLE {s}.{t} (LIKE {h}.{t} INCLUDING ALL);"
            ));
        }
        sqlx::raw_sql(&ddl).execute(&admin).await?;
        let options: PgConnectOptions = cfg.url.expose().parse()?;
        let options = options
            .application_name("weir-private")
            .options([("search_path", format!("{s},{h}"))]);
        let pool = PgPoolOptions::new()
            .max_connections(cfg.max_connections)
            .acquire_timeout(Duration::from_millis(cfg.acquire_timeout_ms))
            .connect_lazy_with(options);
        Ok(Self {
            schema,
            pool,
            admin,
        })
    }

    /// The pool whose sessions use the private tables.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema's name.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// `name` qualified with the private schema, quoted, for DDL.
    pub fn qualified(&self, name: &str) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(name))
    }

    /// Closes the pool and drops the schema with its tables (stop what uses it first).
    pub async fn drop_all(self) -> Result<(), sqlx::Error> {
        self.pool.close().await;
        sqlx::raw_sql(&format!(
            "SET client_min_messages = warning; DROP SCHEMA IF EXISTS {} CASCADE",
            quote_ident(&self.schema)
        ))
        .execute(&self.admin)
        .await?;
        self.admin.close().await;
        Ok(())
    }
}

/// `name` as a quoted SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
