//! `weir dlq list | show | redrive`: what was dead-lettered and why, and sending records
//! back to their source topic once the cause is fixed (see [`weir_runtime::dlq`]).

use weir_runtime::config::Config;

use crate::cli::DlqCommand;

/// `weir dlq list | show | redrive`.
pub async fn run(cfg: &Config, command: DlqCommand) -> anyhow::Result<bool> {
    use weir_runtime::dlq::{self, DlqPosition};
    let codec = weir_runtime::codec::Codec::new(&cfg.schema_registry, &cfg.kafka)?;
    let pool = weir_runtime::db::pool(&cfg.postgres)?;
    let positions = |at: &[String]| -> anyhow::Result<Vec<DlqPosition>> {
        at.iter()
            .map(|a| a.parse::<DlqPosition>().map_err(anyhow::Error::from))
            .collect()
    };
    match command {
        DlqCommand::List { filter, json } => {
            let listing = dlq::read(
                cfg,
                &codec,
                Some(&pool),
                &filter.filter(),
                &[],
                filter.scan,
                filter.limit,
            )
            .await?;
            if json {
                for e in &listing.entries {
                    outln!("{}", serde_json::to_string(e)?);
                }
            } else {
                outln!(
                    "{:<10} {:<24} {:<28} {:<20} {:<14} {:<10} REASON",
                    "DLQ",
                    "TIME",
                    "SOURCE",
                    "GROUP",
                    "CLASS",
                    "REDRIVEN"
                );
                for e in &listing.entries {
                    outln!(
                        "{:<10} {:<24} {:<28} {:<20} {:<14} {:<10} {}",
                        e.at.to_string(),
                        e.time,
                        format!(
                            "{}[{}]@{}",
                            e.source_topic, e.source_partition, e.source_offset
                        ),
                        e.consumer_group,
                        e.error_class,
                        if e.redriven_at.is_some() { "yes" } else { "-" },
                        e.error_message
                    );
                }
                eprintln!(
                    "{} shown, {} scanned, {} undecodable",
                    listing.entries.len(),
                    listing.scanned,
                    listing.undecodable
                );
            }
            Ok(true)
        }
        DlqCommand::Show { at, json } => {
            let at = positions(&at)?;
            let filter = dlq::Filter::default();
            let listing = dlq::read(cfg, &codec, Some(&pool), &filter, &at, 0, at.len()).await?;
            for e in &listing.entries {
                if json {
                    outln!("{}", serde_json::to_string_pretty(e)?);
                    continue;
                }
                outln!("dead letter {}", e.at);
                outln!(
                    "  source      {}[{}]@{}",
                    e.source_topic,
                    e.source_partition,
                    e.source_offset
                );
                outln!("  group       {}", e.consumer_group);
                outln!("  class       {}", e.error_class);
                outln!("  reason      {}", e.error_message);
                outln!("  at          {}", e.time);
                outln!("  redriven    {}", e.redriven_at.as_deref().unwrap_or("no"));
                outln!(
                    "  key         {}",
                    e.original_key.as_deref().unwrap_or("(none)")
                );
                for (k, v) in &e.original_headers {
                    outln!("  header      {k} = {}", v.as_deref().unwrap_or("(null)"));
                }
                match e.original_value() {
                    None => outln!("  value       (none: a tombstone)"),
                    Some(v) => {
                        let framed = v.len() >= 5 && v[0] == 0;
                        let schema = if framed {
                            format!(
                                ", schema id {}",
                                u32::from_be_bytes([v[1], v[2], v[3], v[4]])
                            )
                        } else {
                            String::new()
                        };
                        let head: String = v.iter().take(64).map(|b| format!("{b:02x}")).collect();
                        outln!(
                            "  value       {} bytes{schema}: {head}{}",
                            v.len(),
                            if v.len() > 64 { "..." } else { "" }
                        );
                    }
                }
            }
            Ok(listing.entries.len() == at.len())
        }
        DlqCommand::Redrive {
            at,
            matching,
            filter,
            force,
            dry_run,
        } => {
            let at = positions(&at)?;
            let f = filter.filter();
            let filtered = f.source_topic.is_some()
                || f.group.is_some()
                || f.class.is_some()
                || f.reason_contains.is_some();
            if at.is_empty() && !(matching && filtered) {
                anyhow::bail!(
                    "name the dead letters: DLQ positions (`weir dlq list`), or --matching with at least one filter"
                );
            }
            let limit = if at.is_empty() {
                filter.limit
            } else {
                at.len()
            };
            let listing = dlq::read(cfg, &codec, Some(&pool), &f, &at, filter.scan, limit).await?;
            if dry_run {
                for e in &listing.entries {
                    outln!(
                        "would redrive {} to {} ({}{})",
                        e.at,
                        e.source_topic,
                        e.error_message,
                        if e.redriven_at.is_some() {
                            "; already redriven"
                        } else {
                            ""
                        }
                    );
                }
                return Ok(true);
            }
            let producer = weir_runtime::kafka::producer(&cfg.kafka)?;
            let done = dlq::redrive(cfg, &pool, &producer, &codec, &listing.entries, force).await?;
            let mut all = true;
            for r in &done {
                match (&r.landed, &r.skipped) {
                    (Some((p, o)), _) => note!("redriven {} to {}[{p}]@{o}", r.at, r.topic),
                    (None, Some(why)) => {
                        all = false;
                        eprintln!("warning: skipped {}: {why}", r.at);
                    }
                    (None, None) => {}
                }
            }
            eprintln!(
                "{} redriven, {} skipped",
                done.iter().filter(|r| r.landed.is_some()).count(),
                done.iter().filter(|r| r.skipped.is_some()).count()
            );
            Ok(all)
        }
    }
}
