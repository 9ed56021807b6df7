//! `apijongler why CONNECTOR KEY`: one key's state explained in a sentence, from its row and its last
//! transitions.

use std::io::Write;
use std::process::ExitCode;

use api_jongler::holder::Liveness;
use api_jongler::store::{HistoryQuery, KeyRecord};
use api_jongler::{Coordinator, KeyState};

use super::exit::Usage;
use super::{Global, keyring_to_compare, open, output};

#[derive(Debug, clap::Args)]
pub struct WhyArgs {
    /// The connector.
    connector: String,
    /// The key name.
    key: String,
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
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", explain(&coordinator, key))?;
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
            writeln!(
                stdout,
                "  {}  {} -> {}  {}{status}",
                output::local_time(t.at),
                t.from_state.as_deref().unwrap_or("-"),
                t.to_state,
                t.reason
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The sentence.
fn explain(coordinator: &Coordinator, key: &KeyRecord) -> String {
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
        (KeyState::Vacant, _) => {
            format!("{name} is vacant: the next request takes it when it is the least recently used free key; {used}.")
        }
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
