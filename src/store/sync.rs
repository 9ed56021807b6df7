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

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use rusqlite::Error::FromSqlConversionFailure;
use rusqlite::types::Type;
use rusqlite::{Connection, Row, Transaction, params};

use super::{KeySpec, NewTransition, SyncReport, Transition, record};

/// A keyring, as a sync reads it.
#[derive(Debug, Clone, Copy)]
pub struct SyncSource<'a> {
    /// The keyring file, named in the history rows of the keys it retires or restores.
    pub path: &'a Path,
    /// The connectors the keyring has a section for, even an empty one: only their keys are synced.
    /// A connector of one of `keys` counts as defined even if missing here.
    pub connectors: &'a [&'a str],
    /// Every key of those connectors.
    pub keys: &'a [KeySpec<'a>],
}

impl SyncSource<'_> {
    /// The connectors this sync may touch, as a JSON array for `json_each`.
    fn connectors_json(&self) -> String {
        let connectors: BTreeSet<&str> =
            self.connectors.iter().copied().chain(self.keys.iter().map(|key| key.connector)).collect();
        serde_json::to_string(&connectors).unwrap_or_else(|_| "[]".to_owned())
    }
}

/// What syncing `source` would change, compared with the rows as they are. The keyring's keys are put
/// in a hash map once; each row is then looked up in it as read, without being copied, so a sync that
/// changes nothing allocates nothing per key.
pub(super) fn plan_sync(connection: &Connection, source: &SyncSource<'_>) -> rusqlite::Result<SyncReport> {
    let wanted: HashMap<(&str, &str), (&str, usize)> = source
        .keys
        .iter()
        .enumerate()
        .map(|(index, key)| ((key.connector, key.name), (key.fingerprint, index)))
        .collect();
    let mut seen = vec![false; source.keys.len()];
    let mut report = SyncReport::default();
    let mut statement = connection.prepare_cached(
        "SELECT connector, key_name, fingerprint, retired_at IS NOT NULL FROM keys
          WHERE connector IN (SELECT value FROM json_each(?1))",
    )?;
    let mut rows = statement.query(params![source.connectors_json()])?;
    while let Some(row) = rows.next()? {
        let (connector, name, fingerprint) = (text(row, 0)?, text(row, 1)?, text(row, 2)?);
        let retired: bool = row.get(3)?;
        let id = || (connector.to_owned(), name.to_owned());
        match wanted.get(&(connector, name)) {
            None if !retired => report.retired.push(id()),
            None => {}
            Some(&(wanted_fingerprint, index)) => {
                seen[index] = true;
                if wanted_fingerprint != fingerprint {
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
    row.get_ref(index)?.as_str().map_err(|error| FromSqlConversionFailure(index, Type::Text, Box::new(error)))
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
    let mut written =
        Vec::with_capacity(plan.added.len() + plan.changed.len() + plan.retired.len() + plan.restored.len());
    let mut note = |key: (&str, &str, &str), from_state: Option<&str>, to_state: &str, reason: &str| {
        written.push(record(transaction, now, &NewTransition::new(key, from_state, to_state, reason))?);
        Ok::<_, rusqlite::Error>(())
    };

    let mut insert = transaction
        .prepare_cached("INSERT INTO keys (connector, key_name, fingerprint, created_at) VALUES (?1, ?2, ?3, ?4)")?;
    for id @ (connector, name) in &plan.added {
        insert.execute(params![connector, name, fingerprint(id), now])?;
        note((connector, name, fingerprint(id)), None, "vacant", "added to the keyring")?;
    }

    let mut state_of = transaction.prepare_cached("SELECT state FROM keys WHERE connector = ?1 AND key_name = ?2")?;
    // A new secret is a new key: the old one's error or quota says nothing about it.
    let mut change = transaction.prepare_cached(
        "UPDATE keys
            SET fingerprint = ?3,
                state = CASE WHEN state IN ('error', 'lockdown') THEN 'vacant' ELSE state END,
                lockdown_until = CASE WHEN state IN ('error', 'lockdown') THEN NULL ELSE lockdown_until END,
                lockdown_count = 0
          WHERE connector = ?1 AND key_name = ?2
      RETURNING state",
    )?;
    for id @ (connector, name) in &plan.changed {
        let before: String = state_of.query_row(params![connector, name], |row| row.get(0))?;
        let after: String = change.query_row(params![connector, name, fingerprint(id)], |row| row.get(0))?;
        note((connector, name, fingerprint(id)), Some(&before), &after, "secret changed in the keyring")?;
    }

    let removed = format!("removed from the keyring {}", source.path.display());
    let mut retire = transaction.prepare_cached(
        "UPDATE keys SET retired_at = ?3 WHERE connector = ?1 AND key_name = ?2 RETURNING state, fingerprint",
    )?;
    for (connector, name) in &plan.retired {
        let (state, fingerprint): (String, String) =
            retire.query_row(params![connector, name, now], |row| Ok((row.get(0)?, row.get(1)?)))?;
        note((connector, name, &fingerprint), Some(&state), "retired", &removed)?;
    }

    let back = format!("back in the keyring {}", source.path.display());
    let mut restore = transaction.prepare_cached(
        "UPDATE keys SET retired_at = NULL WHERE connector = ?1 AND key_name = ?2 RETURNING state, fingerprint",
    )?;
    for (connector, name) in &plan.restored {
        let (state, fingerprint): (String, String) =
            restore.query_row(params![connector, name], |row| Ok((row.get(0)?, row.get(1)?)))?;
        note((connector, name, &fingerprint), Some("retired"), &state, &back)?;
    }
    Ok(written)
}
