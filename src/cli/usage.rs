//! `apijongler usage [CONNECTOR] [--since 24h] [--by key|model|group] [--json]`: the upstream attempts
//! of a span, counted per key, model or quota group: requests, successes, 429s and errors, and the
//! input tokens the answers told (where they did). The counts are the store's
//! ([`api_jongler::pool::usage`] says what each column counts), so no SQL is needed.

use std::io::Write;
use std::process::ExitCode;

use api_jongler::pool::usage::{Tally, UsageBy, UsageQuery};

use super::exit::Usage;
use super::{Global, open, output, parse_duration};

#[derive(Debug, clap::Args)]
pub struct UsageArgs {
    /// Only this connector.
    connector: Option<String>,
    /// The span counted, back from now (90s, 15m, 24h, 7d).
    #[arg(long, default_value = "24h", value_name = "DURATION")]
    since: String,
    /// What each row is per: key, model or group (the quota scope: declared group, learned project, or
    /// the key alone).
    #[arg(long, default_value = "key", value_name = "BY")]
    by: String,
}

pub fn run(global: &Global, args: &UsageArgs) -> anyhow::Result<ExitCode> {
    let since = parse_duration(&args.since).map_err(|why| Usage(format!("--since {why}")))?;
    let by: UsageBy = args.by.parse().map_err(|_| Usage(format!("--by {}: write key, model or group", args.by)))?;
    let coordinator = open(global)?;
    let now = coordinator.now_ms();
    let from = now.saturating_sub(i64::try_from(since.as_millis()).unwrap_or(i64::MAX));
    let query = UsageQuery { since: from, connector: args.connector.clone(), by, bucket_ms: None };
    let rows = coordinator.store().usage(&query)?;
    let mut stdout = std::io::stdout().lock();
    if global.json {
        let rows: Vec<_> = rows
            .iter()
            .map(|row| {
                let mut value = serde_json::to_value(row).unwrap_or_default();
                if let Some(object) = value.as_object_mut() {
                    // The name under the word of `--by`, as users asked for it.
                    let name = object.remove("name").unwrap_or_default();
                    object.insert(by.as_str().to_owned(), name);
                    object.remove("bucket");
                    object.remove("model");
                }
                value
            })
            .collect();
        let answer = serde_json::json!({"since": from, "until": now, "by": by.as_str(), "rows": rows});
        writeln!(stdout, "{}", serde_json::to_string_pretty(&answer)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        writeln!(stdout, "No requests since {} in {}.", output::local_time(from), coordinator.db_path().display())?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = output::table(&["connector", by.as_str(), "requests", "ok", "429", "errors", "input tokens"]);
    let mut total = Tally::default();
    let mut tokens: Option<u64> = None;
    for row in &rows {
        total = Tally {
            requests: total.requests + row.tally.requests,
            successes: total.successes + row.tally.successes,
            rate_limited: total.rate_limited + row.tally.rate_limited,
            errors: total.errors + row.tally.errors,
        };
        tokens = match (tokens, row.tokens) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        table.add_row(counts(&row.connector, &row.name, row.tally, row.tokens));
    }
    if rows.len() > 1 {
        table.add_row(counts("all", "", total, tokens));
    }
    writeln!(stdout, "Requests since {} ({} ago), per {by}:", output::local_time(from), args.since.trim())?;
    writeln!(stdout, "{table}")?;
    Ok(ExitCode::SUCCESS)
}

/// One row of the table; `-` for tokens no answer told.
fn counts(connector: &str, name: &str, tally: Tally, tokens: Option<u64>) -> Vec<String> {
    vec![
        connector.to_owned(),
        name.to_owned(),
        tally.requests.to_string(),
        tally.successes.to_string(),
        tally.rate_limited.to_string(),
        tally.errors.to_string(),
        tokens.map_or_else(|| "-".to_owned(), |tokens| tokens.to_string()),
    ]
}
