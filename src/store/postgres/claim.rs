//! Claims: one statement claims a key and writes its history row. Where limits pace the connector, a
//! claim runs in a transaction with its reservation (as on SQLite, under a savepoint: a key whose
//! scope has no room is given back, its scope paced for the model, and the claim looks again);
//! otherwise a lone claim is that one statement, committed on its own.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use postgres::types::ToSql;

use super::connection::Tx;
use super::{CLAIM, CLAIM_PINNED, WATERMARKS_ALONE, pacing};
use crate::clock::Clock;
use crate::holder::Holder;
use crate::pool::{Claimed, ModelScope, Pacing};
use crate::store::ClaimFor;
use crate::store::paced::Paced;

/// Runs one claim of `request` for `holder` in `tx`, reserving by `pacing`, with times read from
/// `clock` now. `holds_keys`: `tx` holds keys it claimed already; a scope found full then ends the
/// claims of `tx` (`None`) instead of being locked down in it.
pub(super) fn claim_paced(
    tx: &mut Tx<'_>,
    request: &ClaimFor<'_>,
    holder: &Holder,
    clock: &dyn Clock,
    (pacing, paced, unread): (&Pacing, &Paced, &UnreadForm),
    holds_keys: bool,
) -> Result<Option<Claimed>, postgres::Error> {
    let now = clock.now_ms();
    let times = (now, clock.boot_ms());
    let Some(model) = paced_model(request) else {
        return Ok(claim_one(tx, request, holder, times, unread)?.map(|(one, _)| one));
    };
    loop {
        tx.batch("SAVEPOINT paced_claim")?;
        let Some((claimed, lesson)) = claim_one(tx, request, holder, times, unread)? else {
            tx.batch("RELEASE paced_claim")?;
            return Ok(None);
        };
        if let Some(lesson) = lesson {
            paced.seen(request.connector, lesson);
        }
        let binding = pacing.binding(&claimed.scope, model, now);
        let reservation = reservation_of(request, &claimed, model);
        match pacing::reserve(tx, &reservation, (&binding, pacing.longest_reach(now)), &|| clock.now_ms())? {
            Ok(()) => {
                tx.batch("RELEASE paced_claim")?;
                return Ok(Some(claimed));
            }
            Err(full) => {
                tx.batch("ROLLBACK TO paced_claim; RELEASE paced_claim")?;
                if holds_keys {
                    // The watermarks' lock is taken before any row (see `WATERMARKS_ALONE`): this
                    // transaction holds the keys it claimed already, so it ends with them, and the scope
                    // is locked down by a later claim.
                    return Ok(None);
                }
                tx.execute(WATERMARKS_ALONE, &[&request.connector])?;
                pacing::lock_down(tx, &reservation, &full, now)?;
            }
        }
    }
}

/// The model a claim of `request` reserves for, if any: a request for the model `*` (no upstream has
/// one) is not paced, since its lockdown would stop every model.
fn paced_model<'a>(request: &ClaimFor<'a>) -> Option<&'a str> {
    request.model.filter(|model| *model != ModelScope::EVERY)
}

/// Counts `claimed`, which went out unpaced, in its scope's window: for the first claim to see a lesson
/// this process had not read (see `Paced::seen`).
pub(super) fn count_unpaced(
    tx: &mut Tx<'_>,
    request: &ClaimFor<'_>,
    claimed: &Claimed,
    now: i64,
) -> Result<(), postgres::Error> {
    let Some(model) = paced_model(request) else { return Ok(()) };
    pacing::record(tx, &reservation_of(request, claimed, model), now)
}

/// The reservation of `claimed` for `model`.
fn reservation_of<'a>(request: &'a ClaimFor<'_>, claimed: &'a Claimed, model: &'a str) -> pacing::Reservation<'a> {
    pacing::Reservation {
        connector: request.connector,
        scope: &claimed.scope,
        model,
        key_name: &claimed.key_name,
        lease: claimed.lease,
        tokens: request.tokens,
    }
}

/// One claim (its history row included), with the connector's latest lesson time if the claim read it:
/// the claim's [`Unread`](super::ClaimStatement::Unread) form first (unless `unread` says it declined
/// lately), and its `Read` form when that form picked a key with a scope watermark.
pub(super) fn claim_one(
    tx: &mut Tx<'_>,
    request: &ClaimFor<'_>,
    holder: &Holder,
    (now, boot_ms): (i64, i64),
    unread: &UnreadForm,
) -> Result<Option<(Claimed, Option<i64>)>, postgres::Error> {
    let tried = request.tried.to_vec();
    let statements = if request.pin.is_some() { &CLAIM_PINNED } else { &CLAIM };
    let pid = i64::from(holder.pid);
    let params: [&(dyn ToSql + Sync); 11] = [
        &request.connector,
        &now,
        &holder.host,
        &holder.boot_id,
        &pid,
        &holder.started,
        &tried,
        &boot_ms,
        &holder.pid_namespace,
        &request.model,
        &request.pin,
    ];
    let claimed = |row: &postgres::Row| Claimed {
        id: row.get(0),
        key_name: row.get(1),
        fingerprint: row.get(2),
        lease: row.get(3),
        lockdown_count: 0,
        boot_ms,
        scope: row.get(5),
    };
    if unread.worth_trying(request.connector) {
        let Some(row) = tx.query_opt(&statements.unread, &params)? else { return Ok(None) };
        if row.get::<_, Option<i64>>(0).is_some() {
            return Ok(Some((claimed(&row), None)));
        }
        unread.declined(request.connector);
    }
    let Some(row) = tx.query_opt(&statements.read, &params)? else { return Ok(None) };
    Ok(Some((Claimed { lockdown_count: row.get(6), ..claimed(&row) }, Some(row.get(7)))))
}

/// When this process's claims of each connector run the claim's `Unread` form. After that form picked a
/// key with a scope watermark, the least recently used keys are likely marked for a while (a group
/// locked down for its main model stays unused for it, so first in line): the `Read` form alone then
/// costs one statement where trying both costs two, so for [`PAUSE`](Self::PAUSE) the claims skip it.
/// Either form takes the same key; this only chooses the cheaper order.
#[derive(Debug, Default)]
pub(super) struct UnreadForm(Mutex<HashMap<String, Instant>>);

impl UnreadForm {
    /// How long after a decline the claims of the connector skip the `Unread` form.
    const PAUSE: Duration = Duration::from_secs(1);

    fn worth_trying(&self, connector: &str) -> bool {
        let paused = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        paused.get(connector).is_none_or(|until| Instant::now() >= *until)
    }

    fn declined(&self, connector: &str) {
        let mut paused = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        paused.insert(connector.to_owned(), Instant::now() + Self::PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::super::usage::test_server::TestDb;
    use super::UnreadForm;
    use crate::clock::ManualClock;
    use crate::holder::Holder;
    use crate::pool::limit::{Limit, Limits, Measure, Window};
    use crate::pool::{KeySpec, SyncSource};
    use crate::store::{Backend, ClaimFor};

    /// A batch of claims that finds a scope full while it holds a key ends there, with that key, rather
    /// than lock the scope down while it holds key rows (the watermarks' lock comes before any row, see
    /// `WATERMARKS_ALONE`); the next claim, holding none, locks it down.
    #[test]
    fn a_batch_holding_a_key_ends_at_a_full_scope_and_the_next_claim_locks_it_down() {
        let Some(db) = TestDb::create("batch_full") else { return };
        let store = db.open();
        let keys = [
            KeySpec { connector: "c", name: "a", fingerprint: "fa" },
            KeySpec { connector: "c", name: "b", fingerprint: "fb" },
        ];
        let source = SyncSource {
            path: Path::new("/keys.ini"),
            connectors: &["c"],
            keys: &keys,
            groups: &[("c", "a", "g"), ("c", "b", "g")],
            as_truth: false,
        };
        const NOW: i64 = 1_000_000;
        let clock = ManualClock::new(NOW);
        store.sync_keys(&source, NOW).expect("sync");
        let one_a_minute =
            Limit { count: 1, measure: Measure::Requests, window: Window::Sliding(Duration::from_secs(60)) };
        let limits = Limits { every_group: [("*".to_owned(), vec![one_a_minute])].into(), ..Limits::default() };
        store.declare_limits("c", Some(Arc::new(limits)), NOW);
        let claim = |count| {
            let request = ClaimFor::new("c", Some("m"), &[]);
            let deadline = Instant::now() + Duration::from_secs(30);
            store.claim_several(request, count, Holder::current(), &clock, deadline).expect("claim")
        };
        let lockdowns_of_g = || -> i64 {
            db.client()
                .query_one("SELECT count(*) FROM apijongler.lockdowns WHERE scope = 'group:g' AND model = 'm'", &[])
                .expect("lockdowns")
                .get(0)
        };

        let batch = claim(2);
        assert_eq!(batch.len(), 1, "the batch ended at the full group with the one key it had: {batch:?}");
        assert_eq!(lockdowns_of_g(), 0, "the batch locked the group down while it held a key");
        assert!(claim(1).is_empty(), "the group had room for a second request this minute");
        assert_eq!(lockdowns_of_g(), 1, "the claim that held nothing locked the full group down");
    }

    #[test]
    fn a_decline_pauses_the_unread_form_of_its_connector_alone() {
        let unread = UnreadForm::default();
        assert!(unread.worth_trying("a") && unread.worth_trying("b"));
        unread.declined("a");
        assert!(!unread.worth_trying("a"), "tried again right after a decline");
        assert!(unread.worth_trying("b"), "another connector's claims paused");
    }
}
