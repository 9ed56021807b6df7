//! Reserve before send: a claim on a key whose quota scope has declared limits for the model counts
//! the scope's reservations in each window, in the claim's own transaction, and adds one only when
//! every window has room (see migration 7). A full window becomes a lockdown of (scope, model) until
//! the reservation that fills it leaves it.
//!
//! Invariant: the count and the insert run under the database's one write lock, so no window ever
//! holds more reservations than its limit, across every process and thread.

use rusqlite::{OptionalExtension, Transaction, params};

use crate::pool::limit::PACED_QUOTA_ID;
use crate::pool::{Limit, Measure};

/// Reservations are kept at least this long (a day and its daylight-saving hour, with room), and as
/// long as the connector's longest window.
const KEEP_MS: i64 = 26 * 3_600_000;

/// A window with no room: the first limit found full, and when it has room again.
#[derive(Debug)]
pub(super) struct Full {
    pub(super) limit: Limit,
    pub(super) until: i64,
}

/// What one reservation is for.
pub(super) struct Reservation<'a> {
    pub(super) connector: &'a str,
    pub(super) scope: &'a str,
    pub(super) model: &'a str,
    pub(super) key_name: &'a str,
    pub(super) lease: i64,
}

/// The reservations of (`scope`, `model`) at or after `since`.
pub(super) fn reserved_since(
    connection: &rusqlite::Connection,
    connector: &str,
    scope: &str,
    model: &str,
    since: i64,
) -> rusqlite::Result<u64> {
    let count: i64 = connection
        .prepare_cached(
            "SELECT count(*) FROM reservations WHERE connector = ?1 AND quota_scope = ?2 AND model = ?3 AND at >= ?4",
        )?
        .query_row(params![connector, scope, model, since], |row| row.get(0))?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// The (scope, model) pairs of `connector` with reservations at or after `since`, by scope and model.
pub(super) fn reserved_models(
    connection: &rusqlite::Connection,
    connector: &str,
    since: i64,
) -> rusqlite::Result<Vec<(String, String)>> {
    connection
        .prepare_cached(
            "SELECT DISTINCT quota_scope, model FROM reservations WHERE connector = ?1 AND at >= ?2
              ORDER BY quota_scope, model",
        )?
        .query_map(params![connector, since], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect()
}

/// Reserves one request of `reservation` at `now` if every request limit of `limits` (those that
/// bind it) has room; else which is full, and until when. `reach`: how far back the connector's longest
/// window counts, for deleting rows no window counts. Token limits are not paced here.
pub(super) fn reserve(
    transaction: &Transaction<'_>,
    reservation: &Reservation<'_>,
    (limits, reach): (&[Limit], i64),
    now: i64,
) -> rusqlite::Result<Result<(), Full>> {
    let Reservation { connector, scope, model, key_name, lease } = *reservation;
    let mut requests = limits.iter().filter(|limit| limit.measure == Measure::Requests).peekable();
    if requests.peek().is_none() {
        // Nothing to count against: no row either.
        return Ok(Ok(()));
    }
    for limit in requests {
        let counted_from = limit.window.counted_from(now);
        let count = reserved_since(transaction, connector, scope, model, counted_from)?;
        if count < limit.count {
            continue;
        }
        // Room comes back when the reservation that puts the window at its limit leaves it.
        let offset = i64::try_from(count - limit.count).unwrap_or(i64::MAX);
        let oldest: Option<i64> = transaction
            .prepare_cached(
                "SELECT at FROM reservations
                  WHERE connector = ?1 AND quota_scope = ?2 AND model = ?3 AND at >= ?4
                  ORDER BY at LIMIT 1 OFFSET ?5",
            )?
            .query_row(params![connector, scope, model, counted_from, offset], |row| row.get(0))
            .optional()?;
        let until = limit.window.room_at(oldest.unwrap_or(now), now);
        return Ok(Err(Full { limit: *limit, until }));
    }
    transaction
        .prepare_cached(
            "INSERT INTO reservations (connector, quota_scope, model, at, key_name, lease)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![connector, scope, model, now, key_name, lease])?;
    // Rows no window of the connector counts any more go, whatever their scope and model: older than
    // its longest window (at least a day and its daylight-saving hour) before its newest earlier row,
    // not before `now`, so that a clock stepped forward for one claim does not make the present's rows
    // look old.
    transaction
        .prepare_cached(
            "DELETE FROM reservations WHERE connector = ?1
                AND at < (SELECT max(at) FROM reservations WHERE connector = ?1 AND at < ?2) - ?3",
        )?
        .execute(params![connector, now, reach.max(KEEP_MS)])?;
    Ok(Ok(()))
}

/// Records that (scope, model) is paced until `full.until`: a lockdown row like any other (claims,
/// waits, `why` and `status` read it), whose strikes it leaves alone (pacing is no upstream refusal).
pub(super) fn lock_down(
    transaction: &Transaction<'_>,
    reservation: &Reservation<'_>,
    full: &Full,
    now: i64,
) -> rusqlite::Result<()> {
    let Reservation { connector, scope, model, key_name, .. } = *reservation;
    let reason = format!("paced: {} declared for {model}", full.limit);
    transaction
        .prepare_cached(
            "INSERT INTO lockdowns
                 (connector, scope, model, until, quota_id, reason, http_status, set_by_key, set_at, strikes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, ?7, ?8, 0)
             ON CONFLICT (connector, scope, model) DO UPDATE SET
                 quota_id = excluded.quota_id, reason = excluded.reason, http_status = NULL,
                 set_by_key = excluded.set_by_key, set_at = excluded.set_at, until = excluded.until
             WHERE excluded.until > until",
        )?
        .execute(params![connector, scope, model, full.until, PACED_QUOTA_ID, reason, key_name, now])?;
    transaction
        .prepare_cached("UPDATE keys SET queue_at = max(queue_at, ?3) WHERE connector = ?1 AND quota_scope = ?2")?
        .execute(params![connector, scope, full.until])?;
    Ok(())
}
