//! Reserve before send: a claim on a key whose quota scope has limits for the model (declared in the
//! keyring, or learned from a 429) counts the scope's reservations in each window, in the claim's own
//! transaction, and adds one only when every window has room (see migrations 7 and 8). A full window
//! becomes a lockdown of (scope, model) until the reservation that fills it leaves it.
//!
//! Invariant: the count and the insert run under the database's one write lock, so no window ever
//! holds more reservations (or tokens) than its limit, across every process and thread.

use rusqlite::{OptionalExtension, Transaction, params};

use crate::pool::limit::PACED_QUOTA_ID;
use crate::pool::{LearnedLimit, Limit, Measure, Source, Taught};
use crate::store::paced::Lessons;
pub(super) use crate::store::paced::{Full, Reservation};

/// Reservations are kept at least this long (a day and its daylight-saving hour, with room), and as
/// long as the connector's longest window.
const KEEP_MS: i64 = 26 * 3_600_000;

/// The learned limits not yet forgotten at `now`, each with its connector and lesson time.
pub(super) fn learned(connection: &rusqlite::Connection, now: i64) -> rusqlite::Result<Lessons> {
    let mut statement = connection.prepare_cached(
        "SELECT connector, quota_scope, model, quota_id, limit_text, until, learned_at FROM learned_limits
          WHERE until > ?1 ORDER BY connector, quota_scope, model, quota_id",
    )?;
    let rows = statement.query_map([now], |row| {
        let limit = row.get::<_, String>(4)?.parse::<Limit>().ok();
        let learned = match limit {
            Some(limit) => Some(LearnedLimit {
                scope: row.get(1)?,
                model: row.get(2)?,
                quota_id: row.get(3)?,
                limit,
                until: row.get(5)?,
            }),
            None => None,
        };
        Ok((row.get::<_, String>(0)?, learned, row.get::<_, i64>(6)?))
    })?;
    // A row this build cannot read (written by a newer one) paces nothing rather than failing claims.
    let mut all = Vec::new();
    for row in rows {
        if let (connector, Some(learned), lesson) = row? {
            all.push((connector, learned, lesson));
        }
    }
    Ok(all)
}

/// The most reservations a lesson adds to fill its window (a paid tier's limits run to thousands a
/// minute; past this the window is left as it is).
const MOST_FILLED: u64 = 10_000;

/// Records what an answer of key `key_name` (under lease `lease`) taught its quota scope `scope`,
/// until `until` (the provider's next midnight); a lesson of the same quota replaces the earlier one.
///
/// The answer said the provider's window is full now, whatever the pool reserved in it (nothing, in a
/// pool that declared no limit): each sliding window taught is filled up to its limit at `now`, so the
/// scope is paced for one window rather than sending a burst when the 429's lockdown ends. A day's
/// window is not filled: the 429 locked the scope down until its end.
pub(super) fn learn(
    transaction: &Transaction<'_>,
    (connector, scope, key_name, lease): (&str, &str, &str, i64),
    taught: &[Taught],
    (now, until): (i64, i64),
) -> rusqlite::Result<()> {
    let mut statement = transaction.prepare_cached(
        "INSERT INTO learned_limits (connector, quota_scope, model, quota_id, limit_text, until, learned_at, key_name)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (connector, quota_scope, model, quota_id) DO UPDATE SET
             limit_text = excluded.limit_text, until = excluded.until, learned_at = excluded.learned_at,
             key_name = excluded.key_name",
    )?;
    for lesson in taught {
        let limit = lesson.limit.to_string();
        statement.execute(params![connector, scope, lesson.model, lesson.quota_id, limit, until, now, key_name])?;
    }
    for lesson in taught.iter().filter(|lesson| lesson.limit.window != crate::pool::Window::Day) {
        let Limit { count, measure, window } = lesson.limit;
        let used = used_since(transaction, (connector, scope, &lesson.model), measure, window.counted_from(now))?;
        let missing = count.saturating_sub(used);
        let (rows, tokens) = match measure {
            Measure::Requests => (missing.min(MOST_FILLED), 0),
            Measure::Tokens => (u64::from(missing > 0), missing),
        };
        let reservation = Reservation { connector, scope, model: &lesson.model, key_name, lease, tokens };
        for _ in 0..rows {
            record(transaction, &reservation, now)?;
        }
    }
    // Lessons forgotten by now go.
    transaction.prepare_cached("DELETE FROM learned_limits WHERE until <= ?1")?.execute([now])?;
    Ok(())
}

/// The reservation of lease `lease` of key `key_name` now counts `tokens`, the answer's own count.
pub(super) fn settle(
    transaction: &Transaction<'_>,
    (connector, key_name, lease): (&str, &str, i64),
    tokens: u64,
) -> rusqlite::Result<()> {
    transaction
        .prepare_cached("UPDATE reservations SET tokens = ?4 WHERE connector = ?1 AND key_name = ?2 AND lease = ?3")?
        .execute(params![connector, key_name, lease, i64::try_from(tokens).unwrap_or(i64::MAX)])?;
    Ok(())
}

/// How much of `measure` (scope, model) reserved at or after `since`: requests, or input tokens.
pub(super) fn used_since(
    connection: &rusqlite::Connection,
    (connector, scope, model): (&str, &str, &str),
    measure: Measure,
    since: i64,
) -> rusqlite::Result<u64> {
    let sql = match measure {
        Measure::Requests => {
            "SELECT count(*) FROM reservations
              WHERE connector = ?1 AND quota_scope = ?2 AND model = ?3 AND at >= ?4"
        }
        Measure::Tokens => {
            "SELECT coalesce(sum(tokens), 0) FROM reservations
              WHERE connector = ?1 AND quota_scope = ?2 AND model = ?3 AND at >= ?4"
        }
    };
    let used: i64 =
        connection.prepare_cached(sql)?.query_row(params![connector, scope, model, since], |row| row.get(0))?;
    Ok(u64::try_from(used).unwrap_or(0))
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

/// Reserves one request of `reservation` (and its tokens) at `now` if every limit of `limits` (those
/// that bind it) has room; else which is full, and until when. `reach`: how far back the connector's
/// longest window counts, for deleting rows no window counts.
///
/// A token window has room when the request's estimate fits beside what it holds, or when it holds
/// nothing: a request larger than the whole limit goes alone rather than never (the provider judges it).
pub(super) fn reserve(
    transaction: &Transaction<'_>,
    reservation: &Reservation<'_>,
    (limits, reach): (&[(Limit, Source)], i64),
    now: i64,
) -> rusqlite::Result<Result<(), Full>> {
    let Reservation { connector, scope, model, tokens, .. } = *reservation;
    if limits.is_empty() {
        // Nothing to count against: no row either.
        return Ok(Ok(()));
    }
    for (limit, source) in limits {
        let counted_from = limit.window.counted_from(now);
        let used = used_since(transaction, (connector, scope, model), limit.measure, counted_from)?;
        // How much must leave the window before this request fits.
        let excess = match limit.measure {
            Measure::Requests => (used + 1).saturating_sub(limit.count),
            Measure::Tokens if used == 0 => 0,
            Measure::Tokens => (used + tokens).saturating_sub(limit.count),
        };
        if excess == 0 {
            continue;
        }
        let leaves = leaving_at(transaction, (connector, scope, model), limit.measure, counted_from, excess)?;
        let until = limit.window.room_at(leaves.unwrap_or(now), now);
        return Ok(Err(Full { limit: *limit, source: source.clone(), until }));
    }
    record(transaction, reservation, now)?;
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

/// Writes `reservation` at `now`.
pub(super) fn record(transaction: &Transaction<'_>, reservation: &Reservation<'_>, now: i64) -> rusqlite::Result<()> {
    let Reservation { connector, scope, model, key_name, lease, tokens } = *reservation;
    transaction
        .prepare_cached(
            "INSERT INTO reservations (connector, quota_scope, model, at, key_name, lease, tokens)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![connector, scope, model, now, key_name, lease, i64::try_from(tokens).unwrap_or(i64::MAX)])?;
    Ok(())
}

/// The instant of the reservation of (scope, model) counted from `counted_from` whose leaving the
/// window frees `excess` of `measure` (oldest first), if the window holds that much.
fn leaving_at(
    transaction: &Transaction<'_>,
    (connector, scope, model): (&str, &str, &str),
    measure: Measure,
    counted_from: i64,
    excess: u64,
) -> rusqlite::Result<Option<i64>> {
    let window = "FROM reservations WHERE connector = ?1 AND quota_scope = ?2 AND model = ?3 AND at >= ?4";
    if measure == Measure::Requests {
        let offset = i64::try_from(excess - 1).unwrap_or(i64::MAX);
        return transaction
            .prepare_cached(&format!("SELECT at {window} ORDER BY at LIMIT 1 OFFSET ?5"))?
            .query_row(params![connector, scope, model, counted_from, offset], |row| row.get(0))
            .optional();
    }
    let mut statement = transaction.prepare_cached(&format!("SELECT at, tokens {window} ORDER BY at"))?;
    let mut rows = statement.query(params![connector, scope, model, counted_from])?;
    let mut freed: u64 = 0;
    while let Some(row) = rows.next()? {
        freed = freed.saturating_add(u64::try_from(row.get::<_, i64>(1)?).unwrap_or(0));
        if freed >= excess {
            return Ok(Some(row.get(0)?));
        }
    }
    Ok(None)
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
    let reason = full.reason(model);
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
