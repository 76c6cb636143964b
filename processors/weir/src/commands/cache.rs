//! `weir cache purge | sweep`: explicit invalidation and upkeep of the result cache.

use weir_runtime::config::Config;

use crate::cli::CacheCommand;

/// Runs one cache command.
pub async fn run(cfg: &Config, command: CacheCommand) -> anyhow::Result<bool> {
    let pool = weir_runtime::db::pool(&cfg.postgres)?;
    match command {
        CacheCommand::Purge {
            workspace,
            node_type,
        } => {
            let purged =
                weir_cache::maintenance::purge(&pool, &workspace, node_type.as_deref()).await?;
            note!(
                "purged {} exact and {} semantic entries",
                purged.exact,
                purged.semantic
            );
            if purged.semantic >= weir_cache::maintenance::VACUUM_AFTER_DELETES {
                weir_cache::maintenance::vacuum_semantic(&pool).await?;
                outln!("vacuumed cache_semantic");
            }
        }
        CacheCommand::Sweep => {
            let cas = weir_runtime::cas::Cas::from_config(cfg).await?;
            let swept = weir_cache::maintenance::sweep_all(&pool, cfg.cache.sweep_batch).await?;
            let window = weir_cache::maintenance::GcWindow::of(&cfg.cache);
            let collected =
                weir_cache::maintenance::gc_once(&pool, &cas, window, cfg.cache.sweep_batch)
                    .await?;
            outln!("swept {swept} expired entries, collected {collected} blobs");
        }
    }
    Ok(true)
}
