//! Usage counts on PostgreSQL (to be ported from `store/sqlite/usage.rs`).

use super::connection::Tx;
use crate::pool::usage::{UsageQuery, UsageRow};

/// The attempts `query` asks for, counted.
pub(super) fn usage(_tx: &mut Tx<'_>, _query: &UsageQuery) -> Result<Vec<UsageRow>, postgres::Error> {
    Ok(Vec::new())
}
