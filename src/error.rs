//! The library's one error type.
//!
//! Every variant carries the thing to fix (file, variable, connector, key) as a field, and its message
//! says what to do next. No variant ever holds a secret: keys are named by connector and key name only.

use std::path::PathBuf;

use crate::coordinator::Unavailable;

/// A boxed cause from below the library (SQLite, the pool), kept opaque so the public API names no
/// backend type.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in apijongler.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No keyring path was given and `APIJONGLER_CONFIG` is not set.
    #[error(
        "APIJONGLER_CONFIG is not set: point it at your keyring INI file (one [connector] section, one `name = secret` line per key)"
    )]
    ConfigNotSet,

    /// The keyring file does not exist.
    #[error("keyring file {path} does not exist: create it, or set APIJONGLER_CONFIG to the right path")]
    ConfigMissing {
        /// The path that was tried.
        path: PathBuf,
    },

    /// The keyring file exists but could not be read.
    #[error("cannot read keyring file {path}")]
    ConfigRead {
        /// The keyring file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The keyring file is not valid INI.
    #[error("{path}:{line}:{column}: {message} (the keyring is INI: [connector] sections of `name = secret` lines)")]
    ConfigSyntax {
        /// The keyring file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// What the parser found wrong.
        message: String,
    },

    /// The keyring parses, but says something apijongler cannot use (a duplicate key, an empty secret).
    #[error("{path}: {problem}")]
    ConfigInvalid {
        /// The keyring file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        problem: String,
    },

    /// The keyring has no section for the connector.
    #[error(
        "no keys for connector '{connector}' in {path}: add a [{connector}] section with one `name = secret` line per key"
    )]
    NoKeyringSection {
        /// The connector asked for.
        connector: String,
        /// The keyring file.
        path: PathBuf,
    },

    /// The connector's section exists but is empty.
    #[error("section [{connector}] of {path} has no keys: add one `name = secret` line per key")]
    NoKeysConfigured {
        /// The connector asked for.
        connector: String,
        /// The keyring file.
        path: PathBuf,
    },

    /// No connector of that name is embedded or in `APIJONGLER_CONNECTORS`.
    #[error(
        "unknown connector '{name}'; known: {}. Add a JSON file for it to the directory named by APIJONGLER_CONNECTORS",
        known.join(", ")
    )]
    UnknownConnector {
        /// The name asked for.
        name: String,
        /// The names that exist.
        known: Vec<String>,
    },

    /// A connector file is not valid.
    #[error("{path}:{line}:{column}: {message}")]
    ConnectorFile {
        /// The connector file.
        path: PathBuf,
        /// 1-based line (0 if the problem is not at a position).
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },

    /// The connector directory or one of its files could not be read.
    #[error("cannot read connector definitions at {path} (named by APIJONGLER_CONNECTORS)")]
    ConnectorsDir {
        /// The directory or file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// Neither `APIJONGLER_DB`, `XDG_STATE_HOME` nor `HOME` says where the database goes.
    #[error("cannot tell where the database goes: set APIJONGLER_DB (or HOME / XDG_STATE_HOME)")]
    NoDatabaseLocation,

    /// The database directory could not be created, or the file could not be created in it.
    #[error(
        "cannot create the database at {path}: set APIJONGLER_DB to a file in a writable directory on a local disk"
    )]
    DatabaseCreate {
        /// The database file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The file at the database path is not an SQLite database.
    #[error(
        "{path} is not an apijongler database (not an SQLite file); it was left untouched: move it away or set APIJONGLER_DB to another path"
    )]
    NotADatabase {
        /// The file that was found.
        path: PathBuf,
    },

    /// The database was written by a newer apijongler.
    #[error(
        "{path} has schema version {found}, but this apijongler knows only up to {supported}; it was left untouched: upgrade apijongler, or set APIJONGLER_DB to another file"
    )]
    SchemaTooNew {
        /// The database file.
        path: PathBuf,
        /// The version found in the file.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },

    /// The file at the database path is an SQLite database of another application.
    #[error(
        "{path} is an SQLite database of another application (it has no apijongler tables and no apijongler application_id); it was left untouched: set APIJONGLER_DB to another path"
    )]
    ForeignDatabase {
        /// The file that was found.
        path: PathBuf,
    },

    /// Another process held the database's write lock for longer than the caller could wait.
    #[error(
        "database {path} stayed locked by another process for {:.1} s while {operation}; find the holder with `fuser {path}` (an open `sqlite3` shell with a transaction, or a stopped apijongler process) and end it",
        waited.as_secs_f64()
    )]
    DatabaseLocked {
        /// The database file.
        path: PathBuf,
        /// What apijongler was doing.
        operation: &'static str,
        /// How long it waited for the lock.
        waited: std::time::Duration,
    },

    /// The database file was deleted or replaced while this process had it open: going on would
    /// split the pool in two.
    #[error(
        "database {path} {what} while this process was using it; nothing more was written. Processes that still have the old file open must be restarted; do not delete the database of running processes"
    )]
    DatabaseReplaced {
        /// The database path.
        path: PathBuf,
        /// What happened to the file.
        what: String,
    },

    /// Any other database failure.
    #[error("database {path}: {operation} failed{}", if hint.is_empty() { String::new() } else { format!(" ({hint})") })]
    Database {
        /// The database file.
        path: PathBuf,
        /// What apijongler was doing.
        operation: &'static str,
        /// What to check, where the failure says it.
        hint: &'static str,
        /// The cause.
        #[source]
        source: Cause,
    },

    /// No key of the connector could be claimed within the wait.
    #[error("{0}")]
    NoKeyAvailable(Box<Unavailable>),

    /// The request cannot be sent as given (bad method, bad proxy URL).
    #[error("{problem}")]
    InvalidRequest {
        /// What is wrong.
        problem: String,
    },

    /// No answer came from the upstream (timeouts, connection errors) within the retry budget.
    #[error("no answer from '{connector}' for {endpoint} after {attempts} attempts")]
    Transport {
        /// The connector.
        connector: String,
        /// The endpoint path.
        endpoint: String,
        /// Attempts made.
        attempts: u32,
        /// The last transport error (its text holds no secret: keys travel only in headers).
        #[source]
        source: Cause,
    },

    /// The upstream answered with a non-2xx status (for `request_json`).
    #[error("'{connector}' answered {status}: {body}")]
    Upstream {
        /// The connector.
        connector: String,
        /// HTTP status.
        status: u16,
        /// The parsed error body (a JSON string when it was not JSON).
        body: Box<serde_json::Value>,
    },

    /// A 2xx answer that is not JSON (for `request_json`).
    #[error("the answer ({status}) is not JSON: {text}")]
    NotJson {
        /// HTTP status.
        status: u16,
        /// The body text.
        text: String,
    },

    /// The lease was taken away (the key was reaped or cleaned up): stop using the key.
    #[error(
        "lease {lease} on key '{key}' of '{connector}' was lost (reaped or cleaned up); the key must not be used any more under it"
    )]
    LeaseLost {
        /// The connector.
        connector: String,
        /// The key name.
        key: String,
        /// The lease token that is no longer current.
        lease: i64,
    },
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
