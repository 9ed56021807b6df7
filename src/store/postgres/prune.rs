//! Retention on PostgreSQL (to be ported from `store/sqlite/prune.rs`).

use super::connection::Tx;
use crate::store::Journal;

/// Deletes up to `batch` of the oldest rows of `journal` older than `before`.
pub(super) fn prune_batch(
    _tx: &mut Tx<'_>,
    _journal: Journal,
    _before: i64,
    _batch: u32,
) -> Result<u64, postgres::Error> {
    Ok(0)
}

/// Whether `journal` holds a row older than `before`.
pub(super) fn has_older(_tx: &mut Tx<'_>, _journal: Journal, _before: i64) -> Result<bool, postgres::Error> {
    Ok(false)
}
