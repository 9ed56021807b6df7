//! Usage from the `requests` table on PostgreSQL: the statement of `store/sqlite/usage.rs` in this
//! dialect, giving the same rows in the same order. Reads only; the span's start walks
//! `requests_by_time`.
//!
//! Invariants (beside SQLite's):
//! - The counts apply `Tally::add`'s rule as SQLite's do: `IS DISTINCT FROM` where SQLite's `IS NOT`
//!   counts a missing status as "not 429".
//! - Rows come in SQLite's order: names compared byte by byte (`COLLATE "C"`, whatever the database's
//!   collation) and NULL first, and buckets are the same integer division (`at >= since`, so
//!   truncation is flooring).

use super::connection::Tx;
use crate::pool::usage::{Tally, UsageQuery, UsageRow};

/// The usage `query` asks for, by connector, name, model and bucket.
pub(super) fn usage(tx: &mut Tx<'_>, query: &UsageQuery) -> Result<Vec<UsageRow>, postgres::Error> {
    // `$3` picks the column rows are per; with buckets, key rows are also per model (the dashboard's
    // strip). The counts are `Tally::add` in SQL.
    let rows = tx.query(
        r#"SELECT * FROM (
             SELECT connector,
                    coalesce(CASE $3::text WHEN 'key' THEN key_name WHEN 'model' THEN model ELSE quota_scope END,
                             '-') AS name,
                    CASE WHEN $4::bigint IS NOT NULL AND $3::text = 'key' THEN coalesce(model, '-') END AS model,
                    CASE WHEN $4::bigint IS NOT NULL
                         THEN $1::bigint + ((at - $1::bigint) / $4::bigint) * $4::bigint END AS bucket,
                    count(*),
                    count(*) FILTER (WHERE status IS DISTINCT FROM 429 AND outcome = 'success'),
                    count(*) FILTER (WHERE status = 429),
                    count(*) FILTER (WHERE status IS DISTINCT FROM 429 AND outcome <> 'success'),
                    sum(prompt_tokens)::bigint
               FROM requests
              WHERE at >= $1::bigint AND ($2::text IS NULL OR connector = $2::text)
              GROUP BY 1, 2, 3, 4) AS counted
          ORDER BY connector COLLATE "C", name COLLATE "C", model COLLATE "C" NULLS FIRST, bucket NULLS FIRST"#,
        &[&query.since, &query.connector, &query.by.as_str(), &query.bucket_ms.filter(|ms| *ms > 0)],
    )?;
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok(rows
        .iter()
        .map(|row| UsageRow {
            connector: row.get(0),
            name: row.get(1),
            model: row.get(2),
            bucket: row.get(3),
            tally: Tally {
                requests: count(row.get(4)),
                successes: count(row.get(5)),
                rate_limited: count(row.get(6)),
                errors: count(row.get(7)),
            },
            tokens: row.get::<_, Option<i64>>(8).map(count),
        })
        .collect())
}

/// A fresh database on the test server, for the tests that compare this backend with SQLite's.
#[cfg(test)]
pub(super) mod test_server {
    use std::sync::atomic::{AtomicU32, Ordering};

    use crate::store::{Location, Postgres, Sqlite};

    /// The base URL of a server tests may create databases on; unset: the tests that need one skip.
    pub(crate) const ENV: &str = "APIJONGLER_TEST_PG";

    /// A database created for one test, dropped (its connections ended) with this.
    pub(crate) struct TestDb {
        base: String,
        name: String,
        /// The database's URL.
        pub(crate) url: String,
    }

    impl TestDb {
        /// A new empty database, or `None` (said on stderr) when no test server is configured.
        pub(crate) fn create(test: &str) -> Option<Self> {
            let Some(base) = std::env::var(ENV).ok().filter(|base| !base.is_empty()) else {
                eprintln!("skipped: {ENV} is unset (a base URL like postgres://postgres@/postgres?host=/tmp/pg)");
                return None;
            };
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let name = format!("ajt_{test}_{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
            let mut client = postgres::Client::connect(&base, postgres::NoTls).expect("connect to APIJONGLER_TEST_PG");
            client.batch_execute(&format!("CREATE DATABASE {name}")).expect("create a test database");
            let url = with_database(&base, &name);
            Some(Self { base, name, url })
        }

        /// The backend on it.
        pub(crate) fn open(&self) -> Postgres {
            let Location::Postgres(url) = Location::parse(self.url.as_ref(), ENV).expect("a URL") else {
                panic!("{ENV} is not a postgres:// URL")
            };
            Postgres::open(&url).expect("open the test database")
        }

        /// A client on it, for statements of the test's own.
        pub(crate) fn client(&self) -> postgres::Client {
            postgres::Client::connect(&self.url, postgres::NoTls).expect("connect to the test database")
        }
    }

    impl Drop for TestDb {
        fn drop(&mut self) {
            if let Ok(mut client) = postgres::Client::connect(&self.base, postgres::NoTls) {
                let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
            }
        }
    }

    /// `base` with its database name replaced by `name`.
    pub(crate) fn with_database(base: &str, name: &str) -> String {
        let (head, query) = base.split_once('?').map_or((base, None), |(head, query)| (head, Some(query)));
        let authority = head.find("://").map_or(0, |at| at + 3);
        let end = head[authority..].find('/').map_or(head.len(), |at| authority + at);
        let query = query.map(|query| format!("?{query}")).unwrap_or_default();
        format!("{}/{name}{query}", &head[..end])
    }

    /// An SQLite backend in a temporary directory, to compare with.
    pub(crate) fn sqlite() -> (tempfile::TempDir, Sqlite) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(&dir.path().join("pool.db")).expect("open sqlite");
        (dir, store)
    }

    #[test]
    fn the_database_name_is_replaced_and_the_rest_kept() {
        assert_eq!(with_database("postgres://u@/postgres?host=/tmp/pg", "x"), "postgres://u@/x?host=/tmp/pg");
        assert_eq!(with_database("postgresql://u:p@h:5/d", "x"), "postgresql://u:p@h:5/x");
        assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::path::Path;

    use super::test_server::{TestDb, sqlite};
    use crate::pool::outcome::Outcome;
    use crate::pool::usage::{UsageBy, UsageQuery};
    use crate::pool::{Attempt, KeySpec, SyncSource};
    use crate::store::Backend;

    /// Two connectors' keys, one of them in a quota group.
    pub(crate) fn sync(store: &dyn Backend) {
        let keys = [
            KeySpec { connector: "c", name: "k1", fingerprint: "f1" },
            KeySpec { connector: "c", name: "K2", fingerprint: "f2" },
            KeySpec { connector: "d", name: "k3", fingerprint: "f3" },
        ];
        let source = SyncSource {
            path: Path::new("/keys.ini"),
            connectors: &["c", "d"],
            keys: &keys,
            groups: &[("c", "K2", "g")],
            as_truth: false,
        };
        store.sync_keys(&source, 1).expect("sync");
    }

    #[test]
    fn usage_counts_and_buckets_as_sqlite_does() {
        let Some(db) = TestDb::create("usage") else { return };
        let postgres = db.open();
        let (_dir, sqlite) = sqlite();
        for store in [&postgres as &dyn Backend, &sqlite] {
            sync(store);
            let mut at = 1_000;
            for (i, outcome) in Outcome::ALL.into_iter().enumerate() {
                for status in [None, Some(200), Some(400), Some(429), Some(503)] {
                    for (connector, key, model) in [
                        ("c", Some("k1"), Some("m")),
                        ("c", Some("K2"), None),
                        ("d", Some("k3"), Some("m2")),
                        ("c", None, Some("m")),
                    ] {
                        at += 37 + i64::try_from(i).expect("small");
                        let attempt = Attempt {
                            at,
                            connector: connector.to_owned(),
                            key_name: key.map(str::to_owned),
                            method: "POST".to_owned(),
                            endpoint: "/v1".to_owned(),
                            status,
                            latency_ms: 5,
                            outcome,
                            model: model.map(str::to_owned),
                            prompt_tokens: (status == Some(200)).then_some(11),
                        };
                        store.record_attempt(&attempt).expect("record");
                    }
                }
            }
        }
        let mut compared = 0;
        for by in UsageBy::ALL {
            for bucket_ms in [None, Some(0), Some(400), Some(7_000)] {
                for connector in [None, Some("c".to_owned()), Some("x".to_owned())] {
                    for since in [0, 1_500, 4_321] {
                        let query = UsageQuery { since, connector: connector.clone(), by, bucket_ms };
                        let expected = sqlite.usage(&query).expect("sqlite usage");
                        assert_eq!(postgres.usage(&query).expect("postgres usage"), expected, "{query:?}");
                        compared += expected.len();
                    }
                }
            }
        }
        assert!(compared > 100, "the comparison saw rows: {compared}");
    }
}
