//! The library's one error type.
//!
//! Every variant carries the thing to fix (file, variable, connector, key) as a field, and its message
//! says what to do next. No variant ever holds a secret: keys are named by connector and key name only.

use std::path::PathBuf;

use crate::pool::{LimitProblem, Unavailable};

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

    /// The database value (`APIJONGLER_DB`, `--db`, `CoordinatorOptions::db_path`) is a URL of a scheme
    /// apijongler does not speak. Only the scheme is kept: the rest may hold a password.
    #[error(
        "{given_by} holds a {scheme}:// URL, a database apijongler does not speak: give a file path (SQLite) or a postgres:// URL (PostgreSQL)"
    )]
    UnsupportedDatabaseUrl {
        /// The variable, flag or option that gave it.
        given_by: String,
        /// The URL's scheme.
        scheme: String,
    },

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

    /// Another process held the database's write lock (on PostgreSQL: the rows needed) for longer than
    /// the caller could wait.
    #[error(
        "database {path} stayed locked by another process for {:.1} s while {operation}; {}",
        waited.as_secs_f64(), find_lock_holder(path)
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

    /// The database server could not be reached (not running, restarting, failing over, cut off) for
    /// as long as the operation could wait: unlike [`Error::Database`], a moment may end it. A waiter
    /// for a key waits through it until its deadline.
    #[error("database {path}: {operation} failed ({hint})")]
    DatabaseUnreachable {
        /// The server's URL, its password masked.
        path: PathBuf,
        /// What apijongler was doing.
        operation: &'static str,
        /// What to check.
        hint: &'static str,
        /// The cause.
        #[source]
        source: Cause,
    },

    /// The key claimed from the database is not in this process's keyring, or has another secret there:
    /// another keyring synced the database since this process loaded its own.
    #[error(
        "key '{key}' of '{connector}' was claimed from the database, but the keyring {path} {problem}: another keyring synced this database since this process started. Restart it, or give each keyring its own database (APIJONGLER_DB)"
    )]
    KeyringDiffers {
        /// The connector.
        connector: String,
        /// The key name.
        key: String,
        /// This process's keyring.
        path: PathBuf,
        /// "has no such key" or "has another secret for it".
        problem: &'static str,
    },

    /// No key of the connector could be claimed within the wait.
    #[error("{0}")]
    NoKeyAvailable(Box<Unavailable>),

    /// The request names a resource (a file, a cached content, a batch, a tuned model) that belongs to
    /// the project of the key that created it, and no key of that project can come back to serve it
    /// (each is in error or left the keyring): another project's key would only get a 403.
    #[error(
        "{resource} was created with key '{key}' of '{connector}' and only keys of its project ({scope}) may use it, but none of them can: {why}. Run `apijongler cleanup {connector}` if they are in error, put the key back in the keyring, or create {resource} again with another key"
    )]
    ResourceOwnerUnavailable {
        /// The connector.
        connector: String,
        /// The resource, e.g. `files/abc`.
        resource: String,
        /// The key that created it.
        key: String,
        /// That key's quota scope (its project, or `key:NAME`).
        scope: String,
        /// The state of the scope's keys, e.g. "2 in error".
        why: String,
    },

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

    /// No usable answer within the retry budget or the caller's deadline: a stream's first event never
    /// came (it timed out or ended before any event), an answer or event was larger than its limit, or
    /// a request that may have reached the upstream timed out and was not sent again.
    #[error("no usable answer from '{connector}' for {endpoint} after {attempts} attempts: {problem}")]
    Stream {
        /// The connector.
        connector: String,
        /// The endpoint path.
        endpoint: String,
        /// Attempts made.
        attempts: u32,
        /// What went wrong on the last attempt.
        problem: String,
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

    /// An instance (a `Coordinator`, a `Jongler`) created before a `fork()` was used in the child: its
    /// threads and database connections stayed in the parent, and the keys it holds are the parent's.
    #[error(
        "this apijongler instance was created by process {created_by}, and process {this_process} is a child forked from it: its heartbeat and database connections stayed in the parent, and the keys it holds are the parent's. Create a new Coordinator or Jongler in the child, after the fork (for a process pool: in the worker, not before starting the pool)"
    )]
    ForkedChild {
        /// The process that created the instance.
        created_by: u32,
        /// This process.
        this_process: u32,
    },

    /// A line of the keyring that apijongler cannot use. The message names the file, the line, the
    /// section and (only when it is a valid name) the key, never the line's text: it may be a secret.
    #[error("{path}:{line}: {problem}")]
    KeyringLine {
        /// The keyring file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong with it.
        problem: KeyringProblem,
    },

    /// A field of a connector file holds a value apijongler cannot use.
    #[error("{path}: `{field}` {problem}")]
    ConnectorField {
        /// The connector file (its bare file name for a shipped connector).
        path: PathBuf,
        /// The JSON field, dotted for nested ones (`policy.timeout_secs`).
        field: &'static str,
        /// What is wrong and what to write instead.
        problem: String,
    },

    /// Two files of the connector directory define the same connector.
    #[error(
        "{first} and {second} both define connector '{name}': give one another `name` (without one, the file name is the name) or remove it"
    )]
    DuplicateConnector {
        /// The connector name both define.
        name: String,
        /// The first file, in name order.
        first: PathBuf,
        /// The second file.
        second: PathBuf,
    },

    /// An environment variable holds a value apijongler cannot use.
    #[error("{variable}={value:?} is not valid: {expected} (or unset it)")]
    InvalidEnv {
        /// The variable.
        variable: &'static str,
        /// Its value (never a secret: no variable holds one).
        value: String,
        /// What the variable must hold.
        expected: &'static str,
    },
}

/// What is wrong with one keyring line (see [`Error::KeyringLine`]). No variant holds the line's text,
/// only names that passed the key-name rule, so a secret pasted in the wrong place is never shown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyringProblem {
    /// The line is not UTF-8.
    #[error("this line is not UTF-8 text: save the keyring as UTF-8")]
    NotUtf8,

    /// `[connector` without its `]`.
    #[error("this section header has no closing `]`: write it as `[connector]`")]
    UnclosedSection,

    /// `[]`, or a section name with a control character.
    #[error("this section header has no usable name: write the connector's name between the brackets, `[connector]`")]
    BadSection,

    /// Neither a section header, a comment, nor `name = secret`.
    #[error(
        "this line, {}, is neither a `[connector]` header nor a `name = secret` line: if it is a secret on a line of its own, put a name before it (`name = secret`); a comment starts with `;` or `#`",
        within(.section.as_deref())
    )]
    NotAKey {
        /// The section the line is in (`None`: before the first one).
        section: Option<String>,
    },

    /// `= secret` without a name.
    #[error("this key, {}, has no name before its `=`: write it as `name = secret`", within(.section.as_deref()))]
    MissingName {
        /// The section the line is in.
        section: Option<String>,
    },

    /// A name that breaks the key-name rule (see the keyring module).
    #[error(
        "the name of this key, {}, {reason}: a key name is 1 to 64 ASCII letters, digits and `-_.@+` (is a secret standing where its name should be?)",
        within(.section.as_deref())
    )]
    InvalidName {
        /// The section the line is in.
        section: Option<String>,
        /// What is wrong with the name, without showing it.
        reason: &'static str,
    },

    /// A valid key line before any section.
    #[error("key '{key}' stands before the first [connector] section: move it under the section of its connector")]
    BeforeSection {
        /// The key's name.
        key: String,
    },

    /// The same name twice in one section.
    #[error("key '{key}' appears twice in [{section}] (first on line {first_line}): give each key its own name")]
    DuplicateKey {
        /// The section.
        section: String,
        /// The key's name.
        key: String,
        /// The line of its first definition.
        first_line: usize,
    },

    /// `name =` with nothing after it.
    #[error("key '{key}' in [{section}] has an empty secret: put the secret after the `=`")]
    EmptySecret {
        /// The section.
        section: String,
        /// The key's name.
        key: String,
    },

    /// A secret an HTTP header cannot carry: it would be sent without a key, or not at all.
    #[error(
        "the secret of key '{key}' in [{section}] holds a control character, which an HTTP header cannot carry: paste the secret again"
    )]
    SecretNotHeaderSafe {
        /// The section.
        section: String,
        /// The key's name.
        key: String,
    },

    /// A `[connector groups]` section for a connector whose keys are not in this file.
    #[error(
        "section [{connector} groups] declares quota groups of connector '{connector}', but this file has no [{connector}] section: add the keys under [{connector}] or remove [{connector} groups] (no connector's name ends in ` groups`)"
    )]
    GroupsWithoutKeys {
        /// The connector the section is named after.
        connector: String,
    },

    /// A key in a `[connector groups]` section that the connector's section does not define.
    #[error(
        "key '{key}' in [{connector} groups] is not a key of [{connector}]: list only keys of [{connector}] there (a key in no group is a group of its own)"
    )]
    UnknownGroupKey {
        /// The connector.
        connector: String,
        /// The key's name.
        key: String,
    },

    /// The same key twice in a `[connector groups]` section.
    #[error(
        "key '{key}' appears twice in [{connector} groups] (first on line {first_line}): a key belongs to one quota group, list it once"
    )]
    DuplicateGroupKey {
        /// The connector.
        connector: String,
        /// The key's name.
        key: String,
        /// The line of its first listing.
        first_line: usize,
    },

    /// A quota group label that breaks the label rule (see the keyring module).
    #[error(
        "the quota group of key '{key}' in [{connector} groups] {reason}: a group label is 1 to 128 ASCII letters, digits and `-_.:@+/`, such as a Google Cloud project id"
    )]
    BadGroupLabel {
        /// The connector.
        connector: String,
        /// The key's name.
        key: String,
        /// What is wrong with the label, without showing it.
        reason: &'static str,
    },

    /// A quota group label that is the secret of a key of the file.
    #[error(
        "the quota group of key '{key}' in [{connector} groups] is the secret of a key: write the name of the project or account the key belongs to there, never a secret"
    )]
    GroupLabelIsSecret {
        /// The connector.
        connector: String,
        /// The key's name.
        key: String,
    },

    /// A line of a `[connector limits]` section that is not `MODEL = LIMIT, LIMIT, ...`.
    #[error(
        "this line, in [{section}], is not a `MODEL = LIMIT, LIMIT, ...` line (such as `gemini-2.5-flash = 10/min, 250/day`): a comment starts with `;` or `#`"
    )]
    NotALimitsLine {
        /// The limits section.
        section: String,
    },

    /// A model name that breaks the model-name rule (see the keyring module), or none.
    #[error(
        "the model of this line, in [{section}], {reason}: write a model's name (ASCII letters, digits and `-_.:/@+`, such as gemini-2.5-flash) or `*` for any model not listed"
    )]
    InvalidModel {
        /// The limits section.
        section: String,
        /// What is wrong with the name, without showing it.
        reason: &'static str,
    },

    /// The same model twice in one limits section (over all its headers). Lines of a limits section
    /// are named by number, never by their model: a malformed line may hold a secret.
    #[error(
        "the model of this line appears twice in [{section}] (first on line {first_line}): list each model once, with all its limits"
    )]
    DuplicateModel {
        /// The limits section.
        section: String,
        /// The line of its first listing.
        first_line: usize,
    },

    /// `MODEL =` with no limit after it.
    #[error(
        "the model of this line, in [{section}], has no limits: write them after the `=`, separated by commas (`10/min, 250/day`)"
    )]
    NoLimits {
        /// The limits section.
        section: String,
    },

    /// A limit that does not parse.
    #[error("the {} limit of this line, in [{section}], is not a limit: {problem}", ordinal(.position))]
    BadLimit {
        /// The limits section.
        section: String,
        /// Which limit of the line, from 1.
        position: usize,
        /// What is wrong with it.
        problem: LimitProblem,
    },

    /// Two limits of one model counting the same measure over the same window (`10/min, 20/min`, or
    /// `5/60s, 10/min`).
    #[error(
        "the {} and {} limits of this line, in [{section}], count the same measure (requests or tokens) over the same window: keep the one the provider states",
        ordinal(.first),
        ordinal(.second)
    )]
    SameLimitTwice {
        /// The limits section.
        section: String,
        /// The first of the two, from 1.
        first: usize,
        /// The second.
        second: usize,
    },

    /// A `[connector limits]` section for a connector whose keys are not in this file.
    #[error(
        "section [{section}] declares limits of connector '{connector}', but this file has no [{connector}] section: add the keys under [{connector}] or remove [{section}] (a section named `X limits` or `X limits GROUP` holds limits, never keys)"
    )]
    LimitsWithoutKeys {
        /// The limits section.
        section: String,
        /// The connector it is named after.
        connector: String,
    },

    /// A `[connector limits GROUP]` section whose group no key of `[connector groups]` belongs to.
    #[error(
        "section [{connector} limits {group}] declares limits of quota group '{group}', but [{connector} groups] puts no key in that group: declare the group in [{connector} groups] (`key = {group}`) or correct its name"
    )]
    UnknownLimitsGroup {
        /// The connector.
        connector: String,
        /// The group named in the header.
        group: String,
    },

    /// A model of a limits section that is the secret of a key of the file (it would be stored).
    #[error(
        "the model named on this line of [{section}] is the secret of a key: write the model's name there (such as gemini-2.5-flash), never a secret"
    )]
    LimitsModelIsSecret {
        /// The section's header, without its brackets.
        section: String,
    },
}

/// `1st`, `2nd`, `3rd`, `4th`, ..., `11th`, ..., `21st`: which limit of a line.
fn ordinal(position: &usize) -> String {
    let suffix = match (position % 10, position % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{position}{suffix}")
}

/// Where a keyring line stands: `in [section]`, or before the first section.
fn within(section: Option<&str>) -> String {
    match section {
        Some(section) => format!("in [{section}]"),
        None => "before the first [connector] section".to_owned(),
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to find what holds database `path`'s lock: a process that has the SQLite file open, or a
/// session on the PostgreSQL server (whose URL is then the path).
fn find_lock_holder(path: &std::path::Path) -> String {
    if path.to_str().is_some_and(|text| text.starts_with("postgres")) {
        return "find the session holding it in the server's pg_stat_activity (state 'idle in transaction', or a stopped apijongler process) and end it (pg_terminate_backend)".to_owned();
    }
    format!(
        "find the holder with `fuser {}` (an open `sqlite3` shell with a transaction, or a stopped apijongler process) and end it",
        path.display()
    )
}
