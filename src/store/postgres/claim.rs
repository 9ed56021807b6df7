//! One claim in a transaction: the claim statement, its history row and, where limits pace the
//! connector, the reservation (as on SQLite, under a savepoint: a key whose scope has no room is given
//! back, its scope paced for the model, and the claim looks again).

use super::connection::Tx;
use super::{CLAIM, CLAIM_PINNED, pacing, record};
use crate::clock::Clock;
use crate::holder::Holder;
use crate::pool::{Claimed, HistoryEvent, ModelScope, Pacing};
use crate::store::ClaimFor;
use crate::store::paced::Paced;
use crate::store::transition::NewTransition;

/// Runs one claim of `request` for `holder` in `tx`, with times read from `clock` now.
pub(super) fn claim_in(
    tx: &mut Tx<'_>,
    request: &ClaimFor<'_>,
    holder: &Holder,
    clock: &dyn Clock,
    pacing: Option<&Pacing>,
    paced: &Paced,
) -> Result<Option<Claimed>, postgres::Error> {
    let now = clock.now_ms();
    let times = (now, clock.boot_ms());
    // A request for the model `*` (no upstream has one) is not paced: its lockdown would stop every model.
    let model = request.model.filter(|model| *model != ModelScope::EVERY);
    let (Some(pacing), Some(model)) = (pacing, model) else {
        let Some((claimed, lesson)) = claim_one(tx, request, holder, times)? else { return Ok(None) };
        // The first claim to see a lesson this process has not read goes out unpaced, but counts.
        if paced.seen(request.connector, lesson)
            && let Some(model) = model
        {
            pacing::record(tx, &reservation_of(request, &claimed, model), now)?;
        }
        return Ok(Some(claimed));
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

/// One claim statement and its history row, with the connector's latest lesson time.
fn claim_one(
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
    let out_of_lockdown = row.get::<_, Option<i64>>(4).is_some();
    let transition = NewTransition {
        holder_pid: Some(holder.pid),
        lease: Some(claimed.lease),
        model: request.model,
        quota_scope: Some(&claimed.scope),
        ..NewTransition::new(
            HistoryEvent::Claimed,
            (request.connector, &claimed.key_name, &claimed.fingerprint),
            Some(if out_of_lockdown { "lockdown" } else { "vacant" }),
            "locked",
            "claimed",
        )
    };
    record(tx, now, &transition)?;
    Ok(Some((claimed, row.get(7))))
}
