//! Making the keys table match a keyring, on a store several hosts share.
//!
//! Invariants (beside those of `store/sqlite/sync.rs`, whose statements these port):
//! - Hosts with slightly different keyrings must not undo each other on every command: a sync here
//!   adds keys, brings back retired ones and sets quota groups, but retires no key and replaces no
//!   secret. A key whose secret differs from this keyring's is reported in `differing`, untouched.
//! - Only a sync told to apply the keyring as the truth (`SyncSource::as_truth`, the explicit
//!   `apijongler sync --as-truth`) does what every SQLite sync does: it also retires the keys of its
//!   connectors the keyring lacks and replaces the secrets that differ, lifting the old secret's error,
//!   whole-key lockdown and own lockdowns (its group's stay), each with its history row.
//! - A sync that would change nothing is found out by a read; one that changes something plans again
//!   in its write transaction, under an advisory lock all syncs take, as another host may have synced,
//!   and locks the key rows it changes in id order before writing (the store's one lock order).

use std::collections::HashMap;

use super::connection::Tx;
use super::{Postgres, WATERMARKS_SHARED_OF, record};
use crate::error::Result;
use crate::pool::{HistoryEvent, SyncReport, SyncSource, Transition};
use crate::store::rule_sql;
use crate::store::transition::NewTransition;

/// The advisory lock every sync's write takes ("AJSY").
const SYNC_LOCK: i64 = 1_095_389_017;

/// Makes the keys match the keyring additively (see the module's invariants).
pub(super) fn sync_keys(store: &Postgres, source: &SyncSource<'_>, now: i64) -> Result<SyncReport> {
    let connectors: Vec<String> = source.defined_connectors().into_iter().map(str::to_owned).collect();
    let pending = store.read("reading the keys", |tx| plan(tx, source, &connectors))?;
    if pending.is_empty() {
        return Ok(pending);
    }
    store.write("syncing the keyring", None, |tx| {
        tx.query_one("SELECT pg_advisory_xact_lock($1)", &[&SYNC_LOCK])?;
        // Keys added or regrouped get their scopes' watermark (a trigger), which shares this lock.
        tx.execute(WATERMARKS_SHARED_OF, &[&Some(&connectors)])?;
        let mut plan = plan(tx, source, &connectors)?;
        lock_in_id_order(tx, &plan)?;
        plan.transitions = apply(tx, source, &plan, now)?;
        Ok(plan)
    })
}

/// What syncing `source` would change: keys to add, to restore, to regroup (in `changed`); keys whose
/// secret differs, in `differing`, or, applying the keyring as the truth, in `changed` (their secret
/// replaced) with the keys it lacks in `retired`.
fn plan(tx: &mut Tx<'_>, source: &SyncSource<'_>, connectors: &[String]) -> Result<SyncReport, postgres::Error> {
    let groups = source.groups_by_key();
    let wanted: HashMap<(&str, &str), (&str, Option<&str>, usize)> = source
        .keys
        .iter()
        .enumerate()
        .map(|(index, key)| {
            let group = groups.get(&(key.connector, key.name)).copied();
            ((key.connector, key.name), (key.fingerprint, group, index))
        })
        .collect();
    let mut seen = vec![false; source.keys.len()];
    let mut report = SyncReport::default();
    let rows = tx.query(
        "SELECT connector, key_name, fingerprint, retired_at IS NOT NULL, quota_group FROM keys
          WHERE connector = ANY($1)",
        &[&connectors],
    )?;
    for row in &rows {
        let (connector, name, fingerprint): (&str, &str, &str) = (row.get(0), row.get(1), row.get(2));
        let retired: bool = row.get(3);
        let group: Option<&str> = row.get(4);
        let id = || (connector.to_owned(), name.to_owned());
        let Some(&(wanted_fingerprint, wanted_group, index)) = wanted.get(&(connector, name)) else {
            if source.as_truth && !retired {
                report.retired.push(id());
            }
            continue;
        };
        seen[index] = true;
        let replaced = wanted_fingerprint != fingerprint && source.as_truth;
        if wanted_group != group || replaced {
            report.changed.push(id());
        }
        if wanted_fingerprint != fingerprint && !source.as_truth {
            report.differing.push(id());
        }
        if retired {
            report.restored.push(id());
        }
    }
    report.added = source
        .keys
        .iter()
        .zip(seen)
        .filter(|(_, seen)| !seen)
        .map(|(key, _)| (key.connector.to_owned(), key.name.to_owned()))
        .collect();
    for ids in [&mut report.changed, &mut report.retired, &mut report.restored, &mut report.differing] {
        ids.sort_unstable();
    }
    Ok(report)
}

/// Writes `plan` (made from `source` in this transaction) and its history rows.
fn apply(
    tx: &mut Tx<'_>,
    source: &SyncSource<'_>,
    plan: &SyncReport,
    now: i64,
) -> Result<Vec<Transition>, postgres::Error> {
    let fingerprints: HashMap<(&str, &str), &str> =
        source.keys.iter().map(|key| ((key.connector, key.name), key.fingerprint)).collect();
    let fingerprint = |(connector, name): &(String, String)| {
        fingerprints.get(&(connector.as_str(), name.as_str())).copied().unwrap_or_default()
    };
    let groups = source.groups_by_key();
    let group = |connector: &str, name: &str| groups.get(&(connector, name)).copied();
    let mut written =
        Vec::with_capacity(plan.added.len() + plan.changed.len() + plan.retired.len() + plan.restored.len());

    for id @ (connector, name) in &plan.added {
        // Another host may add the same key between our plan and this insert: it then stays theirs.
        let inserted = tx.query_opt(
            "INSERT INTO keys (connector, key_name, fingerprint, created_at, quota_group) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (connector, key_name) DO NOTHING
          RETURNING quota_scope",
            &[connector, name, &fingerprint(id), &now, &group(connector, name)],
        )?;
        let Some(row) = inserted else { continue };
        let scope: String = row.get(0);
        let key = (connector.as_str(), name.as_str(), fingerprint(id));
        let transition = NewTransition {
            quota_scope: Some(&scope),
            ..NewTransition::new(HistoryEvent::Added, key, None, "vacant", "added to the keyring")
        };
        written.push(record(tx, now, &transition)?);
    }

    let back = format!("back in the keyring {}", source.path.display());
    written.extend(set_retired(tx, &plan.restored, None, &back, now)?);

    for id @ (connector, name) in &plan.changed {
        if let Some(transition) = replace_secret(tx, (connector, name), fingerprint(id), now)? {
            written.push(transition);
        }
    }

    let removed = format!("removed from the keyring {}", source.path.display());
    written.extend(set_retired(tx, &plan.retired, Some(now), &removed, now)?);

    let file = source.path.display();
    for (connector, name) in &plan.changed {
        let new = group(connector, name);
        let old: Option<String> = tx
            .query_one("SELECT quota_group FROM keys WHERE connector = $1 AND key_name = $2", &[connector, name])?
            .get(0);
        if old.as_deref() == new {
            continue; // In `changed` for its secret alone.
        }
        let row = tx.query_one(
            "UPDATE keys SET quota_group = $3 WHERE connector = $1 AND key_name = $2
          RETURNING state, fingerprint, quota_scope",
            &[connector, name, &new],
        )?;
        let (state, fingerprint, scope): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let reason = match (old, new) {
            (None, Some(new)) => format!("quota group set to '{new}' (keyring {file})"),
            (Some(old), None) => format!("quota group '{old}' removed (keyring {file})"),
            (Some(old), Some(new)) => format!("quota group changed from '{old}' to '{new}' (keyring {file})"),
            (None, None) => continue,
        };
        let transition = NewTransition::new(
            HistoryEvent::GroupChanged,
            (connector, name, &fingerprint),
            Some(&state),
            &state,
            &reason,
        );
        written.push(record(tx, now, &NewTransition { quota_scope: Some(&scope), ..transition })?);
    }
    Ok(written)
}

/// Retires the keys `ids` at `retired_at`, or (`None`) brings them back, each with its history row
/// giving `reason`.
fn set_retired(
    tx: &mut Tx<'_>,
    ids: &[(String, String)],
    retired_at: Option<i64>,
    reason: &str,
    now: i64,
) -> Result<Vec<Transition>, postgres::Error> {
    let mut written = Vec::with_capacity(ids.len());
    for (connector, name) in ids {
        let row = tx.query_one(
            "UPDATE keys SET retired_at = $3 WHERE connector = $1 AND key_name = $2
          RETURNING state, fingerprint, quota_scope",
            &[connector, name, &retired_at],
        )?;
        let (state, fingerprint, scope): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let (event, from, to) = match retired_at {
            Some(_) => (HistoryEvent::Retired, state.as_str(), "retired"),
            None => (HistoryEvent::Restored, "retired", state.as_str()),
        };
        let transition = NewTransition::new(event, (connector, name, &fingerprint), Some(from), to, reason);
        written.push(record(tx, now, &NewTransition { quota_scope: Some(&scope), ..transition })?);
    }
    Ok(written)
}

/// Locks the rows of the keys `plan` changes, retires or restores, in id order: the one order every
/// statement of this store that locks several key rows takes them in, so this write never waits on a
/// lease end (or it on this) in a cycle.
fn lock_in_id_order(tx: &mut Tx<'_>, plan: &SyncReport) -> Result<(), postgres::Error> {
    let (connectors, names): (Vec<&str>, Vec<&str>) = [&plan.changed, &plan.retired, &plan.restored]
        .into_iter()
        .flatten()
        .map(|(connector, name)| (connector.as_str(), name.as_str()))
        .unzip();
    if connectors.is_empty() {
        return Ok(());
    }
    tx.query(
        "SELECT id FROM keys WHERE (connector, key_name) IN (SELECT * FROM unnest($1::text[], $2::text[]))
          ORDER BY id FOR UPDATE",
        &[&connectors, &names],
    )?;
    Ok(())
}

/// Gives key `(connector, name)` the keyring's secret `fingerprint`, if it has another: a new secret
/// is a new key, so the old one's error, whole-key lockdown, strikes and learned project go, and the
/// lockdowns of the key alone (its group's stay), as on SQLite. `None`: the secret was the same.
fn replace_secret(
    tx: &mut Tx<'_>,
    (connector, name): (&str, &str),
    fingerprint: &str,
    now: i64,
) -> Result<Option<Transition>, postgres::Error> {
    let before = tx.query_one(
        "SELECT state, fingerprint FROM keys WHERE connector = $1 AND key_name = $2",
        &[&connector, &name],
    )?;
    let (state_before, old): (String, String) = (before.get(0), before.get(1));
    if old == fingerprint {
        return Ok(None);
    }
    let row = tx.query_one(
        "UPDATE keys
            SET fingerprint = $3,
                state = CASE WHEN state IN ('error', 'lockdown') THEN 'vacant' ELSE state END,
                lockdown_until = CASE WHEN state IN ('error', 'lockdown') THEN NULL ELSE lockdown_until END,
                lockdown_count = 0, project_learned = NULL
          WHERE connector = $1 AND key_name = $2
      RETURNING state, quota_scope",
        &[&connector, &name, &fingerprint],
    )?;
    let (after, scope): (String, String) = (row.get(0), row.get(1));
    tx.execute(
        &format!("DELETE FROM lockdowns WHERE connector = $1 AND scope = {}", rule_sql::own_scope("$2::text")),
        &[&connector, &name],
    )?;
    let transition = NewTransition::new(
        HistoryEvent::SecretChanged,
        (connector, name, fingerprint),
        Some(&state_before),
        &after,
        "secret changed in the keyring",
    );
    Ok(Some(record(tx, now, &NewTransition { quota_scope: Some(&scope), ..transition })?))
}
