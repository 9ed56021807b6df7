//! Sees other sessions' commits by a cheap poll: the newest history and request rows and the lockdowns'
//! latest change, read in one statement of index lookups (PostgreSQL has no `data_version`).

use super::Postgres;
use crate::error::Result;
use crate::store::ChangeWatch;

/// How often a process with waiters looks: a key freed on another host is seen within this, and 64
/// waiting processes cost the server some 2,500 index lookups a second (at SQLite's 1 ms, 64,000 round
/// trips a second starved the writers: 57 claim+release cycles/s with 64 processes on 6 free keys).
const LOOK_EVERY: std::time::Duration = std::time::Duration::from_millis(25);

/// A watch that compares the pool's newest rows with those of the last look.
#[derive(Debug)]
pub(super) struct LatestRows {
    store: Postgres,
    last: Option<(i64, i64, i64, i64)>,
}

impl LatestRows {
    pub(super) fn new(store: Postgres) -> Self {
        Self { store, last: None }
    }
}

impl ChangeWatch for LatestRows {
    fn changed(&mut self) -> Result<bool> {
        let latest = self.store.read("watching for changes", |tx| {
            let row = tx.query_one(
                "SELECT (SELECT coalesce(max(id), 0) FROM history), (SELECT coalesce(max(id), 0) FROM requests),
                        (SELECT coalesce(max(set_at), 0) + count(*) FROM lockdowns),
                        (SELECT coalesce(max(learned_at), 0) FROM learned_limits)",
                &[],
            )?;
            Ok((row.get(0), row.get(1), row.get(2), row.get(3)))
        })?;
        Ok(self.last.replace(latest) != Some(latest))
    }

    fn interval(&self) -> std::time::Duration {
        LOOK_EVERY
    }
}
