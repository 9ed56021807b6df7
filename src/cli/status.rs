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
//!
//! Everything shown comes from one view of the pool ([`api_jongler::pool::view`]): `--json` prints its
//! keys as they are (the one JSON shape of a key, which `why --json` and `/metrics` share), and the
//! table formats them. The table's state column is the key's own state as stored, for no model in
//! particular (a lockdown past its deadline reads `vacant (lockdown over)`); the lockdowns column says
//! which models are kept from it. `--json` gives both the stored state and the state for a request.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::process::ExitCode;

use api_jongler::holder::Holder;
use api_jongler::pool::view::{self, HolderLiveness, KeyView, KeyringKeys, PoolView, Sources};
use api_jongler::pool::{KeyRecord, KeySpec, LockdownRecord, rule};
use api_jongler::{KeyState, Keyring};

use super::{Global, keyring_to_compare, open, output};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Only this connector.
    connector: Option<String>,
}

pub fn run(global: &Global, args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let coordinator = open(global)?;
    let now = coordinator.now_ms();
    let keys: Vec<KeyRecord> = coordinator.store().keys(args.connector.as_deref())?;
    let lockdowns: Vec<LockdownRecord> = coordinator.store().lockdowns(args.connector.as_deref())?;
    let keyring = keyring_to_compare(global);
    let view = pool_view(&keys, &lockdowns, keyring.as_ref(), args.connector.as_deref(), None, now);
    let view = with_limits(view, coordinator.store(), keyring.as_ref())?;
    if !global.quiet {
        for warning in &view.warnings {
            eprintln!("apijongler: warning: {warning}");
        }
    }
    let mut stdout = std::io::stdout().lock();
    if global.json {
        writeln!(stdout, "{}", serde_json::to_string_pretty(&view.keys)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    if view.keys.is_empty() {
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
    let records: HashMap<(&str, &str), &KeyRecord> =
        keys.iter().map(|key| ((key.connector.as_str(), key.key_name.as_str()), key)).collect();
    let mut table = output::table(&header);
    for line in &view.keys {
        let mut row = match records.get(&(line.connector.as_str(), line.key.as_str())) {
            Some(key) => vec![
                key.connector.clone(),
                key.key_name.clone(),
                key.fingerprint.clone(),
                group(key),
                state_label(key, now),
                holder(line, now),
                lockdown_cell(key, &view::in_force(key, &lockdowns, now), now),
                reason(key),
                key.uses.to_string(),
                if key.last_used_at > 0 { output::relative(key.last_used_at, now) } else { "never".to_owned() },
            ],
            None => {
                let mut row = vec![line.connector.clone(), line.key.clone(), line.fingerprint.clone()];
                row.extend(["", "new", "", "", "", "0", "never"].map(str::to_owned));
                row
            }
        };
        if keyring.is_some() {
            row.push(line.keyring.map(|note| note.as_str()).unwrap_or_default().to_owned());
        }
        table.add_row(row);
    }
    writeln!(stdout, "{table}")?;
    let shown: HashSet<&str> = view.keys.iter().map(|line| line.connector.as_str()).collect();
    let explained: Vec<&LockdownRecord> =
        lockdowns.iter().filter(|l| rule::in_force(l, now) && shown.contains(l.connector.as_str())).collect();
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
    if !view.limits.is_empty() {
        writeln!(stdout, "Limits in use (declared by the keyring or learned from a 429; each window's usage):")?;
        for usages in output::by_scope_and_model(&view.limits) {
            let first = &usages[0];
            let used = output::limits_used(usages, now);
            writeln!(stdout, "  {} {} {}: {used}", first.connector, first.scope, first.model)?;
        }
    }
    if let Some(keyring) = keyring.as_ref().filter(|_| view.keyring_differences().next().is_some()) {
        writeln!(
            stdout,
            "The keyring column is how {} differs from the database; the next request or cleanup with it applies it.",
            keyring.path().display()
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The view of the pool `status` and `why` print: the database's keys (of `connector`, or all) as a
/// request for `model` sees them at `now`, compared with `keyring` if one is configured, each holder
/// judged from this process.
pub(super) fn pool_view(
    keys: &[KeyRecord],
    lockdowns: &[LockdownRecord],
    keyring: Option<&Keyring>,
    connector: Option<&str>,
    model: Option<&str>,
    now: i64,
) -> PoolView {
    let keyring = keyring.map(|keyring| KeyringKeys {
        connectors: keyring.connectors().collect(),
        keys: keyring
            .all_keys()
            .map(|(connector, key)| KeySpec { connector, name: key.name(), fingerprint: key.fingerprint().as_str() })
            .collect(),
    });
    let sources = Sources { keys, lockdowns, keyring: keyring.as_ref(), connector, model, now };
    view::pool(&sources, &Holder::liveness)
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
    if let Some(until) = rule::own_lockdown_end(key, now)
        && !mine.iter().any(|l| l.is_every_model())
    {
        lines.insert(0, format!("every model until {}", output::deadline(until, now)));
    }
    lines.join("\n")
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

fn holder(key: &KeyView, now: i64) -> String {
    let Some(holder) = key.holder.as_ref() else { return String::new() };
    let Some(locked_at) = holder.locked_at else { return String::new() };
    let heartbeat =
        holder.heartbeat_at.map(|at| output::humanize((now - at).max(0).unsigned_abs())).unwrap_or_default();
    let dead = if holder.liveness == HolderLiveness::Dead { ", dead" } else { "" };
    format!("pid {} since {}, heartbeat {heartbeat} ago{dead}", holder.pid, output::clock_time(locked_at))
}

fn reason(key: &KeyRecord) -> String {
    match (&key.reason, key.http_status) {
        (Some(reason), _) => reason.clone(),
        (None, Some(status)) => status.to_string(),
        (None, None) => String::new(),
    }
}

/// `view` with the limits in use on each of its connectors: those `keyring` declares and those learned.
pub(super) fn with_limits(
    view: PoolView,
    store: &api_jongler::Store,
    keyring: Option<&Keyring>,
) -> api_jongler::Result<PoolView> {
    let connectors: std::collections::BTreeSet<&str> = view.keys.iter().map(|key| key.connector.as_str()).collect();
    let mut limits = Vec::new();
    for connector in connectors {
        limits.extend(store.limits_in_use(
            connector,
            keyring.and_then(|keyring| keyring.limits(connector)),
            view.at,
        )?);
    }
    Ok(view.with_limits(limits))
}
