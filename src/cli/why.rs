//! `apijongler why CONNECTOR KEY [--model MODEL]`: one key's state explained in a sentence, from its
//! row, the lockdowns in force on its quota scopes and its last transitions.
//!
//! Whether a claim would take the key, and from when, is the claim's rule as `pool::rule` writes it
//! (the key is vacant, or its lockdown is over, and no lockdown in force on its scopes covers the model
//! asked for or every model); this module only puts it in words. A request that names no model is
//! stopped only by lockdowns of every model. The order among the free keys (least recently used first,
//! keys with lockdowns last) is not the key's to explain.
//!
//! `--json` prints the key's view (`pool::view::KeyView`, the object `status --json` prints for it) with
//! the `explanation` and `verdict` sentences after it.

use std::io::Write;
use std::process::ExitCode;

use api_jongler::holder::Liveness;
use api_jongler::pool::rule;
use api_jongler::pool::view::{self, KeyView};
use api_jongler::pool::{HistoryQuery, KeyRecord, LockdownRecord};
use api_jongler::{Coordinator, KeyState};
use serde::Serialize;

use super::exit::Usage;
use super::status::{pool_view, with_limits};
use super::{Global, keyring_to_compare, open, output};

#[derive(Debug, clap::Args)]
pub struct WhyArgs {
    /// The connector.
    connector: String,
    /// The key name.
    key: String,
    /// Whether a request for this model would take the key now, and when it will (the name as requests
    /// give it, e.g. gemini-2.5-pro; Gemini's full name models/gemini-2.5-pro is the same model).
    #[arg(long, value_name = "MODEL")]
    model: Option<String>,
}

pub fn run(global: &Global, args: &WhyArgs) -> anyhow::Result<ExitCode> {
    let coordinator = open(global)?;
    let keys = coordinator.store().keys(Some(&args.connector))?;
    let Some(key) = keys.iter().find(|key| key.key_name == args.key) else {
        // `why` writes nothing, so a key only the keyring knows is explained, not added.
        if let Some(keyring) = keyring_to_compare(global)
            && let Some(key) = keyring.key(&args.connector, &args.key)
        {
            writeln!(
                std::io::stdout().lock(),
                "{} of {} ({}) is in the keyring {} but not yet in the database {}: the next request or cleanup \
                 with that keyring adds it, vacant.",
                args.key,
                args.connector,
                key.fingerprint(),
                keyring.path().display(),
                coordinator.db_path().display()
            )?;
            return Ok(ExitCode::SUCCESS);
        }
        let known: Vec<&str> = keys.iter().map(|key| key.key_name.as_str()).collect();
        let hint = if known.is_empty() {
            format!("the database has no keys of '{}'; check the connector name (`apijongler status`)", args.connector)
        } else {
            format!("its keys are: {}", known.join(", "))
        };
        return Err(Usage(format!(
            "no key '{}' of '{}' in {}: {hint}",
            args.key,
            args.connector,
            coordinator.db_path().display()
        ))
        .into());
    };
    let now = coordinator.now_ms();
    let lockdowns = coordinator.store().lockdowns(Some(&args.connector))?;
    let mine = view::in_force(key, &lockdowns, now);
    // `models/gemini-2.5-pro` is `gemini-2.5-pro`, the name requests are read and locked down under.
    let model = args.model.as_deref().map(view::model_asked);
    let verdict = verdict(key, &lockdowns, &mine, model, now);
    let mut stdout = std::io::stdout().lock();
    if global.json {
        // The key as `status --json` shows it (for the model asked), with the verdict around it.
        let keyring = keyring_to_compare(global);
        let pool = pool_view(&keys, &lockdowns, keyring.as_ref(), Some(&args.connector), model, now);
        let pool = with_limits(pool, coordinator.store(), keyring.as_ref())?;
        let key_view = pool.key(&args.connector, &args.key).expect("the view has every key of the database");
        let answer = Answer { key: key_view, explanation: explain(&coordinator, key, &mine), verdict };
        writeln!(stdout, "{}", serde_json::to_string_pretty(&answer)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(stdout, "{}", explain(&coordinator, key, &mine))?;
    writeln!(stdout, "{}", quota_group(key))?;
    if let Some(model) = model
        && let Some(line) = limits(&coordinator, keyring_to_compare(global).as_ref(), key, model, now)?
    {
        writeln!(stdout, "{line}")?;
    }
    if !mine.is_empty() {
        writeln!(stdout, "Lockdowns in force:")?;
        for lockdown in &mine {
            writeln!(stdout, "  {}", locked_down(lockdown, now))?;
        }
    }
    writeln!(stdout, "{verdict}")?;
    let history = coordinator.store().history(&HistoryQuery {
        connector: Some(args.connector.clone()),
        key_name: Some(args.key.clone()),
        since: None,
        limit: Some(5),
    })?;
    if !history.is_empty() {
        writeln!(stdout, "\nLast transitions:")?;
        for t in &history {
            let status = t.http_status.map(|s| format!(" [{s}]")).unwrap_or_default();
            let model = t.model.as_deref().map(|m| format!(" ({m})")).unwrap_or_default();
            writeln!(
                stdout,
                "  {}  {} -> {}{model}  {}{status}",
                output::local_time(t.at),
                t.from_state.as_deref().unwrap_or("-"),
                t.to_state,
                t.reason
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The limits (declared by `keyring`, or learned) of requests for `model` on `key`'s quota scope, each
/// with its window's usage: `Limits of m for group:g: 2/3 this hour (3/h, declared), 5/250 today
/// (250/day, declared).` `None` when none binds.
fn limits(
    coordinator: &Coordinator,
    keyring: Option<&api_jongler::Keyring>,
    key: &KeyRecord,
    model: &str,
    now: i64,
) -> anyhow::Result<Option<String>> {
    let scope = key.quota_scope.to_string();
    let declared = keyring.and_then(|keyring| keyring.limits(&key.connector));
    let usages = coordinator.store().usage_of((&key.connector, &scope, model), declared, now)?;
    if usages.is_empty() {
        return Ok(None);
    }
    Ok(Some(format!("Limits of {model} for {scope}: {}.", output::limits_used(&usages, now))))
}

/// `why --json`: the key's one JSON shape, then the two sentences about it.
#[derive(Serialize)]
struct Answer<'a> {
    #[serde(flatten)]
    key: &'a KeyView,
    explanation: String,
    verdict: String,
}

/// Whether a claim for `model` takes `key` now, or from when, said in a sentence; `mine` are the
/// lockdowns in force on its scopes, in the order they are listed.
fn verdict(
    key: &KeyRecord,
    lockdowns: &[LockdownRecord],
    mine: &[&LockdownRecord],
    model: Option<&str>,
    now: i64,
) -> String {
    let what = match model {
        Some(model) => format!("A request for {model}"),
        None => "A request that names no model".to_owned(),
    };
    let name = &key.key_name;
    if key.retired_at.is_some() {
        return format!("{what} never takes {name}: it is retired.");
    }
    match key.state {
        KeyState::Error => {
            return format!("{what} does not take {name} before `apijongler cleanup {}`.", key.connector);
        }
        KeyState::Locked => return format!("{what} cannot take {name} while it is held."),
        KeyState::Vacant | KeyState::Lockdown => {}
    }
    if rule::claimable(key, lockdowns, model, now) {
        let others = if model.is_none() && !mine.is_empty() {
            ", and so does a request for a model not listed above"
        } else {
            ""
        };
        return format!("{what} takes {name} now when it is the first free key in the claim order{others}.");
    }
    let Some(until) = rule::free_at(key, lockdowns, model, now) else {
        return format!(
            "{what} does not take {name}: it is in lockdown with no deadline, until `apijongler cleanup {}`.",
            key.connector
        );
    };
    let by: Vec<String> = mine
        .iter()
        .filter(|l| rule::binds(l, key, model, now))
        .map(|l| format!("{} is locked down for {}", output::model(l), scope_of(l)))
        .collect();
    let by = if by.is_empty() { "the key is in lockdown".to_owned() } else { by.join("; ") };
    format!("{what} does not take {name} before {} ({by}).", output::deadline(until, now))
}

/// Which quota group the key is in, and what that means for its lockdowns.
fn quota_group(key: &KeyRecord) -> String {
    let learned = key
        .project_learned
        .as_deref()
        .map(|p| format!(" An answer revealed its Google Cloud project, #{p}."))
        .unwrap_or_default();
    match (&key.quota_group, &key.project_learned) {
        (Some(name), _) => format!(
            "Its quota group is {name} (declared in the keyring): a lockdown of the group stops every key of it.{learned}"
        ),
        (None, Some(project)) => format!(
            "Its quota group is project #{project}, learned from an answer: keys that revealed the same project \
             share its lockdowns."
        ),
        (None, None) => format!(
            "It is in no quota group (a group of its own): only its own answers lock it down. If it shares a quota \
             (a Google Cloud project, a Hugging Face account) with other keys, say so in the keyring's \
             [{} groups] section.",
            key.connector
        ),
    }
}

/// `gemini-2.5-pro is locked down for group my-project until 00:00 PT (in 9 h), set by key1's 429 at
/// 13:02:05: 429 daily quota, ...`.
fn locked_down(lockdown: &LockdownRecord, now: i64) -> String {
    format!(
        "{} is locked down for {} until {}, set by {}: {}",
        output::model(lockdown),
        scope_of(lockdown),
        output::deadline(lockdown.until, now),
        output::set_by(lockdown, now),
        output::because(lockdown)
    )
}

/// Whom a lockdown of the key's scopes stops: `group my-project`, `this key alone`.
fn scope_of(lockdown: &LockdownRecord) -> String {
    if lockdown.scope.is_key() { "this key alone".to_owned() } else { output::scope(&lockdown.scope) }
}

/// The sentence.
fn explain(coordinator: &Coordinator, key: &KeyRecord, mine: &[&LockdownRecord]) -> String {
    let now = coordinator.now_ms();
    let name = format!("{} of {} ({})", key.key_name, key.connector, key.fingerprint);
    let used = if key.last_used_at > 0 {
        format!(
            "last used {} ({}), {} uses",
            output::local_time(key.last_used_at),
            output::relative(key.last_used_at, now),
            key.uses
        )
    } else {
        "never used yet".to_owned()
    };
    if let Some(retired) = key.retired_at {
        return format!(
            "{name} is retired: it left the keyring at {}, and is never used again unless it comes back to the keyring.",
            output::local_time(retired)
        );
    }
    let because = key.reason.as_deref().map(|reason| format!(" ({reason})")).unwrap_or_default();
    match (key.state, key.effective_state(now)) {
        (KeyState::Vacant, _) if mine.is_empty() => {
            format!("{name} is vacant: the next request takes it when it is the least recently used free key; {used}.")
        }
        (KeyState::Vacant, _) if mine.iter().any(|l| l.is_every_model()) => {
            format!("{name} is vacant, but locked down for every model (below); {used}.")
        }
        (KeyState::Vacant, _) => format!(
            "{name} is vacant, and free for every model but the {} locked down below: the next request for another \
             model takes it when it is the least recently used free key; {used}.",
            if mine.len() == 1 { "one" } else { "ones" }
        ),
        (KeyState::Lockdown, KeyState::Vacant) => format!(
            "{name} is free again: its lockdown{because} ended {}; {used}.",
            key.lockdown_until.map(|until| output::relative(until, now)).unwrap_or_default()
        ),
        (KeyState::Lockdown, _) => {
            let until = key.lockdown_until.unwrap_or(now);
            format!(
                "{name} is in lockdown until {} ({}){because}; it is not used before then, or until `apijongler cleanup {}`.",
                output::local_time(until),
                output::relative(until, now),
                key.connector
            )
        }
        (KeyState::Error, _) => format!(
            "{name} is in error{because}: it is not used until `apijongler cleanup {}`, or until its secret changes in the keyring.",
            key.connector
        ),
        (KeyState::Locked, _) => {
            let Some(holder) = &key.holder else { return format!("{name} is locked.") };
            let since = key
                .locked_at
                .map(|at| format!(" since {} ({})", output::clock_time(at), output::relative(at, now)))
                .unwrap_or_default();
            let heartbeat = key
                .heartbeat_at
                .map(|at| format!("; last heartbeat {}", output::relative(at, now)))
                .unwrap_or_default();
            let fate = match holder.liveness() {
                Liveness::Dead(why) => format!(
                    " Its holder is gone ({why}): the next claim of any process, or `apijongler cleanup {}`, frees it.",
                    key.connector
                ),
                Liveness::Alive => {
                    " Its holder is running: it keeps the key until it is done, however old its heartbeat (`apijongler cleanup --force` takes it away)."
                        .to_owned()
                }
                Liveness::Stopped => format!(
                    " Its holder is stopped (SIGSTOP or a debugger): the key is freed once its last heartbeat is older than the stale threshold, or by `apijongler cleanup --force {}`.",
                    key.connector
                ),
                Liveness::Unknown => {
                    " Its holder runs where this process cannot see it (another host, boot or container); the key is freed if its heartbeat goes stale.".to_owned()
                }
            };
            format!("{name} is held by pid {} on {}{since}{heartbeat}.{fate}", holder.pid, holder.host)
        }
    }
}
