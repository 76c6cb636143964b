//! An outbox of its own, beside a live deployment: a Postgres schema holding private copies of
//! `weir_outbox`, `weir_outbox_dead` and `weir_relays`, a pool whose sessions find those three
//! names there first (`search_path = <schema>, <the deployment's schema>`: every other table is
//! the deployment's), and a lane-lock namespace of its own.
//!
//! Benchmarks write and publish through it so that a running deployment is left alone: its
//! relays never see (so never publish, never trip on) the benchmark's rows, and the
//! benchmark's relays never take the deployment's lanes. Give the [`PrivateOutbox::pool`] to
//! whatever writes the outbox and to the relays, with [`weir_relay::Relay::with_lock_namespace`]`(
//! `[`PrivateOutbox::namespace`]`)`.
//!
//! # Invariants
//! - The schema is named `weir_private_<label>_<uuid>`; [`PrivateOutbox::drop_all`] removes it
//!   with everything in it. A run killed before that leaves the schema behind, harmless and
//!   found by its name prefix (`DROP SCHEMA weir_private_... CASCADE`).
//! - Never run migrations through the private pool: they would create their tables in the
//!   private schema (the first of the search path).

use sqlx::PgPool;
use weir_runtime::config::PostgresConfig;
use weir_runtime::db::PrivateSchema;

/// A private outbox; see the module docs.
pub struct PrivateOutbox {
    schema: PrivateSchema,
    namespace: i32,
}

impl PrivateOutbox {
    /// Creates the schema and its tables (copies of the deployment's, migrations applied) and
    /// a pool that uses them. `label` (letters, digits and `_` are kept) names it for humans.
    pub async fn create(cfg: &PostgresConfig, label: &str) -> Result<Self, sqlx::Error> {
        let schema = PrivateSchema::create(
            cfg,
            label,
            &["weir_outbox", "weir_outbox_dead", "weir_relays"],
        )
        .await?;
        let namespace = namespace_of(schema.schema());
        Ok(Self { schema, namespace })
    }

    /// The pool whose sessions use the private tables.
    pub fn pool(&self) -> &PgPool {
        self.schema.pool()
    }

    /// The schema's name.
    pub fn schema(&self) -> &str {
        self.schema.schema()
    }

    /// The lane-lock namespace of relays of this outbox.
    pub fn namespace(&self) -> i32 {
        self.namespace
    }

    /// Closes the pool and drops the schema with its tables (stop the relays first).
    pub async fn drop_all(self) -> Result<(), sqlx::Error> {
        self.schema.drop_all().await
    }
}

/// A lock namespace derived from the schema name (FNV-1a), never the deployment's.
fn namespace_of(schema: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in schema.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let ns = i32::from_ne_bytes(h.to_ne_bytes());
    if ns == weir_relay::LOCK_NAMESPACE {
        ns.wrapping_add(1)
    } else {
        ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_differ_from_the_deployment() {
        assert_ne!(namespace_of("weir_private_a"), weir_relay::LOCK_NAMESPACE);
        assert_ne!(
            namespace_of("weir_private_a"),
            namespace_of("weir_private_b")
        );
        assert_eq!(weir_runtime::db::quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
