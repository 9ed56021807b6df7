//! `apijongler db [--path]`: where the database is, its schema version, and queries to start from;
//! `apijongler db prune --older-than 30d`: history and request rows older than that deleted, in small
//! batches that never hold the write lock for long (see [`api_jongler::retention`]).

use std::io::Write;
use std::process::ExitCode;

use super::exit::Usage;
use super::{Global, open, parse_duration};

#[derive(Debug, clap::Args)]
pub struct DbArgs {
    /// Print only the path (for `sqlite3 "$(apijongler db --path)"`).
    #[arg(long)]
    path: bool,
    #[command(subcommand)]
    command: Option<DbCommand>,
}

#[derive(Debug, clap::Subcommand)]
enum DbCommand {
    /// Delete history and request rows older than --older-than (keys and lockdowns are kept).
    Prune {
        /// The age past which rows go (30d, 12w, 720h).
        #[arg(long, value_name = "DURATION")]
        older_than: String,
    },
}

pub fn run(global: &Global, args: &DbArgs) -> anyhow::Result<ExitCode> {
    if let Some(DbCommand::Prune { older_than }) = &args.command {
        return prune(global, older_than);
    }
    let coordinator = open(global)?;
    let path = coordinator.db_path().display().to_string();
    let mut stdout = std::io::stdout().lock();
    if args.path {
        writeln!(stdout, "{path}")?;
        return Ok(ExitCode::SUCCESS);
    }
    let version = coordinator.store().schema_version()?;
    if global.json {
        writeln!(stdout, "{}", serde_json::json!({"path": path, "schema_version": version}))?;
        return Ok(ExitCode::SUCCESS);
    }
    let shell = if coordinator.store().is_shared() {
        // The URL shown has its password masked: psql takes the user's own (or ~/.pgpass).
        "psql \"$APIJONGLER_DB\"   (the URL you gave; the tables are in the schema apijongler)"
    } else {
        "sqlite3 \"$(apijongler db --path)\""
    };
    writeln!(stdout, "database: {path}\nschema version: {version}\n\nOpen it with:  {shell}\n")?;
    writeln!(stdout, "{}", coordinator.store().example_queries())?;
    Ok(ExitCode::SUCCESS)
}

fn prune(global: &Global, older_than: &str) -> anyhow::Result<ExitCode> {
    let age = parse_duration(older_than).map_err(|why| Usage(format!("--older-than {why}")))?;
    let coordinator = open(global)?;
    let pruned = coordinator.prune(age)?;
    let mut stdout = std::io::stdout().lock();
    if global.json {
        writeln!(stdout, "{}", serde_json::to_string(&pruned)?)?;
    } else {
        writeln!(
            stdout,
            "Deleted {} history rows and {} request rows older than {} ({} batches, the longest held the write lock {} ms).",
            pruned.history,
            pruned.requests,
            older_than.trim(),
            pruned.batches,
            pruned.longest_batch_ms
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
