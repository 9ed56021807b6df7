//! The SQLite backend: every SQL statement of the embedded pool, behind the store's seam
//! (`Backend`); no SQLite type shows outside this module.
//!
//! Invariants the statements keep:
//! - Every write is one `BEGIN IMMEDIATE` transaction (never a read that later upgrades to a write,
//!   which SQLite fails at once with SQLITE_BUSY whatever the busy timeout), and every state change
//!   writes its history row in that same transaction.
//! - A claim increments the key's lease; every later write by the holder is fenced by
//!   `state = 'locked' AND lease = ?`, so a holder that lost its lease changes nothing.
//! - A vacant key has no `lockdown_until`. A key claimed out of an expired lockdown keeps that past
//!   deadline until it is released, which is how the claim's history row knows where the key came from.
//! - A write that meets SQLITE_BUSY is retried until its caller's deadline, never less than the
//!   store's floor (a few seconds, so a brief lock never fails a request), then fails with
//!   [`Error::DatabaseLocked`]: no operation ever hangs on another process's lock.
//! - Claims and lease ends that threads of this process ask for at the same time share one
//!   transaction (group commit, see the `batch` module); each still runs its own statements and gets
//!   its own answer.
//! - Before every operation, the path must still lead to the file this process opened
//!   ([`Error::DatabaseReplaced`] otherwise): a deleted database must not become two pools.

mod batch;
mod examples;
mod pacing;
mod prune;
mod resources;
mod schema;
mod sync;
mod usage;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{OptionalExtension, Row, Transaction, TransactionBehavior, params};

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::holder::Holder;
use crate::store::rule_sql::{self, KeyCols};
use sync::{apply_sync, plan_sync};

pub use schema::{APPLICATION_ID, SCHEMA_VERSION};

use super::transition::NewTransition;
use super::{Backend, ChangeWatch, ClaimFor, Journal};
use crate::pool::*;
use crate::resource::{Created, Owner};

/// How long any operation may wait for another process's write lock, at least (see `Sqlite::write`).
pub const DEFAULT_LOCK_WAIT_FLOOR: Duration = Duration::from_secs(5);

/// The longest single lock wait inside SQLite's busy handler, so the write loop can say that it waits.
const WAIT_SLICE: Duration = Duration::from_millis(250);

/// How many floors a holder's own bookkeeping (ending a lease, recording an attempt, a heartbeat) may
/// wait: giving up on it costs more than the wait (a key held until the retry lands, an answer reported
/// as not recorded), and SQLite's busy handler is not fair, so under heavy contention one writer can
/// lose the lock for seconds in a row.
const HOLDER_PATIENCE: u32 = 3;

/// The SQLite backend: one WAL-mode file shared by every process of a user.
#[derive(Debug, Clone)]
pub(crate) struct Sqlite {
    pool: r2d2::Pool<SqliteConnectionManager>,
    path: PathBuf,
    identity: schema::FileIdentity,
    lock_wait_floor: Duration,
    /// Claims and lease ends waiting to be written together (see the `batch` module).
    claims: std::sync::Arc<batch::ClaimQueue>,
    ends: std::sync::Arc<batch::EndQueue>,
    /// What this process's claims of each connector reserve against (`pacing`).
    paced: std::sync::Arc<super::paced::Paced>,
}

const KEY_COLUMNS: &str = "connector, key_name, fingerprint, state, retired_at, lease, holder_host, holder_boot_id,
     holder_pid_namespace, holder_pid, holder_started, locked_at, heartbeat_at, lockdown_until, reason, http_status,
     lockdown_count, uses, last_used_at, quota_group, project_learned, quota_scope";

/// How many of the least recently used claimable keys the claim looks at first, in pure LRU order.
const LRU_WINDOW: u32 = 8;

/// The claim: a claimable key that no lockdown keeps from the requested model, locked with a new lease,
/// in one statement, so two processes can never both get a key. `explain_claim` shows its plan.
///
/// Which key: the least recently used one among the first [`LRU_WINDOW`] claimable keys in
/// `keys_lru` (so keys locked down for one model still take turns serving the others); when all of
/// those are locked down for the model, the first free one in `keys_claim_order`, where a key sits
/// behind the end of the latest lockdown of its scopes (so however many keys are locked down for the
/// model, that walk stops at the first key it looks at: they were moved behind the keys free for it).
///
/// A request naming a resource of a known owner is pinned to the owner's quota scope (`?11`, NULL for
/// every other request): it takes the least recently used free key of that scope, walking
/// `keys_scope_lru` over that scope's keys alone. Each arm starts with a constant test of `?11`, which
/// SQLite evaluates once, before any row: an unpinned claim never enters the pinned arm, nor a pinned one
/// the others.
static CLAIM: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let claimable = format!(
        "k.connector = ?1 AND {} AND k.key_name NOT IN (SELECT value FROM json_each(?7))",
        rule_sql::claimable_state("k", "?2")
    );
    format!(
        "UPDATE keys
    SET state = 'locked', lease = lease + 1, holder_host = ?3, holder_boot_id = ?4, holder_pid_namespace = ?9,
        holder_pid = ?5, holder_started = ?6, locked_at = ?2, heartbeat_at = ?2, heartbeat_boot_ms = ?8,
        uses = uses + 1, last_used_at = ?2,
        queue_at = max(?2, {latest})
  WHERE id = coalesce(
          (SELECT k.id FROM keys k
            WHERE ?11 IS NOT NULL AND k.quota_scope = ?11 AND {claimable} AND NOT {locked}
            ORDER BY k.last_used_at LIMIT 1),
          (SELECT k.id FROM (SELECT k.id, k.connector, k.quota_scope, k.key_name, k.last_used_at FROM keys k
                              WHERE ?11 IS NULL AND {claimable}
                              ORDER BY k.last_used_at LIMIT {LRU_WINDOW}) k
            WHERE NOT {locked}
            ORDER BY k.last_used_at LIMIT 1),
          (SELECT k.id FROM keys k
            WHERE ?11 IS NULL AND {claimable} AND NOT {locked}
            ORDER BY k.queue_at, k.last_used_at LIMIT 1))
RETURNING id, key_name, fingerprint, lease, lockdown_until, quota_scope,
          coalesce((SELECT q.strikes FROM lockdowns q
                     WHERE q.connector = keys.connector AND q.scope = {own} AND q.model = coalesce(?10, '{every}')), 0),
          (SELECT coalesce(max(l.learned_at), 0) FROM learned_limits l WHERE l.connector = keys.connector)",
        locked = rule_sql::locked_down_for(&KeyCols::row("k"), "?10", "?2"),
        latest = rule_sql::latest_lockdown_end(&KeyCols::row("keys")),
        own = rule_sql::own_scope("keys.key_name"),
        every = ModelScope::EVERY,
    )
});

const HISTORY_COLUMNS: &str =
    "id, at, connector, key_name, fingerprint, from_state, to_state, reason, http_status, holder_pid,
     lease, lockdown_until, model, quota_scope, event";

impl Sqlite {
    /// Opens the database at `path`, creating and migrating it as needed.
    pub fn open(path: &Path) -> Result<Self> {
        let (pool, identity) = schema::open(path)?;
        Ok(Self {
            pool,
            path: path.to_owned(),
            identity,
            lock_wait_floor: DEFAULT_LOCK_WAIT_FLOOR,
            claims: std::sync::Arc::default(),
            ends: std::sync::Arc::default(),
            paced: std::sync::Arc::default(),
        })
    }

    /// The same store with another floor for lock waits: every operation may wait at least this long
    /// for another process's write lock (default [`DEFAULT_LOCK_WAIT_FLOOR`]).
    pub fn with_lock_wait_floor(mut self, floor: Duration) -> Self {
        self.lock_wait_floor = floor;
        self
    }

    /// Runs the claims of `claims` in one transaction, waiting for the lock until `deadline`, each as
    /// [`claim`](Self::claim) would.
    fn claim_all(
        &self,
        claims: &batch::Claims,
        deadline: Instant,
        clock: &dyn Clock,
    ) -> batch::Written<Result<Option<Claimed>>> {
        let all = self.write_by("claiming keys", deadline, |transaction| {
            claims
                .iter()
                .map(|claim| claim_in(transaction, &claim.item, clock, &self.paced))
                .collect::<rusqlite::Result<Vec<_>>>()
        });
        written(all, claims.len())
    }

    /// Ends the leases of `ends` in one transaction, waiting for the lock until `deadline`, each as
    /// [`end_lease`](Self::end_lease) would.
    fn end_leases(&self, ends: &batch::Ends, deadline: Instant) -> batch::Written<Result<bool>> {
        let all = self.write_by("ending leases", deadline, |transaction| {
            ends.iter().map(|end| end_in(transaction, &end.item)).collect::<rusqlite::Result<Vec<bool>>>()
        });
        written(all, ends.len())
    }

    /// Runs `f` on a connection; reads run beside the writer in WAL mode and wait (up to the floor)
    /// only while a checkpoint or recovery briefly locks the file.
    fn read<T>(
        &self,
        operation: &'static str,
        f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let connection = self.connection(operation)?;
        let failed = |error| schema::classify(&self.path, operation, error);
        schema::wait_for_lock(&connection, Instant::now() + self.lock_wait_floor).map_err(failed)?;
        f(&connection).map_err(failed)
    }

    /// Runs `f` in a `BEGIN IMMEDIATE` transaction, waiting for another process's write lock until
    /// `deadline` (`None`: now), but never less than the store's floor; then [`Error::DatabaseLocked`].
    fn write<T>(
        &self,
        operation: &'static str,
        deadline: Option<Instant>,
        f: impl FnMut(&Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let floor = Instant::now() + self.lock_wait_floor;
        self.write_by(operation, deadline.map_or(floor, |deadline| deadline.max(floor)), f)
    }

    /// Runs `f` in a `BEGIN IMMEDIATE` transaction, waiting for another process's write lock until
    /// `deadline` exactly (the busy handler stops there); then [`Error::DatabaseLocked`]. A wait of
    /// over a second is logged once, while it lasts.
    fn write_by<T>(
        &self,
        operation: &'static str,
        deadline: Instant,
        mut f: impl FnMut(&Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let mut connection = self.connection(operation)?;
        let started = Instant::now();
        let failed = |error| schema::classify(&self.path, operation, error);
        let mut warned = false;
        schema::note_write();
        loop {
            // In slices, so a long wait is said in the log while it lasts.
            schema::wait_for_lock(&connection, deadline.min(Instant::now() + WAIT_SLICE)).map_err(failed)?;
            let result = connection.transaction_with_behavior(TransactionBehavior::Immediate).and_then(|transaction| {
                let value = f(&transaction)?;
                transaction.commit()?;
                Ok(value)
            });
            match result {
                Ok(value) => return Ok(value),
                Err(error) if schema::is_busy(&error) => {
                    let waited = started.elapsed();
                    if Instant::now() >= deadline {
                        return Err(self.locked(operation, waited));
                    }
                    if !warned && waited >= Duration::from_secs(1) {
                        warned = true;
                        tracing::warn!(
                            path = %self.path.display(), operation, waited = ?waited,
                            "database stays locked by another process; waiting (find it with `fuser`)"
                        );
                    }
                }
                Err(error) => return Err(failed(error)),
            }
        }
    }

    /// What `connector`'s claims pace by at `now`, if anything (see [`crate::store::paced::Paced::of`]).
    fn pacing_of(&self, connector: &str, now: i64) -> Option<std::sync::Arc<Pacing>> {
        self.paced.of(connector, || self.read_lessons(now))
    }

    /// The learned limits not yet forgotten at `now`.
    fn read_lessons(&self, now: i64) -> Result<super::paced::Lessons> {
        self.read("reading learned limits", |connection| pacing::learned(connection, now))
    }

    /// The error of an operation that waited `waited` for another process's write lock in vain.
    fn locked(&self, operation: &'static str, waited: Duration) -> Error {
        Error::DatabaseLocked { path: self.path.clone(), operation, waited }
    }

    /// The deadline of a holder's own bookkeeping writes (see [`HOLDER_PATIENCE`]).
    fn holder_deadline(&self) -> Instant {
        Instant::now() + self.lock_wait_floor.saturating_mul(HOLDER_PATIENCE)
    }

    /// A pooled connection, once the path is known to still lead to the file this process opened.
    fn connection(&self, operation: &'static str) -> Result<r2d2::PooledConnection<SqliteConnectionManager>> {
        if let Some(what) = self.identity.lost_at(&self.path) {
            return Err(Error::DatabaseReplaced { path: self.path.clone(), what });
        }
        self.pool.get().map_err(|error| Error::Database {
            path: self.path.clone(),
            operation,
            hint: "",
            source: Box::new(error),
        })
    }
}

impl Backend for Sqlite {
    fn example_queries(&self) -> String {
        examples::example_queries()
    }

    fn lock_deadline(&self, asked: Instant, deadline: Instant) -> Instant {
        deadline.max(asked + self.lock_wait_floor)
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn schema_version(&self) -> Result<i64> {
        self.read("reading the schema version", |connection| {
            connection.pragma_query_value(None, "user_version", |row| row.get(0))
        })
    }

    fn sync_keys(&self, source: &SyncSource<'_>, now: i64) -> Result<SyncReport> {
        let pending = self.read("reading the keys", |connection| plan_sync(connection, source))?;
        if pending.is_empty() {
            return Ok(pending);
        }
        self.write("syncing the keyring", None, |transaction| {
            // Plan again under the write lock: another process may have synced in between.
            let mut plan = plan_sync(transaction, source)?;
            plan.transitions = apply_sync(transaction, source, &plan, now)?;
            Ok(plan)
        })
    }

    fn claim(
        &self,
        request: ClaimFor<'_>,
        holder: &Holder,
        clock: &dyn Clock,
        deadline: Instant,
    ) -> Result<Option<Claimed>> {
        let pacing = self.pacing_of(request.connector, clock.now_ms());
        self.claims.commit(
            batch::Claim::new(request, holder).paced(pacing),
            deadline,
            |claims, deadline| self.claim_all(claims, deadline, clock),
            |claim| Err(self.locked("claiming a key", claim.waited())),
        )
    }

    fn declare_limits(&self, connector: &str, limits: Option<std::sync::Arc<Limits>>, now: i64) {
        self.paced.declare(connector, limits, || self.read_lessons(now));
    }

    fn declared_limits(&self, connector: &str) -> Option<std::sync::Arc<Limits>> {
        self.paced.declared(connector)
    }

    fn paces_tokens(&self, connector: &str, now: i64) -> bool {
        // What the claim will pace by, read as the claim will read it: a lesson learned by another
        // process is seen here no later than by the claim.
        self.pacing_of(connector, now).is_some_and(|pacing| pacing.paces_tokens())
    }

    fn claim_several(
        &self,
        request: ClaimFor<'_>,
        count: usize,
        holder: &Holder,
        clock: &dyn Clock,
        deadline: Instant,
    ) -> Result<Vec<Claimed>> {
        let claim = batch::Claim::new(request, holder).paced(self.pacing_of(request.connector, clock.now_ms()));
        self.write_by("claiming keys", deadline, |transaction| {
            let mut claimed = Vec::with_capacity(count);
            while claimed.len() < count {
                match claim_in(transaction, &claim, clock, &self.paced)? {
                    Some(one) => claimed.push(one),
                    None => break,
                }
            }
            Ok(claimed)
        })
    }

    fn end_lease(&self, id: i64, lease: i64, fate: &Fate, attempt: Option<&Attempt>, now: i64) -> Result<bool> {
        let ended = self.ends.commit(
            batch::End::new(id, lease, fate, attempt, now)
                .settling(attempt.is_some_and(|attempt| self.paced.paces(&attempt.connector))),
            self.holder_deadline(),
            |ends, deadline| self.end_leases(ends, deadline),
            |end| Err(self.locked("ending a lease", end.waited())),
        );
        if matches!(fate, Fate::Lockdown(lockdown) if !lockdown.taught.is_empty()) && ended.is_ok() {
            // What this answer taught paces this process's next claims, not a second later.
            self.paced.read_again();
        }
        ended
    }

    fn confirm_error(&self, id: i64, lease: i64, fate: &Fate, now: i64) -> Result<bool> {
        let Fate::Error { reason, http_status, project } = fate else { return Ok(false) };
        self.write("putting a key in error", Some(self.holder_deadline()), |transaction| {
            let released = transaction
                .prepare_cached(&format!(
                    "SELECT connector, key_name, fingerprint, state, quota_scope FROM keys k
                      WHERE id = ?1 AND lease = ?2 AND {unheld}",
                    unheld = rule_sql::unheld("k")
                ))?
                .query_row(params![id, lease], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, String>(2)?,
                        row.get(3)?,
                        row.get(4)?,
                    ))
                })
                .optional()?;
            let Some((connector, key_name, fingerprint, from_state, quota_scope)) = released else { return Ok(false) };
            transaction
                .prepare_cached(
                    "UPDATE keys SET state = 'error', lockdown_until = NULL, reason = ?2, http_status = ?3,
                            project_learned = coalesce(?4, project_learned)
                      WHERE id = ?1",
                )?
                .execute(params![id, reason, http_status, project])?;
            if project.is_some() {
                requeue(transaction, id)?;
            }
            let from_state: String = from_state;
            let quota_scope: String = quota_scope;
            let transition = NewTransition {
                holder_pid: Some(std::process::id()),
                lease: Some(lease),
                http_status: *http_status,
                quota_scope: Some(&quota_scope),
                ..NewTransition::new(
                    HistoryEvent::Errored,
                    (&connector, &key_name, &fingerprint),
                    Some(&from_state),
                    "error",
                    reason,
                )
            };
            record(transaction, now, &transition)?;
            Ok(true)
        })
    }

    fn record_attempt(&self, attempt: &Attempt) -> Result<()> {
        self.write("recording a request", Some(self.holder_deadline()), |transaction| {
            insert_attempt(transaction, attempt)
        })
    }

    fn reset_escalation(&self, id: i64, lease: i64, model: Option<&str>, now: i64) -> Result<bool> {
        self.write("resetting a key's lockdown count", Some(self.holder_deadline()), |transaction| {
            let held = transaction
                .prepare_cached(
                    "UPDATE keys SET lockdown_count = 0 WHERE id = ?1 AND lease = ?2 AND state = 'locked'
                     RETURNING connector, quota_scope, key_name",
                )?
                .query_row(params![id, lease], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, String>(2)?))
                })
                .optional()?;
            let Some((connector, quota_scope, key_name)) = held else { return Ok(false) };
            transaction.prepare_cached(&expired_lockdowns_of_key())?.execute(params![
                connector,
                quota_scope,
                key_name,
                model,
                now
            ])?;
            Ok(true)
        })
    }

    fn is_locked_down_for(&self, id: i64, model: &str, now: i64) -> Result<bool> {
        self.read("reading a key's lockdowns", |connection| {
            connection
                .prepare_cached(&format!(
                    "SELECT {} FROM keys k WHERE k.id = ?1",
                    rule_sql::locked_down_for(&KeyCols::row("k"), "?2", "?3")
                ))?
                .query_row(params![id, model, now], |row| row.get(0))
        })
    }

    fn reserve_held(
        &self,
        (connector, id, lease): (&str, i64, i64),
        model: &str,
        tokens: u64,
        now: i64,
    ) -> Result<bool> {
        let Some(pacing) = self.pacing_of(connector, now) else { return Ok(true) };
        self.write("reserving for a kept key", None, |transaction| {
            let held = transaction
                .prepare_cached(
                    "SELECT key_name, quota_scope FROM keys WHERE id = ?1 AND lease = ?2 AND state = 'locked'",
                )?
                .query_row(params![id, lease], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)))
                .optional()?;
            let Some((key_name, scope)) = held else { return Ok(false) };
            let reservation =
                pacing::Reservation { connector, scope: &scope, model, key_name: &key_name, lease, tokens };
            let binding = pacing.binding(&scope, model, now);
            match pacing::reserve(transaction, &reservation, (&binding, pacing.longest_reach(now)), now)? {
                Ok(()) => Ok(true),
                Err(full) => {
                    pacing::lock_down(transaction, &reservation, &full, now)?;
                    Ok(false)
                }
            }
        })
    }

    fn lockdowns(&self, connector: Option<&str>) -> Result<Vec<LockdownRecord>> {
        self.read("reading lockdowns", |connection| {
            let mut statement = connection.prepare_cached(
                "SELECT connector, scope, model, until, quota_id, reason, http_status, set_by_key, set_at, strikes
                   FROM lockdowns WHERE ?1 IS NULL OR connector = ?1 ORDER BY connector, scope, model",
            )?;
            all(&mut statement, params![connector], |row| {
                Ok(LockdownRecord {
                    connector: row.get(0)?,
                    scope: word(row, 1)?,
                    model: word(row, 2)?,
                    until: row.get(3)?,
                    quota_id: row.get(4)?,
                    reason: row.get(5)?,
                    http_status: row.get(6)?,
                    set_by_key: row.get(7)?,
                    set_at: row.get(8)?,
                    strikes: row.get(9)?,
                })
            })
        })
    }

    fn watch_changes(&self) -> Result<Box<dyn ChangeWatch>> {
        let connection = self.connection("watching for changes")?;
        let mut watch = DataVersionWatch { connection, version: None, path: self.path.clone() };
        watch.changed()?;
        Ok(Box::new(watch))
    }

    fn attempts(&self, connector: Option<&str>) -> Result<Vec<Attempt>> {
        self.read("reading requests", |connection| {
            let mut statement = connection.prepare_cached(
                "SELECT at, connector, key_name, method, endpoint, status, latency_ms, outcome, model, prompt_tokens
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
                    outcome: word(row, 7)?,
                    model: row.get(8)?,
                    prompt_tokens: row.get::<_, Option<i64>>(9)?.and_then(|tokens| u64::try_from(tokens).ok()),
                })
            })
        })
    }

    fn heartbeat(&self, leases: &[(i64, i64)], clock: &dyn Clock) -> Result<(Vec<(i64, i64)>, i64)> {
        if leases.is_empty() {
            return Ok((Vec::new(), clock.boot_ms()));
        }
        let leases = serde_json::to_string(leases).unwrap_or_else(|_| "[]".to_owned());
        self.write("refreshing heartbeats", Some(self.holder_deadline()), |transaction| {
            let (now, boot_ms) = (clock.now_ms(), clock.boot_ms());
            let mut statement = transaction.prepare_cached(
                "UPDATE keys SET heartbeat_at = ?1, heartbeat_boot_ms = ?2
                  WHERE state = 'locked'
                    AND (id, lease) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?3))
              RETURNING id, lease",
            )?;
            let held = all(&mut statement, params![now, boot_ms, leases], |row| Ok((row.get(0)?, row.get(1)?)))?;
            Ok((held, boot_ms))
        })
    }

    fn held_keys(&self, connector: Option<&str>) -> Result<Vec<HeldKey>> {
        self.read("reading held keys", |connection| {
            let mut statement = connection.prepare_cached(
                "SELECT id, connector, key_name, lease, holder_host, holder_boot_id, holder_pid_namespace, holder_pid,
                        holder_started, heartbeat_at, heartbeat_boot_ms
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
                    heartbeat_at: row.get(9)?,
                    heartbeat_boot_ms: row.get(10)?,
                    heartbeat_age_on_server_ms: None,
                })
            })
        })
    }

    fn evict(&self, evictions: &[Eviction], now: i64) -> Result<Vec<Transition>> {
        if evictions.is_empty() {
            return Ok(Vec::new());
        }
        self.write("freeing locks", None, |transaction| {
            let mut written = Vec::new();
            for eviction in evictions {
                let freed = transaction
                    .prepare_cached(&format!(
                        "UPDATE keys
                            SET state = CASE WHEN {end} IS NOT NULL THEN 'lockdown' ELSE 'vacant' END,
                                lockdown_until = {end},
                                holder_host = NULL, holder_boot_id = NULL, holder_pid_namespace = NULL,
                                holder_pid = NULL, holder_started = NULL, locked_at = NULL, heartbeat_at = NULL,
                                heartbeat_boot_ms = NULL
                          WHERE id = ?1 AND lease = ?2 AND state = 'locked'
                            AND heartbeat_at IS ?4 AND heartbeat_boot_ms IS ?5
                      RETURNING connector, key_name, fingerprint, state, lockdown_until",
                        end = rule_sql::whole_lockdown_end(&KeyCols::row("keys"), "?3")
                    ))?
                    .query_row(
                        params![eviction.id, eviction.lease, now, eviction.heartbeat_at, eviction.heartbeat_boot_ms],
                        |row| {
                            let key: (String, String, String) = (row.get(0)?, row.get(1)?, row.get(2)?);
                            Ok((key, row.get::<_, String>(3)?, row.get(4)?))
                        },
                    )
                    .optional()?;
                if let Some(((connector, key_name, fingerprint), state, until)) = freed {
                    written.push(record(
                        transaction,
                        now,
                        &NewTransition {
                            lease: Some(eviction.lease),
                            lockdown_until: until,
                            ..NewTransition::new(
                                eviction.event,
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

    fn clear_lockdowns_and_errors(&self, connector: Option<&str>, now: i64) -> Result<Vec<Transition>> {
        self.write("cleaning up keys", None, |transaction| {
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
            transaction
                .prepare_cached("DELETE FROM lockdowns WHERE ?1 IS NULL OR connector = ?1")?
                .execute(params![connector])?;
            let mut written = Vec::new();
            for (id, (key_connector, key_name, fingerprint), state) in targets {
                statement.execute(params![id])?;
                written.push(record(
                    transaction,
                    now,
                    &NewTransition::new(
                        HistoryEvent::CleanedUp,
                        (&key_connector, &key_name, &fingerprint),
                        Some(&state),
                        "vacant",
                        "cleanup",
                    ),
                )?);
            }
            Ok(written)
        })
    }

    fn availability(
        &self,
        ClaimFor { connector, model, tried, pin, .. }: ClaimFor<'_>,
        now: i64,
    ) -> Result<Availability> {
        let tried = json_list(tried);
        self.read("reading key availability", |connection| {
            connection
                .prepare_cached(&format!(
                    "SELECT coalesce(sum(usable AND NOT was_tried), 0), coalesce(sum(live AND state = 'locked'), 0),
                        coalesce(sum(live AND free AND whole_until IS NOT NULL), 0),
                        coalesce(sum(live AND state = 'error'), 0), coalesce(sum(usable AND was_tried), 0),
                        min(CASE WHEN live AND free AND NOT usable
                                 THEN max(coalesce(whole_until, 0), coalesce(model_until, 0)) END),
                        coalesce(sum(NOT live), 0), max(retired_at),
                        coalesce(sum(live AND free AND whole_until IS NULL AND model_until IS NOT NULL), 0),
                        min(CASE WHEN live AND free AND whole_until IS NULL THEN model_until END)
                   FROM (SELECT state, retired_at, live, free, whole_until, model_until, was_tried, usable
                           FROM (SELECT k.state, k.retired_at, k.retired_at IS NULL AS live, {usable} AS usable,
                                        {unheld} AS free,
                                        nullif(max(coalesce({own}, 0), coalesce({whole}, 0)), 0) AS whole_until,
                                        {model_until} AS model_until,
                                        k.key_name IN (SELECT value FROM json_each(?3)) AS was_tried
                                   FROM keys k WHERE k.connector = ?1 AND (?5 IS NULL OR k.quota_scope = ?5)))",
                    unheld = rule_sql::unheld("k"),
                    own = rule_sql::own_lockdown_end("k", "?2"),
                    whole = rule_sql::whole_lockdown_end(&KeyCols::row("k"), "?2"),
                    model_until = rule_sql::model_lockdown_end(&KeyCols::row("k"), "?4", "?2"),
                    usable = rule_sql::free_for("k", "?4", "?2"),
                ))?
                .query_row(params![connector, now, tried, model, pin], |row| {
                    Ok(Availability {
                        connector: connector.to_owned(),
                        claimable: row.get(0)?,
                        locked: row.get(1)?,
                        lockdown: row.get(2)?,
                        error: row.get(3)?,
                        tried: row.get(4)?,
                        earliest_lockdown_end: row.get(5)?,
                        retired: row.get(6)?,
                        last_retired_at: row.get(7)?,
                        last_retired_reason: None,
                        model: model.map(str::to_owned),
                        model_lockdown: row.get(8)?,
                        earliest_model_lockdown_end: row.get(9)?,
                        model_lockdown_quota: None,
                    })
                })
                .and_then(|mut availability| {
                    // Only when no key is left: say what emptied the pool (the waiters' polls skip this).
                    if availability.total() == 0 && availability.retired > 0 {
                        availability.last_retired_reason = connection
                            .prepare_cached(
                                "SELECT reason FROM history
                                  WHERE connector = ?1 AND to_state = 'retired'
                                    AND key_name = (SELECT key_name FROM keys WHERE connector = ?1
                                                     ORDER BY retired_at DESC LIMIT 1)
                                  ORDER BY at DESC, id DESC LIMIT 1",
                            )?
                            .query_row(params![connector], |row| row.get(0))
                            .optional()?;
                    }
                    if availability.claimable == 0 && availability.model_lockdown > 0 {
                        availability.model_lockdown_quota = connection
                            .prepare_cached(&format!(
                                "SELECT coalesce(quota_id, reason) FROM lockdowns
                                  WHERE connector = ?1 AND model = ?2 AND {} ORDER BY until LIMIT 1",
                                rule_sql::in_force("lockdowns", "?3")
                            ))?
                            .query_row(params![connector, model, now], |row| row.get(0))
                            .optional()?;
                    }
                    Ok(availability)
                })
        })
    }

    fn keys(&self, connector: Option<&str>) -> Result<Vec<KeyRecord>> {
        self.read("reading keys", |connection| {
            let mut statement = connection.prepare_cached(&format!(
                "SELECT {KEY_COLUMNS} FROM keys WHERE ?1 IS NULL OR connector = ?1 ORDER BY connector, key_name"
            ))?;
            all(&mut statement, params![connector], key_record)
        })
    }

    fn history(&self, query: &HistoryQuery) -> Result<Vec<Transition>> {
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

    fn usage(&self, query: &crate::pool::usage::UsageQuery) -> Result<Vec<crate::pool::usage::UsageRow>> {
        self.read("reading usage", |connection| usage::usage(connection, query))
    }

    fn has_older(&self, journal: Journal, before: i64) -> Result<bool> {
        self.read("looking for rows past retention", |connection| prune::has_older(connection, journal, before))
    }

    fn prune_batch(&self, journal: Journal, before: i64, batch: u32) -> Result<(u64, Duration)> {
        self.write("pruning old rows", None, |transaction| {
            let started = Instant::now();
            let deleted = prune::prune_batch(transaction, journal, before, batch)?;
            Ok((deleted, started.elapsed()))
        })
    }

    fn record_resources(&self, connector: &str, key_name: &str, created: &[Created], now: i64) -> Result<usize> {
        self.write("recording resources", None, |transaction| {
            resources::record(transaction, connector, key_name, created, now)
        })
    }

    fn used_since(&self, (connector, scope, model): (&str, &str, &str), measure: Measure, since: i64) -> Result<u64> {
        self.read("reading reservations", |connection| {
            pacing::used_since(connection, (connector, scope, model), measure, since)
        })
    }

    fn learned_limits(&self, connector: &str, now: i64) -> Result<Vec<LearnedLimit>> {
        let all = self.read_lessons(now)?;
        Ok(all.into_iter().filter(|(of, ..)| of == connector).map(|(_, learned, _)| learned).collect())
    }

    fn reserved_models(&self, connector: &str, since: i64) -> Result<Vec<(String, String)>> {
        self.read("reading reservations", |connection| pacing::reserved_models(connection, connector, since))
    }

    fn resource_owner(&self, connector: &str, names: &[String], now: i64) -> Result<Option<Owner>> {
        self.read("reading resource owners", |connection| resources::owner(connection, connector, names, now))
    }

    fn explain_claim(&self) -> Result<Vec<String>> {
        self.read("explaining the claim", |connection| {
            let mut statement = connection.prepare(&format!("EXPLAIN QUERY PLAN {}", *CLAIM))?;
            let params = params!["c", 0, "h", "b", 1, 1, "[]", 0, "n", "m", Option::<&str>::None];
            all(&mut statement, params, |row| row.get::<_, String>(3))
        })
    }
}

/// A connection kept to see other connections' commits, by SQLite's `data_version`.
struct DataVersionWatch {
    connection: r2d2::PooledConnection<SqliteConnectionManager>,
    version: Option<i64>,
    path: PathBuf,
}

impl ChangeWatch for DataVersionWatch {
    fn changed(&mut self) -> Result<bool> {
        let version = self
            .connection
            .pragma_query_value(None, "data_version", |row| row.get::<_, i64>(0))
            .map_err(|error| schema::classify(&self.path, "watching for changes", error))?;
        Ok(self.version.replace(version) != Some(version))
    }
}

impl std::fmt::Debug for DataVersionWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataVersionWatch").field("version", &self.version).finish_non_exhaustive()
    }
}

/// A batch's answers from its transaction's result: each item's own when it was written; when the
/// lock never came, [`batch::Written::Busy`]; when it failed otherwise, the one item's error, or for
/// several [`batch::Written::Failed`] so each is written again alone.
fn written<A>(all: Result<Vec<A>>, items: usize) -> batch::Written<Result<A>> {
    match all {
        Ok(answers) => batch::Written::Answers(answers.into_iter().map(Ok).collect()),
        Err(Error::DatabaseLocked { .. }) => batch::Written::Busy,
        Err(error) if items == 1 => batch::Written::Answers(vec![Err(error)]),
        Err(_) => batch::Written::Failed,
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

/// Runs one claim in `transaction` (see `Backend::claim`), with times read from `clock` now.
fn claim_in(
    transaction: &Transaction<'_>,
    claim: &batch::Claim,
    clock: &dyn Clock,
    paced: &crate::store::paced::Paced,
) -> rusqlite::Result<Option<Claimed>> {
    let now = clock.now_ms();
    // A request for the model `*` (no upstream has one) is not paced: its lockdown would stop every model.
    let model = claim.model.as_deref().filter(|model| *model != ModelScope::EVERY);
    let (Some(pacing), Some(model)) = (&claim.pacing, model) else {
        let Some((claimed, lesson)) = claim_one(transaction, claim, (now, clock.boot_ms()))? else { return Ok(None) };
        // The first claim to see a lesson this process has not read goes out unpaced (it cannot be
        // refused without a savepoint every claim would pay for), but counts in the window.
        if paced.seen(&claim.connector, lesson)
            && let Some(model) = model
        {
            pacing::record(transaction, &reservation_of(claim, &claimed, model), now)?;
        }
        return Ok(Some(claimed));
    };
    // Paced: a key whose scope has no room for the model is given back and its scope locked down
    // for the model until it has, and the claim looks again (each turn locks one scope more).
    loop {
        transaction.execute_batch("SAVEPOINT paced_claim")?;
        let Some((claimed, lesson)) = claim_one(transaction, claim, (now, clock.boot_ms()))? else {
            transaction.execute_batch("RELEASE paced_claim")?;
            return Ok(None);
        };
        paced.seen(&claim.connector, lesson);
        let binding = pacing.binding(&claimed.scope, model, now);
        let reservation = reservation_of(claim, &claimed, model);
        match pacing::reserve(transaction, &reservation, (&binding, pacing.longest_reach(now)), now)? {
            Ok(()) => {
                transaction.execute_batch("RELEASE paced_claim")?;
                return Ok(Some(claimed));
            }
            Err(full) => {
                transaction.execute_batch("ROLLBACK TO paced_claim; RELEASE paced_claim")?;
                pacing::lock_down(transaction, &reservation, &full, now)?;
            }
        }
    }
}

/// The reservation of `claimed` for `model`.
fn reservation_of<'a>(claim: &'a batch::Claim, claimed: &'a Claimed, model: &'a str) -> pacing::Reservation<'a> {
    pacing::Reservation {
        connector: &claim.connector,
        scope: &claimed.scope,
        model,
        key_name: &claimed.key_name,
        lease: claimed.lease,
        tokens: claim.tokens,
    }
}

/// One claim statement and its history row (see `claim_in`), with the connector's latest lesson time
/// (`learned_limits.learned_at`), which the statement returns.
fn claim_one(
    transaction: &Transaction<'_>,
    claim: &batch::Claim,
    (now, boot_ms): (i64, i64),
) -> rusqlite::Result<Option<(Claimed, i64)>> {
    let (connector, model, tried, holder, pin) =
        (claim.connector.as_str(), claim.model.as_deref(), &claim.tried, &claim.holder, claim.pin.as_deref());
    let claimed = transaction
        .prepare_cached(&CLAIM)?
        .query_row(
            params![
                connector,
                now,
                holder.host,
                holder.boot_id,
                holder.pid,
                holder.started,
                tried,
                boot_ms,
                holder.pid_namespace,
                model,
                pin
            ],
            |row| {
                let claimed = Claimed {
                    id: row.get(0)?,
                    key_name: row.get(1)?,
                    fingerprint: row.get(2)?,
                    lease: row.get(3)?,
                    lockdown_count: row.get(6)?,
                    boot_ms,
                    scope: row.get(5)?,
                };
                let out_of_lockdown = row.get::<_, Option<i64>>(4)?.is_some();
                Ok((claimed, out_of_lockdown, row.get::<_, i64>(7)?))
            },
        )
        .optional()?;
    let Some((claimed, out_of_lockdown, lesson)) = claimed else { return Ok(None) };
    record(
        transaction,
        now,
        &NewTransition {
            holder_pid: Some(holder.pid),
            lease: Some(claimed.lease),
            model,
            quota_scope: Some(&claimed.scope),
            ..NewTransition::new(
                HistoryEvent::Claimed,
                (connector, &claimed.key_name, &claimed.fingerprint),
                Some(if out_of_lockdown { "lockdown" } else { "vacant" }),
                "locked",
                "claimed",
            )
        },
    )?;
    Ok(Some((claimed, lesson)))
}

/// Deletes the lockdowns of key `(?1 connector, ?2 quota scope, ?3 name)` covering model `?4` whose
/// deadline passed at `?5`: after a success for that model, its strikes start again at 0.
fn expired_lockdowns_of_key() -> String {
    let lockdowns = "lockdowns";
    format!(
        "DELETE FROM lockdowns WHERE {scopes} AND {covers} AND NOT {in_force}",
        scopes = rule_sql::on_scopes_of(lockdowns, &KeyCols::given("?1", "?2", "?3")),
        covers = rule_sql::covers(lockdowns, "?4"),
        in_force = rule_sql::in_force(lockdowns, "?5")
    )
}

/// Ends one lease in `transaction` (see `Backend::end_lease`): `Ok(false)` when it was already lost.
fn end_in(transaction: &Transaction<'_>, end: &batch::End) -> rusqlite::Result<bool> {
    let (id, lease, fate, attempt, now) = (end.id, end.lease, &end.fate, end.attempt.as_ref(), end.now);
    if let Some(attempt) = attempt {
        insert_attempt(transaction, attempt)?;
        if let (true, Some(key_name), Some(tokens)) = (end.settles, &attempt.key_name, attempt.prompt_tokens) {
            pacing::settle(transaction, (&attempt.connector, key_name, lease), tokens)?;
        }
    }
    let held = transaction
        .prepare_cached(
            "SELECT connector, key_name, fingerprint FROM keys WHERE id = ?1 AND lease = ?2 AND state = 'locked'",
        )?
        .query_row(params![id, lease], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, String>(2)?))
        })
        .optional()?;
    let Some((connector, key_name, fingerprint)) = held else { return Ok(false) };
    let key: (&str, &str, &str) = (&connector, &key_name, &fingerprint);
    let project = match fate {
        Fate::Lockdown(lockdown) => lockdown.project.as_deref(),
        Fate::Error { project, .. } => project.as_deref(),
        Fate::Release { .. } => None,
    };
    if let Some(project) = project {
        transaction
            .prepare_cached("UPDATE keys SET project_learned = ?2 WHERE id = ?1")?
            .execute(params![id, project])?;
        requeue(transaction, id)?;
    }
    let key_scope: String =
        transaction.prepare_cached("SELECT quota_scope FROM keys WHERE id = ?1")?.query_row([id], |row| row.get(0))?;
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
            lockdown_scope = set_lockdown(transaction, key, id, &key_scope, lockdown, now)?;
            if !lockdown.taught.is_empty() {
                let until = limit::next_pacific_midnight(now);
                let lesson = (connector.as_str(), lockdown_scope.as_str(), key_name.as_str(), lease);
                pacing::learn(transaction, lesson, &lockdown.taught, (now, until))?;
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
                transaction
                    .prepare_cached(&expired_lockdowns_of_key())?
                    .execute(params![connector, key_scope, key_name, model, now])?;
            }
            transition.model = model;
        }
    }
    let (state, until) = transaction
        .prepare_cached(&format!(
            "UPDATE keys
                    SET state = CASE WHEN ?2 = 'error' THEN 'error'
                                     WHEN {end} IS NOT NULL THEN 'lockdown' ELSE 'vacant' END,
                        lockdown_until = CASE WHEN ?2 = 'error' THEN NULL ELSE {end} END,
                        reason = coalesce(?4, reason), http_status = CASE WHEN ?4 IS NULL THEN http_status ELSE ?5 END,
                        lockdown_count = CASE WHEN ?6 THEN lockdown_count + 1 WHEN ?7 THEN 0 ELSE lockdown_count END,
                        holder_host = NULL, holder_boot_id = NULL, holder_pid_namespace = NULL, holder_pid = NULL,
                        holder_started = NULL, locked_at = NULL, heartbeat_at = NULL, heartbeat_boot_ms = NULL
                  WHERE id = ?1
              RETURNING state, lockdown_until",
            end = rule_sql::whole_lockdown_end(&KeyCols::row("keys"), "?3")
        ))?
        .query_row(
            params![
                id,
                transition.to_state,
                now,
                (transition.to_state == "error" || matches!(fate, Fate::Lockdown(_))).then_some(transition.reason),
                transition.http_status,
                matches!(fate, Fate::Lockdown(_)),
                matches!(fate, Fate::Release { success: true })
            ],
            |row| Ok((row.get::<_, String>(0)?, row.get::<_, Option<i64>>(1)?)),
        )?;
    transition.to_state = &state;
    if transition.lockdown_until.is_none() {
        transition.lockdown_until = until;
    }
    record(transaction, now, &transition)?;
    Ok(true)
}

/// Puts key `id` behind the lockdowns of its (new) scopes in the claim order, after its scope changed.
fn requeue(transaction: &Transaction<'_>, id: i64) -> rusqlite::Result<()> {
    transaction
        .prepare_cached(&format!(
            "UPDATE keys SET queue_at = max(queue_at, {}) WHERE id = ?1",
            rule_sql::latest_lockdown_end(&KeyCols::row("keys"))
        ))?
        .execute([id])?;
    Ok(())
}

/// Records `lockdown`, set by the answer key `key` (row `id`, scope `key_scope`) got, on its scope, and
/// pushes the keys of that scope back in the claim order until it ends. A lockdown of every model of a
/// group also puts the group's other free keys in lockdown, each with a history row. Returns the scope.
fn set_lockdown(
    transaction: &Transaction<'_>,
    key: (&str, &str, &str),
    id: i64,
    key_scope: &str,
    lockdown: &Lockdown,
    now: i64,
) -> rusqlite::Result<String> {
    let (connector, key_name, _) = key;
    let scope = match lockdown.reach {
        Reach::Key => Scope::Key(key_name.to_owned()).to_string(),
        Reach::Group => key_scope.to_owned(),
    };
    let every_model = [ModelScope::EVERY.to_owned()];
    let models = if lockdown.models.is_empty() { &every_model[..] } else { &lockdown.models[..] };
    let mut upsert = transaction.prepare_cached(
        "INSERT INTO lockdowns (connector, scope, model, until, quota_id, reason, http_status, set_by_key, set_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (connector, scope, model) DO UPDATE SET
             strikes = strikes + 1,
             quota_id = CASE WHEN excluded.until >= until THEN excluded.quota_id ELSE quota_id END,
             reason = CASE WHEN excluded.until >= until THEN excluded.reason ELSE reason END,
             http_status = CASE WHEN excluded.until >= until THEN excluded.http_status ELSE http_status END,
             set_by_key = CASE WHEN excluded.until >= until THEN excluded.set_by_key ELSE set_by_key END,
             set_at = CASE WHEN excluded.until >= until THEN excluded.set_at ELSE set_at END,
             until = max(until, excluded.until)",
    )?;
    for model in models {
        upsert.execute(params![
            connector,
            scope,
            model,
            lockdown.until,
            lockdown.quota_id,
            lockdown.reason,
            lockdown.http_status,
            key_name,
            now
        ])?;
    }
    if lockdown.reach == Reach::Key || scope != key_scope {
        transaction
            .prepare_cached("UPDATE keys SET queue_at = max(queue_at, ?2) WHERE id = ?1")?
            .execute(params![id, lockdown.until])?;
        return Ok(scope);
    }
    transaction
        .prepare_cached("UPDATE keys SET queue_at = max(queue_at, ?3) WHERE connector = ?1 AND quota_scope = ?2")?
        .execute(params![connector, scope, lockdown.until])?;
    if !lockdown.models.is_empty() {
        return Ok(scope);
    }
    let siblings = transaction
        .prepare_cached(&format!(
            "SELECT id, key_name, fingerprint, state FROM keys
              WHERE connector = ?1 AND quota_scope = ?2 AND id != ?3 AND retired_at IS NULL
                AND {unheld} AND coalesce(lockdown_until, 0) < ?4",
            unheld = rule_sql::unheld("keys")
        ))?
        .query_map(params![connector, scope, id, lockdown.until], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?, row.get::<_, String>(2)?, row.get::<_, String>(3)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let reason = format!("{scope} locked down for every model by {key_name}'s answer: {}", lockdown.reason);
    for (sibling, name, fingerprint, state) in siblings {
        transaction
            .prepare_cached("UPDATE keys SET state = 'lockdown', lockdown_until = ?2 WHERE id = ?1")?
            .execute(params![sibling, lockdown.until])?;
        record(
            transaction,
            now,
            &NewTransition {
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
            },
        )?;
    }
    Ok(scope)
}

fn insert_attempt(transaction: &Transaction<'_>, attempt: &Attempt) -> rusqlite::Result<()> {
    transaction
        .prepare_cached(
            "INSERT INTO requests (at, connector, key_name, method, endpoint, status, latency_ms, outcome, model,
                                   quota_scope, prompt_tokens)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9,
                     (SELECT quota_scope FROM keys WHERE connector = ?2 AND key_name = ?3), ?10)",
        )?
        .execute(params![
            attempt.at,
            attempt.connector,
            attempt.key_name,
            attempt.method,
            attempt.endpoint,
            attempt.status,
            attempt.latency_ms,
            attempt.outcome.to_string(),
            attempt.model,
            attempt.prompt_tokens.and_then(|tokens| i64::try_from(tokens).ok())
        ])?;
    Ok(())
}

fn record(transaction: &Transaction<'_>, at: i64, new: &NewTransition<'_>) -> rusqlite::Result<Transition> {
    transaction
        .prepare_cached(
            "INSERT INTO history (at, connector, key_name, fingerprint, from_state, to_state, reason, http_status,
                                  holder_pid, lease, lockdown_until, model, quota_scope, event)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
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
            new.lockdown_until,
            new.model,
            new.quota_scope,
            new.event.as_str()
        ])?;
    Ok(new.written(transaction.last_insert_rowid(), at))
}

/// The holder recorded in columns `first..first + 5` (host, boot id, pid namespace, pid, start time),
/// or `None` when no pid is recorded.
fn holder_at(row: &Row<'_>, first: usize) -> rusqlite::Result<Option<Holder>> {
    let Some(pid) = row.get::<_, Option<u32>>(first + 3)? else { return Ok(None) };
    Ok(Some(Holder {
        host: row.get::<_, Option<String>>(first)?.unwrap_or_default(),
        boot_id: row.get::<_, Option<String>>(first + 1)?.unwrap_or_default(),
        pid_namespace: row.get::<_, Option<String>>(first + 2)?.unwrap_or_default(),
        pid,
        started: row.get::<_, Option<i64>>(first + 4)?.unwrap_or_default(),
    }))
}

fn key_record(row: &Row<'_>) -> rusqlite::Result<KeyRecord> {
    Ok(KeyRecord {
        connector: row.get(0)?,
        key_name: row.get(1)?,
        fingerprint: row.get(2)?,
        state: word(row, 3)?,
        retired_at: row.get(4)?,
        lease: row.get(5)?,
        holder: holder_at(row, 6)?,
        locked_at: row.get(11)?,
        heartbeat_at: row.get(12)?,
        lockdown_until: row.get(13)?,
        reason: row.get(14)?,
        http_status: row.get(15)?,
        lockdown_count: row.get(16)?,
        uses: row.get(17)?,
        last_used_at: row.get(18)?,
        quota_group: row.get(19)?,
        project_learned: row.get(20)?,
        quota_scope: word(row, 21)?,
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
        model: row.get(12)?,
        quota_scope: row.get(13)?,
        event: word(row, 14)?,
    })
}

/// A word of the pool's vocabulary read from column `index`; text it does not know fails the read.
fn word<T>(row: &Row<'_>, index: usize) -> rusqlite::Result<T>
where
    T: std::str::FromStr<Err = UnknownWord>,
{
    let text: String = row.get(index)?;
    text.parse()
        .map_err(|error| rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, Box::new(error)))
}
