//! Reserve before send on PostgreSQL: the rules of `store/sqlite/pacing.rs` in this dialect.
//!
//! Invariant: a window's count and its insert run under a transaction-scoped advisory lock of its
//! (connector, scope, model), which every process of every host takes first: no window ever holds
//! more reservations (or tokens) than its limit, while claims of other scopes run in parallel.

use super::connection::Tx;
use crate::pool::limit::PACED_QUOTA_ID;
use crate::pool::{LearnedLimit, Limit, Measure, Source, Taught, Window};
use crate::store::paced::Lessons;
pub(super) use crate::store::paced::{Full, Reservation};

/// Reservations are kept at least this long (a day and its daylight-saving hour, with room), and as
/// long as the connector's longest window.
const KEEP_MS: i64 = 26 * 3_600_000;

/// The most reservations a lesson adds to fill its window.
const MOST_FILLED: u64 = 10_000;

fn as_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Waits for (and holds until the transaction ends) the lock of the windows of (scope, model).
fn lock_windows(tx: &mut Tx<'_>, (connector, scope, model): (&str, &str, &str)) -> Result<(), postgres::Error> {
    tx.query_one(
        "SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(31) || $2 || chr(31) || $3, 0))",
        &[&connector, &scope, &model],
    )?;
    Ok(())
}

/// The learned limits not yet forgotten at `now`, each with its connector and lesson time.
pub(super) fn learned(tx: &mut Tx<'_>, now: i64) -> Result<Lessons, postgres::Error> {
    let rows = tx.query(
        "SELECT connector, quota_scope, model, quota_id, limit_text, until, learned_at FROM learned_limits
          WHERE until > $1 ORDER BY connector, quota_scope, model, quota_id",
        &[&now],
    )?;
    // A row this build cannot read (written by a newer one) paces nothing rather than failing claims.
    Ok(rows
        .iter()
        .filter_map(|row| {
            let limit = row.get::<_, String>(4).parse::<Limit>().ok()?;
            let learned =
                LearnedLimit { scope: row.get(1), model: row.get(2), quota_id: row.get(3), limit, until: row.get(5) };
            Some((row.get::<_, String>(0), learned, row.get::<_, i64>(6)))
        })
        .collect())
}

/// Records what an answer of key `key_name` (under lease `lease`) taught its quota scope `scope`,
/// until `until`, and fills each sliding window taught up to its limit (see the SQLite backend).
pub(super) fn learn(
    tx: &mut Tx<'_>,
    (connector, scope, key_name, lease): (&str, &str, &str, i64),
    taught: &[Taught],
    (now, until): (i64, i64),
) -> Result<(), postgres::Error> {
    for lesson in taught {
        tx.execute(
            "INSERT INTO learned_limits (connector, quota_scope, model, quota_id, limit_text, until, learned_at, key_name)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (connector, quota_scope, model, quota_id) DO UPDATE SET
                 limit_text = excluded.limit_text, until = excluded.until, learned_at = excluded.learned_at,
                 key_name = excluded.key_name",
            &[&connector, &scope, &lesson.model, &lesson.quota_id, &lesson.limit.to_string(), &until, &now, &key_name],
        )?;
    }
    for lesson in taught.iter().filter(|lesson| lesson.limit.window != Window::Day) {
        let Limit { count, measure, window } = lesson.limit;
        lock_windows(tx, (connector, scope, &lesson.model))?;
        let used = used_since(tx, (connector, scope, &lesson.model), measure, window.counted_from(now))?;
        let missing = count.saturating_sub(used);
        let (rows, tokens) = match measure {
            Measure::Requests => (missing.min(MOST_FILLED), 0),
            Measure::Tokens => (u64::from(missing > 0), missing),
        };
        tx.execute(
            "INSERT INTO reservations (connector, quota_scope, model, at, key_name, lease, tokens)
             SELECT $1, $2, $3, $4, $5, $6, $7 FROM generate_series(1, $8::bigint)",
            &[&connector, &scope, &lesson.model, &now, &key_name, &lease, &as_i64(tokens), &as_i64(rows)],
        )?;
    }
    // Lessons forgotten by now go.
    tx.execute("DELETE FROM learned_limits WHERE until <= $1", &[&now])?;
    Ok(())
}

/// The reservation of lease `lease` of key `key_name` now counts `tokens`, the answer's own count.
pub(super) fn settle(
    tx: &mut Tx<'_>,
    (connector, key_name, lease): (&str, &str, i64),
    tokens: u64,
) -> Result<(), postgres::Error> {
    tx.execute(
        "UPDATE reservations SET tokens = $4 WHERE connector = $1 AND key_name = $2 AND lease = $3",
        &[&connector, &key_name, &lease, &as_i64(tokens)],
    )?;
    Ok(())
}

/// How much of `measure` (scope, model) reserved at or after `since`: requests, or input tokens.
pub(super) fn used_since(
    tx: &mut Tx<'_>,
    (connector, scope, model): (&str, &str, &str),
    measure: Measure,
    since: i64,
) -> Result<u64, postgres::Error> {
    let sql = match measure {
        Measure::Requests => {
            "SELECT count(*) FROM reservations
              WHERE connector = $1 AND quota_scope = $2 AND model = $3 AND at >= $4"
        }
        Measure::Tokens => {
            "SELECT coalesce(sum(tokens), 0)::bigint FROM reservations
              WHERE connector = $1 AND quota_scope = $2 AND model = $3 AND at >= $4"
        }
    };
    let used: i64 = tx.query_one(sql, &[&connector, &scope, &model, &since])?.get(0);
    Ok(u64::try_from(used).unwrap_or(0))
}

/// The (scope, model) pairs of `connector` with reservations at or after `since`, by scope and model.
pub(super) fn reserved_models(
    tx: &mut Tx<'_>,
    connector: &str,
    since: i64,
) -> Result<Vec<(String, String)>, postgres::Error> {
    let rows = tx.query(
        "SELECT DISTINCT quota_scope, model FROM reservations WHERE connector = $1 AND at >= $2
          ORDER BY quota_scope, model",
        &[&connector, &since],
    )?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// Reserves `reservation` if every window of `limits` has room now (`reach`: how far back the longest
/// window reaches); else the first full window. `now` reads the clock: it is read once the windows'
/// lock is held, so a wait for it never makes a reservation look older than it is (which would let
/// the next one into the window early).
pub(super) fn reserve(
    tx: &mut Tx<'_>,
    reservation: &Reservation<'_>,
    (limits, reach): (&[(Limit, Source)], i64),
    now: &dyn Fn() -> i64,
) -> Result<Result<(), Full>, postgres::Error> {
    let Reservation { connector, scope, model, tokens, .. } = *reservation;
    if limits.is_empty() {
        return Ok(Ok(()));
    }
    lock_windows(tx, (connector, scope, model))?;
    let now = now();
    for (limit, source) in limits {
        let counted_from = limit.window.counted_from(now);
        let used = used_since(tx, (connector, scope, model), limit.measure, counted_from)?;
        let excess = match limit.measure {
            Measure::Requests => (used + 1).saturating_sub(limit.count),
            Measure::Tokens if used == 0 => 0,
            Measure::Tokens => (used + tokens).saturating_sub(limit.count),
        };
        if excess == 0 {
            continue;
        }
        let leaves = leaving_at(tx, (connector, scope, model), limit.measure, counted_from, excess)?;
        let until = limit.window.room_at(leaves.unwrap_or(now), now);
        return Ok(Err(Full { limit: *limit, source: source.clone(), until }));
    }
    record(tx, reservation, now)?;
    tx.execute(
        "DELETE FROM reservations WHERE connector = $1
            AND at < (SELECT max(at) FROM reservations WHERE connector = $1 AND at < $2) - $3",
        &[&connector, &now, &reach.max(KEEP_MS)],
    )?;
    Ok(Ok(()))
}

/// Records `reservation` at `now`, whatever the windows hold.
pub(super) fn record(tx: &mut Tx<'_>, reservation: &Reservation<'_>, now: i64) -> Result<(), postgres::Error> {
    let Reservation { connector, scope, model, key_name, lease, tokens } = *reservation;
    tx.execute(
        "INSERT INTO reservations (connector, quota_scope, model, at, key_name, lease, tokens)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[&connector, &scope, &model, &now, &key_name, &lease, &as_i64(tokens)],
    )?;
    Ok(())
}

/// When enough of the window leaves it for `excess` more to fit: the time of the reservation whose
/// leaving frees it (`None`: never within the window).
fn leaving_at(
    tx: &mut Tx<'_>,
    (connector, scope, model): (&str, &str, &str),
    measure: Measure,
    counted_from: i64,
    excess: u64,
) -> Result<Option<i64>, postgres::Error> {
    if measure == Measure::Requests {
        let offset = as_i64(excess - 1);
        return Ok(tx
            .query_opt(
                "SELECT at FROM reservations WHERE connector = $1 AND quota_scope = $2 AND model = $3 AND at >= $4
                  ORDER BY at LIMIT 1 OFFSET $5",
                &[&connector, &scope, &model, &counted_from, &offset],
            )?
            .map(|row| row.get(0)));
    }
    let rows = tx.query(
        "SELECT at, tokens FROM reservations WHERE connector = $1 AND quota_scope = $2 AND model = $3 AND at >= $4
          ORDER BY at",
        &[&connector, &scope, &model, &counted_from],
    )?;
    let mut freed: u64 = 0;
    for row in &rows {
        freed = freed.saturating_add(u64::try_from(row.get::<_, i64>(1)).unwrap_or(0));
        if freed >= excess {
            return Ok(Some(row.get(0)));
        }
    }
    Ok(None)
}

/// Paces (scope, model) until `full` has room: a lockdown row, as any other, with no strike.
pub(super) fn lock_down(
    tx: &mut Tx<'_>,
    reservation: &Reservation<'_>,
    full: &Full,
    now: i64,
) -> Result<(), postgres::Error> {
    let Reservation { connector, scope, model, key_name, .. } = *reservation;
    let reason = full.reason(model);
    tx.execute(
        "INSERT INTO lockdowns AS q
             (connector, scope, model, until, quota_id, reason, http_status, set_by_key, set_at, strikes)
         VALUES ($1, $2, $3, $4, $5, $6, NULL, $7, $8, 0)
         ON CONFLICT (connector, scope, model) DO UPDATE SET
             quota_id = excluded.quota_id, reason = excluded.reason, http_status = NULL,
             set_by_key = excluded.set_by_key, set_at = excluded.set_at, until = excluded.until
         WHERE excluded.until > q.until",
        &[&connector, &scope, &model, &full.until, &PACED_QUOTA_ID, &reason, &key_name, &now],
    )?;
    Ok(())
}
