//! Making the keys table match a keyring, on a store several hosts share.
//!
//! Invariants (beside those of `store/sqlite/sync.rs`, whose statements these port):
//! - Hosts with slightly different keyrings must not undo each other on every command: a sync here
//!   adds keys, brings back retired ones and sets quota groups, but retires no key and replaces no
//!   secret. A key whose secret differs from this keyring's is reported in `differing`, untouched.
//! - A sync that would change nothing is found out by a read; one that changes something plans again
//!   in its write transaction, under an advisory lock all syncs take, as another host may have synced.

use std::collections::HashMap;

use super::connection::Tx;
use super::{Postgres, record};
use crate::error::Result;
use crate::pool::{HistoryEvent, SyncReport, SyncSource, Transition};
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
    store.write("syncing the keyring", None, |tx, _| {
        tx.query_one("SELECT pg_advisory_xact_lock($1)", &[&SYNC_LOCK])?;
        let mut plan = plan(tx, source, &connectors)?;
        plan.transitions = apply(tx, source, &plan, now)?;
        Ok(plan)
    })
}

/// What syncing `source` would change: keys to add, to restore, to regroup (in `changed`, their
/// secret left alone); keys whose secret differs, in `differing`.
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
        let Some(&(wanted_fingerprint, wanted_group, index)) = wanted.get(&(connector, name)) else { continue };
        seen[index] = true;
        if wanted_group != group {
            report.changed.push(id());
        }
        if wanted_fingerprint != fingerprint {
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
    for ids in [&mut report.changed, &mut report.restored, &mut report.differing] {
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
    let mut written = Vec::with_capacity(plan.added.len() + plan.changed.len() + plan.restored.len());

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
    for (connector, name) in &plan.restored {
        let row = tx.query_one(
            "UPDATE keys SET retired_at = NULL WHERE connector = $1 AND key_name = $2
          RETURNING state, fingerprint, quota_scope",
            &[connector, name],
        )?;
        let (state, fingerprint, scope): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let transition =
            NewTransition::new(HistoryEvent::Restored, (connector, name, &fingerprint), Some("retired"), &state, &back);
        written.push(record(tx, now, &NewTransition { quota_scope: Some(&scope), ..transition })?);
    }

    let file = source.path.display();
    for (connector, name) in &plan.changed {
        let new = group(connector, name);
        let old: Option<String> = tx
            .query_one("SELECT quota_group FROM keys WHERE connector = $1 AND key_name = $2", &[connector, name])?
            .get(0);
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
