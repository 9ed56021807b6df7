//! Retention: the append-only tables (`history`, `requests`) lose their rows older than a cutoff, a
//! small batch per write transaction, so the write lock is never held for long and claims slip in
//! between batches (the loop and its pauses are `crate::retention`'s).
//!
//! Invariant: a batch deletes the oldest rows first, through each table's `at` index, so a batch costs
//! the same on a table of a thousand rows or of millions, and rows newer than the cutoff are never
//! read.

use rusqlite::{Transaction, params};

use crate::store::Journal;

/// Deletes up to `batch` rows of `journal` older than `before` (unix ms); how many it deleted.
pub(super) fn prune_batch(
    transaction: &Transaction<'_>,
    journal: Journal,
    before: i64,
    batch: u32,
) -> rusqlite::Result<u64> {
    let statement = match journal {
        Journal::History => {
            "DELETE FROM history WHERE id IN (SELECT id FROM history WHERE at < ?1 ORDER BY at LIMIT ?2)"
        }
        Journal::Requests => {
            "DELETE FROM requests WHERE id IN (SELECT id FROM requests WHERE at < ?1 ORDER BY at LIMIT ?2)"
        }
    };
    let deleted = transaction.prepare_cached(statement)?.execute(params![before, batch])?;
    Ok(deleted as u64)
}

/// Whether `journal` has any row older than `before`: one step of its `at` index.
pub(super) fn has_older(connection: &rusqlite::Connection, journal: Journal, before: i64) -> rusqlite::Result<bool> {
    let statement = match journal {
        Journal::History => "SELECT EXISTS (SELECT 1 FROM history WHERE at < ?1)",
        Journal::Requests => "SELECT EXISTS (SELECT 1 FROM requests WHERE at < ?1)",
    };
    connection.prepare_cached(statement)?.query_row(params![before], |row| row.get(0))
}
