//! `weir workflows replay`: a workflow rebuilt from its patch log, checked against its head.

use weir_runtime::config::Config;

use crate::cli::WorkflowsCommand;

/// Runs one workflows command.
pub async fn run(cfg: &Config, command: WorkflowsCommand) -> anyhow::Result<bool> {
    match command {
        WorkflowsCommand::Replay {
            workflow_id,
            workspace,
            to_version,
        } => replay(cfg, &workspace, &workflow_id, to_version).await,
    }
}

/// Prints the definition at `to_version` when given; false when the replay differs from
/// the stored head.
async fn replay(
    cfg: &Config,
    workspace: &str,
    workflow_id: &str,
    to_version: Option<i64>,
) -> anyhow::Result<bool> {
    let pool = weir_runtime::db::pool(&cfg.postgres)?;
    let cas = weir_runtime::cas::Cas::from_config(cfg).await?;
    let report = weir_materializer::replay::replay_with(
        &pool,
        &cas,
        workspace,
        workflow_id,
        to_version,
        &cfg.materializer.limits(),
        &cfg.materializer.budget(),
    )
    .await?;
    if to_version.is_some() {
        outln!("{}", serde_json::to_string_pretty(&report.definition)?);
    }
    eprintln!(
        "replayed {}/{} to version {} (stored head: {})",
        report.workspace_id,
        report.workflow_id,
        report.version,
        report
            .stored_version
            .map_or("none".into(), |v| format!("version {v}"))
    );
    if report.differences.is_empty() {
        eprintln!("no differences");
        Ok(true)
    } else {
        for d in &report.differences {
            eprintln!("DIFFERENCE: {d}");
        }
        Ok(false)
    }
}
