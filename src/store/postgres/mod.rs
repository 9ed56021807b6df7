//! The PostgreSQL backend, for pools shared by several hosts: every statement of the shared pool,
//! behind the store's seam (`Backend`); no PostgreSQL type shows outside this module.
//!
//! Invariants the statements keep (beside the seam's):
//! - Every write is one READ COMMITTED transaction. Concurrent claims run in parallel: the claim takes
//!   its key with `FOR UPDATE SKIP LOCKED` (never waiting on another claim's row), and a statement that
//!   locks several key rows locks them in id order first, so two writers never wait on each other in
//!   a cycle. A deadlock or serialization failure anyway is retried until the caller's deadline.
//! - A claim increments the key's lease; every later write by the holder is fenced by
//!   `state = 'locked' AND lease = $n`, as on SQLite.
//! - No wait is unbounded: each transaction's `lock_timeout` and `statement_timeout` end at the
//!   caller's deadline (never less than the store's floor); connecting has a timeout and connections
//!   TCP keepalives.
//! - Times are the callers' clocks, as on SQLite, except liveness: a claim and a heartbeat also record
//!   the server's `now()` (`heartbeat_db_at`), and a holder on another host is judged by that
//!   heartbeat's age on the server's clock, never by a client's wall clock.

mod connection;
mod schema;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::Row;
use postgres::error::SqlState;
use postgres::types::ToSql;

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::holder::Holder;
use crate::pool::*;
use crate::resource::{Created, Owner};

use super::location::PostgresUrl;
use super::paced::{Lessons, Paced};
use super::rule_sql::{self, KeyCols};
use super::transition::NewTransition;
use super::{Backend, ChangeWatch, ClaimFor, Journal};
pub use connection::DURABLE_COMMITS;
use connection::{Access, Connection, Manager, Tx, off_runtime};

/// The schema that holds the pool's tables on the server.
pub(crate) const SCHEMA: &str = "apijongler";

/// The scope watermarks' advisory lock of a connector (`migrations/postgres/0009_scope_watermark.sql`),
/// taken before any row: alone by a transaction that writes `lockdowns` or `learned_limits` (whose
/// triggers then mark held keys too, never waiting in a cycle), shared by one that recomputes watermarks
/// or deletes lockdowns (which must not wait for a writer's lockdown row while holding a key row).
///
/// Of connector `$1`, alone.
const WATERMARKS_ALONE: &str = "SELECT pg_advisory_xact_lock(1095388743, hashtext($1::text))";
/// Of the connector of key `$1` (read without locking its row), alone or shared.
const WATERMARKS_OF_KEY_ALONE: &str =
    "SELECT pg_advisory_xact_lock(1095388743, hashtext(connector)) FROM keys WHERE id = $1";
const WATERMARKS_OF_KEY_SHARED: &str =
    "SELECT pg_advisory_xact_lock_shared(1095388743, hashtext(connector)) FROM keys WHERE id = $1";
/// Of each connector named in `$1` (NULL: every connector with keys), shared, in name order.
const WATERMARKS_SHARED_OF: &str = "SELECT pg_advisory_xact_lock_shared(1095388743, hashtext(c))
   FROM (SELECT DISTINCT connector AS c FROM keys WHERE $1::text[] IS NULL OR connector = ANY($1)
         UNION SELECT unnest($1::text[]) ORDER BY 1) connectors";

/// The server's clock, unix ms, as of the transaction's start.
const SERVER_NOW: &str = "(extract(epoch from now()) * 1000)::bigint";

/// The server's clock, unix ms, as the statement runs: a renewal (a claim, a heartbeat) is recorded no
/// earlier than the holder read its own clock for it, before sending the statement. So the holder's trust
/// in its lease (measured from its reading) always ends before another host's reaper (measuring from
/// this record on the server's clock) may take the key, however long the transaction waited to start.
const SERVER_CLOCK: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// How many floors a holder's own bookkeeping may wait (as on SQLite: giving up costs more).
const HOLDER_PATIENCE: u32 = 3;

/// The PostgreSQL backend: one database on a server, shared by every process of every host.
#[derive(Debug, Clone)]
pub(crate) struct Postgres {
    pool: r2d2::Pool<Manager>,
    /// Connects outside the pool, to learn why the pool could not.
    direct: Manager,
    /// The server's URL, its password masked: what messages name.
    server: PathBuf,
    lock_wait_floor: Duration,
    paced: Arc<Paced>,
    unread: Arc<claim::UnreadForm>,
}

const KEY_COLUMNS: &str = "connector, key_name, fingerprint, state, retired_at, lease, holder_host, holder_boot_id,
     holder_pid_namespace, holder_pid, holder_started, locked_at, heartbeat_at, lockdown_until, reason, http_status,
     lockdown_count, uses, last_used_at, quota_group, project_learned, quota_scope";

const HISTORY_COLUMNS: &str =
    "id, at, connector, key_name, fingerprint, from_state, to_state, reason, http_status, holder_pid,
     lease, lockdown_until, model, quota_scope, event";

/// The claim: the least recently used key that is claimable and that no lockdown keeps from the model,
/// locked with a new lease, and its history row, in one statement (one round trip, committed on its
/// own where nothing paces the claim), walking `keys_lru` in order (the sort is the index's, so the
/// walk stops at the first free key). `SKIP LOCKED`: a key another claim is taking right now is passed
/// over, never waited for. `explain_claim` shows its plan.
///
/// The key is picked in a materialized expression of its own, whose one id the update then looks up by
/// primary key: written as `UPDATE ... WHERE id = (SELECT ... SKIP LOCKED)` inside a `WITH`, the
/// statement found no key now and then under concurrent claims while most keys were free (measured: 6
/// to 12 claims in 3 s of 16 sessions on 64 keys; none with the pick of its own).
///
/// Each claim first runs as its [`ClaimStatement::Unread`] form, and as this one when that form picks a
/// key with a scope watermark.
static CLAIM: std::sync::LazyLock<ClaimStatements> = std::sync::LazyLock::new(|| ClaimStatements {
    unread: claim_statement(false, ClaimStatement::Unread),
    read: claim_statement(false, ClaimStatement::Read),
});

/// The claim of a request pinned to quota scope `$11` (a resource's owner, see `crate::resource`):
/// the same, over that scope's keys alone, walking `keys_scope_lru`.
static CLAIM_PINNED: std::sync::LazyLock<ClaimStatements> = std::sync::LazyLock::new(|| ClaimStatements {
    unread: claim_statement(true, ClaimStatement::Unread),
    read: claim_statement(true, ClaimStatement::Read),
});

/// The two forms of one claim (see [`ClaimStatement`]).
struct ClaimStatements {
    unread: String,
    read: String,
}

/// The two forms of the claim statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClaimStatement {
    /// Reads neither `lockdowns` nor `learned_limits`: it picks the least recently used claimable key and
    /// takes it if its scope watermark is NULL (no row of either table on its scopes, see
    /// `migrations/postgres/0009_scope_watermark.sql`), which is then the key the [`Read`] form would
    /// take, with no strikes and no lesson to read. It answers no row when no key is claimable, and a
    /// row of NULLs when the key it picked has a watermark: the [`Read`] form decides then.
    ///
    /// [`Read`]: ClaimStatement::Read
    Unread,
    /// Reads the lockdowns that keep a key from the model, the key's strikes for it and the connector's
    /// latest lesson.
    Read,
}

/// The claim statement, pinned to a scope or not (two statements, so each has a plan of its own), in
/// `form`. Parameters: `$1` connector, `$2` now, `$3..$6, $9` the holder (host, boot id, pid, start, pid
/// namespace), `$7` key names tried, `$8` the boot clock, `$10` the model, `$11` the pinned scope.
fn claim_statement(pinned: bool, form: ClaimStatement) -> String {
    let scope = if pinned { "k.quota_scope = $11" } else { "$11::text IS NULL" };
    let claimable = rule_sql::claimable_state("k", "$2");
    // The picked key's columns, the lockdown filter, the id the update takes, the strikes and lesson it
    // reads, and what the statement answers.
    let (picked, unlocked, target, read, answer) = match form {
        ClaimStatement::Unread => (
            "k.id, k.scope_watermark",
            String::new(),
            "(SELECT id FROM picked WHERE scope_watermark IS NULL)",
            String::new(),
            "claimed.id, key_name, fingerprint, lease, lockdown_until, quota_scope FROM picked LEFT JOIN claimed ON true",
        ),
        ClaimStatement::Read => (
            "k.id",
            format!(" AND NOT {}", rule_sql::locked_down_for(&KeyCols::row("k"), "$10::text", "$2")),
            "(SELECT id FROM picked)",
            format!(
                ",
          coalesce((SELECT q.strikes FROM lockdowns q
                     WHERE q.connector = keys.connector AND q.scope = {own} AND q.model = coalesce($10, '{every}')), 0)
            AS strikes,
          (SELECT coalesce(max(l.learned_at), 0) FROM learned_limits l WHERE l.connector = keys.connector) AS lesson",
                own = rule_sql::own_scope("keys.key_name"),
                every = ModelScope::EVERY,
            ),
            "id, key_name, fingerprint, lease, lockdown_until, quota_scope, strikes, lesson FROM claimed",
        ),
    };
    format!(
        "WITH picked AS MATERIALIZED (
 SELECT {picked} FROM keys k
  WHERE k.connector = $1 AND {scope} AND {claimable} AND NOT (k.key_name = ANY($7)){unlocked}
  ORDER BY k.last_used_at LIMIT 1
    FOR UPDATE SKIP LOCKED
), claimed AS (
 UPDATE keys
    SET state = 'locked', lease = lease + 1, holder_host = $3, holder_boot_id = $4, holder_pid_namespace = $9,
        holder_pid = $5, holder_started = $6, locked_at = $2, heartbeat_at = $2, heartbeat_boot_ms = $8,
        heartbeat_db_at = {SERVER_CLOCK}, uses = uses + 1, last_used_at = $2
  WHERE id = {target}
RETURNING id, key_name, fingerprint, lease, lockdown_until, quota_scope{read}
), recorded AS ({history})
SELECT {answer}",
        history = record_each(
            "claimed",
            &HistoryValues {
                at: "$2",
                connector: "$1",
                from_state: "CASE WHEN lockdown_until IS NULL THEN 'vacant' ELSE 'lockdown' END",
                to_state: "'locked'",
                reason: "'claimed'",
                holder_pid: "$5",
                model: "$10",
                ..HistoryValues::of(HistoryEvent::Claimed)
            }
        ),
    )
}

impl Postgres {
    /// Connects to the database `url` names, creating the schema or migrating it as needed.
    pub fn open(url: &PostgresUrl) -> Result<Self> {
        off_runtime(|| Self::open_here(url))
    }

    /// [`open`](Self::open), on a thread that runs no async runtime.
    fn open_here(url: &PostgresUrl) -> Result<Self> {
        let server = PathBuf::from(url.redacted());
        let config: postgres::Config = url.secret_text().parse().map_err(|error| Error::Database {
            path: server.clone(),
            operation: "reading the URL",
            hint: "see https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNSTRING-URIS",
            source: Box::new(error),
        })?;
        let manager = Manager::new(config);
        // Connect once directly: a refusal then says why (no such database, login refused...), where
        // the pool would only time out.
        drop(r2d2::ManageConnection::connect(&manager).map_err(|error| Error::Database {
            path: server.clone(),
            operation: "connecting",
            hint: hint(&error),
            source: Box::new(error),
        })?);
        let store = Self {
            pool: manager.clone().pool(),
            direct: manager,
            server,
            lock_wait_floor: super::DEFAULT_LOCK_WAIT_FLOOR,
            paced: Arc::default(),
            unread: Arc::default(),
        };
        // A current schema needs no migration lock: a host frozen while opening must stall no other.
        let mut found = store.read("reading the schema version", schema::version)?;
        if found < schema::VERSION {
            found = store.write("migrating the schema", None, schema::migrate)?;
        }
        if found > schema::VERSION {
            return Err(Error::SchemaTooNew { path: store.server.clone(), found, supported: schema::VERSION });
        }
        Ok(store)
    }

    /// The same store with another floor for lock waits.
    pub fn with_lock_wait_floor(mut self, floor: Duration) -> Self {
        self.lock_wait_floor = floor;
        self
    }

    /// A connection, waiting for one until `deadline`: a pooled one, or, while the pool has none (its
    /// connections lost to a server restart, say), one opened directly for this operation. A server
    /// that refuses for good (no such database, login refused) fails at once, saying why.
    fn connection(&self, operation: &'static str, deadline: Instant) -> Result<Held> {
        loop {
            if let Ok(pooled) = self.pool.get_timeout(POOL_WAIT) {
                return Ok(Held::Pooled(pooled));
            }
            match r2d2::ManageConnection::connect(&self.direct) {
                Ok(direct) => return Ok(Held::Direct(direct)),
                Err(error) if is_transient(&error) && Instant::now() + RECONNECT_PAUSE < deadline => {
                    std::thread::sleep(RECONNECT_PAUSE);
                }
                Err(error) => return Err(self.failed(operation, error, deadline)),
            }
        }
    }

    /// Runs `f` in a read-only transaction (one snapshot).
    fn read<T: Send>(
        &self,
        operation: &'static str,
        f: impl FnOnce(&mut Tx<'_>) -> std::result::Result<T, postgres::Error> + Send,
    ) -> Result<T> {
        let deadline = Instant::now() + self.lock_wait_floor;
        let mut f = Some(f);
        off_runtime(|| {
            let mut connection = self.connection(operation, deadline)?;
            loop {
                let value = run(&mut connection, (deadline, self.lock_wait_floor, Access::Read), |tx| {
                    f.take().expect("a read runs once unless its connection was lost before it ran")(tx)
                });
                match value {
                    Ok(value) => return Ok(value),
                    // A pooled connection the server closed since (a restart, a failover) fails before
                    // the read runs: once more on a new one.
                    Err(error) if f.is_some() && is_connection_lost(&error) && Instant::now() < deadline => {
                        drop(connection);
                        connection = self.connection(operation, deadline)?;
                    }
                    Err(error) => return Err(self.failed(operation, error, deadline)),
                }
            }
        })
    }

    /// Runs `f` in a transaction; waits for rows
    /// other writers hold until `deadline` (`None`: now), but never less than the store's floor.
    fn write<T: Send>(
        &self,
        operation: &'static str,
        deadline: Option<Instant>,
        f: impl FnMut(&mut Tx<'_>) -> std::result::Result<T, postgres::Error> + Send,
    ) -> Result<T> {
        let floor = Instant::now() + self.lock_wait_floor;
        self.write_by(operation, deadline.map_or(floor, |deadline| deadline.max(floor)), f)
    }

    /// Runs `f` in a transaction until `deadline` exactly; a deadlock or serialization failure is tried
    /// again while time is left.
    fn write_by<T: Send>(
        &self,
        operation: &'static str,
        deadline: Instant,
        f: impl FnMut(&mut Tx<'_>) -> std::result::Result<T, postgres::Error> + Send,
    ) -> Result<T> {
        self.write_as(Access::Write, operation, deadline, f)
    }

    /// [`write_by`](Self::write_by), with `f` run as `access` says (a transaction, or one statement).
    fn write_as<T: Send>(
        &self,
        access: Access,
        operation: &'static str,
        deadline: Instant,
        mut f: impl FnMut(&mut Tx<'_>) -> std::result::Result<T, postgres::Error> + Send,
    ) -> Result<T> {
        let started = Instant::now();
        off_runtime(|| {
            let mut connection = self.connection(operation, deadline)?;
            loop {
                let result = run(&mut connection, (deadline, self.lock_wait_floor, access), &mut f);
                match result {
                    Ok(value) => return Ok(value),
                    Err(error) if is_retryable(&error) && Instant::now() < deadline => continue,
                    // A wait the session's timeouts cut before the deadline (see `Connection::bound_waits`).
                    Err(error) if is_lock_wait(&error) && Instant::now() < deadline => continue,
                    // The server closed the connection (a restart, a failover): again on a new one. A
                    // commit lost with it is the one case left open: a claim it carried stays held by
                    // this (live) process until it exits, never by two.
                    Err(error) if is_connection_lost(&error) && Instant::now() < deadline => {
                        drop(connection);
                        connection = self.connection(operation, deadline)?;
                    }
                    Err(error) if is_lock_wait(&error) || Instant::now() >= deadline && is_retryable(&error) => {
                        return Err(Error::DatabaseLocked {
                            path: self.server.clone(),
                            operation,
                            waited: started.elapsed(),
                        });
                    }
                    Err(error) => return Err(self.failed(operation, error, deadline)),
                }
            }
        })
    }

    /// The library error for `error`, met while doing `operation` with time until `deadline`.
    fn failed(&self, operation: &'static str, error: postgres::Error, deadline: Instant) -> Error {
        if is_lock_wait(&error) {
            let waited = self.lock_wait_floor.saturating_sub(deadline.saturating_duration_since(Instant::now()));
            return Error::DatabaseLocked { path: self.server.clone(), operation, waited };
        }
        let (path, hint) = (self.server.clone(), hint(&error));
        if is_connection_lost(&error) || is_transient(&error) && error.code().is_some() {
            return Error::DatabaseUnreachable { path, operation, hint, source: Box::new(error) };
        }
        Error::Database { path, operation, hint, source: Box::new(error) }
    }

    /// The error of a read that met text the pool's vocabulary does not know (a newer build's word).
    fn unknown(&self, operation: &'static str, error: UnknownWord) -> Error {
        Error::Database { path: self.server.clone(), operation, hint: "", source: Box::new(error) }
    }

    /// The deadline of a holder's own bookkeeping writes.
    fn holder_deadline(&self) -> Instant {
        Instant::now() + self.lock_wait_floor.saturating_mul(HOLDER_PATIENCE)
    }

    /// What `connector`'s claims pace by at `now`, if anything.
    fn pacing_of(&self, connector: &str, now: i64) -> Option<Arc<Pacing>> {
        self.paced.of(connector, || self.read_lessons(now))
    }

    /// The learned limits not yet forgotten at `now`.
    fn read_lessons(&self, now: i64) -> Result<Lessons> {
        self.read("reading learned limits", |tx| pacing::learned(tx, now))
    }
}

/// Runs `f` on `connection` as `access` says, its waits ending by `deadline` (and not before `floor`
/// unless the deadline is sooner), and commits.
fn run<T>(
    connection: &mut Connection,
    (deadline, floor, access): (Instant, Duration, Access),
    f: impl FnOnce(&mut Tx<'_>) -> std::result::Result<T, postgres::Error>,
) -> std::result::Result<T, postgres::Error> {
    connection.bound_waits(deadline.saturating_duration_since(Instant::now()), floor)?;
    let mut tx = Tx::begin(connection, access)?;
    let value = f(&mut tx)?;
    tx.commit()?;
    Ok(value)
}

/// What to check when the server cannot be reached.
const UNREACHABLE: &str = "cannot reach the server: is it running, and are the host and port (or the socket directory, \
     `host=`) in APIJONGLER_DB right?";

/// What to check for `error`, where its code says.
fn hint(error: &postgres::Error) -> &'static str {
    let Some(code) = error.code() else {
        return if is_connection_lost(error) { UNREACHABLE } else { "" };
    };
    match code {
        code if *code == SqlState::READ_ONLY_SQL_TRANSACTION => {
            "the server is a read-only replica or in recovery: point APIJONGLER_DB at the primary"
        }
        code if *code == SqlState::INVALID_PASSWORD || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
            "the server refused the login: check the user and password of APIJONGLER_DB (or ~/.pgpass)"
        }
        code if *code == SqlState::INVALID_CATALOG_NAME => {
            "the database does not exist: create it (`createdb NAME`) or name another in APIJONGLER_DB"
        }
        code if *code == SqlState::INSUFFICIENT_PRIVILEGE => {
            "the user lacks a privilege apijongler needs: it creates and uses the schema `apijongler` (GRANT CREATE ON DATABASE ... TO ...)"
        }
        code if *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW =>
        {
            "the server is shutting down or restarting (a failover?): try again once it is back"
        }
        code if *code == SqlState::TOO_MANY_CONNECTIONS => {
            "the server has no connection slot left: raise its max_connections or run fewer processes"
        }
        code if *code == SqlState::DISK_FULL => "the server's disk is full",
        _ => "",
    }
}

/// The pause between attempts to connect to a server that is not accepting connections yet.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// How long an operation waits for a pooled connection before it opens one of its own.
const POOL_WAIT: Duration = Duration::from_millis(250);

/// A connection for one operation.
enum Held {
    /// From the pool, back to it after the operation (unless the server closed it).
    Pooled(r2d2::PooledConnection<Manager>),
    /// Opened for this operation alone, while the pool had none.
    Direct(Connection),
}

impl std::ops::Deref for Held {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        match self {
            Self::Pooled(pooled) => pooled,
            Self::Direct(direct) => direct,
        }
    }
}

impl std::ops::DerefMut for Held {
    fn deref_mut(&mut self) -> &mut Connection {
        match self {
            Self::Pooled(pooled) => pooled,
            Self::Direct(direct) => direct,
        }
    }
}

/// A refusal that a moment may end: the server is starting, shutting down or unreachable right now.
fn is_transient(error: &postgres::Error) -> bool {
    match error.code() {
        None => true,
        Some(code) => {
            *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::TOO_MANY_CONNECTIONS
        }
    }
}

/// The server closed the connection, or the socket failed: nothing more can run on it.
fn is_connection_lost(error: &postgres::Error) -> bool {
    error.is_closed()
        || std::error::Error::source(error).is_some_and(|source| source.is::<std::io::Error>())
        || error.code().is_some_and(|code| *code == SqlState::ADMIN_SHUTDOWN || *code == SqlState::CRASH_SHUTDOWN)
}

/// A failure worth trying the transaction again for.
fn is_retryable(error: &postgres::Error) -> bool {
    error
        .code()
        .is_some_and(|code| *code == SqlState::T_R_DEADLOCK_DETECTED || *code == SqlState::T_R_SERIALIZATION_FAILURE)
}

/// The transaction waited for rows (or a statement) until its deadline.
fn is_lock_wait(error: &postgres::Error) -> bool {
    error.code().is_some_and(|code| *code == SqlState::LOCK_NOT_AVAILABLE || *code == SqlState::QUERY_CANCELED)
}

impl Backend for Postgres {
    fn example_queries(&self) -> String {
        examples::example_queries()
    }

    fn lock_deadline(&self, asked: Instant, deadline: Instant) -> Instant {
        deadline.max(asked + self.lock_wait_floor)
    }

    fn path(&self) -> &Path {
        &self.server
    }

    fn schema_version(&self) -> Result<i64> {
        self.read("reading the schema version", schema::version)
    }

    fn durability_warnings(&self) -> Result<Vec<String>> {
        // `missing_ok`: a server that does not know a setting (a PostgreSQL-compatible one) warns of nothing.
        let (fsync, full_page_writes): (Option<String>, Option<String>) =
            self.read("reading the server's settings", |tx| {
                let row = tx.query_one(
                    "SELECT current_setting('fsync', true), current_setting('full_page_writes', true)",
                    &[],
                )?;
                Ok((row.get(0), row.get(1)))
            })?;
        let server = self.server.display();
        let fix = "turn it on where it is set (pg_settings.source says where) and reload the server, unless it \
                   is a throwaway test server or a hosted service that runs this way by design";
        let mut warnings = Vec::new();
        if fsync.as_deref() == Some("off") {
            warnings.push(format!(
                "the PostgreSQL server at {server} runs with fsync = off: if its machine crashes or loses power, \
                 it can forget claims it confirmed, and a key still in use can then be claimed by a second \
                 holder; {fix}"
            ));
        }
        if full_page_writes.as_deref() == Some("off") {
            warnings.push(format!(
                "the PostgreSQL server at {server} runs with full_page_writes = off: if its machine crashes or \
                 loses power, the pool's tables can be left corrupt; {fix}"
            ));
        }
        Ok(warnings)
    }

    fn sync_keys(&self, source: &SyncSource<'_>, now: i64) -> Result<SyncReport> {
        sync::sync_keys(self, source, now)
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn claims_in_parallel(&self) -> bool {
        true
    }

    fn server_clock_offset(&self, clock: &dyn Clock) -> Result<Option<i64>> {
        let before = clock.now_ms();
        let server_now: i64 = self.read("reading the server's clock", |tx| {
            Ok(tx.query_one(&format!("SELECT {SERVER_CLOCK}"), &[])?.get(0))
        })?;
        let after = clock.now_ms();
        // The server read its clock while this one went from `before` to `after`: midway, give or take
        // half the round trip.
        Ok(Some(server_now - (before + (after - before) / 2)))
    }

    fn claim(
        &self,
        request: ClaimFor<'_>,
        holder: &Holder,
        clock: &dyn Clock,
        deadline: Instant,
    ) -> Result<Option<Claimed>> {
        Ok(self.claim_several(request, 1, holder, clock, deadline)?.pop())
    }

    fn declare_limits(&self, connector: &str, limits: Option<Arc<Limits>>, now: i64) {
        self.paced.declare(connector, limits, || self.read_lessons(now));
    }

    fn declared_limits(&self, connector: &str) -> Option<Arc<Limits>> {
        self.paced.declared(connector)
    }

    fn paces_tokens(&self, connector: &str, now: i64) -> bool {
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
        let pacing = self.pacing_of(request.connector, clock.now_ms());
        if let Some(pacing) = pacing {
            return self.write_by("claiming keys", deadline, |tx| {
                let mut claimed = Vec::with_capacity(count);
                while claimed.len() < count {
                    match claim::claim_paced(
                        tx,
                        &request,
                        holder,
                        clock,
                        (&pacing, &self.paced, &self.unread),
                        !claimed.is_empty(),
                    )? {
                        Some(one) => claimed.push(one),
                        None => break,
                    }
                }
                Ok(claimed)
            });
        }
        // Unpaced: a lone claim is one statement, committed on its own; several are one transaction.
        let access = if count == 1 { Access::OneStatement } else { Access::Write };
        let claimed = self.write_as(access, "claiming keys", deadline, |tx| {
            let mut claimed = Vec::with_capacity(count);
            while claimed.len() < count {
                match claim::claim_one(tx, &request, holder, (clock.now_ms(), clock.boot_ms()), &self.unread)? {
                    Some(one) => claimed.push(one),
                    None => break,
                }
            }
            Ok(claimed)
        })?;
        // A lesson this process had not read: the claim that saw it first went out unpaced, but counts.
        // The claim is taken already: a failure to count it is only said. (A claim that read no lesson
        // took a key none of whose scopes has one.)
        let seen = claimed.iter().find_map(|(one, lesson)| lesson.map(|lesson| (one, lesson)));
        if let Some((one, lesson)) = seen
            && self.paced.seen(request.connector, lesson)
        {
            let counted = self.write("counting a claim in its window", Some(deadline), |tx| {
                claim::count_unpaced(tx, &request, one, clock.now_ms())
            });
            if let Err(error) = counted {
                tracing::warn!(key = %one.key_name, %error, "a claim that went out unpaced was not counted in its window");
            }
        }
        Ok(claimed.into_iter().map(|(one, _)| one).collect())
    }

    fn end_lease(&self, id: i64, lease: i64, fate: &Fate, attempt: Option<&Attempt>, now: i64) -> Result<bool> {
        let settles = attempt.is_some_and(|attempt| self.paced.paces(&attempt.connector));
        let ended = match fate {
            Fate::Release { success } if !settles => {
                let deadline = self.holder_deadline();
                let freed = self.write_as(Access::OneStatement, "ending a lease", deadline, |tx| {
                    lease_end::release_unread(tx, (id, lease), *success, attempt, now)
                })?;
                if freed {
                    Ok(true)
                } else {
                    self.write("ending a lease", Some(deadline), |tx| {
                        lease_end::end_in(tx, (id, lease), fate, attempt, settles, now)
                    })
                }
            }
            _ => self.write("ending a lease", Some(self.holder_deadline()), |tx| {
                lease_end::end_in(tx, (id, lease), fate, attempt, settles, now)
            }),
        };
        if matches!(fate, Fate::Lockdown(lockdown) if !lockdown.taught.is_empty()) && ended.is_ok() {
            self.paced.read_again();
        }
        ended
    }

    fn confirm_error(&self, id: i64, lease: i64, fate: &Fate, now: i64) -> Result<bool> {
        let Fate::Error { reason, http_status, project } = fate else { return Ok(false) };
        self.write("putting a key in error", Some(self.holder_deadline()), |tx| {
            tx.execute(WATERMARKS_OF_KEY_SHARED, &[&id])?;
            let sql = format!(
                "SELECT connector, key_name, fingerprint, state, quota_scope FROM keys k
                  WHERE id = $1 AND lease = $2 AND {unheld} FOR UPDATE",
                unheld = rule_sql::unheld("k")
            );
            let Some(row) = tx.query_opt(&sql, &[&id, &lease])? else { return Ok(false) };
            let (connector, key_name, fingerprint, from_state, quota_scope): (String, String, String, String, String) =
                (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
            tx.execute(
                "UPDATE keys SET state = 'error', lockdown_until = NULL, reason = $2, http_status = $3,
                        project_learned = coalesce($4, project_learned)
                  WHERE id = $1",
                &[&id, reason, &http_status.map(i64::from), project],
            )?;
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
            record(tx, now, &transition)?;
            Ok(true)
        })
    }

    fn record_attempt(&self, attempt: &Attempt) -> Result<()> {
        self.write("recording a request", Some(self.holder_deadline()), |tx| insert_attempt(tx, attempt))
    }

    fn reset_escalation(&self, id: i64, lease: i64, model: Option<&str>, now: i64) -> Result<bool> {
        self.write("resetting a key's lockdown count", Some(self.holder_deadline()), |tx| {
            tx.execute(WATERMARKS_OF_KEY_SHARED, &[&id])?;
            let held = tx.query_opt(
                "UPDATE keys SET lockdown_count = 0 WHERE id = $1 AND lease = $2 AND state = 'locked'
                 RETURNING connector, quota_scope, key_name",
                &[&id, &lease],
            )?;
            let Some(row) = held else { return Ok(false) };
            let (connector, quota_scope, key_name): (String, String, String) = (row.get(0), row.get(1), row.get(2));
            tx.execute(&lease_end::expired_lockdowns_of_key(), &[&connector, &quota_scope, &key_name, &model, &now])?;
            Ok(true)
        })
    }

    fn is_locked_down_for(&self, id: i64, model: &str, now: i64) -> Result<bool> {
        self.read("reading a key's lockdowns", |tx| {
            let sql = format!(
                "SELECT {} FROM keys k WHERE k.id = $1",
                rule_sql::locked_down_for(&KeyCols::row("k"), "$2::text", "$3")
            );
            Ok(tx.query_one(&sql, &[&id, &model, &now])?.get(0))
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
        self.write("reserving for a kept key", None, |tx| {
            let held = tx.query_opt(
                "SELECT key_name, quota_scope FROM keys WHERE id = $1 AND lease = $2 AND state = 'locked'",
                &[&id, &lease],
            )?;
            let Some(row) = held else { return Ok(false) };
            let (key_name, scope): (String, String) = (row.get(0), row.get(1));
            let reservation =
                pacing::Reservation { connector, scope: &scope, model, key_name: &key_name, lease, tokens };
            let binding = pacing.binding(&scope, model, now);
            tx.batch("SAVEPOINT reserve_held")?;
            match pacing::reserve(tx, &reservation, (&binding, pacing.longest_reach(now)), &|| now)? {
                Ok(()) => {
                    tx.batch("RELEASE reserve_held")?;
                    Ok(true)
                }
                Err(full) => {
                    // The window's lock goes before the watermarks' lock is taken, as before any row.
                    tx.batch("ROLLBACK TO reserve_held; RELEASE reserve_held")?;
                    tx.execute(WATERMARKS_ALONE, &[&connector])?;
                    pacing::lock_down(tx, &reservation, &full, now)?;
                    Ok(false)
                }
            }
        })
    }

    fn lockdowns(&self, connector: Option<&str>) -> Result<Vec<LockdownRecord>> {
        let operation = "reading lockdowns";
        let rows = self.read(operation, |tx| {
            tx.query(
                "SELECT connector, scope, model, until, quota_id, reason, http_status, set_by_key, set_at, strikes
                   FROM lockdowns WHERE $1::text IS NULL OR connector = $1 ORDER BY connector, scope, model",
                &[&connector],
            )
        })?;
        rows.iter()
            .map(|row| {
                Ok(LockdownRecord {
                    connector: row.get(0),
                    scope: word(row, 1)?,
                    model: word(row, 2)?,
                    until: row.get(3),
                    quota_id: row.get(4),
                    reason: row.get(5),
                    http_status: status(row, 6),
                    set_by_key: row.get(7),
                    set_at: row.get(8),
                    strikes: row.get(9),
                })
            })
            .collect::<std::result::Result<_, UnknownWord>>()
            .map_err(|error| self.unknown(operation, error))
    }

    fn watch_changes(&self) -> Result<Box<dyn ChangeWatch>> {
        let mut watch = watch::LatestRows::new(self.clone());
        watch.changed()?;
        Ok(Box::new(watch))
    }

    fn attempts(&self, connector: Option<&str>) -> Result<Vec<Attempt>> {
        let operation = "reading requests";
        let rows = self.read(operation, |tx| {
            tx.query(
                "SELECT at, connector, key_name, method, endpoint, status, latency_ms, outcome, model, prompt_tokens
                   FROM requests WHERE $1::text IS NULL OR connector = $1 ORDER BY id",
                &[&connector],
            )
        })?;
        rows.iter()
            .map(|row| {
                Ok(Attempt {
                    at: row.get(0),
                    connector: row.get(1),
                    key_name: row.get(2),
                    method: row.get(3),
                    endpoint: row.get(4),
                    status: status(row, 5),
                    latency_ms: row.get(6),
                    outcome: word(row, 7)?,
                    model: row.get(8),
                    prompt_tokens: row.get::<_, Option<i64>>(9).and_then(|tokens| u64::try_from(tokens).ok()),
                })
            })
            .collect::<std::result::Result<_, UnknownWord>>()
            .map_err(|error| self.unknown(operation, error))
    }

    fn heartbeat(&self, leases: &[(i64, i64)], clock: &dyn Clock) -> Result<(Vec<(i64, i64)>, i64)> {
        if leases.is_empty() {
            return Ok((Vec::new(), clock.boot_ms()));
        }
        let (ids, tokens): (Vec<i64>, Vec<i64>) = leases.iter().copied().unzip();
        self.write("refreshing heartbeats", Some(self.holder_deadline()), |tx| {
            let (now, boot_ms) = (clock.now_ms(), clock.boot_ms());
            let rows = tx.query(
                &format!(
                    "UPDATE keys SET heartbeat_at = $1, heartbeat_boot_ms = $2, heartbeat_db_at = {SERVER_CLOCK}
                      WHERE id IN (SELECT id FROM keys
                                    WHERE state = 'locked'
                                      AND (id, lease) IN (SELECT * FROM unnest($3::bigint[], $4::bigint[]))
                                    ORDER BY id FOR UPDATE)
                        AND state = 'locked'
                  RETURNING id, lease"
                ),
                &[&now, &boot_ms, &ids, &tokens],
            )?;
            Ok((rows.iter().map(|row| (row.get(0), row.get(1))).collect(), boot_ms))
        })
    }

    fn held_keys(&self, connector: Option<&str>) -> Result<Vec<HeldKey>> {
        self.read("reading held keys", |tx| {
            let rows = tx.query(
                &format!(
                    "SELECT id, connector, key_name, lease, holder_host, holder_boot_id, holder_pid_namespace,
                            holder_pid, holder_started, heartbeat_at, heartbeat_boot_ms,
                            {SERVER_NOW} - heartbeat_db_at
                       FROM keys WHERE state = 'locked' AND ($1::text IS NULL OR connector = $1)"
                ),
                &[&connector],
            )?;
            Ok(rows
                .iter()
                .map(|row| HeldKey {
                    id: row.get(0),
                    connector: row.get(1),
                    key_name: row.get(2),
                    lease: row.get(3),
                    holder: holder_at(row, 4).unwrap_or_default(),
                    heartbeat_at: row.get(9),
                    heartbeat_boot_ms: row.get(10),
                    heartbeat_age_on_server_ms: row.get(11),
                })
                .collect())
        })
    }

    fn evict(&self, evictions: &[Eviction], now: i64) -> Result<Vec<Transition>> {
        if evictions.is_empty() {
            return Ok(Vec::new());
        }
        let mut ordered = evictions.to_vec();
        ordered.sort_by_key(|eviction| eviction.id);
        self.write("freeing locks", None, |tx| {
            let sql = format!(
                "UPDATE keys
                    SET state = CASE WHEN {end} IS NOT NULL THEN 'lockdown' ELSE 'vacant' END,
                        lockdown_until = {end},
                        holder_host = NULL, holder_boot_id = NULL, holder_pid_namespace = NULL,
                        holder_pid = NULL, holder_started = NULL, locked_at = NULL, heartbeat_at = NULL,
                        heartbeat_boot_ms = NULL, heartbeat_db_at = NULL
                  WHERE id = $1 AND lease = $2 AND state = 'locked'
                    AND heartbeat_at IS NOT DISTINCT FROM $4 AND heartbeat_boot_ms IS NOT DISTINCT FROM $5
              RETURNING connector, key_name, fingerprint, state, lockdown_until",
                end = rule_sql::whole_lockdown_end(&KeyCols::row("keys"), "$3")
            );
            // A key whose row another session holds (its holder ending the lease right now, or one
            // stopped mid-write until the server ends its session) is left for the next reap: one
            // such row must not hold back every other stale key.
            let ids: Vec<i64> = ordered.iter().map(|eviction| eviction.id).collect();
            let free: std::collections::HashSet<i64> = tx
                .query("SELECT id FROM keys WHERE id = ANY($1) ORDER BY id FOR UPDATE SKIP LOCKED", &[&ids])?
                .iter()
                .map(|row| row.get(0))
                .collect();
            let mut written = Vec::new();
            for eviction in ordered.iter().filter(|eviction| free.contains(&eviction.id)) {
                let params: [&(dyn ToSql + Sync); 5] =
                    [&eviction.id, &eviction.lease, &now, &eviction.heartbeat_at, &eviction.heartbeat_boot_ms];
                let Some(row) = tx.query_opt(&sql, &params)? else { continue };
                let (connector, key_name, fingerprint, state): (String, String, String, String) =
                    (row.get(0), row.get(1), row.get(2), row.get(3));
                let transition = NewTransition {
                    lease: Some(eviction.lease),
                    lockdown_until: row.get(4),
                    ..NewTransition::new(
                        eviction.event,
                        (&connector, &key_name, &fingerprint),
                        Some("locked"),
                        &state,
                        &eviction.reason,
                    )
                };
                written.push(record(tx, now, &transition)?);
            }
            Ok(written)
        })
    }

    fn clear_lockdowns_and_errors(&self, connector: Option<&str>, now: i64) -> Result<Vec<Transition>> {
        self.write("cleaning up keys", None, |tx| {
            let only: Option<Vec<&str>> = connector.map(|connector| vec![connector]);
            tx.execute(WATERMARKS_SHARED_OF, &[&only])?;
            let targets = tx.query(
                "SELECT id, connector, key_name, fingerprint, state FROM keys
                  WHERE state IN ('lockdown', 'error') AND ($1::text IS NULL OR connector = $1)
                  ORDER BY id FOR UPDATE",
                &[&connector],
            )?;
            tx.execute("DELETE FROM lockdowns WHERE $1::text IS NULL OR connector = $1", &[&connector])?;
            let mut written = Vec::new();
            for row in &targets {
                let id: i64 = row.get(0);
                let (key_connector, key_name, fingerprint, state): (String, String, String, String) =
                    (row.get(1), row.get(2), row.get(3), row.get(4));
                tx.execute(
                    "UPDATE keys SET state = 'vacant', lockdown_until = NULL, lockdown_count = 0 WHERE id = $1",
                    &[&id],
                )?;
                let transition = NewTransition::new(
                    HistoryEvent::CleanedUp,
                    (&key_connector, &key_name, &fingerprint),
                    Some(&state),
                    "vacant",
                    "cleanup",
                );
                written.push(record(tx, now, &transition)?);
            }
            Ok(written)
        })
    }

    fn availability(&self, request: ClaimFor<'_>, now: i64) -> Result<Availability> {
        self.read("reading key availability", |tx| availability::of(tx, &request, now))
    }

    fn keys(&self, connector: Option<&str>) -> Result<Vec<KeyRecord>> {
        let operation = "reading keys";
        let rows = self.read(operation, |tx| {
            tx.query(
                &format!(
                    "SELECT {KEY_COLUMNS} FROM keys WHERE $1::text IS NULL OR connector = $1
                      ORDER BY connector, key_name"
                ),
                &[&connector],
            )
        })?;
        rows.iter()
            .map(key_record)
            .collect::<std::result::Result<_, _>>()
            .map_err(|error| self.unknown(operation, error))
    }

    fn history(&self, query: &HistoryQuery) -> Result<Vec<Transition>> {
        let limit = query.limit.map(|limit| i64::try_from(limit).unwrap_or(i64::MAX));
        let operation = "reading the history";
        let rows = self.read(operation, |tx| {
            tx.query(
                &format!(
                    "SELECT {HISTORY_COLUMNS} FROM history
                      WHERE ($1::text IS NULL OR connector = $1) AND ($2::text IS NULL OR key_name = $2)
                        AND ($3::bigint IS NULL OR at >= $3)
                      ORDER BY id DESC LIMIT $4"
                ),
                &[&query.connector, &query.key_name, &query.since, &limit],
            )
        })?;
        rows.iter()
            .map(transition)
            .collect::<std::result::Result<_, _>>()
            .map_err(|error| self.unknown(operation, error))
    }

    fn usage(&self, query: &crate::pool::usage::UsageQuery) -> Result<Vec<crate::pool::usage::UsageRow>> {
        self.read("reading usage", |tx| usage::usage(tx, query))
    }

    fn has_older(&self, journal: Journal, before: i64) -> Result<bool> {
        self.read("looking for rows past retention", |tx| prune::has_older(tx, journal, before))
    }

    fn prune_batch(&self, journal: Journal, before: i64, batch: u32) -> Result<(u64, Duration)> {
        self.write("pruning old rows", None, |tx| {
            let started = Instant::now();
            let deleted = prune::prune_batch(tx, journal, before, batch)?;
            Ok((deleted, started.elapsed()))
        })
    }

    fn record_resources(&self, connector: &str, key_name: &str, created: &[Created], now: i64) -> Result<usize> {
        self.write("recording resources", None, |tx| resources::record(tx, connector, key_name, created, now))
    }

    fn used_since(&self, of: (&str, &str, &str), measure: Measure, since: i64) -> Result<u64> {
        self.read("reading reservations", |tx| pacing::used_since(tx, of, measure, since))
    }

    fn learned_limits(&self, connector: &str, now: i64) -> Result<Vec<LearnedLimit>> {
        let all = self.read_lessons(now)?;
        Ok(all.into_iter().filter(|(of, ..)| of == connector).map(|(_, learned, _)| learned).collect())
    }

    fn reserved_models(&self, connector: &str, since: i64) -> Result<Vec<(String, String)>> {
        self.read("reading reservations", |tx| pacing::reserved_models(tx, connector, since))
    }

    fn resource_owner(&self, connector: &str, names: &[String], now: i64) -> Result<Option<Owner>> {
        self.read("reading resource owners", |tx| resources::owner(tx, connector, names, now))
    }

    fn explain_claim(&self) -> Result<Vec<String>> {
        self.read("explaining the claim", |tx| {
            let tried: Vec<String> = Vec::new();
            let mut plan = Vec::new();
            // Both statements' plans, the unpinned claim's first.
            let statements = [(&*CLAIM, None), (&*CLAIM_PINNED, Some("group:g"))];
            for (statement, pin) in
                statements.iter().flat_map(|(claim, pin)| [(&claim.unread, *pin), (&claim.read, *pin)])
            {
                let params: [&(dyn ToSql + Sync); 11] =
                    [&"c", &0_i64, &"h", &"b", &1_i64, &1_i64, &tried, &0_i64, &"n", &Some("m"), &pin];
                let rows = tx.query(&format!("EXPLAIN {statement}"), &params)?;
                plan.extend(rows.iter().map(|row| row.get::<_, String>(0)));
            }
            Ok(plan)
        })
    }
}

mod availability;
mod claim;
mod examples;
mod lease_end;
mod pacing;
mod prune;
mod resources;
mod sync;
mod usage;
mod watch;

/// The history table's columns, in the order [`record`] and [`record_each`] write them.
const HISTORY_INSERT: &str = "INSERT INTO history (at, connector, key_name, fingerprint, from_state, to_state, reason,
                                http_status, holder_pid, lease, lockdown_until, model, quota_scope, event)";

/// Writes the history row `new` at `at`.
fn record(tx: &mut Tx<'_>, at: i64, new: &NewTransition<'_>) -> std::result::Result<Transition, postgres::Error> {
    let row = tx.query_one(
        &format!("{HISTORY_INSERT} VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) RETURNING id"),
        &[
            &at,
            &new.connector,
            &new.key_name,
            &new.fingerprint,
            &new.from_state,
            &new.to_state,
            &new.reason,
            &new.http_status.map(i64::from),
            &new.holder_pid.map(i64::from),
            &new.lease,
            &new.lockdown_until,
            &new.model,
            &new.quota_scope,
            &new.event.as_str(),
        ],
    )?;
    Ok(new.written(row.get(0), at))
}

/// The history row of a change a statement makes, as SQL expressions over the rows of the common table
/// expression that made it (whose `key_name`, `fingerprint`, `lease` and `quota_scope` columns the
/// defaults name): [`record`]'s row, written inside the changing statement itself.
struct HistoryValues<'a> {
    at: &'a str,
    connector: &'a str,
    from_state: &'a str,
    to_state: &'a str,
    reason: &'a str,
    http_status: &'a str,
    holder_pid: &'a str,
    lockdown_until: &'a str,
    model: &'a str,
    event: HistoryEvent,
}

impl HistoryValues<'_> {
    /// The row of `event`, every other value `NULL` but the key's own columns; set them with struct
    /// update syntax.
    fn of(event: HistoryEvent) -> Self {
        Self {
            at: "NULL",
            connector: "connector",
            from_state: "NULL",
            to_state: "NULL",
            reason: "NULL",
            http_status: "NULL",
            holder_pid: "NULL",
            lockdown_until: "NULL",
            model: "NULL",
            event,
        }
    }
}

/// The `INSERT` of `values`' history row for each row of `source`.
fn record_each(source: &str, values: &HistoryValues<'_>) -> String {
    let HistoryValues {
        at,
        connector,
        from_state,
        to_state,
        reason,
        http_status,
        holder_pid,
        lockdown_until,
        model,
        event,
    } = values;
    format!(
        "{HISTORY_INSERT}
 SELECT {at}, {connector}, key_name, fingerprint, {from_state}, {to_state}, {reason}, {http_status}, {holder_pid},
        lease, {lockdown_until}, {model}, quota_scope, '{event}'
   FROM {source}",
        event = event.as_str()
    )
}

/// Records `attempt` in `requests`.
fn insert_attempt(tx: &mut Tx<'_>, attempt: &Attempt) -> std::result::Result<(), postgres::Error> {
    let values = AttemptValues::of(attempt);
    tx.execute(&AttemptValues::insert(1), &values.params(attempt))?;
    Ok(())
}

/// An attempt's row in `requests`, as statement parameters.
struct AttemptValues {
    status: Option<i64>,
    outcome: String,
    prompt_tokens: Option<i64>,
}

impl AttemptValues {
    /// How many parameters the row takes.
    const COUNT: usize = 10;

    fn of(attempt: &Attempt) -> Self {
        Self {
            status: attempt.status.map(i64::from),
            outcome: attempt.outcome.to_string(),
            prompt_tokens: attempt.prompt_tokens.and_then(|tokens| i64::try_from(tokens).ok()),
        }
    }

    /// The `INSERT` of the row, its parameters numbered from `$first`.
    fn insert(first: usize) -> String {
        Self::insert_if(first, "true")
    }

    /// The `INSERT` of the row if `condition` (an SQL condition) holds.
    fn insert_if(first: usize, condition: &str) -> String {
        let [at, connector, key_name, method, endpoint, status, latency_ms, outcome, model, prompt_tokens] =
            std::array::from_fn::<_, { Self::COUNT }, _>(|index| format!("${}", first + index));
        format!(
            "INSERT INTO requests (at, connector, key_name, method, endpoint, status, latency_ms, outcome, model,
                                   quota_scope, prompt_tokens)
             SELECT {at}, {connector}, {key_name}, {method}, {endpoint}, {status}, {latency_ms}, {outcome}, {model},
                    (SELECT quota_scope FROM keys WHERE connector = {connector} AND key_name = {key_name}),
                    {prompt_tokens}
              WHERE {condition}"
        )
    }

    /// The parameters of [`insert`](Self::insert), in order.
    fn params<'a>(&'a self, attempt: &'a Attempt) -> [&'a (dyn ToSql + Sync); Self::COUNT] {
        [
            &attempt.at,
            &attempt.connector,
            &attempt.key_name,
            &attempt.method,
            &attempt.endpoint,
            &self.status,
            &attempt.latency_ms,
            &self.outcome,
            &attempt.model,
            &self.prompt_tokens,
        ]
    }
}

/// An HTTP status read from column `index`.
fn status(row: &Row, index: usize) -> Option<u16> {
    row.get::<_, Option<i64>>(index).and_then(|status| u16::try_from(status).ok())
}

/// The holder recorded in columns `first..first + 5` (host, boot id, pid namespace, pid, start time),
/// or `None` when no pid is recorded.
fn holder_at(row: &Row, first: usize) -> Option<Holder> {
    let pid = row.get::<_, Option<i64>>(first + 3)?;
    Some(Holder {
        host: row.get::<_, Option<String>>(first).unwrap_or_default(),
        boot_id: row.get::<_, Option<String>>(first + 1).unwrap_or_default(),
        pid_namespace: row.get::<_, Option<String>>(first + 2).unwrap_or_default(),
        pid: u32::try_from(pid).unwrap_or_default(),
        started: row.get::<_, Option<i64>>(first + 4).unwrap_or_default(),
    })
}

fn key_record(row: &Row) -> std::result::Result<KeyRecord, UnknownWord> {
    Ok(KeyRecord {
        connector: row.get(0),
        key_name: row.get(1),
        fingerprint: row.get(2),
        state: word(row, 3)?,
        retired_at: row.get(4),
        lease: row.get(5),
        holder: holder_at(row, 6),
        locked_at: row.get(11),
        heartbeat_at: row.get(12),
        lockdown_until: row.get(13),
        reason: row.get(14),
        http_status: status(row, 15),
        lockdown_count: row.get(16),
        uses: row.get(17),
        last_used_at: row.get(18),
        quota_group: row.get(19),
        project_learned: row.get(20),
        quota_scope: word(row, 21)?,
    })
}

fn transition(row: &Row) -> std::result::Result<Transition, UnknownWord> {
    Ok(Transition {
        id: row.get(0),
        at: row.get(1),
        connector: row.get(2),
        key_name: row.get(3),
        fingerprint: row.get(4),
        from_state: row.get(5),
        to_state: row.get(6),
        reason: row.get(7),
        http_status: status(row, 8),
        holder_pid: row.get::<_, Option<i64>>(9).and_then(|pid| u32::try_from(pid).ok()),
        lease: row.get(10),
        lockdown_until: row.get(11),
        model: row.get(12),
        quota_scope: row.get(13),
        event: word(row, 14)?,
    })
}

/// A word of the pool's vocabulary read from column `index`; text it does not know fails the read.
fn word<T>(row: &Row, index: usize) -> std::result::Result<T, UnknownWord>
where
    T: std::str::FromStr<Err = UnknownWord>,
{
    row.get::<_, String>(index).parse()
}
