//! The PostgreSQL schema: created on first use in its own schema (`apijongler`), migrated with the
//! files of `migrations/postgres/`, whose numbers are the SQLite schema versions they match.
//!
//! Invariants:
//! - Migrations run under a transaction-scoped advisory lock: hosts opening a new pool at once
//!   migrate it once.
//! - A newer schema is refused before anything is written; no object outside the schema is touched.

use super::SCHEMA;
use super::connection::Tx;

/// The migrations, by the schema version each brings the database to. PostgreSQL support began at
/// version 8, so its first file creates the tables of SQLite's versions 1 to 8 at once.
const MIGRATIONS: &[(i64, &str)] = &[
    (8, include_str!("../../../migrations/postgres/0008_initial.sql")),
    (9, include_str!("../../../migrations/postgres/0009_scope_watermark.sql")),
];

/// The schema version this build reads and writes (the same as SQLite's).
pub(super) const VERSION: i64 = crate::store::SCHEMA_VERSION;

/// The advisory lock key of migrations ("AJNG", as SQLite's application id).
const MIGRATION_LOCK: i64 = 1_095_388_743;

/// What the schema holds on the server: its version (0: none yet).
pub(super) fn version(tx: &mut Tx<'_>) -> Result<i64, postgres::Error> {
    // Read from the catalog's tables with this statement's snapshot (not through `to_regclass`, whose
    // cache may predate a migration committed while this transaction waited for the lock); opening them
    // also brings the session's catalog cache up to date for the statements that follow.
    let exists: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = $1 AND tablename = 'schema_version')",
            &[&SCHEMA],
        )?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(tx.query_opt("SELECT version FROM schema_version", &[])?.map_or(0, |row| row.get(0)))
}

/// Brings the schema to [`VERSION`] if it is older, under the migration lock; returns the version found
/// (a newer one is the caller's to refuse, and nothing was written).
///
/// The lock is the transaction's first statement: the catalog it then reads includes what a migration
/// that held the lock before committed.
pub(super) fn migrate(tx: &mut Tx<'_>) -> Result<i64, postgres::Error> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    let found = version(tx)?;
    if found >= VERSION {
        return Ok(found);
    }
    if found == 0 {
        tx.batch(&format!(
            "CREATE SCHEMA IF NOT EXISTS {SCHEMA};
             CREATE TABLE {SCHEMA}.schema_version (version BIGINT NOT NULL);
             INSERT INTO {SCHEMA}.schema_version VALUES (0);"
        ))?;
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(version, _)| *version > found) {
        tx.batch(sql)?;
        tx.execute("UPDATE schema_version SET version = $1", &[version])?;
        tracing::info!(version, "PostgreSQL schema migrated");
    }
    Ok(found)
}
