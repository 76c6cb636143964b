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
    let options: PgConnectOptions = cfg.url.expose().parse()?;
    let options = options.application_name("weir");
    Ok(PgPoolOptions::new()
        .max_connections(cfg.max_connections)
        .acquire_timeout(Duration::from_millis(cfg.acquire_timeout_ms))
        .connect_lazy_with(options))
}
