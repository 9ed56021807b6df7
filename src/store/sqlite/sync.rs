//! Making the keys table match a keyring.
//!
//! Invariants:
//! - A sync touches only the connectors its keyring defines (has a section for, even an empty one):
//!   keys of any other connector are never added, changed, retired or restored by it, so processes
//!   whose keyrings have different sections can share one database.
//! - Planning and applying cost time linear in the number of keys: the keyring's keys go into a hash
//!   map keyed by (connector, key name), the rows of those connectors are read once and looked up in it
//!   without being copied, and each statement is prepared once per sync.
//! - A sync that would change nothing is found out by a read and takes no write lock. One that changes
//!   something plans again under the write lock, as another process may have synced in between.
//! - A retired (or restored) key's history row names the keyring file that dropped (or brought back)
//!   it, so an emptied pool can say which file emptied it.
//! - A key's quota group (`keys.quota_group`, NULL: a group of its own) is the one its keyring declares:
//!   set when the key is added, and updated, with a history row that names the keyring file and the new
//!   quota scope, when the keyring declares another. Until [`SyncReport`] has a list of its own for
//!   them, a key whose group alone changed is reported in `changed` (its secret is left alone), so that
//!   a sync that changes only groups is not taken for a no-op.

use std::collections::HashMap;

use rusqlite::Error::FromSqlConversionFailure;
use rusqlite::types::{FromSqlError, Type};
use rusqlite::{Connection, Row, Transaction, params};

use super::{NewTransition, record};
use crate::pool::{HistoryEvent, SyncReport, SyncSource, Transition};
use crate::store::rule_sql;

/// The connectors syncing `source` may touch, as a JSON array for `json_each`.
fn connectors_json(source: &SyncSource<'_>) -> String {
    serde_json::to_string(&source.defined_connectors()).unwrap_or_else(|_| "[]".to_owned())
}

/// What syncing `source` would change, compared with the rows as they are. The keyring's keys are put
/// in a hash map once; each row is then looked up in it as read, without being copied, so a sync that
/// changes nothing allocates nothing per key.
pub(super) fn plan_sync(connection: &Connection, source: &SyncSource<'_>) -> rusqlite::Result<SyncReport> {
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
    let mut statement = connection.prepare_cached(
        "SELECT connector, key_name, fingerprint, retired_at IS NOT NULL, quota_group FROM keys
          WHERE connector IN (SELECT value FROM json_each(?1))",
    )?;
    let mut rows = statement.query(params![connectors_json(source)])?;
    while let Some(row) = rows.next()? {
        let (connector, name, fingerprint) = (text(row, 0)?, text(row, 1)?, text(row, 2)?);
        let retired: bool = row.get(3)?;
        let group = row.get_ref(4)?.as_str_or_null().map_err(|error| conversion(4, error))?;
        let id = || (connector.to_owned(), name.to_owned());
        match wanted.get(&(connector, name)) {
            None if !retired => report.retired.push(id()),
            None => {}
            Some(&(wanted_fingerprint, wanted_group, index)) => {
                seen[index] = true;
                if wanted_fingerprint != fingerprint || wanted_group != group {
                    report.changed.push(id());
                }
                if retired {
                    report.restored.push(id());
                }
            }
        }
    }
    report.added = source
        .keys
        .iter()
        .zip(seen)
        .filter(|(_, seen)| !seen)
        .map(|(key, _)| (key.connector.to_owned(), key.name.to_owned()))
        .collect();
    for ids in [&mut report.changed, &mut report.retired, &mut report.restored] {
        ids.sort_unstable();
    }
    Ok(report)
}

/// Column `index` of `row` as text, borrowed from SQLite.
fn text<'row>(row: &'row Row<'_>, index: usize) -> rusqlite::Result<&'row str> {
    row.get_ref(index)?.as_str().map_err(|error| conversion(index, error))
}

/// A column that is neither text nor (where allowed) NULL.
fn conversion(index: usize, error: FromSqlError) -> rusqlite::Error {
    FromSqlConversionFailure(index, Type::Text, Box::new(error))
}

/// Writes `plan` (made from `source` under this transaction's write lock) and its history rows.
pub(super) fn apply_sync(
    transaction: &Transaction<'_>,
    source: &SyncSource<'_>,
    plan: &SyncReport,
    now: i64,
) -> rusqlite::Result<Vec<Transition>> {
    let fingerprints: HashMap<(&str, &str), &str> =
        source.keys.iter().map(|key| ((key.connector, key.name), key.fingerprint)).collect();
    let fingerprint = |(connector, name): &(String, String)| {
        fingerprints.get(&(connector.as_str(), name.as_str())).copied().unwrap_or_default()
    };
    let groups = source.groups_by_key();
    let group = |connector: &str, name: &str| groups.get(&(connector, name)).copied();
    let mut written =
        Vec::with_capacity(plan.added.len() + plan.changed.len() + plan.retired.len() + plan.restored.len());
    let mut note = |new: NewTransition<'_>| {
        written.push(record(transaction, now, &new)?);
        Ok::<_, rusqlite::Error>(())
    };

    let mut insert = transaction.prepare_cached(
        "INSERT INTO keys (connector, key_name, fingerprint, created_at, quota_group) VALUES (?1, ?2, ?3, ?4, ?5)
      RETURNING quota_scope",
    )?;
    for id @ (connector, name) in &plan.added {
        let scope: String = insert
            .query_row(params![connector, name, fingerprint(id), now, group(connector, name)], |row| row.get(0))?;
        let key = (connector.as_str(), name.as_str(), fingerprint(id));
        note(NewTransition {
            quota_scope: Some(&scope),
            ..NewTransition::new(HistoryEvent::Added, key, None, "vacant", "added to the keyring")
        })?;
    }

    // What the row holds before this sync: its state, fingerprint and quota group.
    let mut row_of = transaction
        .prepare_cached("SELECT state, fingerprint, quota_group FROM keys WHERE connector = ?1 AND key_name = ?2")?;
    let mut read = |connector: &str, name: &str| {
        row_of.query_row(params![connector, name], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, Option<String>>(2)?))
        })
    };
    // A new secret is a new key: the old one's error or quota says nothing about it.
    let mut change = transaction.prepare_cached(
        "UPDATE keys
            SET fingerprint = ?3,
                state = CASE WHEN state IN ('error', 'lockdown') THEN 'vacant' ELSE state END,
                lockdown_until = CASE WHEN state IN ('error', 'lockdown') THEN NULL ELSE lockdown_until END,
                lockdown_count = 0, project_learned = NULL
          WHERE connector = ?1 AND key_name = ?2
      RETURNING state, quota_scope",
    )?;
    // Keys in `changed` for their group alone are regrouped below, once retired keys are back.
    let mut regroup = Vec::new();
    for id @ (connector, name) in &plan.changed {
        let (before, old_fingerprint, old_group) = read(connector, name)?;
        if old_group.as_deref() != group(connector, name) {
            regroup.push((connector.as_str(), name.as_str(), old_group));
        }
        if old_fingerprint == fingerprint(id) {
            continue;
        }
        let (after, scope): (String, String) =
            change.query_row(params![connector, name, fingerprint(id)], |row| Ok((row.get(0)?, row.get(1)?)))?;
        // A new secret is a new key: the lockdowns of the old one alone go (its group's stay).
        transaction
            .prepare_cached(&format!(
                "DELETE FROM lockdowns WHERE connector = ?1 AND scope = {}",
                rule_sql::own_scope("?2")
            ))?
            .execute(params![connector, name])?;
        let key = (connector.as_str(), name.as_str(), fingerprint(id));
        let transition = NewTransition::new(
            HistoryEvent::SecretChanged,
            key,
            Some(&before),
            &after,
            "secret changed in the keyring",
        );
        note(NewTransition { quota_scope: Some(&scope), ..transition })?;
    }

    let removed = format!("removed from the keyring {}", source.path.display());
    let mut retire = transaction.prepare_cached(
        "UPDATE keys SET retired_at = ?3 WHERE connector = ?1 AND key_name = ?2
      RETURNING state, fingerprint, quota_scope",
    )?;
    for (connector, name) in &plan.retired {
        let (state, fingerprint, scope): (String, String, String) =
            retire.query_row(params![connector, name, now], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
        let transition = NewTransition::new(
            HistoryEvent::Retired,
            (connector, name, &fingerprint),
            Some(&state),
            "retired",
            &removed,
        );
        note(NewTransition { quota_scope: Some(&scope), ..transition })?;
    }

    let back = format!("back in the keyring {}", source.path.display());
    let mut restore = transaction.prepare_cached(
        "UPDATE keys SET retired_at = NULL WHERE connector = ?1 AND key_name = ?2
      RETURNING state, fingerprint, quota_scope",
    )?;
    for (connector, name) in &plan.restored {
        let (state, fingerprint, scope): (String, String, String) =
            restore.query_row(params![connector, name], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
        let transition =
            NewTransition::new(HistoryEvent::Restored, (connector, name, &fingerprint), Some("retired"), &state, &back);
        note(NewTransition { quota_scope: Some(&scope), ..transition })?;
    }

    let file = source.path.display();
    let mut set_group = transaction.prepare_cached(
        "UPDATE keys SET quota_group = ?3 WHERE connector = ?1 AND key_name = ?2
      RETURNING id, state, fingerprint, quota_scope",
    )?;
    for (connector, name, old) in regroup {
        let new = group(connector, name);
        let (id, state, fingerprint, scope): (i64, String, String, String) = set_group
            .query_row(params![connector, name, new], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))?;
        // A key joining a group locked down for a model goes behind the keys free for it in the claim order.
        super::requeue(transaction, id)?;
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
        note(NewTransition { quota_scope: Some(&scope), ..transition })?;
    }
    Ok(written)
}
