//! Every SQL statement of apijongler, behind a narrow API that names no SQLite type.
//!
//! Invariants the statements keep:
//! - Every write is one `BEGIN IMMEDIATE` transaction (never a read that later upgrades to a write,
//!   which SQLite fails at once with SQLITE_BUSY whatever the busy timeout), and every state change
//!   writes its history row in that same transaction.
//! - A claim increments the key's lease; every later write by the holder is fenced by
//!   `state = 'locked' AND lease = ?`, so a holder that lost its lease changes nothing.
//! - A vacant key has no `lockdown_until`. A key claimed out of an expired lockdown keeps that past
//!   deadline until it is released, which is how the claim's history row knows where the key came from.
//! - A write that meets SQLITE_BUSY is retried until it goes through: a dropped release would leak
//!   the key, and no caller ever sees SQLITE_BUSY.
//!
//! A second backend (PostgreSQL, for pools shared by several hosts) would implement the same methods.

mod schema;
mod types;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{OptionalExtension, Row, Transaction, TransactionBehavior, params};

use crate::error::{Error, Result};
use crate::holder::Holder;

pub use schema::{DB_ENV, SCHEMA_VERSION, default_path};
pub use types::*;

/// The database: one file shared by every process of a user.
#[derive(Debug, Clone)]
pub struct Store {
    pool: r2d2::Pool<SqliteConnectionManager>,
    path: PathBuf,
}

/// A history row about to be written.
struct NewTransition<'a> {
    connector: &'a str,
    key_name: &'a str,
    fingerprint: &'a str,
    from_state: Option<&'a str>,
    to_state: &'a str,
    reason: &'a str,
    http_status: Option<u16>,
    holder_pid: Option<u32>,
    lease: Option<i64>,
    lockdown_until: Option<i64>,
}

impl<'a> NewTransition<'a> {
    /// A transition with no status, holder, lease or deadline; set those with struct update syntax.
    /// `key` is (connector, key name, fingerprint).
    fn new(
        (connector, key_name, fingerprint): (&'a str, &'a str, &'a str),
        from_state: Option<&'a str>,
        to_state: &'a str,
        reason: &'a str,
    ) -> Self {
        Self {
            connector,
            key_name,
            fingerprint,
            from_state,
            to_state,
            reason,
            http_status: None,
            holder_pid: None,
            lease: None,
            lockdown_until: None,
        }
    }
}

const KEY_COLUMNS: &str = "connector, key_name, fingerprint, state, retired_at, lease, holder_host, holder_boot_id,
     holder_pid, holder_started, locked_at, heartbeat_at, lockdown_until, reason, http_status, lockdown_count,
     uses, last_used_at";

const HISTORY_COLUMNS: &str =
    "id, at, connector, key_name, fingerprint, from_state, to_state, reason, http_status, holder_pid,
     lease, lockdown_until";

impl Store {
    /// Opens the database at `path`, creating and migrating it as needed.
    pub fn open(path: &Path) -> Result<Self> {
        let pool = schema::open(path)?;
        Ok(Self { pool, path: path.to_owned() })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version recorded in the file.
    pub fn schema_version(&self) -> Result<i64> {
        self.read("reading the schema version", |connection| {
            connection.pragma_query_value(None, "user_version", |row| row.get(0))
        })
    }

    /// Makes the keys table match the keyring: inserts new keys vacant, lifts error and lockdown from
    /// keys whose secret changed, retires keys that left the keyring and restores those that came back.
    /// Writes nothing (takes no write lock) when everything already matches.
    pub fn sync_keys(&self, keys: &[KeySpec<'_>], now: i64) -> Result<SyncReport> {
        let pending = self.read("reading the keys", |connection| plan_sync(connection, keys))?;
        if pending.is_empty() {
            return Ok(pending);
        }
        self.write("syncing the keyring", |transaction| {
            // Plan again under the write lock: another process may have synced in between.
            let mut plan = plan_sync(transaction, keys)?;
            plan.transitions = apply_sync(transaction, keys, &plan, now)?;
            Ok(plan)
        })
    }

    /// Claims the least recently used claimable key of `connector` not named in `tried`, for `holder`.
    pub fn claim(&self, connector: &str, tried: &[String], holder: &Holder, now: i64) -> Result<Option<Claimed>> {
        let tried = json_list(tried);
        self.write("claiming a key", |transaction| {
            let claimed = transaction
                .prepare_cached(
                    "UPDATE keys
                        SET state = 'locked', lease = lease + 1, holder_host = ?3, holder_boot_id = ?4,
                            holder_pid = ?5, holder_started = ?6, locked_at = ?2, heartbeat_at = ?2,
                            uses = uses + 1, last_used_at = ?2
                      WHERE id = (SELECT id FROM keys
                                   WHERE connector = ?1
                                     AND state IN ('vacant', 'lockdown') AND retired_at IS NULL
                                     AND (state = 'vacant' OR lockdown_until <= ?2)
                                     AND key_name NOT IN (SELECT value FROM json_each(?7))
                                   ORDER BY last_used_at
                                   LIMIT 1)
                  RETURNING id, key_name, fingerprint, lease, lockdown_until, lockdown_count",
                )?
                .query_row(
                    params![connector, now, holder.host, holder.boot_id, holder.pid, holder.started, tried],
                    |row| {
                        let claimed = Claimed {
                            id: row.get(0)?,
                            key_name: row.get(1)?,
                            fingerprint: row.get(2)?,
                            lease: row.get(3)?,
                            lockdown_count: row.get(5)?,
                        };
                        let out_of_lockdown = row.get::<_, Option<i64>>(4)?.is_some();
                        Ok((claimed, out_of_lockdown))
                    },
                )
                .optional()?;
            let Some((claimed, out_of_lockdown)) = claimed else { return Ok(None) };
            record(
                transaction,
                now,
                &NewTransition {
                    holder_pid: Some(holder.pid),
                    lease: Some(claimed.lease),
                    ..NewTransition::new(
                        (connector, &claimed.key_name, &claimed.fingerprint),
                        Some(if out_of_lockdown { "lockdown" } else { "vacant" }),
                        "locked",
                        "claimed",
                    )
                },
            )?;
            Ok(Some(claimed))
        })
    }

    /// Ends lease `lease` on key `id` with `fate`. `Ok(false)` means the lease was already lost: the
    /// key now belongs to someone else (or to nobody) and was not touched.
    /// `attempt`, if given, is recorded in the same transaction.
    pub fn end_lease(&self, id: i64, lease: i64, fate: &Fate, attempt: Option<&Attempt>, now: i64) -> Result<bool> {
        let success = matches!(fate, Fate::Release { success: true });
        let (to_state, until, reason, status) = match fate {
            Fate::Release { .. } => ("vacant", None, None, None),
            Fate::Lockdown { until, reason, http_status } => ("lockdown", Some(*until), Some(reason), *http_status),
            Fate::Error { reason, http_status } => ("error", None, Some(reason), *http_status),
        };
        self.write("ending a lease", |transaction| {
            let ended = transaction
                .prepare_cached(
                    "UPDATE keys
                        SET state = ?3, lockdown_until = ?4,
                            reason = coalesce(?5, reason), http_status = CASE WHEN ?5 IS NULL THEN http_status ELSE ?6 END,
                            lockdown_count = CASE WHEN ?3 = 'lockdown' THEN lockdown_count + 1
                                                  WHEN ?7 THEN 0 ELSE lockdown_count END,
                            holder_host = NULL, holder_boot_id = NULL, holder_pid = NULL, holder_started = NULL,
                            locked_at = NULL, heartbeat_at = NULL
                      WHERE id = ?1 AND lease = ?2 AND state = 'locked'
                  RETURNING connector, key_name, fingerprint",
                )?
                .query_row(params![id, lease, to_state, until, reason, status, success], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, String>(2)?))
                })
                .optional()?;
            if let Some(attempt) = attempt {
                insert_attempt(transaction, attempt)?;
            }
            let Some((connector, key_name, fingerprint)) = ended else { return Ok(false) };
            record(
                transaction,
                now,
                &NewTransition {
                    http_status: status,
                    holder_pid: Some(std::process::id()),
                    lease: Some(lease),
                    lockdown_until: until,
                    ..NewTransition::new(
                        (&connector, &key_name, &fingerprint),
                        Some("locked"),
                        to_state,
                        reason.map_or("released", String::as_str),
                    )
                },
            )?;
            Ok(true)
        })
    }

    /// Records an attempt made without ending a lease (no key, or the lease is kept).
    pub fn record_attempt(&self, attempt: &Attempt) -> Result<()> {
        self.write("recording a request", |transaction| insert_attempt(transaction, attempt))
    }

    /// After a success on a key that is kept (per-connection leases), its consecutive-lockdown count
    /// starts again at 0. `Ok(false)`: the lease was lost.
    pub fn reset_escalation(&self, id: i64, lease: i64) -> Result<bool> {
        self.write("resetting a key's lockdown count", |transaction| {
            let changed = transaction
                .prepare_cached("UPDATE keys SET lockdown_count = 0 WHERE id = ?1 AND lease = ?2 AND state = 'locked'")?
                .execute(params![id, lease])?;
            Ok(changed == 1)
        })
    }

    /// Every recorded attempt, oldest first (for the demo's summary and for tests).
    pub fn attempts(&self, connector: Option<&str>) -> Result<Vec<Attempt>> {
        self.read("reading requests", |connection| {
            let mut statement = connection.prepare_cached(
                "SELECT at, connector, key_name, method, endpoint, status, latency_ms, outcome
                   FROM requests WHERE ?1 IS NULL OR connector = ?1 ORDER BY id",
            )?;
            all(&mut statement, params![connector], |row| {
                Ok(Attempt {
                    at: row.get(0)?,
                    connector: row.get(1)?,
                    key_name: row.get(2)?,
                    method: row.get(3)?,
                    endpoint: row.get(4)?,
                    status: row.get(5)?,
                    latency_ms: row.get(6)?,
                    outcome: row.get(7)?,
                })
            })
        })
    }

    /// Refreshes the heartbeat of every key `holder` holds, and returns `(id, lease)` of each: a lease
    /// missing from the answer was lost.
    pub fn heartbeat(&self, holder: &Holder, now: i64) -> Result<Vec<(i64, i64)>> {
        self.write("refreshing heartbeats", |transaction| {
            let mut statement = transaction.prepare_cached(
                "UPDATE keys SET heartbeat_at = ?1
                  WHERE state = 'locked' AND holder_pid = ?2 AND holder_started = ?3
                    AND holder_boot_id = ?4 AND holder_host = ?5
              RETURNING id, lease",
            )?;
            all(&mut statement, params![now, holder.pid, holder.started, holder.boot_id, holder.host], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
        })
    }

    /// The held keys of `connector` (or of all connectors), for the reaper.
    pub fn held_keys(&self, connector: Option<&str>) -> Result<Vec<HeldKey>> {
        self.read("reading held keys", |connection| {
            let mut statement = connection.prepare_cached(
                "SELECT id, connector, key_name, lease, holder_host, holder_boot_id, holder_pid, holder_started,
                        heartbeat_at
                   FROM keys WHERE state = 'locked' AND (?1 IS NULL OR connector = ?1)",
            )?;
            all(&mut statement, params![connector], |row| {
                Ok(HeldKey {
                    id: row.get(0)?,
                    connector: row.get(1)?,
                    key_name: row.get(2)?,
                    lease: row.get(3)?,
                    // A locked row always names its holder; an empty one is judged by heartbeat alone.
                    holder: holder_at(row, 4)?.unwrap_or_default(),
                    heartbeat_at: row.get::<_, Option<i64>>(8)?.unwrap_or_default(),
                })
            })
        })
    }

    /// Frees the given locks (each fenced by its lease): back to vacant, or to lockdown if the key's
    /// deadline is still ahead. Returns the transitions written.
    pub fn evict(&self, evictions: &[Eviction], now: i64) -> Result<Vec<Transition>> {
        if evictions.is_empty() {
            return Ok(Vec::new());
        }
        self.write("freeing locks", |transaction| {
            let mut written = Vec::new();
            for eviction in evictions {
                let freed = transaction
                    .prepare_cached(
                        "UPDATE keys
                            SET state = CASE WHEN lockdown_until > ?3 THEN 'lockdown' ELSE 'vacant' END,
                                lockdown_until = CASE WHEN lockdown_until > ?3 THEN lockdown_until END,
                                holder_host = NULL, holder_boot_id = NULL, holder_pid = NULL,
                                holder_started = NULL, locked_at = NULL, heartbeat_at = NULL
                          WHERE id = ?1 AND lease = ?2 AND state = 'locked'
                      RETURNING connector, key_name, fingerprint, state, lockdown_until",
                    )?
                    .query_row(params![eviction.id, eviction.lease, now], |row| {
                        let key: (String, String, String) = (row.get(0)?, row.get(1)?, row.get(2)?);
                        Ok((key, row.get::<_, String>(3)?, row.get(4)?))
                    })
                    .optional()?;
                if let Some(((connector, key_name, fingerprint), state, until)) = freed {
                    written.push(record(
                        transaction,
                        now,
                        &NewTransition {
                            lease: Some(eviction.lease),
                            lockdown_until: until,
                            ..NewTransition::new(
                                (&connector, &key_name, &fingerprint),
                                Some("locked"),
                                &state,
                                &eviction.reason,
                            )
                        },
                    )?);
                }
            }
            Ok(written)
        })
    }

    /// Puts every key in lockdown or error of `connector` (or of all connectors) back to vacant.
    /// Locks are not touched here: the reaper frees dead ones, and a forced cleanup evicts the rest.
    pub fn clear_lockdowns_and_errors(&self, connector: Option<&str>, now: i64) -> Result<Vec<Transition>> {
        self.write("cleaning up keys", |transaction| {
            let mut statement = transaction.prepare_cached(
                "UPDATE keys SET state = 'vacant', lockdown_until = NULL, lockdown_count = 0 WHERE id = ?1",
            )?;
            let targets = transaction
                .prepare_cached(
                    "SELECT id, connector, key_name, fingerprint, state FROM keys
                      WHERE state IN ('lockdown', 'error') AND (?1 IS NULL OR connector = ?1)",
                )?
                .query_map(params![connector], |row| {
                    let key: (String, String, String) = (row.get(1)?, row.get(2)?, row.get(3)?);
                    Ok((row.get::<_, i64>(0)?, key, row.get::<_, String>(4)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut written = Vec::new();
            for (id, (key_connector, key_name, fingerprint), state) in targets {
                statement.execute(params![id])?;
                written.push(record(
                    transaction,
                    now,
                    &NewTransition::new((&key_connector, &key_name, &fingerprint), Some(&state), "vacant", "cleanup"),
                )?);
            }
            Ok(written)
        })
    }

    /// How many keys of `connector` are claimable, held, in lockdown or error, from a read (no write
    /// lock), so waiters can poll without slowing the writers.
    pub fn availability(&self, connector: &str, tried: &[String], now: i64) -> Result<Availability> {
        let tried = json_list(tried);
        self.read("reading key availability", |connection| {
            connection
                .prepare_cached(
                    "SELECT coalesce(sum(usable AND NOT was_tried), 0), coalesce(sum(state = 'locked'), 0),
                        coalesce(sum(state = 'lockdown' AND NOT usable), 0), coalesce(sum(state = 'error'), 0),
                        coalesce(sum(usable AND was_tried), 0),
                        min(CASE WHEN state = 'lockdown' AND NOT usable THEN lockdown_until END)
                   FROM (SELECT state, lockdown_until,
                                state = 'vacant' OR (state = 'lockdown' AND lockdown_until <= ?2) AS usable,
                                key_name IN (SELECT value FROM json_each(?3)) AS was_tried
                           FROM keys WHERE connector = ?1 AND retired_at IS NULL)",
                )?
                .query_row(params![connector, now, tried], |row| {
                    Ok(Availability {
                        connector: connector.to_owned(),
                        claimable: row.get(0)?,
                        locked: row.get(1)?,
                        lockdown: row.get(2)?,
                        error: row.get(3)?,
                        tried: row.get(4)?,
                        earliest_lockdown_end: row.get(5)?,
                    })
                })
        })
    }

    /// Every key of `connector` (or of all connectors), retired ones included, by connector and name.
    pub fn keys(&self, connector: Option<&str>) -> Result<Vec<KeyRecord>> {
        self.read("reading keys", |connection| {
            let mut statement = connection.prepare_cached(&format!(
                "SELECT {KEY_COLUMNS} FROM keys WHERE ?1 IS NULL OR connector = ?1 ORDER BY connector, key_name"
            ))?;
            all(&mut statement, params![connector], key_record)
        })
    }

    /// History rows matching `query`, newest first.
    pub fn history(&self, query: &HistoryQuery) -> Result<Vec<Transition>> {
        let limit = query.limit.map_or(-1, |limit| i64::try_from(limit).unwrap_or(i64::MAX));
        self.read("reading the history", |connection| {
            let mut statement = connection.prepare_cached(&format!(
                "SELECT {HISTORY_COLUMNS} FROM history
                  WHERE (?1 IS NULL OR connector = ?1) AND (?2 IS NULL OR key_name = ?2) AND (?3 IS NULL OR at >= ?3)
                  ORDER BY id DESC LIMIT ?4"
            ))?;
            all(&mut statement, params![query.connector, query.key_name, query.since, limit], transition)
        })
    }

    /// The plan SQLite chooses for the claim's key lookup, one line per step (for tests and docs).
    pub fn explain_claim(&self) -> Result<Vec<String>> {
        self.read("explaining the claim", |connection| {
            let mut statement = connection.prepare(
                "EXPLAIN QUERY PLAN
                 SELECT id FROM keys
                  WHERE connector = ?1
                    AND state IN ('vacant', 'lockdown') AND retired_at IS NULL
                    AND (state = 'vacant' OR lockdown_until <= ?2)
                    AND key_name NOT IN (SELECT value FROM json_each(?3))
                  ORDER BY last_used_at
                  LIMIT 1",
            )?;
            all(&mut statement, params!["c", 0, "[]"], |row| row.get::<_, String>(3))
        })
    }

    fn read<T>(
        &self,
        operation: &'static str,
        f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let connection = self.connection(operation)?;
        f(&connection).map_err(|error| schema::classify(&self.path, operation, error))
    }

    /// Runs `f` in a `BEGIN IMMEDIATE` transaction, retrying while another process holds the write lock
    /// beyond the busy timeout: the write is never dropped and SQLITE_BUSY never reaches the caller.
    fn write<T>(
        &self,
        operation: &'static str,
        mut f: impl FnMut(&Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let mut connection = self.connection(operation)?;
        let started = Instant::now();
        let mut attempt: u32 = 0;
        loop {
            let result = connection.transaction_with_behavior(TransactionBehavior::Immediate).and_then(|transaction| {
                let value = f(&transaction)?;
                transaction.commit()?;
                Ok(value)
            });
            match result {
                Ok(value) => return Ok(value),
                Err(error) if schema::is_busy(&error) => {
                    attempt += 1;
                    tracing::warn!(
                        path = %self.path.display(), operation, attempt, waited = ?started.elapsed(),
                        "database stays locked by another process; retrying"
                    );
                    std::thread::sleep(Duration::from_millis(fastrand::u64(1..=50)));
                }
                Err(error) => return Err(schema::classify(&self.path, operation, error)),
            }
        }
    }

    fn connection(&self, operation: &'static str) -> Result<r2d2::PooledConnection<SqliteConnectionManager>> {
        self.pool.get().map_err(|error| Error::Database { path: self.path.clone(), operation, source: Box::new(error) })
    }
}

/// Key names as a JSON array, for `json_each` (the claim's hot path mostly has none).
fn json_list(names: &[String]) -> std::borrow::Cow<'static, str> {
    if names.is_empty() {
        return "[]".into();
    }
    serde_json::to_string(names).unwrap_or_else(|_| "[]".to_owned()).into()
}

/// Every row a statement returns, mapped by `map`.
fn all<T>(
    statement: &mut rusqlite::Statement<'_>,
    params: impl rusqlite::Params,
    map: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Vec<T>> {
    statement.query_map(params, map)?.collect()
}

fn insert_attempt(transaction: &Transaction<'_>, attempt: &Attempt) -> rusqlite::Result<()> {
    transaction
        .prepare_cached(
            "INSERT INTO requests (at, connector, key_name, method, endpoint, status, latency_ms, outcome)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?
        .execute(params![
            attempt.at,
            attempt.connector,
            attempt.key_name,
            attempt.method,
            attempt.endpoint,
            attempt.status,
            attempt.latency_ms,
            attempt.outcome
        ])?;
    Ok(())
}

fn record(transaction: &Transaction<'_>, at: i64, new: &NewTransition<'_>) -> rusqlite::Result<Transition> {
    transaction
        .prepare_cached(
            "INSERT INTO history (at, connector, key_name, fingerprint, from_state, to_state, reason, http_status,
                                  holder_pid, lease, lockdown_until)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?
        .execute(params![
            at,
            new.connector,
            new.key_name,
            new.fingerprint,
            new.from_state,
            new.to_state,
            new.reason,
            new.http_status,
            new.holder_pid,
            new.lease,
            new.lockdown_until
        ])?;
    Ok(Transition {
        id: transaction.last_insert_rowid(),
        at,
        connector: new.connector.to_owned(),
        key_name: new.key_name.to_owned(),
        fingerprint: new.fingerprint.to_owned(),
        from_state: new.from_state.map(str::to_owned),
        to_state: new.to_state.to_owned(),
        reason: new.reason.to_owned(),
        http_status: new.http_status,
        holder_pid: new.holder_pid,
        lease: new.lease,
        lockdown_until: new.lockdown_until,
    })
}

/// What syncing `keys` would change, compared with the rows as they are.
fn plan_sync(connection: &rusqlite::Connection, keys: &[KeySpec<'_>]) -> rusqlite::Result<SyncReport> {
    let mut existing = std::collections::HashMap::new();
    let mut statement = connection.prepare_cached("SELECT connector, key_name, fingerprint, retired_at FROM keys")?;
    let rows = statement.query_map([], |row| {
        Ok((
            (row.get::<_, String>(0)?, row.get::<_, String>(1)?),
            (row.get::<_, String>(2)?, row.get::<_, Option<i64>>(3)?),
        ))
    })?;
    for row in rows {
        let (id, values) = row?;
        existing.insert(id, values);
    }
    let mut report = SyncReport::default();
    for key in keys {
        let id = (key.connector.to_owned(), key.name.to_owned());
        match existing.remove(&id) {
            None => report.added.push(id),
            Some((fingerprint, retired_at)) => {
                if fingerprint != key.fingerprint {
                    report.changed.push(id.clone());
                }
                if retired_at.is_some() {
                    report.restored.push(id);
                }
            }
        }
    }
    report.retired =
        existing.into_iter().filter(|(_, (_, retired_at))| retired_at.is_none()).map(|(id, _)| id).collect();
    report.retired.sort();
    Ok(report)
}

fn apply_sync(
    transaction: &Transaction<'_>,
    keys: &[KeySpec<'_>],
    plan: &SyncReport,
    now: i64,
) -> rusqlite::Result<Vec<Transition>> {
    let mut written = Vec::new();
    let spec = |(connector, name): &(String, String)| {
        keys.iter().find(|key| key.connector == connector && key.name == name).map_or("", |key| key.fingerprint)
    };
    let mut note = |key: (&str, &str, &str), from_state: Option<&str>, to_state: &str, reason: &str| {
        written.push(record(transaction, now, &NewTransition::new(key, from_state, to_state, reason))?);
        Ok::<_, rusqlite::Error>(())
    };
    for id @ (connector, name) in &plan.added {
        transaction
            .prepare_cached("INSERT INTO keys (connector, key_name, fingerprint, created_at) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![connector, name, spec(id), now])?;
        note((connector, name, spec(id)), None, "vacant", "added to the keyring")?;
    }
    for id @ (connector, name) in &plan.changed {
        // A new secret is a new key: the old one's error or quota says nothing about it.
        let before: String = transaction
            .prepare_cached("SELECT state FROM keys WHERE connector = ?1 AND key_name = ?2")?
            .query_row(params![connector, name], |row| row.get(0))?;
        let state: String = transaction
            .prepare_cached(
                "UPDATE keys
                    SET fingerprint = ?3,
                        state = CASE WHEN state IN ('error', 'lockdown') THEN 'vacant' ELSE state END,
                        lockdown_until = CASE WHEN state IN ('error', 'lockdown') THEN NULL ELSE lockdown_until END,
                        lockdown_count = 0
                  WHERE connector = ?1 AND key_name = ?2
              RETURNING state",
            )?
            .query_row(params![connector, name, spec(id)], |row| row.get(0))?;
        note((connector, name, spec(id)), Some(&before), &state, "secret changed in the keyring")?;
    }
    for (connector, name) in &plan.retired {
        let (state, fingerprint): (String, String) = transaction
            .prepare_cached(
                "UPDATE keys SET retired_at = ?3 WHERE connector = ?1 AND key_name = ?2 RETURNING state, fingerprint",
            )?
            .query_row(params![connector, name, now], |row| Ok((row.get(0)?, row.get(1)?)))?;
        note((connector, name, &fingerprint), Some(&state), "retired", "removed from the keyring")?;
    }
    for (connector, name) in &plan.restored {
        let (state, fingerprint): (String, String) = transaction
            .prepare_cached(
                "UPDATE keys SET retired_at = NULL WHERE connector = ?1 AND key_name = ?2 RETURNING state, fingerprint",
            )?
            .query_row(params![connector, name], |row| Ok((row.get(0)?, row.get(1)?)))?;
        note((connector, name, &fingerprint), Some("retired"), &state, "back in the keyring")?;
    }
    Ok(written)
}

/// The holder recorded in columns `first..first + 4` (host, boot id, pid, start time, the order of the
/// `keys` table), or `None` when no pid is recorded.
fn holder_at(row: &Row<'_>, first: usize) -> rusqlite::Result<Option<Holder>> {
    let Some(pid) = row.get::<_, Option<u32>>(first + 2)? else { return Ok(None) };
    Ok(Some(Holder {
        host: row.get::<_, Option<String>>(first)?.unwrap_or_default(),
        boot_id: row.get::<_, Option<String>>(first + 1)?.unwrap_or_default(),
        pid,
        started: row.get::<_, Option<i64>>(first + 3)?.unwrap_or_default(),
    }))
}

fn key_record(row: &Row<'_>) -> rusqlite::Result<KeyRecord> {
    Ok(KeyRecord {
        connector: row.get(0)?,
        key_name: row.get(1)?,
        fingerprint: row.get(2)?,
        state: KeyState::parse(&row.get::<_, String>(3)?),
        retired_at: row.get(4)?,
        lease: row.get(5)?,
        holder: holder_at(row, 6)?,
        locked_at: row.get(10)?,
        heartbeat_at: row.get(11)?,
        lockdown_until: row.get(12)?,
        reason: row.get(13)?,
        http_status: row.get(14)?,
        lockdown_count: row.get(15)?,
        uses: row.get(16)?,
        last_used_at: row.get(17)?,
    })
}

fn transition(row: &Row<'_>) -> rusqlite::Result<Transition> {
    Ok(Transition {
        id: row.get(0)?,
        at: row.get(1)?,
        connector: row.get(2)?,
        key_name: row.get(3)?,
        fingerprint: row.get(4)?,
        from_state: row.get(5)?,
        to_state: row.get(6)?,
        reason: row.get(7)?,
        http_status: row.get(8)?,
        holder_pid: row.get(9)?,
        lease: row.get(10)?,
        lockdown_until: row.get(11)?,
    })
}
