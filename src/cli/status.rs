//! `apijongler status [CONNECTOR] [--json]`: every key, its quota group, state, holder, lockdowns by
//! model, last reason, uses.
//!
//! A key's lockdowns are those in force on its quota scope (its declared group, the project an answer
//! revealed, or the key alone) and on the key alone: the rows a claim checks. The table lists each
//! key's locked models with their deadlines, and below it each lockdown once, with its reason and the
//! answer that set it (a group's lockdown is shared by all its keys).
//!
//! It writes nothing: the keyring, if one is configured, is compared with the database but not synced.
//! Keys in the keyring and not yet in the database are shown in state `new`; a key whose secret
//! changed, that left the keyring or came back to it carries that note. The next command that uses
//! the keyring (a request, `cleanup`) applies it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::process::ExitCode;

use api_jongler::pool::{KeyRecord, LockdownRecord, rule};
use api_jongler::{KeyState, Keyring, holder::Liveness};
use serde_json::json;

use super::{Global, keyring_to_compare, open, output};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Only this connector.
    connector: Option<String>,
}

/// One line of the status: a key of the database, or of the keyring only.
struct Line<'a> {
    connector: &'a str,
    key_name: &'a str,
    fingerprint: &'a str,
    /// `None`: in the keyring, not yet in the database.
    record: Option<&'a KeyRecord>,
    /// How the keyring differs from the row, if it does.
    keyring: Option<&'static str>,
}

pub fn run(global: &Global, args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let coordinator = open(global)?;
    let now = coordinator.now_ms();
    let keys: Vec<KeyRecord> = coordinator.store().keys(args.connector.as_deref())?;
    let lockdowns: Vec<LockdownRecord> =
        coordinator.store().lockdowns(args.connector.as_deref())?.into_iter().filter(|l| l.until > now).collect();
    let keyring = keyring_to_compare(global);
    let lines = lines(&keys, keyring.as_ref(), args.connector.as_deref());
    if !global.quiet {
        for warning in group_warnings(&keys) {
            eprintln!("apijongler: warning: {warning}");
        }
    }
    let mut stdout = std::io::stdout().lock();
    if global.json {
        let rows: Vec<_> = lines.iter().map(|line| as_json(line, &lockdowns, now)).collect();
        writeln!(stdout, "{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    if lines.is_empty() {
        let scope = args.connector.as_deref().map(|c| format!(" of '{c}'")).unwrap_or_default();
        writeln!(
            stdout,
            "No keys{scope} in {}. Keys appear once a keyring (APIJONGLER_CONFIG or --config) is used.",
            coordinator.db_path().display()
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut header = vec![
        "connector",
        "key",
        "fingerprint",
        "group",
        "state",
        "holder",
        "lockdowns",
        "last reason",
        "uses",
        "last used",
    ];
    if keyring.is_some() {
        header.push("keyring");
    }
    let mut table = output::table(&header);
    for line in &lines {
        let mut row = match line.record {
            Some(key) => vec![
                key.connector.clone(),
                key.key_name.clone(),
                key.fingerprint.clone(),
                group(key),
                state_label(key, now),
                holder(key, now),
                lockdown_cell(key, &in_force_on(key, &lockdowns, now), now),
                reason(key),
                key.uses.to_string(),
                if key.last_used_at > 0 { output::relative(key.last_used_at, now) } else { "never".to_owned() },
            ],
            None => {
                let mut row = vec![line.connector.to_owned(), line.key_name.to_owned(), line.fingerprint.to_owned()];
                row.extend(["", "new", "", "", "", "0", "never"].map(str::to_owned));
                row
            }
        };
        if keyring.is_some() {
            row.push(line.keyring.unwrap_or_default().to_owned());
        }
        table.add_row(row);
    }
    writeln!(stdout, "{table}")?;
    let shown: HashSet<&str> = lines.iter().map(|line| line.connector).collect();
    let explained: Vec<&LockdownRecord> = lockdowns.iter().filter(|l| shown.contains(l.connector.as_str())).collect();
    if !explained.is_empty() {
        writeln!(
            stdout,
            "Lockdowns in force (keys skip them for that model; `apijongler why CONNECTOR KEY` explains one key):"
        )?;
        for lockdown in explained {
            writeln!(
                stdout,
                "  {} {}: {} until {}, set by {}: {}",
                lockdown.connector,
                output::scope(&lockdown.scope),
                output::model(lockdown),
                output::deadline(lockdown.until, now),
                output::set_by(lockdown, now),
                output::because(lockdown)
            )?;
        }
    }
    if let Some(keyring) = keyring.as_ref().filter(|_| lines.iter().any(|line| line.keyring.is_some())) {
        writeln!(
            stdout,
            "The keyring column is how {} differs from the database; the next request or cleanup with it applies it.",
            keyring.path().display()
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The database's keys and the keyring's keys not yet in it, by connector and name, each with how the
/// keyring differs from its row (only for the connectors the keyring has a section for, as a sync).
fn lines<'a>(keys: &'a [KeyRecord], keyring: Option<&'a Keyring>, only: Option<&str>) -> Vec<Line<'a>> {
    let defined: HashSet<&str> = keyring.map(|keyring| keyring.connectors().collect()).unwrap_or_default();
    let mut in_keyring: HashMap<(&str, &str), &str> = keyring
        .map(|keyring| {
            keyring
                .all_keys()
                .filter(|(connector, _)| only.is_none_or(|only| only == *connector))
                .map(|(connector, key)| ((connector, key.name()), key.fingerprint().as_str()))
                .collect()
        })
        .unwrap_or_default();
    let mut lines: Vec<Line<'a>> = keys
        .iter()
        .map(|key| {
            let listed = in_keyring.remove(&(key.connector.as_str(), key.key_name.as_str()));
            let keyring = match (defined.contains(key.connector.as_str()), listed, key.retired_at) {
                (false, _, _) => None,
                (true, None, None) => Some("not in the keyring"),
                (true, None, Some(_)) => None,
                (true, Some(fingerprint), _) if fingerprint != key.fingerprint => Some("secret changed in the keyring"),
                (true, Some(_), Some(_)) => Some("back in the keyring"),
                (true, Some(_), None) => None,
            };
            Line {
                connector: &key.connector,
                key_name: &key.key_name,
                fingerprint: &key.fingerprint,
                record: Some(key),
                keyring,
            }
        })
        .collect();
    lines.extend(in_keyring.into_iter().map(|((connector, key_name), fingerprint)| Line {
        connector,
        key_name,
        fingerprint,
        record: None,
        keyring: Some("in the keyring, not yet in the database"),
    }));
    lines.sort_by(|a, b| (a.connector, a.key_name).cmp(&(b.connector, b.key_name)));
    lines
}

/// The lockdowns in force on `key`: those of its quota scope and those of the key alone (the rows a
/// claim checks), every-model ones first, then by model.
pub(super) fn in_force_on<'a>(key: &KeyRecord, lockdowns: &'a [LockdownRecord], now: i64) -> Vec<&'a LockdownRecord> {
    let mut mine: Vec<&LockdownRecord> = lockdowns.iter().filter(|l| rule::in_force_on(l, key, now)).collect();
    mine.sort_by(|a, b| (!a.is_every_model(), &a.model, &a.scope).cmp(&(!b.is_every_model(), &b.model, &b.scope)));
    mine
}

/// A lockdown in `--json` output.
pub(super) fn lockdown_json(l: &LockdownRecord) -> serde_json::Value {
    json!({
        "model": l.model, "until": l.until, "quota_id": l.quota_id, "reason": l.reason, "http_status": l.http_status,
        "set_by_key": l.set_by_key, "set_at": l.set_at, "scope": l.scope, "strikes": l.strikes,
    })
}

/// The key's quota group: the keyring's label, else the project an answer revealed, else nothing (the
/// key is a group of its own).
fn group(key: &KeyRecord) -> String {
    match (&key.quota_group, &key.project_learned) {
        (Some(group), _) => group.clone(),
        (None, Some(project)) => format!("#{project} (learned)"),
        (None, None) => String::new(),
    }
}

/// One line per locked model: `gemini-2.5-pro until 00:00 PT (in 9 h)`. A key in lockdown whose every-model
/// row is gone (a database from before per-model lockdowns) still shows its deadline.
fn lockdown_cell(key: &KeyRecord, mine: &[&LockdownRecord], now: i64) -> String {
    let mut lines: Vec<String> =
        mine.iter().map(|l| format!("{} until {}", output::model(l), output::deadline(l.until, now))).collect();
    if let Some(until) = key.lockdown_until.filter(|until| key.state == KeyState::Lockdown && *until > now)
        && !mine.iter().any(|l| l.is_every_model())
    {
        lines.insert(0, format!("every model until {}", output::deadline(until, now)));
    }
    lines.join("\n")
}

/// Keys the keyring puts in one group, yet whose answers revealed different Google Cloud projects: the
/// group is probably wrong (a lockdown of one project then stops keys of another).
fn group_warnings(keys: &[KeyRecord]) -> Vec<String> {
    let mut projects: BTreeMap<(&str, &str), BTreeMap<&str, Vec<&str>>> = BTreeMap::new();
    for key in keys.iter().filter(|key| key.retired_at.is_none()) {
        if let (Some(group), Some(project)) = (&key.quota_group, &key.project_learned) {
            let group = projects.entry((&key.connector, group)).or_default();
            group.entry(project).or_default().push(&key.key_name);
        }
    }
    projects
        .into_iter()
        .filter(|(_, learned)| learned.len() > 1)
        .map(|((connector, group), learned)| {
            let learned: Vec<String> =
                learned.iter().map(|(project, keys)| format!("{} in #{project}", keys.join(", "))).collect();
            format!(
                "the keys of group '{group}' of {connector} are in different Google Cloud projects ({}): the group \
                 may be wrong; check the [{connector} groups] section of the keyring",
                learned.join("; ")
            )
        })
        .collect()
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

fn as_json(line: &Line<'_>, lockdowns: &[LockdownRecord], now: i64) -> serde_json::Value {
    let Some(key) = line.record else {
        return json!({
            "connector": line.connector,
            "key": line.key_name,
            "fingerprint": line.fingerprint,
            "state": "new",
            "stored_state": null,
            "in_database": false,
            "keyring": line.keyring,
            "lockdowns": [],
        });
    };
    let mine: Vec<_> = in_force_on(key, lockdowns, now).into_iter().map(lockdown_json).collect();
    json!({
        "connector": key.connector,
        "key": key.key_name,
        "fingerprint": key.fingerprint,
        "state": if key.retired_at.is_some() { "retired".to_owned() } else { key.effective_state(now).to_string() },
        "stored_state": key.state.as_str(),
        "in_database": true,
        "keyring": line.keyring,
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
        "quota_group": key.quota_group,
        "project_learned": key.project_learned,
        "quota_scope": key.quota_scope,
        "lockdowns": mine,
    })
}
