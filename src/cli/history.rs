//! `apijongler history [--connector C] [--key K] [--since 1h] [--limit N] [--json]`: transitions,
//! newest first, each with its event (the kind of change, a word of [`HistoryEvent`]), the model it was
//! about (a claim for a model, a lockdown of some models) and the quota scope it counted against.
//!
//! [`HistoryEvent`]: api_jongler::pool::HistoryEvent

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use api_jongler::pool::{HistoryQuery, Transition};

use super::exit::Usage;
use super::{Global, open, output, parse_duration};

#[derive(Debug, clap::Args)]
pub struct HistoryArgs {
    /// Only this connector.
    #[arg(long)]
    connector: Option<String>,
    /// Only this key name.
    #[arg(long)]
    key: Option<String>,
    /// Only this recent (90s, 15m, 2h, 1d).
    #[arg(long, value_name = "DURATION")]
    since: Option<String>,
    /// At most this many rows.
    #[arg(long, default_value_t = 50)]
    limit: u64,
}

pub fn run(global: &Global, args: &HistoryArgs) -> anyhow::Result<ExitCode> {
    let since: Option<Duration> =
        args.since.as_deref().map(parse_duration).transpose().map_err(|why| Usage(format!("--since {why}")))?;
    let coordinator = open(global)?;
    let now = coordinator.now_ms();
    let query = HistoryQuery {
        connector: args.connector.clone(),
        key_name: args.key.clone(),
        since: since.map(|since| now - i64::try_from(since.as_millis()).unwrap_or(i64::MAX)),
        limit: Some(args.limit),
    };
    let rows = coordinator.store().history(&query)?;
    let mut stdout = std::io::stdout().lock();
    if global.json {
        let rows: Vec<_> = rows.iter().map(row_json).collect();
        writeln!(stdout, "{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = output::table(&[
        "time",
        "event",
        "connector",
        "key",
        "from",
        "to",
        "model",
        "scope",
        "reason",
        "status",
        "pid",
        "until",
    ]);
    for t in &rows {
        table.add_row(vec![
            output::local_time(t.at),
            t.event.to_string(),
            t.connector.clone(),
            t.key_name.clone(),
            t.from_state.clone().unwrap_or_else(|| "-".to_owned()),
            t.to_state.clone(),
            t.model.clone().unwrap_or_default(),
            t.quota_scope.clone().unwrap_or_default(),
            t.reason.clone(),
            t.http_status.map(|s| s.to_string()).unwrap_or_default(),
            t.holder_pid.map(|p| p.to_string()).unwrap_or_default(),
            t.lockdown_until.map(output::local_time).unwrap_or_default(),
        ]);
    }
    writeln!(stdout, "{table}")?;
    Ok(ExitCode::SUCCESS)
}

/// One history row as `history --json` prints it (and the dashboard's key history shows it).
pub(super) fn row_json(t: &Transition) -> serde_json::Value {
    serde_json::json!({
        "id": t.id, "at": t.at, "event": t.event, "connector": t.connector, "key": t.key_name,
        "fingerprint": t.fingerprint, "from": t.from_state, "to": t.to_state, "reason": t.reason, "http_status": t.http_status,
        "holder_pid": t.holder_pid, "lease": t.lease, "lockdown_until": t.lockdown_until,
        "model": t.model, "quota_scope": t.quota_scope,
    })
}
