//! Claims: one statement claims a key and writes its history row. Where limits pace the connector, a
//! claim runs in a transaction with its reservation (as on SQLite, under a savepoint: a key whose
//! scope has no room is given back, its scope paced for the model, and the claim looks again);
//! otherwise a lone claim is that one statement, committed on its own.

use super::connection::Tx;
use super::{CLAIM, CLAIM_PINNED, pacing};
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
        paced.seen(request.connector, lesson);
        let binding = pacing.binding(&claimed.scope, model, now);
        let reservation = reservation_of(request, &claimed, model);
        match pacing::reserve(tx, &reservation, (&binding, pacing.longest_reach(now)), &|| clock.now_ms())? {
            Ok(()) => {
                tx.batch("RELEASE paced_claim")?;
                return Ok(Some(claimed));
            }
            Err(full) => {
                tx.batch("ROLLBACK TO paced_claim; RELEASE paced_claim")?;
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

/// One claim statement (its history row included), with the connector's latest lesson time.
pub(super) fn claim_one(
    tx: &mut Tx<'_>,
    request: &ClaimFor<'_>,
    holder: &Holder,
    (now, boot_ms): (i64, i64),
) -> Result<Option<(Claimed, i64)>, postgres::Error> {
    let tried = request.tried.to_vec();
    let statement = if request.pin.is_some() { &CLAIM_PINNED } else { &CLAIM };
    let row = tx.query_opt(
        statement,
        &[
            &request.connector,
            &now,
            &holder.host,
            &holder.boot_id,
            &i64::from(holder.pid),
            &holder.started,
            &tried,
            &boot_ms,
            &holder.pid_namespace,
            &request.model,
            &request.pin,
        ],
    )?;
    let Some(row) = row else { return Ok(None) };
    let claimed = Claimed {
        id: row.get(0),
        key_name: row.get(1),
        fingerprint: row.get(2),
        lease: row.get(3),
        lockdown_count: row.get(6),
        boot_ms,
        scope: row.get(5),
    };
    Ok(Some((claimed, row.get(7))))
}
