//! Queries for the user's own `sqlite3`, printed by `apijongler db` (the README lists the same). Built
//! from the rule's fragments, so that the query showing which keys a lockdown stops is the claim's rule.

use crate::store::rule_sql::{self, KeyCols};

/// A lockdown's deadline against the time `sqlite3` reads at, unix ms.
const NOW: &str = "strftime('%s', 'now') * 1000";

/// The queries, with a comment line above each.
pub(super) fn example_queries() -> String {
    format!(
        "\
-- Requests per key today (local time)
SELECT connector, key_name, count(*) AS requests, sum(outcome = 'success') AS ok
  FROM requests WHERE at >= strftime('%s', 'now', 'localtime', 'start of day', 'utc') * 1000
 GROUP BY connector, key_name;

-- Requests per key and model today (local time), and the quota scope they counted against
SELECT connector, key_name, coalesce(model, '-') AS model, quota_scope, count(*) AS requests,
       sum(outcome = 'success') AS ok, sum(outcome = 'rate limited') AS rate_limited
  FROM requests WHERE at >= strftime('%s', 'now', 'localtime', 'start of day', 'utc') * 1000
 GROUP BY connector, key_name, model, quota_scope ORDER BY connector, key_name, model;

-- Lockdowns in force: which model ('*': every model) of which quota scope, until when, and why
SELECT connector, scope, model, datetime(until / 1000, 'unixepoch', 'localtime') AS until, quota_id, reason,
       set_by_key, datetime(set_at / 1000, 'unixepoch', 'localtime') AS set_at
  FROM lockdowns WHERE until > strftime('%s', 'now') * 1000 ORDER BY connector, scope, model;

-- The keys each lockdown in force stops (their group's lockdowns, and their own)
SELECT k.connector, k.key_name, q.model, datetime(q.until / 1000, 'unixepoch', 'localtime') AS until, q.scope
  FROM keys k JOIN lockdowns q ON {scopes}
 WHERE {in_force} AND k.retired_at IS NULL ORDER BY k.connector, k.key_name, q.model;

-- Keys locked down for every model, and until when
SELECT connector, key_name, datetime(lockdown_until / 1000, 'unixepoch', 'localtime') AS until, reason
  FROM keys WHERE state = 'lockdown' AND lockdown_until > strftime('%s', 'now') * 1000;

-- Why a key went to error
SELECT datetime(at / 1000, 'unixepoch', 'localtime') AS at, connector, key_name, reason, http_status
  FROM history WHERE to_state = 'error' ORDER BY id DESC LIMIT 10;

-- What happened to the keys in the last hour, by event
SELECT connector, event, count(*) AS times FROM history
 WHERE at >= (strftime('%s', 'now') - 3600) * 1000 GROUP BY connector, event ORDER BY connector, times DESC;

-- Who holds what
SELECT connector, key_name, holder_pid, datetime(locked_at / 1000, 'unixepoch', 'localtime') AS since
  FROM keys WHERE state = 'locked';

-- Files, cached contents, batches and tuned models: the key whose project owns each, until when
SELECT connector, name, key_name, quota_scope, datetime(expires_at / 1000, 'unixepoch', 'localtime') AS expires
  FROM resources WHERE expires_at IS NULL OR expires_at > strftime('%s', 'now') * 1000 ORDER BY connector, name;
",
        scopes = rule_sql::on_scopes_of("q", &KeyCols::row("k")),
        in_force = rule_sql::in_force("q", NOW),
    )
}
