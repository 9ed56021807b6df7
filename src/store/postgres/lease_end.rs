//! Ending a lease in a transaction: the attempt, the key's new state, the lockdown its answer set
//! (on its scope, for its models) and the history rows, as on SQLite.
//!
//! Lock order: the ended key's row first (`FOR UPDATE`), then the lockdown rows, then, for a lockdown
//! of every model of a group, the group's free keys in id order. A deadlock anyway (a claim pacing the
//! same scope at once) is detected by the server and the transaction tried again.

use super::connection::Tx;
use super::{
    AttemptValues, HistoryValues, WATERMARKS_OF_KEY_ALONE, WATERMARKS_OF_KEY_SHARED, insert_attempt, pacing, record,
    record_each,
};
use crate::pool::{Attempt, Fate, HistoryEvent, Lockdown, ModelScope, Reach, Scope, limit};
use crate::store::rule_sql::{self, KeyCols};
use crate::store::transition::NewTransition;

/// Ends lease `(id, lease)` with `fate` in `tx` (see `Backend::end_lease`): `Ok(false)` when it was
/// already lost. `settles`: the attempt's tokens settle its reservation.
pub(super) fn end_in(
    tx: &mut Tx<'_>,
    (id, lease): (i64, i64),
    fate: &Fate,
    attempt: Option<&Attempt>,
    settles: bool,
    now: i64,
) -> Result<bool, postgres::Error> {
    // Before any row: a lease end that writes lockdowns (or lessons) holds the scope watermarks' lock
    // alone, any other shares it (see `migrations/postgres/0009_scope_watermark.sql`).
    let writes_lockdowns = matches!(fate, Fate::Lockdown(_));
    tx.execute(if writes_lockdowns { WATERMARKS_OF_KEY_ALONE } else { WATERMARKS_OF_KEY_SHARED }, &[&id])?;
    if let Some(attempt) = attempt {
        insert_attempt(tx, attempt)?;
        if let (true, Some(key_name), Some(tokens)) = (settles, &attempt.key_name, attempt.prompt_tokens) {
            pacing::settle(tx, (&attempt.connector, key_name, lease), tokens)?;
        }
    }
    let held = tx.query_opt(
        "SELECT connector, key_name, fingerprint, quota_scope, scope_watermark FROM keys
          WHERE id = $1 AND lease = $2 AND state = 'locked'
            FOR UPDATE",
        &[&id, &lease],
    )?;
    let Some(row) = held else { return Ok(false) };
    let (connector, key_name, fingerprint): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    let mut key_scope: String = row.get(3);
    // A watermark is recomputed (lowered, if rows on the key's scopes are gone) by the lease's end; a
    // NULL one stays NULL unless this end writes a lockdown, whose trigger raises it.
    let rewatermark = row.get::<_, Option<i64>>(4).is_some();
    let key: (&str, &str, &str) = (&connector, &key_name, &fingerprint);
    let project = match fate {
        Fate::Lockdown(lockdown) => lockdown.project.as_deref(),
        Fate::Error { project, .. } => project.as_deref(),
        Fate::Release { .. } => None,
    };
    if let Some(project) = project {
        // The project the answer revealed is the key's scope from now on.
        key_scope = tx
            .query_one("UPDATE keys SET project_learned = $2 WHERE id = $1 RETURNING quota_scope", &[&id, &project])?
            .get(0);
    }
    let mut transition = NewTransition {
        holder_pid: Some(std::process::id()),
        lease: Some(lease),
        quota_scope: Some(&key_scope),
        ..NewTransition::new(HistoryEvent::ending(fate), key, Some("locked"), "vacant", "released")
    };
    let lockdown_scope;
    let models;
    match fate {
        Fate::Lockdown(lockdown) => {
            lockdown_scope = set_lockdown(tx, key, id, &key_scope, lockdown, now)?;
            if !lockdown.taught.is_empty() {
                let until = limit::next_pacific_midnight(now);
                let lesson = (connector.as_str(), lockdown_scope.as_str(), key_name.as_str(), lease);
                pacing::learn(tx, lesson, &lockdown.taught, (now, until))?;
            }
            models = lockdown.models.join(",");
            transition.reason = &lockdown.reason;
            transition.http_status = lockdown.http_status;
            transition.lockdown_until = Some(lockdown.until);
            transition.model = (!models.is_empty()).then_some(models.as_str());
            transition.quota_scope = Some(&lockdown_scope);
        }
        Fate::Error { reason, http_status, .. } => {
            transition.to_state = "error";
            transition.reason = reason;
            transition.http_status = *http_status;
        }
        Fate::Release { success } => {
            let model = attempt.and_then(|attempt| attempt.model.as_deref());
            if *success {
                tx.execute(&expired_lockdowns_of_key(), &[&connector, &key_scope, &key_name, &model, &now])?;
            }
            transition.model = model;
        }
    }
    let is_lockdown = matches!(fate, Fate::Lockdown(_));
    let reason = (transition.to_state == "error" || is_lockdown).then_some(transition.reason);
    let row = tx.query_one(
        &format!(
            "UPDATE keys
                SET {freed},
                    reason = coalesce($4, reason),
                    http_status = CASE WHEN $4::text IS NULL THEN http_status ELSE $5 END,
                    lockdown_count = CASE WHEN $6 THEN lockdown_count + 1 WHEN $7 THEN 0 ELSE lockdown_count END,
                    scope_watermark = CASE WHEN $8 THEN scope_watermark(connector, quota_scope, key_name)
                                           ELSE scope_watermark END,
                    {UNHELD}
              WHERE id = $1
          RETURNING state, lockdown_until",
            freed = freed("$3", "$2 = 'error'"),
        ),
        &[
            &id,
            &transition.to_state,
            &now,
            &reason,
            &transition.http_status.map(i64::from),
            &is_lockdown,
            &matches!(fate, Fate::Release { success: true }),
            &rewatermark,
        ],
    )?;
    let state: String = row.get(0);
    let until: Option<i64> = row.get(1);
    transition.to_state = &state;
    if transition.lockdown_until.is_none() {
        transition.lockdown_until = until;
    }
    record(tx, now, &transition)?;
    Ok(true)
}

/// The columns of a holder, cleared when its lease ends.
const UNHELD: &str = "holder_host = NULL, holder_boot_id = NULL, holder_pid_namespace = NULL, holder_pid = NULL,
     holder_started = NULL, locked_at = NULL, heartbeat_at = NULL, heartbeat_boot_ms = NULL, heartbeat_db_at = NULL";

/// The assignment of `(state, lockdown_until)` to the key row being updated once its lease ends at
/// `now`, reading its lockdowns once: in error when `error` (an SQL condition) holds; else in
/// lockdown, until the latest one ends, while a lockdown of every model is in force on one of its
/// scopes; else vacant.
fn freed(now: &str, error: &str) -> String {
    format!(
        "(state, lockdown_until) =
           (SELECT CASE WHEN {error} THEN 'error' WHEN max(q.until) IS NULL THEN 'vacant' ELSE 'lockdown' END,
                   CASE WHEN {error} THEN NULL ELSE max(q.until) END
              FROM lockdowns q WHERE {whole})",
        whole = rule_sql::whole_lockdowns_in_force(&KeyCols::row("keys"), now)
    )
}

/// A release that settles no reservation of a key whose scope watermark is NULL, in one statement (one
/// round trip, committed on its own), reading neither `lockdowns` nor `learned_limits`: no row of either
/// is on its scopes (`migrations/postgres/0009_scope_watermark.sql`), so the key is vacant now and no
/// ended lockdown is left to delete. The attempt's row, the key freed and its history row; the general
/// [`end_in`] writes the same rows in several statements.
///
/// Parameters: `$1` id, `$2` lease, `$3` now, `$4` success, `$5` the model, `$6` this pid, then the
/// attempt's (`AttemptValues`) when `with_attempt`, written only with the key freed. It answers how many
/// keys it freed: 0 when the lease was lost already or the key has a watermark, which [`end_in`] tells
/// apart.
fn release_statement(with_attempt: bool) -> String {
    let attempted = if with_attempt {
        format!("attempted AS ({}),", AttemptValues::insert_if(7, "EXISTS (SELECT 1 FROM ended)"))
    } else {
        String::new()
    };
    format!(
        "WITH ended AS (
 UPDATE keys SET state = 'vacant', lockdown_until = NULL, lockdown_count = CASE WHEN $4 THEN 0 ELSE lockdown_count END,
        {UNHELD}
  WHERE id = $1 AND lease = $2 AND state = 'locked' AND scope_watermark IS NULL
 RETURNING connector, key_name, fingerprint, lease, quota_scope, state, lockdown_until
), {attempted} recorded AS ({history})
SELECT count(*) FROM ended",
        history = record_each(
            "ended",
            &HistoryValues {
                at: "$3",
                from_state: "'locked'",
                to_state: "state",
                reason: "'released'",
                holder_pid: "$6",
                lockdown_until: "lockdown_until",
                model: "$5",
                ..HistoryValues::of(HistoryEvent::Released)
            }
        ),
    )
}

/// [`release_statement`] without and with an attempt.
static RELEASE: std::sync::LazyLock<[String; 2]> = std::sync::LazyLock::new(|| [false, true].map(release_statement));

/// Ends lease `(id, lease)` of a key whose scope watermark is NULL with a release (`success`: the
/// attempt succeeded) that settles nothing, recording `attempt`, in one statement: `Ok(false)` when it
/// freed no key (the lease was lost already, or the key has a watermark: [`end_in`] then ends it).
pub(super) fn release_unread(
    tx: &mut Tx<'_>,
    (id, lease): (i64, i64),
    success: bool,
    attempt: Option<&Attempt>,
    now: i64,
) -> Result<bool, postgres::Error> {
    let model = attempt.and_then(|attempt| attempt.model.as_deref());
    let pid = i64::from(std::process::id());
    let values = attempt.map(|attempt| (attempt, AttemptValues::of(attempt)));
    let freed: i64 = match &values {
        None => tx.query_one(&RELEASE[0], &[&id, &lease, &now, &success, &model, &pid])?,
        Some((attempt, values)) => {
            let [a, b, c, d, e, f, g, h, i, j] = values.params(attempt);
            tx.query_one(&RELEASE[1], &[&id, &lease, &now, &success, &model, &pid, a, b, c, d, e, f, g, h, i, j])?
        }
    }
    .get(0);
    Ok(freed == 1)
}

/// Deletes the lockdowns of key `($1 connector, $2 quota scope, $3 name)` covering model `$4` whose
/// deadline passed at `$5`: after a success for that model, its strikes start again at 0.
pub(super) fn expired_lockdowns_of_key() -> String {
    let lockdowns = "lockdowns";
    format!(
        "DELETE FROM lockdowns WHERE {scopes} AND {covers} AND NOT {in_force}",
        scopes = rule_sql::on_scopes_of(lockdowns, &KeyCols::given("$1", "$2", "$3")),
        covers = rule_sql::covers(lockdowns, "$4::text"),
        in_force = rule_sql::in_force(lockdowns, "$5")
    )
}

/// Records `lockdown`, set by the answer key `key` (row `id`, scope `key_scope`) got, on its scope. A
/// lockdown of every model of a group also puts the group's other free keys in lockdown, each with a
/// history row. Returns the scope.
fn set_lockdown(
    tx: &mut Tx<'_>,
    key: (&str, &str, &str),
    id: i64,
    key_scope: &str,
    lockdown: &Lockdown,
    now: i64,
) -> Result<String, postgres::Error> {
    let (connector, key_name, _) = key;
    let scope = match lockdown.reach {
        Reach::Key => Scope::Key(key_name.to_owned()).to_string(),
        Reach::Group => key_scope.to_owned(),
    };
    let every_model = [ModelScope::EVERY.to_owned()];
    let mut models = if lockdown.models.is_empty() { every_model.to_vec() } else { lockdown.models.clone() };
    // Lockdown rows in one order everywhere, like key rows.
    models.sort();
    models.dedup();
    for model in &models {
        tx.execute(
            "INSERT INTO lockdowns AS q (connector, scope, model, until, quota_id, reason, http_status, set_by_key, set_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (connector, scope, model) DO UPDATE SET
                 strikes = q.strikes + 1,
                 quota_id = CASE WHEN excluded.until >= q.until THEN excluded.quota_id ELSE q.quota_id END,
                 reason = CASE WHEN excluded.until >= q.until THEN excluded.reason ELSE q.reason END,
                 http_status = CASE WHEN excluded.until >= q.until THEN excluded.http_status ELSE q.http_status END,
                 set_by_key = CASE WHEN excluded.until >= q.until THEN excluded.set_by_key ELSE q.set_by_key END,
                 set_at = CASE WHEN excluded.until >= q.until THEN excluded.set_at ELSE q.set_at END,
                 until = greatest(q.until, excluded.until)",
            &[
                &connector,
                &scope,
                model,
                &lockdown.until,
                &lockdown.quota_id,
                &lockdown.reason,
                &lockdown.http_status.map(i64::from),
                &key_name,
                &now,
            ],
        )?;
    }
    if lockdown.reach == Reach::Key || scope != key_scope || !lockdown.models.is_empty() {
        return Ok(scope);
    }
    let siblings = tx.query(
        &format!(
            "SELECT id, key_name, fingerprint, state FROM keys
              WHERE connector = $1 AND quota_scope = $2 AND id != $3 AND retired_at IS NULL
                AND {unheld} AND coalesce(lockdown_until, 0) < $4
              ORDER BY id FOR UPDATE",
            unheld = rule_sql::unheld("keys")
        ),
        &[&connector, &scope, &id, &lockdown.until],
    )?;
    let reason = format!("{scope} locked down for every model by {key_name}'s answer: {}", lockdown.reason);
    for sibling in &siblings {
        let (sibling_id, name, fingerprint, state): (i64, String, String, String) =
            (sibling.get(0), sibling.get(1), sibling.get(2), sibling.get(3));
        tx.execute(
            "UPDATE keys SET state = 'lockdown', lockdown_until = $2 WHERE id = $1",
            &[&sibling_id, &lockdown.until],
        )?;
        let transition = NewTransition {
            http_status: lockdown.http_status,
            lockdown_until: Some(lockdown.until),
            quota_scope: Some(&scope),
            ..NewTransition::new(
                HistoryEvent::ScopeLockedDown,
                (connector, &name, &fingerprint),
                Some(&state),
                "lockdown",
                &reason,
            )
        };
        record(tx, now, &transition)?;
    }
    Ok(scope)
}
