//! `apijongler db [--path]`: where the database is, its schema version, and queries to start from.

use std::io::Write;
use std::process::ExitCode;

use super::{Global, open};

#[derive(Debug, clap::Args)]
pub struct DbArgs {
    /// Print only the path (for `sqlite3 "$(apijongler db --path)"`).
    #[arg(long)]
    path: bool,
}

pub fn run(global: &Global, args: &DbArgs) -> anyhow::Result<ExitCode> {
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
    writeln!(
        stdout,
        "database: {path}\nschema version: {version}\n\nOpen it with:  sqlite3 \"$(apijongler db --path)\"\n"
    )?;
    writeln!(stdout, "{}", coordinator.store().example_queries())?;
    Ok(ExitCode::SUCCESS)
}
