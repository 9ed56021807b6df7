//! Claims: one statement claims a key and writes its history row. Where limits pace the connector, a
//! claim runs in a transaction with its reservation (as on SQLite, under a savepoint: a key whose
//! scope has no room is given back, its scope paced for the model, and the claim looks again);
//! otherwise a lone claim is that one statement, committed on its own.

use super::connection::Tx;
use postgres::types::ToSql;

use super::{CLAIM, CLAIM_PINNED, WATERMARKS_ALONE, pacing};
use crate::clock::Clock;
use crate::holder::Holder;
use crate::pool::{Claimed, ModelScope, Pacing};
use crate::store::ClaimFor;
use crate::store::paced::Paced;

/// Runs one claim of `request` for `holder` in `tx`, reserving by `pacing`, with times read from
/// `clock` now.
pub(super) fn claim_paced(
    tx: &mut Tx<'_>,
    request: &ClaimFor<'_>,
    holder: &Holder,
    clock: &dyn Clock,
    (pacing, paced): (&Pacing, &Paced),
) -> Result<Option<Claimed>, postgres::Error> {
    let now = clock.now_ms();
    let times = (now, clock.boot_ms());
    let Some(model) = paced_model(request) else {
        return Ok(claim_one(tx, request, holder, times)?.map(|(one, _)| one));
    };
    loop {
        tx.batch("SAVEPOINT paced_claim")?;
        let Some((claimed, lesson)) = claim_one(tx, request, holder, times)? else {
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
                // The watermarks' lock before the lockdown row (see `WATERMARKS_ALONE`).
                tx.batch(&format!("ROLLBACK TO paced_claim; RELEASE paced_claim; {WATERMARKS_ALONE}"))?;
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
/// the claim's [`Unread`](super::ClaimStatement::Unread) form first, and its `Read` form when the key that form picked
/// has a scope watermark.
pub(super) fn claim_one(
    tx: &mut Tx<'_>,
    request: &ClaimFor<'_>,
    holder: &Holder,
    (now, boot_ms): (i64, i64),
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
    let Some(row) = tx.query_opt(&statements.unread, &params)? else { return Ok(None) };
    if row.get::<_, Option<i64>>(0).is_some() {
        return Ok(Some((claimed(&row), None)));
    }
    let Some(row) = tx.query_opt(&statements.read, &params)? else { return Ok(None) };
    Ok(Some((Claimed { lockdown_count: row.get(6), ..claimed(&row) }, Some(row.get(7)))))
}
