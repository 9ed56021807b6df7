//! Usage from the `requests` table: attempts counted per key, model or quota scope, over a span and
//! optionally per time bucket (`crate::pool::usage`). Reads only; the span's start walks
//! `requests_by_time`.
//!
//! Invariant: the three counts apply `Tally::add`'s rule (a 429 first, then a success, else an error);
//! the test below checks every outcome and status against it.

use rusqlite::params;

use crate::pool::usage::{Tally, UsageQuery, UsageRow};

/// The usage `query` asks for, by connector, name, model and bucket.
pub(super) fn usage(connection: &rusqlite::Connection, query: &UsageQuery) -> rusqlite::Result<Vec<UsageRow>> {
    // `?3` picks the column rows are per; with buckets, key rows are also per model (the dashboard's
    // strip). The counts are `Tally::add` in SQL.
    let mut statement = connection.prepare_cached(
        "SELECT connector,
                coalesce(CASE ?3 WHEN 'key' THEN key_name WHEN 'model' THEN model ELSE quota_scope END, '-'),
                CASE WHEN ?4 IS NOT NULL AND ?3 = 'key' THEN coalesce(model, '-') END,
                CASE WHEN ?4 IS NOT NULL THEN ?1 + ((at - ?1) / ?4) * ?4 END,
                count(*),
                sum(status IS NOT 429 AND outcome = 'success'),
                sum(status IS 429),
                sum(status IS NOT 429 AND outcome <> 'success'),
                sum(prompt_tokens)
           FROM requests
          WHERE at >= ?1 AND (?2 IS NULL OR connector = ?2)
          GROUP BY 1, 2, 3, 4
          ORDER BY 1, 2, 3, 4",
    )?;
    let by = query.by.as_str();
    let bucket = query.bucket_ms.filter(|ms| *ms > 0);
    let rows = statement.query_map(params![query.since, query.connector, by, bucket], |row| {
        let count = |index| row.get::<_, i64>(index).map(|n| u64::try_from(n).unwrap_or(0));
        Ok(UsageRow {
            connector: row.get(0)?,
            name: row.get(1)?,
            model: row.get(2)?,
            bucket: row.get(3)?,
            tally: Tally { requests: count(4)?, successes: count(5)?, rate_limited: count(6)?, errors: count(7)? },
            tokens: row.get::<_, Option<i64>>(8)?.map(|n| u64::try_from(n).unwrap_or(0)),
        })
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::outcome::Outcome;
    use crate::pool::usage::UsageBy;

    #[test]
    fn the_sql_counts_every_outcome_as_tally_does() {
        let connection = rusqlite::Connection::open_in_memory().expect("open");
        connection
            .execute_batch(concat!(
                include_str!("../../../migrations/0002_requests.sql"),
                "ALTER TABLE requests ADD COLUMN model TEXT; ALTER TABLE requests ADD COLUMN quota_scope TEXT;
                 ALTER TABLE requests ADD COLUMN prompt_tokens INTEGER;"
            ))
            .expect("schema");
        let mut expected = Tally::default();
        for outcome in Outcome::ALL {
            for status in [None, Some(200), Some(400), Some(429), Some(503)] {
                connection
                    .execute(
                        "INSERT INTO requests (at, connector, key_name, method, endpoint, status, latency_ms, outcome, model)
                         VALUES (1000, 'c', 'k', 'POST', '/', ?1, 1, ?2, 'm')",
                        params![status, outcome.to_string()],
                    )
                    .expect("insert");
                expected.add(outcome, status);
            }
        }
        for by in UsageBy::ALL {
            let rows = usage(&connection, &UsageQuery { since: 0, by, ..UsageQuery::default() }).expect("usage");
            assert_eq!(rows.len(), 1, "{by}");
            assert_eq!(rows[0].tally, expected, "{by}");
        }
        let bucketed = UsageQuery { since: 500, bucket_ms: Some(400), ..UsageQuery::default() };
        let rows = usage(&connection, &bucketed).expect("usage");
        assert_eq!((rows[0].bucket, rows[0].model.as_deref(), rows[0].name.as_str()), (Some(900), Some("m"), "k"));
        assert!(usage(&connection, &UsageQuery { since: 1001, ..UsageQuery::default() }).expect("usage").is_empty());
    }
}
