//! `weir patch apply`: the materializer's JSON Patch engine and budget on files.

use std::path::Path;

use anyhow::Context;
use weir_runtime::config::Config;

use crate::cli::PatchCommand;

/// Runs one patch command.
pub fn run(cfg: &Config, command: PatchCommand) -> anyhow::Result<bool> {
    match command {
        PatchCommand::Apply {
            doc,
            patch,
            no_validate,
        } => apply(cfg, &doc, &patch, no_validate),
    }
}

/// A file's text; `-` is standard input.
fn read(p: &Path) -> anyhow::Result<String> {
    if p.as_os_str() == "-" {
        Ok(std::io::read_to_string(std::io::stdin())?)
    } else {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    }
}

/// Prints the patched document; false (with the reason's code) when the patch is invalid,
/// over the budget, or (unless `no_validate`) leaves an invalid workflow definition.
fn apply(cfg: &Config, doc: &Path, patch: &Path, no_validate: bool) -> anyhow::Result<bool> {
    let mut doc: serde_json::Value = weir_model::patch::parse_json_strict(&read(doc)?)
        .context("the document is not valid JSON")?;
    let ops = match weir_model::patch::Patch::from_json_str(&read(patch)?) {
        Ok(ops) => ops,
        Err(e) => {
            eprintln!("error ({}): {e}", e.code());
            return Ok(false);
        }
    };
    // The materializer's budget, so a patch that would be rejected there is rejected
    // here, with its reason, instead of exhausting memory or the stack.
    let budget = cfg.materializer.budget();
    if let Err(e) = ops.apply_with(&mut doc, &budget) {
        eprintln!("error ({}): {e}", e.code());
        if e.is_over_budget() {
            eprintln!("(the limits are materializer.patch_max_*; see `weir config`)");
        }
        return Ok(false);
    }
    if !no_validate {
        let limits = cfg.materializer.limits();
        if let Err(e) = weir_model::definition::check(&doc, &limits) {
            eprintln!(
                "error ({}): the result is not a valid workflow definition: {e}",
                e.code()
            );
            return Ok(false);
        }
    }
    outln!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(true)
}
