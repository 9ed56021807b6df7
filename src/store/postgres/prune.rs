//! Retention on PostgreSQL: the append-only tables (`history`, `requests`) lose their rows older than
//! a cutoff, a small batch per transaction (the loop and its pauses are `crate::retention`'s), as on
//! SQLite (`store/sqlite/prune.rs`).
//!
//! Invariants:
//! - A batch deletes the oldest rows first by `at`, through each table's `at` index, so it costs the
//!   same on a table of a thousand rows or of millions, and rows newer than the cutoff are never read.
//! - Pruners on several hosts at once never wait on each other: a batch skips rows another batch has
//!   locked (`SKIP LOCKED`) and takes the next oldest.

use super::connection::Tx;
use crate::store::Journal;

/// Deletes up to `batch` of the oldest rows of `journal` older than `before` (unix ms); how many it
/// deleted.
pub(super) fn prune_batch(tx: &mut Tx<'_>, journal: Journal, before: i64, batch: u32) -> Result<u64, postgres::Error> {
    let statement = match journal {
        Journal::History => {
            "DELETE FROM history WHERE id IN (SELECT id FROM history WHERE at < $1::bigint ORDER BY at
                                              LIMIT $2::bigint FOR UPDATE SKIP LOCKED)"
        }
        Journal::Requests => {
            "DELETE FROM requests WHERE id IN (SELECT id FROM requests WHERE at < $1::bigint ORDER BY at
                                               LIMIT $2::bigint FOR UPDATE SKIP LOCKED)"
        }
    };
    tx.execute(statement, &[&before, &i64::from(batch)])
}

/// Whether `journal` has any row older than `before`: one step of its `at` index.
pub(super) fn has_older(tx: &mut Tx<'_>, journal: Journal, before: i64) -> Result<bool, postgres::Error> {
    let statement = match journal {
        Journal::History => "SELECT EXISTS (SELECT 1 FROM history WHERE at < $1::bigint)",
        Journal::Requests => "SELECT EXISTS (SELECT 1 FROM requests WHERE at < $1::bigint)",
    };
    Ok(tx.query_one(statement, &[&before])?.get(0))
}

#[cfg(test)]
mod tests {
    use super::super::usage::test_server::{TestDb, sqlite};
    use crate::pool::outcome::Outcome;
    use crate::pool::{Attempt, HistoryQuery};
    use crate::store::{Backend, Journal};

    /// The `at` of every request row, oldest first.
    fn ats(store: &dyn Backend) -> Vec<i64> {
        store.attempts(None).expect("attempts").into_iter().map(|attempt| attempt.at).collect()
    }

    #[test]
    fn batches_delete_the_oldest_rows_first_as_on_sqlite() {
        let Some(db) = TestDb::create("prune") else { return };
        let postgres = db.open();
        let (_dir, sqlite) = sqlite();
        for store in [&postgres as &dyn Backend, &sqlite] {
            super::super::usage::tests::sync(store);
            // Inserted out of time order, so "oldest" means the smallest `at`, not the first row.
            for at in [50, 10, 40, 20, 60, 30, 70] {
                let attempt = Attempt {
                    at,
                    connector: "c".to_owned(),
                    key_name: Some("k1".to_owned()),
                    method: "GET".to_owned(),
                    endpoint: "/".to_owned(),
                    status: Some(200),
                    latency_ms: 1,
                    outcome: Outcome::ALL[0],
                    model: None,
                    prompt_tokens: None,
                };
                store.record_attempt(&attempt).expect("record");
            }
        }
        for (before, batch) in [(45, 2), (45, 2), (45, 2), (100, 0), (1, 5)] {
            let expected = sqlite.prune_batch(Journal::Requests, before, batch).expect("sqlite").0;
            assert_eq!(postgres.prune_batch(Journal::Requests, before, batch).expect("postgres").0, expected);
            assert_eq!(ats(&postgres), ats(&sqlite), "after pruning {batch} before {before}");
            for cutoff in [0, 45, 51, 1_000] {
                let expected = sqlite.has_older(Journal::Requests, cutoff).expect("sqlite");
                assert_eq!(postgres.has_older(Journal::Requests, cutoff).expect("postgres"), expected, "{cutoff}");
            }
        }
        assert_eq!(ats(&postgres), [50, 60, 70]);
        // The history: the sync's rows (at 1) go, nothing newer.
        let history = |store: &dyn Backend| store.history(&HistoryQuery::default()).expect("history").len();
        assert!(postgres.has_older(Journal::History, 2).expect("has older"));
        assert_eq!(postgres.prune_batch(Journal::History, 2, 100).expect("prune").0, history(&sqlite) as u64);
        assert_eq!(history(&postgres), 0);
        assert!(!postgres.has_older(Journal::History, 2).expect("has older"));
    }
}
