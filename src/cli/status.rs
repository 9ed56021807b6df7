//! `apijongler status [CONNECTOR] [--json]`: every key, its state, holder, deadline, last reason, uses.

use std::io::Write;
use std::process::ExitCode;

use api_jongler::store::KeyRecord;
use api_jongler::{KeyState, holder::Liveness};
use serde_json::json;

use super::{Global, open, output};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Only this connector.
    connector: Option<String>,
}

pub fn run(global: &Global, args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let coordinator = open(global)?;
    let now = coordinator.now_ms();
    let keys: Vec<KeyRecord> = coordinator.store().keys(args.connector.as_deref())?;
    let mut stdout = std::io::stdout().lock();
    if global.json {
        let rows: Vec<_> = keys.iter().map(|key| as_json(key, now)).collect();
        writeln!(stdout, "{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    if keys.is_empty() {
        let scope = args.connector.as_deref().map(|c| format!(" of '{c}'")).unwrap_or_default();
        writeln!(
            stdout,
            "No keys{scope} in {}. Keys appear once a keyring (APIJONGLER_CONFIG or --config) is used.",
            coordinator.db_path().display()
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = output::table(&[
        "connector",
        "key",
        "fingerprint",
        "state",
        "holder",
        "lockdown until",
        "last reason",
        "uses",
        "last used",
    ]);
    for key in &keys {
        table.add_row(vec![
            key.connector.clone(),
            key.key_name.clone(),
            key.fingerprint.clone(),
            state_label(key, now),
            holder(key, now),
            key.lockdown_until
                .filter(|_| key.state == KeyState::Lockdown)
                .map(|until| format!("{} ({})", output::local_time(until), output::relative(until, now)))
                .unwrap_or_default(),
            reason(key),
            key.uses.to_string(),
            if key.last_used_at > 0 { output::relative(key.last_used_at, now) } else { "never".to_owned() },
        ]);
    }
    writeln!(stdout, "{table}")?;
    Ok(ExitCode::SUCCESS)
}

/// The state as a user should read it: an expired lockdown is claimable, a retired key is gone.
fn state_label(key: &KeyRecord, now: i64) -> String {
    if key.retired_at.is_some() {
        return "retired".to_owned();
    }
    match (key.state, key.effective_state(now)) {
        (KeyState::Lockdown, KeyState::Vacant) => "vacant (lockdown over)".to_owned(),
        (state, _) => state.to_string(),
    }
}

fn holder(key: &KeyRecord, now: i64) -> String {
    let (Some(holder), Some(locked_at)) = (&key.holder, key.locked_at) else { return String::new() };
    let heartbeat = key.heartbeat_at.map(|at| output::humanize((now - at).max(0).unsigned_abs())).unwrap_or_default();
    let dead = if matches!(holder.liveness(), Liveness::Dead(_)) { ", dead" } else { "" };
    format!("pid {} since {}, heartbeat {heartbeat} ago{dead}", holder.pid, output::clock_time(locked_at))
}

fn reason(key: &KeyRecord) -> String {
    match (&key.reason, key.http_status) {
        (Some(reason), _) => reason.clone(),
        (None, Some(status)) => status.to_string(),
        (None, None) => String::new(),
    }
}

fn as_json(key: &KeyRecord, now: i64) -> serde_json::Value {
    json!({
        "connector": key.connector,
        "key": key.key_name,
        "fingerprint": key.fingerprint,
        "state": if key.retired_at.is_some() { "retired".to_owned() } else { key.effective_state(now).to_string() },
        "stored_state": key.state.as_str(),
        "retired_at": key.retired_at,
        "lease": key.lease,
        "holder": key.holder.as_ref().map(|h| json!({
            "host": h.host, "pid": h.pid, "alive": !matches!(h.liveness(), Liveness::Dead(_)),
            "locked_at": key.locked_at, "heartbeat_at": key.heartbeat_at,
        })),
        "lockdown_until": key.lockdown_until,
        "reason": key.reason,
        "http_status": key.http_status,
        "lockdown_count": key.lockdown_count,
        "uses": key.uses,
        "last_used_at": if key.last_used_at > 0 { Some(key.last_used_at) } else { None },
    })
}
