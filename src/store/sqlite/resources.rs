//! The `resources` table (schema 6): which key created each per-project resource, and until when that
//! counts (see `crate::resource`).
//!
//! Invariants:
//! - A row names its key; the scope a request is pinned to is that key's quota scope now (a project
//!   learned or declared since counts), and the scope written with the row only when the key is gone.
//! - A row past its `expires_at` is never read; each write of a connector's resources deletes that
//!   connector's expired rows, so the table holds about the resources alive now.
//! - A resource created again (a name reused after a delete) belongs to the key of its latest answer.

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::json_list;
use crate::resource::{Created, Owner};

/// Records `created`, the resources the answer key `key_name` of `connector` got created, at `now`;
/// deletes the connector's rows expired by then. Returns how many were recorded.
pub(super) fn record(
    transaction: &Transaction<'_>,
    connector: &str,
    key_name: &str,
    created: &[Created],
    now: i64,
) -> rusqlite::Result<usize> {
    transaction
        .prepare_cached("DELETE FROM resources WHERE connector = ?1 AND expires_at <= ?2")?
        .execute(params![connector, now])?;
    let mut insert = transaction.prepare_cached(
        "INSERT INTO resources (connector, name, key_name, quota_scope, expires_at, created_at)
         SELECT ?1, ?2, ?3, k.quota_scope, ?4, ?5 FROM keys k WHERE k.connector = ?1 AND k.key_name = ?3
         ON CONFLICT (connector, name) DO UPDATE SET
             key_name = excluded.key_name, quota_scope = excluded.quota_scope,
             expires_at = excluded.expires_at, created_at = excluded.created_at",
    )?;
    let mut recorded = 0;
    for resource in created.iter().filter(|resource| resource.expires_at.is_none_or(|end| end > now)) {
        recorded += insert.execute(params![connector, resource.name, key_name, resource.expires_at, now])?;
    }
    Ok(recorded)
}

/// The owner of the first of `names` that `connector` has a row for, unexpired at `now` (the path's name
/// before the body's: the caller lists them in that order).
pub(super) fn owner(
    connection: &Connection,
    connector: &str,
    names: &[String],
    now: i64,
) -> rusqlite::Result<Option<Owner>> {
    if names.is_empty() {
        return Ok(None);
    }
    connection
        .prepare_cached(
            "SELECT r.name, r.key_name, coalesce(k.quota_scope, r.quota_scope), r.expires_at
               FROM json_each(?2) AS wanted
               JOIN resources r ON r.connector = ?1 AND r.name = wanted.value
               LEFT JOIN keys k ON k.connector = r.connector AND k.key_name = r.key_name
              WHERE r.expires_at IS NULL OR r.expires_at > ?3
              ORDER BY wanted.key LIMIT 1",
        )?
        .query_row(params![connector, json_list(names), now], |row| {
            Ok(Owner { name: row.get(0)?, key_name: row.get(1)?, quota_scope: row.get(2)?, expires_at: row.get(3)? })
        })
        .optional()
}
