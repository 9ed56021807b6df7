//! Connections to the PostgreSQL server: configured from the user's URL, pooled, each with its
//! prepared statements, and never used from inside an async runtime's thread (the synchronous
//! `postgres` client runs its own small runtime and panics there).
//!
//! Invariants:
//! - Every connection has a connect timeout, TCP keepalives and `search_path = apijongler`: a
//!   statement names the pool's tables without the schema, and no wait on an unreachable or silent
//!   server is unbounded.
//! - A statement is prepared once per connection (a round trip saved on every later use).
//! - Every commit of ours is durable before the server answers it: a session whose server commits
//!   asynchronously (`synchronous_commit` off, `local` or `remote_write`) raises it to `on` for itself
//!   (see [`DURABLE_COMMITS`]).
//! - Waits are bounded by the session's `lock_timeout` and `statement_timeout`, set before an operation
//!   only when they would not end within its time left, or would end much sooner than the store's floor
//!   (see `bound_waits`): most operations send no setting at all.

use std::collections::HashMap;
use std::time::Duration;

use postgres::types::ToSql;
use postgres::{Client, Config, NoTls, Row, Statement, Transaction};

use super::SCHEMA;

/// How long connecting may take unless the URL says (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the server lets a session of ours sit idle inside a transaction before ending it.
const IDLE_IN_TRANSACTION_MS: u64 = 2_000;

/// Pooled connections per process: concurrent claims on PostgreSQL run in parallel, unlike SQLite's.
const POOL_SIZE: u32 = 16;

/// Raises the session's `synchronous_commit` to `on` unless it is `on` or stronger (`remote_apply`):
/// with `off`, a claim the server answered but had not flushed would be undone by a crash of the
/// server, and the key given to a second holder while the first one still uses it; with `local` or
/// `remote_write` and synchronous standbys, a failover could lose it the same way. (Asynchronous
/// standbys can lose it whatever the setting.) Sent on every new connection; the benchmark's bare
/// reference sends it too.
pub const DURABLE_COMMITS: &str = "SELECT set_config('synchronous_commit', 'on', false)
  WHERE current_setting('synchronous_commit') NOT IN ('on', 'remote_apply')";

/// A connection with the statements prepared on it.
pub(super) struct Connection {
    /// Always `Some` until dropped (see `Drop`).
    client: Option<Client>,
    statements: HashMap<String, Statement>,
    /// The session's `lock_timeout` and `statement_timeout`, ms (0: the server's default, unbounded).
    timeouts_ms: u64,
}

impl Connection {
    fn client(&mut self) -> &mut Client {
        self.client.as_mut().expect("a connection has its client until it is dropped")
    }

    /// Makes the session's waits end within `left`, and not before `floor` of it (or three quarters of
    /// that): a statement cut earlier than its deadline is tried again by the caller while time is
    /// left. The settings are sent only when the current ones do not fit, so operations of different
    /// deadlines (a claim waiting a minute, a release a few seconds) share them.
    pub(super) fn bound_waits(&mut self, left: Duration, floor: Duration) -> Result<(), postgres::Error> {
        let left_ms = clamped_ms(left);
        let needed_ms = coarse_ms(left_ms.min(clamped_ms(floor)));
        if (needed_ms..=left_ms).contains(&self.timeouts_ms) {
            return Ok(());
        }
        let fitting = coarse_ms(left_ms);
        self.timeouts_ms = 0;
        self.client().batch_execute(&format!("SET lock_timeout = {fitting}; SET statement_timeout = {fitting}"))?;
        self.timeouts_ms = fitting;
        Ok(())
    }
}

/// `wait` in ms, within what the server takes for a timeout: 1 ms to i32::MAX ms (24 days); a longer
/// wait is that long.
fn clamped_ms(wait: Duration) -> u64 {
    u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).clamp(1, i32::MAX as u64)
}

/// `ms` rounded down to a quarter of its highest power of two: at least three quarters of it, and the
/// same for every `ms` of a wide band, so that a setting chosen for one operation fits the next ones.
fn coarse_ms(ms: u64) -> u64 {
    let step = ((1u64 << ms.ilog2()) / 4).max(1);
    ms / step * step
}

impl Drop for Connection {
    /// Closing a client blocks on its own runtime, which panics inside an async runtime's thread (a
    /// store dropped by an async caller drops its pooled connections there): close it on a thread of
    /// its own then.
    fn drop(&mut self) {
        if let Some(client) = self.client.take()
            && tokio::runtime::Handle::try_current().is_ok()
        {
            std::thread::spawn(move || drop(client));
        }
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").finish_non_exhaustive()
    }
}

/// What an operation's statements run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    /// A read-only transaction: one snapshot, no write.
    Read,
    /// A read-write transaction.
    Write,
    /// No transaction: each statement commits on its own. Only for an operation of one statement,
    /// which then costs one round trip instead of three (begin, statement, commit).
    OneStatement,
}

/// Where the statements of a [`Tx`] run.
enum Session<'a> {
    Transaction(Transaction<'a>),
    Autocommit(&'a mut Client),
}

/// Runs `$call` on the session's client, whichever it is (both have the same methods).
macro_rules! on_session {
    ($tx:expr, $client:ident => $call:expr) => {
        match &mut $tx.session {
            Session::Transaction($client) => $call,
            Session::Autocommit($client) => $call,
        }
    };
}

/// The statements of one operation on a pooled connection (in a transaction unless
/// [`Access::OneStatement`]), prepared once per connection.
pub(super) struct Tx<'a> {
    session: Session<'a>,
    statements: &'a mut HashMap<String, Statement>,
}

impl<'a> Tx<'a> {
    /// Starts an operation of `access` on `connection`.
    pub(super) fn begin(connection: &'a mut Connection, access: Access) -> Result<Self, postgres::Error> {
        let Connection { client, statements, .. } = connection;
        let client = client.as_mut().expect("a connection has its client until it is dropped");
        let session = match access {
            Access::Read => Session::Transaction(client.build_transaction().read_only(true).start()?),
            Access::Write => Session::Transaction(client.transaction()?),
            Access::OneStatement => Session::Autocommit(client),
        };
        Ok(Self { session, statements })
    }

    fn prepared(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = on_session!(self, client => client.prepare(sql))?;
        self.statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    /// The rows `sql` answers.
    pub(super) fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, postgres::Error> {
        let statement = self.prepared(sql)?;
        on_session!(self, client => client.query(&statement, params))
    }

    /// The one row `sql` answers, if any.
    pub(super) fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, postgres::Error> {
        let statement = self.prepared(sql)?;
        on_session!(self, client => client.query_opt(&statement, params))
    }

    /// The one row `sql` answers.
    pub(super) fn query_one(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, postgres::Error> {
        let statement = self.prepared(sql)?;
        on_session!(self, client => client.query_one(&statement, params))
    }

    /// Runs `sql`; how many rows it changed.
    pub(super) fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, postgres::Error> {
        let statement = self.prepared(sql)?;
        on_session!(self, client => client.execute(&statement, params))
    }

    /// Runs `sql` (several statements, no parameters) unprepared.
    pub(super) fn batch(&mut self, sql: &str) -> Result<(), postgres::Error> {
        on_session!(self, client => client.batch_execute(sql))
    }

    /// Commits (a transaction; each statement of [`Access::OneStatement`] committed as it ran).
    pub(super) fn commit(self) -> Result<(), postgres::Error> {
        match self.session {
            Session::Transaction(transaction) => transaction.commit(),
            Session::Autocommit(_) => Ok(()),
        }
    }
}

/// Opens connections for the pool.
#[derive(Debug, Clone)]
pub(super) struct Manager {
    config: Config,
}

impl Manager {
    /// A manager for the server and database `config` names, with apijongler's settings added.
    pub(super) fn new(mut config: Config) -> Self {
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // A session left idle inside a transaction (its process stopped, frozen or cut off mid-write)
        // is ended by the server, and its row and advisory locks with it: no other host's write waits
        // on a frozen one for longer than that. apijongler's own transactions take milliseconds.
        let ours = format!("-c search_path={SCHEMA} -c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}");
        let options = match config.get_options() {
            Some(given) => format!("{given} {ours}"),
            None => ours,
        };
        config
            .options(&options)
            .application_name("apijongler")
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(2))
            .keepalives_retries(3);
        Self { config }
    }

    /// A pool of connections opened on demand.
    pub(super) fn pool(self) -> r2d2::Pool<Self> {
        r2d2::Pool::builder()
            .max_size(POOL_SIZE)
            .min_idle(Some(0))
            // A broken connection shows as an error of the statement that meets it, which says so; a
            // check on every checkout would cost a round trip per operation.
            .test_on_check_out(false)
            .connection_timeout(CONNECT_TIMEOUT + Duration::from_secs(1))
            // A failure reaches the caller as an error naming the server; r2d2's own log of it would
            // only say "db error", once per retry.
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build_unchecked(self)
    }
}

impl r2d2::ManageConnection for Manager {
    type Connection = Connection;
    type Error = postgres::Error;

    fn connect(&self) -> Result<Connection, postgres::Error> {
        let mut client = self.config.connect(NoTls)?;
        client.batch_execute(DURABLE_COMMITS)?;
        Ok(Connection { client: Some(client), statements: HashMap::new(), timeouts_ms: 0 })
    }

    fn is_valid(&self, connection: &mut Connection) -> Result<(), postgres::Error> {
        connection.client().simple_query("").map(|_| ())
    }

    fn has_broken(&self, connection: &mut Connection) -> bool {
        connection.client().is_closed()
    }
}

/// Runs `f` where the synchronous client may block: on this thread, or on a scoped thread of its own
/// when this thread runs an async runtime (where the client's own runtime would panic).
pub(super) fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|scope| match scope.spawn(f).join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

#[cfg(test)]
mod tests {
    use super::super::usage::test_server::TestDb;
    use super::coarse_ms;

    #[test]
    fn every_session_commits_durably_whatever_the_database_default() {
        let Some(db) = TestDb::create("durable") else { return };
        let cases =
            [("off", "on"), ("local", "on"), ("remote_write", "on"), ("on", "on"), ("remote_apply", "remote_apply")];
        for (default, expected) in cases {
            db.client()
                .batch_execute(&format!(
                    "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET synchronous_commit = %L', current_database(), '{default}'); END $$"
                ))
                .expect("set the database's default");
            let store = db.open();
            let setting: String = store
                .read("reading the setting", |tx| Ok(tx.query_one("SHOW synchronous_commit", &[])?.get(0)))
                .expect("read");
            assert_eq!(setting, expected, "with the database's default at {default}");
        }
    }

    #[test]
    fn a_coarse_timeout_is_never_longer_than_asked_nor_shorter_than_three_quarters_of_it() {
        for ms in (1..5_000).chain([65_535, 65_536, 2_147_483_647]) {
            let coarse = coarse_ms(ms);
            assert!(coarse <= ms && coarse * 4 >= ms * 3, "{ms} ms became {coarse}");
        }
    }

    #[test]
    fn a_coarse_timeout_is_the_same_across_a_band_so_one_setting_serves_many_operations() {
        assert_eq!(coarse_ms(5_000), 4_096);
        assert_eq!(coarse_ms(4_097), 4_096);
        assert_eq!(coarse_ms(5_119), 4_096);
        assert_eq!(coarse_ms(5_120), 5_120);
        assert_eq!(coarse_ms(15_000), 14_336);
        assert_eq!(coarse_ms(1), 1);
        assert_eq!(coarse_ms(3), 3);
    }
}
