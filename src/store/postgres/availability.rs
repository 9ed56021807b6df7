//! How many keys could serve a request now, and why the others cannot: one read, as on SQLite.

use super::connection::Tx;
use crate::pool::Availability;
use crate::store::ClaimFor;
use crate::store::rule_sql::{self, KeyCols};

/// The availability of `request`'s keys at `now`.
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
           FROM (SELECT k.state, k.retired_at, k.retired_at IS NULL AS live, {usable} AS usable,
                        {unheld} AS free,
                        nullif(greatest(coalesce({own}, 0), coalesce({whole}, 0)), 0) AS whole_until,
                        {model_until} AS model_until,
                        k.key_name = ANY($3) AS was_tried
                   FROM keys k WHERE k.connector = $1 AND ($5::text IS NULL OR k.quota_scope = $5)) keys",
        unheld = rule_sql::unheld("k"),
        own = rule_sql::own_lockdown_end("k", "$2"),
        whole = rule_sql::whole_lockdown_end(&KeyCols::row("k"), "$2"),
        model_until = rule_sql::model_lockdown_end(&KeyCols::row("k"), "$4::text", "$2"),
        usable = rule_sql::free_for("k", "$4::text", "$2"),
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
