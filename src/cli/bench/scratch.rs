//! Where each `bench keys` configuration runs: a store of its own, fresh, so that no configuration
//! inherits another's rows, history, dead tuples or cached plans.
//!
//! - SQLite (the default, and whenever `--db` is a file path, which the bench then ignores): a file
//!   in a temporary directory.
//! - PostgreSQL (`--db postgres://...`): a throwaway database `apijongler_bench_<run>_<n>` created on
//!   the server the URL names and dropped (`WITH (FORCE)`) as soon as the configuration ends, so the
//!   user needs the `CREATEDB` privilege. The database the URL names is only connected to, to create
//!   and drop those; the bench never reads or writes it, nor any other database. A bench killed
//!   before it drops its database leaves it behind (`psql -c '\l apijongler_bench_*'` lists them).
//!
//! These few statements are the bench's scaffolding, not the pool's: they live here, not in the store.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};

use anyhow::Context;
use api_jongler::store::Location;

use crate::cli::Global;

/// The server every configuration of one run gets its store on.
pub(in crate::cli) enum Server {
    Sqlite,
    Postgres(Box<Throwaways>),
}

/// A PostgreSQL server on which this run creates and drops its databases.
pub(in crate::cli) struct Throwaways {
    /// A connection to the database the user's URL names, for `CREATE` and `DROP DATABASE` only.
    admin: RefCell<postgres::Client>,
    /// The user's URL, password included: only ever handed to the driver and to the workers.
    url: String,
    /// The URL with its password masked: what messages and the report name.
    shown: String,
    /// This run's part of the databases' names, so that two runs on one server never meet.
    run: String,
    next: Cell<u32>,
}

impl Server {
    /// The server `global.db` names: PostgreSQL for a `postgres://` URL, else SQLite.
    pub(in crate::cli) fn of(global: &Global) -> anyhow::Result<Self> {
        let Some(db) = &global.db else { return Ok(Self::Sqlite) };
        let Location::Postgres(url) = Location::parse(db.as_os_str(), "--db")? else { return Ok(Self::Sqlite) };
        let text = db.to_str().context("a postgres:// URL is text")?.to_owned();
        let shown = url.redacted();
        let admin = postgres::Client::connect(&text, postgres::NoTls)
            .map_err(|error| database_error(&shown, "connecting to create the bench's databases", error))?;
        Ok(Self::Postgres(Box::new(Throwaways {
            admin: RefCell::new(admin),
            url: text,
            shown,
            run: format!("{}_{:04x}", std::process::id(), fastrand::u16(..)),
            next: Cell::new(0),
        })))
    }

    /// A fresh, empty store for one configuration, and a temporary directory beside it.
    pub(in crate::cli) fn scratch(&self) -> anyhow::Result<Scratch<'_>> {
        let dir = tempfile::tempdir()?;
        match self {
            Self::Sqlite => Ok(Scratch { db: dir.path().join("bench.db"), dir, database: None }),
            Self::Postgres(server) => {
                let n = server.next.replace(server.next.get() + 1);
                let name = format!("apijongler_bench_{}_{n}", server.run);
                server
                    .admin
                    .borrow_mut()
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .map_err(|error| database_error(&server.shown, "creating a throwaway database", error))?;
                let db = PathBuf::from(with_database(&server.url, &name));
                Ok(Scratch { db, dir, database: Some((server, name)) })
            }
        }
    }
}

impl std::fmt::Display for Throwaways {
    /// What the report says the bench ran on, the password masked.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PostgreSQL at {}, a fresh database per configuration; raw: the bare FOR UPDATE SKIP LOCKED claim \
             and its release, two statements",
            self.shown
        )
    }
}

/// One configuration's store: dropped (the PostgreSQL database with it) when this is.
pub(in crate::cli) struct Scratch<'a> {
    /// The `--db` value of the store: a file path or a URL (which may hold a password).
    db: PathBuf,
    dir: tempfile::TempDir,
    database: Option<(&'a Throwaways, String)>,
}

impl Scratch<'_> {
    /// The store, as `--db` and `CoordinatorOptions::db_path` take it.
    pub(in crate::cli) fn db(&self) -> &Path {
        &self.db
    }

    /// A temporary directory that lives as long as the store.
    pub(in crate::cli) fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        let Some((server, name)) = &self.database else { return };
        // FORCE: a worker that failed may still hold a connection; the database is the bench's own.
        if let Err(error) =
            server.admin.borrow_mut().batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        {
            tracing::warn!(database = %name, server = %server.shown, %error, "could not drop the bench's database");
        }
    }
}

/// The library's database error, naming the server by its masked URL and the privilege to check.
fn database_error(shown: &str, operation: &'static str, error: postgres::Error) -> anyhow::Error {
    api_jongler::Error::Database {
        path: PathBuf::from(shown),
        operation,
        hint: "bench keys creates and drops its own databases apijongler_bench_* there: the user needs CREATEDB",
        source: Box::new(error),
    }
    .into()
}

/// `url` naming database `name` instead of its own: the path replaced, any `dbname` parameter left out,
/// every other part (user, password, hosts, parameters such as `host=/run/pg`) kept as it was.
fn with_database(url: &str, name: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (tail, fragment) = tail.split_once('#').map_or((tail, None), |(tail, fragment)| (tail, Some(fragment)));
    let query = tail.split_once('?').map(|(_, query)| query);
    let mut rewritten = format!("{scheme}://{authority}/{name}");
    if let Some(query) = query {
        let kept: Vec<&str> =
            query.split('&').filter(|pair| pair.split('=').next() != Some("dbname") && !pair.is_empty()).collect();
        if !kept.is_empty() {
            rewritten.push('?');
            rewritten.push_str(&kept.join("&"));
        }
    }
    if let Some(fragment) = fragment {
        rewritten.push('#');
        rewritten.push_str(fragment);
    }
    rewritten
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn the_database_is_replaced_and_everything_else_kept() {
        for (url, expected) in [
            ("postgres://postgres@/mine?host=/tmp/pg", "postgres://postgres@/b?host=/tmp/pg"),
            ("postgres://u:pw@db.example:5433/mine", "postgres://u:pw@db.example:5433/b"),
            ("postgresql://u@h", "postgresql://u@h/b"),
            ("postgres:///mine", "postgres:///b"),
            ("postgres://u@h1,h2/mine?dbname=x&connect_timeout=3", "postgres://u@h1,h2/b?connect_timeout=3"),
            ("postgres://u@h?dbname=x", "postgres://u@h/b"),
            ("postgres://u@/?host=/s&dbname=x&application_name=a", "postgres://u@/b?host=/s&application_name=a"),
        ] {
            assert_eq!(with_database(url, "b"), expected, "{url}");
        }
    }

    #[test]
    fn the_rewritten_url_names_the_new_database_to_the_driver() {
        let url = with_database("postgres://u@/mine?host=/tmp/pg&dbname=other", "apijongler_bench_1_0");
        let config: postgres::Config = url.parse().expect("a URL the driver reads");
        assert_eq!(config.get_dbname(), Some("apijongler_bench_1_0"));
        assert_eq!(config.get_user(), Some("u"));
    }
}
