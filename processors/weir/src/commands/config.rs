//! `weir config`: the effective configuration, in the format weir reads.

use weir_runtime::config::Config;

/// Prints the effective configuration as a TOML file (secrets hidden, as comments).
pub fn print(cfg: &Config) -> anyhow::Result<bool> {
    out!("{}", cfg.to_toml_redacted()?);
    Ok(true)
}
