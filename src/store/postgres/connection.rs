//! Connections to the PostgreSQL server: configured from the user's URL, pooled, each with its
//! prepared statements, and never used from inside an async runtime's thread (the synchronous
//! `postgres` client runs its own small runtime and panics there).
//!
//! Invariants:
//! - Every connection has a connect timeout, TCP keepalives and `search_path = apijongler`: a
//!   statement names the pool's tables without the schema, and no wait on an unreachable or silent
//!   server is unbounded.
//! - A statement is prepared once per connection (a round trip saved on every later use).

use std::collections::HashMap;
use std::time::Duration;

use postgres::types::ToSql;
use postgres::{Client, Config, NoTls, Row, Statement, Transaction};

use super::SCHEMA;

/// How long connecting may take unless the URL says (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Pooled connections per process: concurrent claims on PostgreSQL run in parallel, unlike SQLite's.
const POOL_SIZE: u32 = 16;

/// A connection with the statements prepared on it.
pub(super) struct Connection {
    /// Always `Some` until dropped (see `Drop`).
    client: Option<Client>,
    statements: HashMap<String, Statement>,
}

impl Connection {
    fn client(&mut self) -> &mut Client {
        self.client.as_mut().expect("a connection has its client until it is dropped")
    }
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

/// A transaction on a pooled connection, whose statements are prepared once per connection.
pub(super) struct Tx<'a> {
    transaction: Transaction<'a>,
    statements: &'a mut HashMap<String, Statement>,
}

impl<'a> Tx<'a> {
    /// Begins a transaction on `connection`.
    pub(super) fn begin(connection: &'a mut Connection) -> Result<Self, postgres::Error> {
        let Connection { client, statements } = connection;
        let client = client.as_mut().expect("a connection has its client until it is dropped");
        Ok(Self { transaction: client.transaction()?, statements })
    }

    fn prepared(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.transaction.prepare(sql)?;
        self.statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    /// The rows `sql` answers.
    pub(super) fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, postgres::Error> {
        let statement = self.prepared(sql)?;
        self.transaction.query(&statement, params)
    }

    /// The one row `sql` answers, if any.
    pub(super) fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, postgres::Error> {
        let statement = self.prepared(sql)?;
        self.transaction.query_opt(&statement, params)
    }

    /// The one row `sql` answers.
    pub(super) fn query_one(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, postgres::Error> {
        let statement = self.prepared(sql)?;
        self.transaction.query_one(&statement, params)
    }

    /// Runs `sql`; how many rows it changed.
    pub(super) fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, postgres::Error> {
        let statement = self.prepared(sql)?;
        self.transaction.execute(&statement, params)
    }

    /// Runs `sql` (several statements, no parameters) unprepared.
    pub(super) fn batch(&mut self, sql: &str) -> Result<(), postgres::Error> {
        self.transaction.batch_execute(sql)
    }

    /// Commits.
    pub(super) fn commit(self) -> Result<(), postgres::Error> {
        self.transaction.commit()
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
        let options = match config.get_options() {
            Some(given) => format!("{given} -c search_path={SCHEMA}"),
            None => format!("-c search_path={SCHEMA}"),
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
        Ok(Connection { client: Some(self.config.connect(NoTls)?), statements: HashMap::new() })
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
