//! `apijongler cleanup [CONNECTOR | --all] [--force]`, and the seed's `--cleanup C` / `--cleanup-all`.
//! Unlike the seed's, live holders keep their keys unless `--force`.

use std::io::Write;
use std::process::ExitCode;

use api_jongler::pool::Transition;

use super::exit::Usage;
use super::{Global, open_synced};

#[derive(Debug, clap::Args)]
pub struct CleanupArgs {
    /// The connector to clean up.
    #[arg(required_unless_present = "all")]
    connector: Option<String>,
    /// Every connector.
    #[arg(long, conflicts_with = "connector")]
    all: bool,
    /// Also take keys from live holders (they learn at their next write that they lost them).
    #[arg(long)]
    force: bool,
}

pub fn run(global: &Global, args: &CleanupArgs) -> anyhow::Result<ExitCode> {
    if args.connector.is_none() && !args.all {
        return Err(Usage("name a connector, or use --all".to_owned()).into());
    }
    clean(global, args.connector.as_deref(), args.force)
}

/// The seed's `--cleanup CONNECTOR` and `--cleanup-all`.
pub fn seed(global: &Global, connector: Option<&str>) -> anyhow::Result<ExitCode> {
    if !global.quiet && !global.json {
        match connector {
            Some(connector) => eprintln!("Cleaning up lockdown and error keys for {connector}..."),
            None => eprintln!("Cleaning up lockdown and error keys of all connectors..."),
        }
    }
    clean(global, connector, false)
}

fn clean(global: &Global, connector: Option<&str>, force: bool) -> anyhow::Result<ExitCode> {
    let coordinator = open_synced(global)?;
    let done: Vec<Transition> = coordinator.cleanup(connector, force)?;
    let mut stdout = std::io::stdout().lock();
    if global.json {
        let rows: Vec<_> = done
            .iter()
            .map(|t| {
                serde_json::json!({"connector": t.connector, "key": t.key_name, "from": t.from_state,
                    "to": t.to_state, "reason": t.reason})
            })
            .collect();
        writeln!(stdout, "{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    for t in &done {
        writeln!(
            stdout,
            "{} {}: {} -> {} ({})",
            t.connector,
            t.key_name,
            t.from_state.as_deref().unwrap_or("-"),
            t.to_state,
            t.reason
        )?;
    }
    let live = coordinator.store().held_keys(connector)?.len();
    let kept =
        if live > 0 && !force { format!("; {live} held by live processes, kept (use --force)") } else { String::new() };
    writeln!(stdout, "Cleanup completed: {} keys changed{kept}.", done.len())?;
    Ok(ExitCode::SUCCESS)
}
