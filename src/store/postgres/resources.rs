//! Resource owners on PostgreSQL (to be ported from `store/sqlite/resources.rs`).

use super::connection::Tx;
use crate::resource::{Created, Owner};

/// Records what `key_name` created.
pub(super) fn record(
    _tx: &mut Tx<'_>,
    _connector: &str,
    _key_name: &str,
    _created: &[Created],
    _now: i64,
) -> Result<usize, postgres::Error> {
    Ok(0)
}

/// The owner of the first known of `names`.
pub(super) fn owner(
    _tx: &mut Tx<'_>,
    _connector: &str,
    _names: &[String],
    _now: i64,
) -> Result<Option<Owner>, postgres::Error> {
    Ok(None)
}
