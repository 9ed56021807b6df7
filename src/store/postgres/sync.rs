//! Keyring sync on PostgreSQL (to be ported from `store/sqlite/sync.rs`).

use super::Postgres;
use crate::error::{Error, Result};
use crate::pool::{SyncReport, SyncSource};

/// Makes the keys match the keyring (see `Backend::sync_keys`).
pub(super) fn sync_keys(store: &Postgres, _source: &SyncSource<'_>, _now: i64) -> Result<SyncReport> {
    Err(Error::NotYetOnPostgres { operation: "syncing a keyring", server: store.server.display().to_string() })
}
