//! How many keys could serve a request now, and why the others cannot: one read, as on SQLite.

use super::connection::Tx;
use crate::pool::Availability;
use crate::store::ClaimFor;
use crate::store::rule_sql::{self, KeyCols};

/// The availability of `request`'s keys at `now`: the rules of `rule_sql` (a key is free for the model
/// unless a lockdown in force on one of its scopes covers the model; its whole and per-model lockdown
/// ends), with each key's lockdowns read once, in one lookup (`LATERAL`), and each key's columns computed
/// once, in a derived table the planner may not flatten (`OFFSET 0`). Flattened, with one lookup per
/// rule, the lockdowns were read ten times a key: 4 to 7 times slower on 64 keys, 58 of them locked down.
pub(super) fn of(tx: &mut Tx<'_>, request: &ClaimFor<'_>, now: i64) -> Result<Availability, postgres::Error> {
    let ClaimFor { connector, model, tried, pin, .. } = *request;
    let tried = tried.to_vec();
    let sql = format!(
        "SELECT count(*) FILTER (WHERE usable AND NOT was_tried), count(*) FILTER (WHERE live AND state = 'locked'),
                count(*) FILTER (WHERE live AND free AND whole_until IS NOT NULL),
                count(*) FILTER (WHERE live AND state = 'error'), count(*) FILTER (WHERE usable AND was_tried),
                min(CASE WHEN live AND free AND NOT usable
                         THEN greatest(coalesce(whole_until, 0), coalesce(model_until, 0)) END),
                count(*) FILTER (WHERE NOT live), max(retired_at),
                count(*) FILTER (WHERE live AND free AND whole_until IS NULL AND model_until IS NOT NULL),
                min(CASE WHEN live AND free AND whole_until IS NULL THEN model_until END)
           FROM (SELECT k.state, k.retired_at, k.retired_at IS NULL AS live,
                        {claimable} AND NOT coalesce(l.covering, false) AS usable,
                        {unheld} AS free,
                        nullif(greatest(coalesce({own}, 0), coalesce(l.whole_until, 0)), 0) AS whole_until,
                        l.model_until,
                        k.key_name = ANY($3) AS was_tried
                   FROM keys k
                  CROSS JOIN LATERAL (
                        SELECT bool_or({covers}) AS covering,
                               max(q.until) FILTER (WHERE {every}) AS whole_until,
                               max(q.until) FILTER (WHERE q.model = $4::text) AS model_until
                          FROM lockdowns q WHERE {scopes} AND {in_force}) l
                  WHERE k.connector = $1 AND ($5::text IS NULL OR k.quota_scope = $5)
                 OFFSET 0) keys",
        unheld = rule_sql::unheld("k"),
        own = rule_sql::own_lockdown_end("k", "$2"),
        claimable = rule_sql::claimable_state("k", "$2"),
        covers = rule_sql::covers("q", "$4::text"),
        every = rule_sql::every_model("q"),
        scopes = rule_sql::on_scopes_of("q", &KeyCols::row("k")),
        in_force = rule_sql::in_force("q", "$2"),
    );
    let row = tx.query_one(&sql, &[&connector, &now, &tried, &model, &pin])?;
    let count = |index: usize| u32::try_from(row.get::<_, i64>(index)).unwrap_or(u32::MAX);
    let mut availability = Availability {
        connector: connector.to_owned(),
        claimable: count(0),
        locked: count(1),
        lockdown: count(2),
        error: count(3),
        tried: count(4),
        earliest_lockdown_end: row.get(5),
        retired: count(6),
        last_retired_at: row.get(7),
        last_retired_reason: None,
        model: model.map(str::to_owned),
        model_lockdown: count(8),
        earliest_model_lockdown_end: row.get(9),
        model_lockdown_quota: None,
    };
    // Only when no key is left: say what emptied the pool (the waiters' polls skip this).
    if availability.total() == 0 && availability.retired > 0 {
        availability.last_retired_reason = tx
            .query_opt(
                "SELECT reason FROM history
                  WHERE connector = $1 AND to_state = 'retired'
                    AND key_name = (SELECT key_name FROM keys WHERE connector = $1
                                     ORDER BY retired_at DESC NULLS LAST LIMIT 1)
                  ORDER BY at DESC, id DESC LIMIT 1",
                &[&connector],
            )?
            .map(|row| row.get(0));
    }
    if availability.claimable == 0 && availability.model_lockdown > 0 {
        let sql = format!(
            "SELECT coalesce(quota_id, reason) FROM lockdowns
              WHERE connector = $1 AND model = $2 AND {} ORDER BY until LIMIT 1",
            rule_sql::in_force("lockdowns", "$3")
        );
        availability.model_lockdown_quota = tx.query_opt(&sql, &[&connector, &model, &now])?.map(|row| row.get(0));
    }
    Ok(availability)
}
