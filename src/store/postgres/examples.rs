//! Queries for the user's own `psql`, printed by `apijongler db` (the README lists the same): the
//! questions of `store/sqlite/examples.rs` in PostgreSQL's dialect. Built from the rule's fragments,
//! so that the query showing which keys a lockdown stops is the claim's rule.
//!
//! Times are unix ms in `bigint` columns: `to_timestamp(ms / 1000.0)` shows one in the session's time
//! zone (psql's "local time"), and "today" starts at `date_trunc('day', now())` in that zone.

use super::SCHEMA;
use crate::store::rule_sql::{self, KeyCols};

/// The server's time as `psql` reads it, unix ms.
const NOW: &str = "extract(epoch from now()) * 1000";

/// The start of today in the session's time zone, unix ms.
const TODAY: &str = "extract(epoch from date_trunc('day', now())) * 1000";

/// The queries, with a comment line above each.
pub(super) fn example_queries() -> String {
    format!(
        "\
-- The pool's tables live in the schema '{SCHEMA}'
SET search_path = {SCHEMA};

-- Requests per key today (the session's time zone)
SELECT connector, key_name, count(*) AS requests, count(*) FILTER (WHERE outcome = 'success') AS ok
  FROM requests WHERE at >= {TODAY}
 GROUP BY connector, key_name ORDER BY connector, key_name;

-- Requests per key and model today (the session's time zone), and the quota scope they counted against
SELECT connector, key_name, coalesce(model, '-') AS model, quota_scope, count(*) AS requests,
       count(*) FILTER (WHERE outcome = 'success') AS ok,
       count(*) FILTER (WHERE outcome = 'rate limited') AS rate_limited
  FROM requests WHERE at >= {TODAY}
 GROUP BY connector, key_name, model, quota_scope ORDER BY connector, key_name, model NULLS FIRST;

-- Lockdowns in force: which model ('*': every model) of which quota scope, until when, and why
SELECT connector, scope, model, to_timestamp(until / 1000.0) AS until, quota_id, reason,
       set_by_key, to_timestamp(set_at / 1000.0) AS set_at
  FROM lockdowns WHERE until > {NOW} ORDER BY connector, scope, model;

-- The keys each lockdown in force stops (their group's lockdowns, and their own)
SELECT k.connector, k.key_name, q.model, to_timestamp(q.until / 1000.0) AS until, q.scope
  FROM keys k JOIN lockdowns q ON {scopes}
 WHERE {in_force} AND k.retired_at IS NULL ORDER BY k.connector, k.key_name, q.model;

-- Keys locked down for every model, and until when
SELECT connector, key_name, to_timestamp(lockdown_until / 1000.0) AS until, reason
  FROM keys WHERE state = 'lockdown' AND lockdown_until > {NOW};

-- Why a key went to error
SELECT to_timestamp(at / 1000.0) AS at, connector, key_name, reason, http_status
  FROM history WHERE to_state = 'error' ORDER BY id DESC LIMIT 10;

-- What happened to the keys in the last hour, by event
SELECT connector, event, count(*) AS times FROM history
 WHERE at >= {NOW} - 3600 * 1000 GROUP BY connector, event ORDER BY connector, times DESC;

-- Who holds what, on which host, and how old its heartbeat is on the server's clock
SELECT connector, key_name, holder_host, holder_pid, to_timestamp(locked_at / 1000.0) AS since,
       ({NOW} - heartbeat_db_at) / 1000 AS heartbeat_age_s
  FROM keys WHERE state = 'locked';

-- Files, cached contents, batches and tuned models: the key whose project owns each, until when
SELECT connector, name, key_name, quota_scope, to_timestamp(expires_at / 1000.0) AS expires
  FROM resources WHERE expires_at IS NULL OR expires_at > {NOW} ORDER BY connector, name;
",
        scopes = rule_sql::on_scopes_of("q", &KeyCols::row("k")),
        in_force = rule_sql::in_force("q", NOW),
    )
}

#[cfg(test)]
mod tests {
    use super::super::usage::test_server::TestDb;

    #[test]
    fn every_query_runs_on_the_server() {
        let Some(db) = TestDb::create("examples") else { return };
        let store = db.open();
        super::super::usage::tests::sync(&store);
        let mut client = db.client();
        let text = super::example_queries();
        let statements: Vec<&str> = text.split(";\n").map(str::trim).filter(|sql| !sql.is_empty()).collect();
        assert!(statements.len() >= 10, "{statements:?}");
        // As a user would paste them: the search path first, then each query on its own.
        for sql in statements {
            client.batch_execute(sql).unwrap_or_else(|error| panic!("{sql}\n{error:?}"));
        }
    }
}
