//! `weir keys create | list | revoke`: the gateway's API keys (see docs/gateway.md).

use anyhow::Context;
use weir_gateway::auth::{KeyInfo, Revoked};
use weir_runtime::config::Config;

use crate::cli::KeysCommand;

/// Runs one keys command.
pub async fn run(cfg: &Config, command: KeysCommand) -> anyhow::Result<bool> {
    match command {
        KeysCommand::Create {
            workspace,
            permission,
        } => create(cfg, &workspace, permission).await,
        KeysCommand::List { workspace, json } => list(cfg, workspace.as_deref(), json).await,
        KeysCommand::Revoke { key_id } => revoke(cfg, &key_id).await,
    }
}

/// Prints the new key once on stdout (only its hash is stored), what it is on stderr.
async fn create(
    cfg: &Config,
    workspace: &str,
    permission: weir_model::Permission,
) -> anyhow::Result<bool> {
    anyhow::ensure!(!workspace.is_empty(), "--workspace must not be empty");
    let pool = weir_runtime::db::pool(&cfg.postgres)?;
    let key = weir_gateway::create_key(&pool, workspace, permission)
        .await
        .context("creating the key")?;
    eprintln!(
        "created key {} for workspace {workspace} ({}); it is shown only this once:",
        key.key_id,
        permission.as_str()
    );
    outln!("{}", key.key);
    Ok(true)
}

/// A table, or one JSON object per line; never a key or its hash.
async fn list(cfg: &Config, workspace: Option<&str>, json: bool) -> anyhow::Result<bool> {
    let pool = weir_runtime::db::pool(&cfg.postgres)?;
    let keys = weir_gateway::auth::list_keys(&pool, workspace)
        .await
        .context("listing keys")?;
    if json {
        for k in &keys {
            outln!("{}", serde_json::to_string(k)?);
        }
    } else {
        let width =
            |f: fn(&KeyInfo) -> usize, min: usize| keys.iter().map(f).max().unwrap_or(0).max(min);
        let id_w = width(|k| k.key_id.len(), 6);
        let ws_w = width(|k| k.workspace_id.len(), 9);
        outln!(
            "{:<id_w$} {:<ws_w$} {:<10} {:<20} REVOKED",
            "KEY_ID",
            "WORKSPACE",
            "PERMISSION",
            "CREATED"
        );
        for k in &keys {
            outln!(
                "{:<id_w$} {:<ws_w$} {:<10} {:<20} {}",
                k.key_id,
                k.workspace_id,
                k.permission,
                k.created_at,
                k.revoked_at.as_deref().unwrap_or("-")
            );
        }
    }
    Ok(true)
}

/// False when there is no such key.
async fn revoke(cfg: &Config, key_id: &str) -> anyhow::Result<bool> {
    let pool = weir_runtime::db::pool(&cfg.postgres)?;
    let ttl_ms = cfg.gateway.key_cache_ttl_ms;
    match weir_gateway::auth::revoke_key(&pool, key_id)
        .await
        .context("revoking the key")?
    {
        Revoked::Now => {
            eprintln!(
                "revoked key {key_id}; gateways refuse it at once (notified), at the \
                 latest within {ttl_ms} ms"
            );
            Ok(true)
        }
        Revoked::Already => {
            eprintln!("key {key_id} was already revoked");
            Ok(true)
        }
        Revoked::Unknown => {
            eprintln!("no key {key_id}");
            Ok(false)
        }
    }
}
