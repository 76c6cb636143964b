//! Setting up the stack weir runs on: `weir migrate`, `weir topics create`,
//! `weir schemas register | check` (`weir doctor` is [`weir_runtime::ops::doctor`]).

use anyhow::Context;
use weir_runtime::{config::Config, ops};

use crate::cli::{SchemasCommand, TopicsCommand};

/// `weir migrate`: the SQL migrations embedded in this binary.
pub async fn migrate(cfg: &Config) -> anyhow::Result<bool> {
    let pool = weir_runtime::db::pool(&cfg.postgres)?;
    weir_runtime::db::MIGRATOR
        .run(&pool)
        .await
        .context("applying migrations")?;
    outln!(
        "migrations applied ({} known)",
        weir_runtime::db::MIGRATOR.iter().count()
    );
    Ok(true)
}

/// `weir topics create`.
pub async fn topics(cfg: &Config, command: TopicsCommand) -> anyhow::Result<bool> {
    match command {
        TopicsCommand::Create => {
            let outcomes = weir_runtime::kafka::create_topics(&cfg.kafka)
                .await
                .context("creating topics")?;
            for (topic, outcome) in outcomes {
                outln!("{topic:<40} {outcome:?}");
            }
            Ok(true)
        }
    }
}

/// `weir schemas register | check`.
pub async fn schemas(cfg: &Config, command: SchemasCommand) -> anyhow::Result<bool> {
    let (dir, register) = match command {
        SchemasCommand::Register { dir } => (dir, true),
        SchemasCommand::Check { dir } => (dir, false),
    };
    let schemas = ops::load_schemas(dir.as_deref()).map_err(anyhow::Error::msg)?;
    if register {
        Ok(ops::register_schemas(cfg, &schemas).await?)
    } else {
        let results = ops::check_schemas(cfg, &schemas).await?;
        let ok = ops::print_check(&results);
        if !ok {
            eprintln!("schemas check failed: a change is not BACKWARD compatible");
        }
        Ok(ok)
    }
}
