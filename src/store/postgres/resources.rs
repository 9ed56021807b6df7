//! The `resources` table on PostgreSQL: which key created each per-project resource, and until when
//! that counts (see `crate::resource`); the statements of `store/sqlite/resources.rs` in this dialect.
//!
//! Invariants (as on SQLite):
//! - A row names its key; the scope a request is pinned to is that key's quota scope now, and the
//!   scope written with the row only when the key is gone.
//! - A row past its `expires_at` is never read; each write of a connector's resources deletes that
//!   connector's expired rows.
//! - A resource created again (a name reused after a delete) belongs to the key of its latest answer:
//!   with hosts racing, the last write wins, as on SQLite.

use super::connection::Tx;
use crate::resource::{Created, Owner};

/// Records `created`, the resources the answer key `key_name` of `connector` got created, at `now`;
/// deletes the connector's rows expired by then. Returns how many were recorded.
pub(super) fn record(
    tx: &mut Tx<'_>,
    connector: &str,
    key_name: &str,
    created: &[Created],
    now: i64,
) -> Result<usize, postgres::Error> {
    tx.execute("DELETE FROM resources WHERE connector = $1 AND expires_at <= $2", &[&connector, &now])?;
    let mut recorded = 0;
    for resource in created.iter().filter(|resource| resource.expires_at.is_none_or(|end| end > now)) {
        recorded += tx.execute(
            "INSERT INTO resources (connector, name, key_name, quota_scope, expires_at, created_at)
             SELECT $1, $2, $3, k.quota_scope, $4, $5 FROM keys k WHERE k.connector = $1 AND k.key_name = $3
             ON CONFLICT (connector, name) DO UPDATE SET
                 key_name = excluded.key_name, quota_scope = excluded.quota_scope,
                 expires_at = excluded.expires_at, created_at = excluded.created_at",
            &[&connector, &resource.name, &key_name, &resource.expires_at, &now],
        )?;
    }
    Ok(usize::try_from(recorded).unwrap_or(usize::MAX))
}

/// The owner of the first of `names` that `connector` has a row for, unexpired at `now` (the path's name
/// before the body's: the caller lists them in that order).
pub(super) fn owner(
    tx: &mut Tx<'_>,
    connector: &str,
    names: &[String],
    now: i64,
) -> Result<Option<Owner>, postgres::Error> {
    if names.is_empty() {
        return Ok(None);
    }
    let row = tx.query_opt(
        "SELECT r.name, r.key_name, coalesce(k.quota_scope, r.quota_scope), r.expires_at
           FROM unnest($2::text[]) WITH ORDINALITY AS wanted (name, position)
           JOIN resources r ON r.connector = $1 AND r.name = wanted.name
           LEFT JOIN keys k ON k.connector = r.connector AND k.key_name = r.key_name
          WHERE r.expires_at IS NULL OR r.expires_at > $3
          ORDER BY wanted.position LIMIT 1",
        &[&connector, &names, &now],
    )?;
    Ok(row.map(|row| Owner { name: row.get(0), key_name: row.get(1), quota_scope: row.get(2), expires_at: row.get(3) }))
}

#[cfg(test)]
mod tests {
    use super::super::usage::test_server::{TestDb, sqlite};
    use crate::resource::Created;
    use crate::store::Backend;

    fn created(name: &str, expires_at: Option<i64>) -> Created {
        Created { name: name.to_owned(), expires_at }
    }

    #[test]
    fn owners_are_recorded_and_read_as_on_sqlite() {
        let Some(db) = TestDb::create("resources") else { return };
        let postgres = db.open();
        let (_dir, sqlite) = sqlite();
        super::super::usage::tests::sync(&postgres);
        super::super::usage::tests::sync(&sqlite);
        let names = |list: &[&str]| list.iter().map(|name| (*name).to_owned()).collect::<Vec<String>>();
        let steps: [(&str, &str, Vec<Created>, i64); 5] = [
            ("c", "k1", vec![created("files/a", Some(500)), created("files/b", None)], 100),
            ("c", "K2", vec![created("files/c", Some(50)), created("cachedContents/x", Some(900))], 100),
            ("c", "K2", vec![created("files/b", None)], 200),
            ("c", "gone", vec![created("files/z", None)], 200),
            ("c", "k1", vec![created("files/d", Some(10_000))], 600),
        ];
        let mut found = 0;
        for (connector, key, created, now) in &steps {
            let expected = sqlite.record_resources(connector, key, created, *now).expect("sqlite");
            let recorded = postgres.record_resources(connector, key, created, *now).expect("postgres");
            assert_eq!(recorded, expected, "{key} at {now}");
            found += usize::from(sqlite.resource_owner("c", &names(&["files/b"]), *now).expect("sqlite").is_some());
            for now in [150, 450, 700] {
                for asked in [
                    names(&[]),
                    names(&["files/a"]),
                    names(&["files/nope", "files/b", "files/a"]),
                    names(&["cachedContents/x", "files/b"]),
                    names(&["files/z", "files/d"]),
                ] {
                    let expected = sqlite.resource_owner("c", &asked, now).expect("sqlite");
                    assert_eq!(
                        postgres.resource_owner("c", &asked, now).expect("postgres"),
                        expected,
                        "{asked:?} {now}"
                    );
                }
            }
        }
        assert_eq!(found, 5, "the comparison saw owners");
        let owner = postgres.resource_owner("c", &names(&["files/b"]), 700).expect("owner").expect("b");
        assert_eq!((owner.key_name.as_str(), owner.quota_scope.as_str()), ("K2", "group:g"), "the latest answer's key");
    }
}
