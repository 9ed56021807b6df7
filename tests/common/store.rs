//! Which store the tests run on, and their direct SQL on it: one test list, two backends.
//!
//! Without `APIJONGLER_TEST_PG` every sandbox is an SQLite file, as a user's default. With it (a
//! `postgres://` URL of a server the tests may create databases on; `.ci/postgres` starts a throwaway
//! one on a Unix socket), every sandbox gets its own fresh database there, dropped with the sandbox.
//!
//! [`Sql`] is what the tests do behind the library's back (count rows, read history, forge a row) in
//! the SQL both stores speak: the same table and column names (PostgreSQL's in schema `apijongler`),
//! values read back as text and parsed as the test asks, so a PostgreSQL `BIGINT` or `NUMERIC` and an
//! SQLite `INTEGER` read alike. Parameters are inlined as SQL literals (`?1`, `?2`, ...), which both
//! dialects read the same way.

use std::cell::RefCell;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The variable naming the PostgreSQL server the tests run on instead of SQLite.
pub const TEST_PG_ENV: &str = "APIJONGLER_TEST_PG";

/// The schema of apijongler's tables on PostgreSQL.
const PG_SCHEMA: &str = "apijongler";

/// The server's URL (a maintenance database on it, such as `postgres`), when the tests run on PostgreSQL.
fn test_server() -> Option<String> {
    std::env::var(TEST_PG_ENV).ok().filter(|url| !url.is_empty())
}

/// The tests run on PostgreSQL (`APIJONGLER_TEST_PG` is set).
pub fn on_postgres() -> bool {
    test_server().is_some()
}

/// For a test whose subject exists only on SQLite (the database file, a `sqlite3` shell's lock): on
/// PostgreSQL it says so on stderr and returns true, and the test returns at once.
pub fn sqlite_only(why: &str) -> bool {
    let skip = on_postgres();
    if skip {
        eprintln!("not run on PostgreSQL: {why}");
    }
    skip
}

/// Runs `work` on a thread of its own. The `postgres` client blocks on a runtime of its own, which
/// panics on a thread already inside one (an async test's): each call on it, its connection and its
/// drop (which says goodbye to the server) go through here.
fn off_runtime<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| scope.spawn(work).join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
}

/// A `postgres` client whose every call, and whose drop, runs off the caller's runtime.
struct PgClient(Option<postgres::Client>);

impl PgClient {
    fn connect(url: &str) -> Result<Self, postgres::Error> {
        let mut config: postgres::Config = url.parse().unwrap_or_else(|e| panic!("{TEST_PG_ENV}: {e}"));
        config.connect_timeout(Duration::from_secs(30));
        off_runtime(move || config.connect(postgres::NoTls)).map(|client| Self(Some(client)))
    }

    fn simple_query(&mut self, sql: &str) -> Result<Vec<postgres::SimpleQueryMessage>, String> {
        let client = self.0.as_mut().expect("connected");
        off_runtime(move || client.simple_query(sql)).map_err(|e| described(&e))
    }

    fn batch_execute(&mut self, sql: &str) -> Result<(), String> {
        let client = self.0.as_mut().expect("connected");
        off_runtime(move || client.batch_execute(sql)).map_err(|e| described(&e))
    }
}

impl Drop for PgClient {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            off_runtime(move || drop(client));
        }
    }
}

/// The server's own words (`postgres::Error` alone says only "db error").
fn described(error: &postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => error.to_string(),
    }
}

fn connect(url: &str) -> PgClient {
    PgClient::connect(url).unwrap_or_else(|e| panic!("connect to the test server ({TEST_PG_ENV}): {e}"))
}

/// A sandbox's own database on the test server, dropped (with whoever is still connected) with it.
pub struct PgDatabase {
    server: String,
    name: String,
    url: String,
}

impl PgDatabase {
    /// A new, empty database on the test server, or `None` on SQLite.
    pub fn create() -> Option<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let server = test_server()?;
        // Unique on the server: test binaries run one after another and side by side, pids come back.
        let name = format!(
            "apijongler_test_{}_{}_{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..)
        );
        connect(&server)
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        let url = with_database(&server, &name);
        Some(Self { server, name, url })
    }

    /// Its URL, as `APIJONGLER_DB` and `CoordinatorOptions::db_path` take it.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let dropped = PgClient::connect(&self.server)
            .map_err(|e| described(&e))
            .and_then(|mut admin| admin.batch_execute(&statement));
        if let Err(error) = dropped {
            eprintln!("could not drop the test database {}: {error}", self.name);
        }
    }
}

/// `url` naming database `name` instead of its own: the path part of `scheme://authority/path?query`.
fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or_else(|| panic!("{TEST_PG_ENV} is not a URL: {url}"));
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let query = tail.find('?').map_or("", |start| &tail[start..]);
    format!("{scheme}://{authority}/{name}{query}")
}

/// A connection to a sandbox's store for the tests' own SQL. Each method answers `Err` with the
/// statement and the database's words, for the test's `expect`.
pub struct Sql {
    connection: RefCell<Connection>,
}

enum Connection {
    Sqlite(rusqlite::Connection),
    Postgres(PgClient),
}

/// A statement that failed, and why.
pub struct SqlError(String);

impl fmt::Debug for SqlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for SqlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub type SqlResult<T> = Result<T, SqlError>;

impl Sql {
    /// A connection to the store at `db`: a PostgreSQL URL (searching schema `apijongler`) or an SQLite
    /// file, opened as a user's `sqlite3` would (read-write, waiting up to 10 s for a lock).
    pub fn open(db: &Path) -> Self {
        let text = db.to_string_lossy();
        let connection = if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            let mut client = connect(&text);
            client.batch_execute(&format!("SET search_path = {PG_SCHEMA}")).expect("search_path");
            Connection::Postgres(client)
        } else {
            let connection = rusqlite::Connection::open(db).expect("open db");
            connection.busy_timeout(Duration::from_secs(10)).expect("busy timeout");
            Connection::Sqlite(connection)
        };
        Self { connection: RefCell::new(connection) }
    }

    /// Every row `sql` (one statement, `?N` for `params[N-1]`) answers.
    pub fn query(&self, sql: &str, params: &[&dyn Literal]) -> SqlResult<Vec<Row>> {
        let sql = inline(sql, params);
        let failed = |e: &dyn fmt::Display| SqlError(format!("{sql}: {e}"));
        match &mut *self.connection.borrow_mut() {
            Connection::Sqlite(connection) => {
                let mut statement = connection.prepare(&sql).map_err(|e| failed(&e))?;
                let columns = statement.column_count();
                let rows = statement.query_map([], |row| (0..columns).map(|index| sqlite_text(row, index)).collect());
                rows.and_then(|rows| rows.map(|row| row.map(Row)).collect()).map_err(|e| failed(&e))
            }
            Connection::Postgres(client) => {
                let messages = client.simple_query(&sql).map_err(|e| failed(&e))?;
                Ok(messages
                    .iter()
                    .filter_map(|message| match message {
                        postgres::SimpleQueryMessage::Row(row) => {
                            Some(Row((0..row.len()).map(|index| row.get(index).map(str::to_owned)).collect()))
                        }
                        _ => None,
                    })
                    .collect())
            }
        }
    }

    /// The only row `sql` answers; `Err` when it answers none.
    pub fn row(&self, sql: &str, params: &[&dyn Literal]) -> SqlResult<Row> {
        let mut rows = self.query(sql, params)?.into_iter();
        match (rows.next(), rows.next()) {
            (Some(row), None) => Ok(row),
            (None, _) => Err(SqlError(format!("{sql}: no row"))),
            (Some(_), Some(_)) => Err(SqlError(format!("{sql}: more than one row"))),
        }
    }

    /// The first column of the only row `sql` answers, such as a `count(*)`.
    pub fn value<T: FromText>(&self, sql: &str, params: &[&dyn Literal]) -> SqlResult<T> {
        Ok(self.row(sql, params)?.get(0))
    }

    /// The first column of every row `sql` answers.
    pub fn column<T: FromText>(&self, sql: &str, params: &[&dyn Literal]) -> SqlResult<Vec<T>> {
        Ok(self.query(sql, params)?.iter().map(|row| row.get(0)).collect())
    }

    /// Runs one statement and returns how many rows it changed.
    pub fn execute(&self, sql: &str, params: &[&dyn Literal]) -> SqlResult<u64> {
        let sql = inline(sql, params);
        let failed = |e: &dyn fmt::Display| SqlError(format!("{sql}: {e}"));
        match &mut *self.connection.borrow_mut() {
            Connection::Sqlite(connection) => {
                connection.execute(&sql, []).map(|changed| changed as u64).map_err(|e| failed(&e))
            }
            Connection::Postgres(client) => {
                let messages = client.simple_query(&sql).map_err(|e| failed(&e))?;
                Ok(messages
                    .iter()
                    .map(|message| match message {
                        postgres::SimpleQueryMessage::CommandComplete(changed) => *changed,
                        _ => 0,
                    })
                    .sum())
            }
        }
    }

    /// Runs several statements separated by `;`.
    pub fn batch(&self, sql: &str) -> SqlResult<()> {
        let failed = |e: &dyn fmt::Display| SqlError(format!("{sql}: {e}"));
        match &mut *self.connection.borrow_mut() {
            Connection::Sqlite(connection) => connection.execute_batch(sql).map_err(|e| failed(&e)),
            Connection::Postgres(client) => client.batch_execute(sql).map_err(|e| failed(&e)),
        }
    }

    /// The names of apijongler's tables on PostgreSQL, quoted for a statement.
    fn pg_tables(&self) -> SqlResult<Vec<String>> {
        let sql = "SELECT quote_ident(tablename) FROM pg_tables WHERE schemaname = ?1 ORDER BY tablename";
        self.column(sql, &[&PG_SCHEMA])
    }

    /// Every row of every apijongler table as text, one line a row (PostgreSQL).
    pub fn dump(&self) -> SqlResult<String> {
        let tables = self.pg_tables()?;
        let mut text = String::new();
        for table in tables {
            for line in self.column::<String>(&format!("SELECT t::text FROM {table} t"), &[])? {
                text.push_str(&format!("{table} {line}\n"));
            }
        }
        Ok(text)
    }

    /// Takes the store's write lock in a transaction, as another process writing would, until
    /// [`Sql::rollback`]: SQLite's `BEGIN IMMEDIATE`; on PostgreSQL every apijongler table locked in
    /// `EXCLUSIVE` mode, which lets plain reads through and stops every write and `SELECT ... FOR UPDATE`.
    pub fn lock_writes(&self) -> SqlResult<()> {
        if matches!(*self.connection.borrow(), Connection::Sqlite(_)) {
            return self.batch("BEGIN IMMEDIATE");
        }
        let tables = self.pg_tables()?;
        self.batch(&format!("BEGIN; LOCK TABLE {} IN EXCLUSIVE MODE", tables.join(", ")))
    }

    /// Ends the transaction [`Sql::lock_writes`] began, writing nothing.
    pub fn rollback(&self) -> SqlResult<()> {
        self.batch("ROLLBACK")
    }
}

/// A value as SQL text: SQLite's column as it would print it, PostgreSQL's text form.
fn sqlite_text(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<Option<String>> {
    use rusqlite::types::ValueRef;
    Ok(match row.get_ref(index)? {
        ValueRef::Null => None,
        ValueRef::Integer(value) => Some(value.to_string()),
        ValueRef::Real(value) => Some(value.to_string()),
        ValueRef::Text(text) | ValueRef::Blob(text) => Some(String::from_utf8_lossy(text).into_owned()),
    })
}

/// `sql` with each `?N` outside quotes replaced by the literal of `params[N-1]`.
fn inline(sql: &str, params: &[&dyn Literal]) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        if c == '\'' {
            quoted = !quoted;
        }
        if c != '?' || quoted {
            out.push(c);
            continue;
        }
        let mut digits = String::new();
        while let Some(digit) = chars.next_if(char::is_ascii_digit) {
            digits.push(digit);
        }
        let index: usize = digits.parse().unwrap_or_else(|_| panic!("a bare ? in {sql}: write ?1, ?2, ..."));
        let param = params.get(index.wrapping_sub(1)).unwrap_or_else(|| panic!("no parameter ?{index} for {sql}"));
        out.push_str(&param.literal());
    }
    out
}

/// A Rust value written as an SQL literal both dialects read alike.
pub trait Literal {
    fn literal(&self) -> String;
}

macro_rules! integer_literals {
    ($($t:ty),*) => {$(
        impl Literal for $t {
            fn literal(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
integer_literals!(i32, i64, u32, u64, usize);

impl Literal for str {
    fn literal(&self) -> String {
        format!("'{}'", self.replace('\'', "''"))
    }
}

impl Literal for &str {
    fn literal(&self) -> String {
        (**self).literal()
    }
}

impl Literal for String {
    fn literal(&self) -> String {
        self.as_str().literal()
    }
}

impl<T: Literal> Literal for Option<T> {
    fn literal(&self) -> String {
        self.as_ref().map_or_else(|| "NULL".to_owned(), Literal::literal)
    }
}

/// One row of an answer, each value as text (`None` for NULL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row(pub Vec<Option<String>>);

impl Row {
    /// Column `index` read as `T`; a value `T` cannot be read from fails the test.
    pub fn get<T: FromText>(&self, index: usize) -> T {
        let value = self.0.get(index).unwrap_or_else(|| panic!("no column {index} in {self:?}"));
        T::from_text(value.as_deref())
            .unwrap_or_else(|| panic!("column {index} of {self:?} as {}", std::any::type_name::<T>()))
    }
}

/// A type a column's text reads as.
pub trait FromText: Sized {
    fn from_text(text: Option<&str>) -> Option<Self>;
}

macro_rules! parsed {
    ($($t:ty),*) => {$(
        impl FromText for $t {
            fn from_text(text: Option<&str>) -> Option<Self> {
                text?.parse().ok()
            }
        }
    )*};
}
parsed!(i32, i64, u32, u64, f64, String);

impl FromText for bool {
    fn from_text(text: Option<&str>) -> Option<Self> {
        match text? {
            "1" | "t" | "true" => Some(true),
            "0" | "f" | "false" => Some(false),
            _ => None,
        }
    }
}

impl<T: FromText> FromText for Option<T> {
    fn from_text(text: Option<&str>) -> Option<Self> {
        match text {
            None => Some(None),
            Some(_) => T::from_text(text).map(Some),
        }
    }
}
