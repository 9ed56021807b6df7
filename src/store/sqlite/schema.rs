//! Opening the database file: location, creation, pragmas, WAL, and the embedded migrations.
//!
//! Invariants: a file that is not SQLite, another application's database, or a database with a newer
//! schema than this build knows is refused before anything is written to it. apijongler's files carry
//! `PRAGMA application_id` [`APPLICATION_ID`]; an empty file, or one written by a build older than
//! the stamp (schema 1 or 2 with a `keys` table), is adopted. The schema version is read inside the
//! same `BEGIN IMMEDIATE` transaction that migrates, so any number of processes may open a fresh file
//! at once.
//!
//! Pooled connections open the file without `SQLITE_OPEN_CREATE`, so a file deleted while in use is
//! never silently re-created empty by a later connection; [`FileIdentity`] tells when the path no
//! longer leads to the file this process opened.

use std::cell::Cell;
use std::fs::OpenOptions;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior};

use crate::error::{Error, Result};

/// The embedded migrations, in order; migration `n` (1-based) brings the schema to version `n`.
const MIGRATIONS: &[&str] = &[
    include_str!("../../../migrations/0001_initial.sql"),
    include_str!("../../../migrations/0002_requests.sql"),
    include_str!("../../../migrations/0003_liveness.sql"),
    include_str!("../../../migrations/0004_quotas.sql"),
    include_str!("../../../migrations/0005_history_events.sql"),
    include_str!("../../../migrations/0006_resources.sql"),
    include_str!("../../../migrations/0007_reservations.sql"),
    include_str!("../../../migrations/0008_learned_limits_and_tokens.sql"),
    include_str!("../../../migrations/0009_scope_watermark.sql"),
];

/// `PRAGMA application_id` of apijongler's databases ("AJNG"), set by migration 3.
pub const APPLICATION_ID: i64 = 0x414A_4E47;

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// How long one statement waits for another process's write lock before SQLite reports busy.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// WAL pages after which a commit checkpoints itself: a backstop only. A commit that checkpoints
/// copies the log into the database and fsyncs both before its caller gets its answer, and on an ext4
/// disk that put the claim+release p99 at 16 processes at 10 to 55 ms (1 to 2.3 ms with no checkpoints;
/// 2 to 3 ms on tmpfs). So each process's checkpointer thread ([`spawn_checkpointer`]) copies the log
/// off the hot path, and a commit checkpoints only if the log still grows past 64 MB.
const CHECKPOINT_PAGES: i64 = 16_000;

/// How often the checkpointer looks for new writes to copy into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);

/// Write transactions started by this process, so the checkpointer sleeps while it only reads: a
/// process that only reads never checkpoints. (After a `-shm` file was deleted under a writer, a
/// reader's new index is stale; a checkpoint through it would copy the wrong frames into the database.)
static WRITES: AtomicU64 = AtomicU64::new(0);

/// Counts a write transaction of this process, for the checkpointer.
pub(super) fn note_write() {
    WRITES.fetch_add(1, Ordering::Relaxed);
}

/// Pooled connections per process: a handful of threads of one process write at most one at a time
/// anyway, because SQLite has one writer.
const POOL_SIZE: u32 = 8;

/// The device and inode of the database file this process opened: if the path later leads elsewhere
/// (the file was deleted, or replaced by another), this process and new ones would use two pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileIdentity {
    device: u64,
    inode: u64,
}

impl FileIdentity {
    fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        Ok(Self { device: meta.dev(), inode: meta.ino() })
    }

    /// `None` while `path` still leads to this file; else what happened to it.
    pub(super) fn lost_at(&self, path: &Path) -> Option<String> {
        match Self::of(path) {
            Ok(now) if now == *self => None,
            Ok(_) => Some("was replaced by another file".to_owned()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Some("was deleted".to_owned()),
            Err(error) => Some(format!("cannot be checked ({error})")),
        }
    }
}

/// Opens (creating if needed) and migrates the database, and returns a pool of configured connections
/// and the identity of the file they use.
pub(super) fn open(path: &Path) -> Result<(r2d2::Pool<SqliteConnectionManager>, FileIdentity)> {
    crate::fork_guard::guard_forks();
    create_file(path)?;
    let failed = |operation| {
        let path = path.to_owned();
        move |error: rusqlite::Error| classify(&path, operation, error)
    };

    let mut setup = Connection::open_with_flags(path, existing_file()).map_err(failed("opening"))?;
    configure(&setup).map_err(failed("configuring the connection"))?;
    let identity = FileIdentity::of(path).map_err(|source| Error::DatabaseCreate { path: path.to_owned(), source })?;
    // Read before anything can write: a foreign or newer file must stay byte-for-byte untouched.
    let version = refuse_foreign_or_newer(&setup, path)?;
    switch_to_wal(&setup).map_err(failed("switching to WAL mode"))?;
    if version < SCHEMA_VERSION {
        migrate(&mut setup, path)?;
    }
    drop(setup);

    // The pool's manager keeps `alive`; the checkpointer stops once the pool (and its manager) is gone.
    let alive = Arc::new(());
    spawn_checkpointer(path.to_owned(), Arc::downgrade(&alive));
    let manager = SqliteConnectionManager::file(path).with_flags(existing_file()).with_init(move |connection| {
        let _alive = &alive;
        configure(connection)
    });
    let pool = r2d2::Pool::builder()
        .max_size(POOL_SIZE)
        .min_idle(Some(0))
        .test_on_check_out(false)
        .connection_timeout(Duration::from_secs(30))
        .build_unchecked(manager);
    Ok((pool, identity))
}

/// Starts the thread that checkpoints `path` every [`CHECKPOINT_EVERY`] while this process uses it,
/// until `alive` is gone. A PASSIVE checkpoint never waits for a lock and never blocks a writer; its
/// connection is opened per checkpoint, so none outlives the store (the last connection to close
/// deletes the log).
fn spawn_checkpointer(path: PathBuf, alive: Weak<()>) {
    let spawned = std::thread::Builder::new().name("apijongler-checkpoint".to_owned()).spawn(move || {
        let mut seen = WRITES.load(Ordering::Relaxed);
        while alive.strong_count() > 0 {
            std::thread::sleep(CHECKPOINT_EVERY);
            let now = WRITES.load(Ordering::Relaxed);
            if now == seen {
                continue;
            }
            let checkpointed = {
                // While a fork is under way, the next round checkpoints instead.
                let Some(_held_off) = crate::fork_guard::hold_off_forks() else { continue };
                // No busy wait (rusqlite's default is 5 s): a fork waits for this round to end.
                Connection::open_with_flags(&path, existing_file()).and_then(|connection| {
                    connection.busy_timeout(Duration::ZERO)?;
                    connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                })
            };
            seen = now;
            if let Err(error) = checkpointed {
                // The next commits still checkpoint past CHECKPOINT_PAGES; the store reports real failures.
                tracing::debug!(path = %path.display(), %error, "background checkpoint failed");
            }
        }
    });
    if let Err(error) = spawned {
        tracing::warn!(%error, "no checkpointer thread: commits checkpoint the log themselves");
    }
}

/// Read-write, never create: the file is created once, by `create_file`.
fn existing_file() -> OpenFlags {
    OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI
}

/// Creates the parent directory and, if there is none yet, the file (mode 0600: the file says which
/// keys a user has).
///
/// An existing file is never opened here: closing any descriptor of a file drops every POSIX lock this
/// process holds on it, SQLite's included, so a second store opened in a process that already uses the
/// file (the gateway's jonglers beside its coordinator) would let another process checkpoint and delete
/// the WAL under it.
fn create_file(path: &Path) -> Result<()> {
    let create_error = |source| Error::DatabaseCreate { path: path.to_owned(), source };
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(create_error)?;
    }
    match OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(create_error(error)),
    }
}

/// Per-connection settings; the lock wait first so the others already wait politely.
fn configure(connection: &Connection) -> rusqlite::Result<()> {
    wait_for_lock(connection, Instant::now() + BUSY_TIMEOUT)?;
    connection.pragma_update(None, "synchronous", "NORMAL")?;
    connection.pragma_update(None, "foreign_keys", "ON")?;
    connection.pragma_update(None, "wal_autocheckpoint", CHECKPOINT_PAGES)?;
    connection.set_prepared_statement_cache_capacity(32);
    Ok(())
}

/// WAL mode is a property of the file, so it is switched once here, not per connection. Several
/// processes switching a fresh file at once can see "database is locked" despite the busy timeout;
/// a retry bounded like every other lock wait (by the store's default floor) absorbs that.
fn switch_to_wal(connection: &Connection) -> rusqlite::Result<()> {
    let deadline = Instant::now() + super::DEFAULT_LOCK_WAIT_FLOOR;
    loop {
        let result: rusqlite::Result<String> =
            connection.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0));
        match result {
            Ok(mode) if mode.eq_ignore_ascii_case("wal") => return Ok(()),
            Ok(mode) => {
                return Err(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
                    Some(format!("the file system refused WAL mode (journal mode stays '{mode}')")),
                ));
            }
            Err(error) if is_busy(&error) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5 + fastrand::u64(0..20)));
            }
            Err(error) => return Err(error),
        }
    }
}

fn migrate(connection: &mut Connection, path: &Path) -> Result<()> {
    let failed = |error| classify(path, "migrating the schema", error);
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(failed)?;
    let version = refuse_foreign_or_newer(&transaction, path)?;
    // Another process may have migrated between our first read and this transaction.
    let applied = usize::try_from(version).unwrap_or(0);
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        transaction.execute_batch(sql).map_err(failed)?;
        tracing::info!(path = %path.display(), version = index + 1, "database schema migrated");
    }
    if version < SCHEMA_VERSION {
        transaction.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(failed)?;
    }
    transaction.commit().map_err(failed)
}

/// The schema version of an apijongler database (0 for an empty file); an error for a newer schema
/// or for another application's database, which must not be adopted.
fn refuse_foreign_or_newer(connection: &Connection, path: &Path) -> Result<i64> {
    // One statement, so one snapshot: another process may be migrating the file right now.
    let (version, application_id, objects, has_keys): (i64, i64, i64, bool) = connection
        .query_row(
            "SELECT (SELECT user_version FROM pragma_user_version),
                    (SELECT application_id FROM pragma_application_id),
                    count(*), coalesce(sum(type = 'table' AND name = 'keys'), 0) > 0
               FROM sqlite_schema",
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
        )
        .map_err(|error| classify(path, "reading", error))?;
    let ours = match application_id {
        APPLICATION_ID => true,
        // Empty, or written by apijongler before it stamped its files.
        0 => objects == 0 || (has_keys && (1..APPLICATION_ID_SINCE).contains(&version)),
        _ => false,
    };
    if !ours {
        return Err(Error::ForeignDatabase { path: path.to_owned() });
    }
    if version > SCHEMA_VERSION {
        return Err(Error::SchemaTooNew { path: path.to_owned(), found: version, supported: SCHEMA_VERSION });
    }
    Ok(version)
}

/// The schema version whose migration stamps `application_id`.
const APPLICATION_ID_SINCE: i64 = 3;

thread_local! {
    /// The deadline of the statements this thread runs, for [`retry_until_deadline`], which SQLite
    /// calls as a plain `fn` without context. A pooled connection runs on the thread that checked it
    /// out, right after [`wait_for_lock`] set this.
    static LOCK_DEADLINE: Cell<Instant> = Cell::new(Instant::now());
}

/// The sleeps of a lock wait, in ms, retry by retry: SQLite's own steps (1, 2, 5, ... ms: the write lock
/// is mostly held for a fraction of a millisecond) but never longer than 25 ms, where SQLite's go to
/// 100 ms. Shorter sleeps were measured and dropped: on 2 cores, 16 waiters retrying every 0.1 to 1 ms
/// took the CPU from the lock's holder (at 16 processes on 64 keys the claim+release p99 went from 11 to
/// 40 ms, the throughput from 65 to 35 % of raw SQLite), though the p99.9 fell from 340 to 80 ms.
const PAUSES_MS: [u64; 7] = [1, 2, 5, 10, 15, 20, 25];

/// Makes `connection`'s next statements on this thread wait for another connection's lock until
/// `deadline`, then fail with SQLITE_BUSY; replaces SQLite's busy timeout (see [`retry_until_deadline`]).
pub(super) fn wait_for_lock(connection: &Connection, deadline: Instant) -> rusqlite::Result<()> {
    LOCK_DEADLINE.set(deadline);
    connection.busy_handler(Some(retry_until_deadline))
}

/// SQLite's busy handler, `attempt` being the retries of this lock wait so far: true to try again,
/// after the next of [`PAUSES_MS`], cut short at the deadline [`wait_for_lock`] set.
fn retry_until_deadline(attempt: i32) -> bool {
    let left = LOCK_DEADLINE.get().saturating_duration_since(Instant::now());
    if left.is_zero() {
        return false;
    }
    let step = usize::try_from(attempt).unwrap_or(0).min(PAUSES_MS.len() - 1);
    std::thread::sleep(Duration::from_millis(PAUSES_MS[step]).min(left));
    true
}

/// True for the two answers that mean "another connection holds the lock, try again".
pub(super) fn is_busy(error: &rusqlite::Error) -> bool {
    matches!(error.sqlite_error_code(), Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked))
}

/// Maps an SQLite failure to the library error, recognising a file that is not a database and the
/// failures that come from the file system (full, read-only, I/O), whose hint differs.
pub(super) fn classify(path: &Path, operation: &'static str, error: rusqlite::Error) -> Error {
    let hint = match error.sqlite_error_code() {
        // Both are what reading the log through another process's stale index looks like.
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) if shm_deleted_in_use(path) => SHM_DELETED,
        Some(ErrorCode::NotADatabase) => return Error::NotADatabase { path: path.to_owned() },
        Some(ErrorCode::DiskFull) => "the disk is full: free space on it",
        Some(ErrorCode::ReadOnly | ErrorCode::PermissionDenied | ErrorCode::CannotOpen) => {
            "check the file's and its directory's permissions (APIJONGLER_DB names the file)"
        }
        Some(ErrorCode::SystemIoFailure | ErrorCode::FileLockingProtocolFailed) => {
            "the file system failed; the database must be on a local disk (NFS and SMB break SQLite's WAL mode)"
        }
        Some(ErrorCode::DatabaseCorrupt) => {
            "the file is damaged: move it away (the keys come back from the keyring; the history stays in the old file)"
        }
        _ => "",
    };
    // SQLite's syntax errors quote the statement; a message never shows SQL (a migration's, say).
    let source: crate::error::Cause = match error {
        rusqlite::Error::SqlInputError { msg, .. } => msg.into(),
        error => Box::new(error),
    };
    Error::Database { path: path.to_owned(), operation, hint, source }
}

/// The hint for a database whose `-shm` file was deleted while processes had it open.
const SHM_DELETED: &str = "the database's shared-memory index (the file ending in -shm) was deleted while processes \
     were using it, so they no longer see each other's writes; nothing is lost: stop the processes using the \
     database (`fuser` on the file finds them), then run the command again (SQLite rebuilds the index from the file \
     and its -wal); do not move the database away";

/// True when some process (this one included) still maps `path`'s `-shm` file although it was deleted:
/// then processes that opened the database since use a new, empty index beside the old one, and read
/// the write-ahead log through the wrong one, which SQLite reports as a malformed database although the
/// file is sound. Linux shows such a mapping in `/proc/PID/maps` as `PATH-shm (deleted)`; processes of
/// other users are not readable there and are not seen.
fn shm_deleted_in_use(path: &Path) -> bool {
    let Some(db) = path.parent().and_then(|dir| dir.canonicalize().ok()).zip(path.file_name()) else {
        return false;
    };
    let mut shm = db.0.join(db.1).into_os_string();
    shm.push("-shm (deleted)");
    let Some(shm) = shm.to_str() else { return false };
    let Ok(processes) = std::fs::read_dir("/proc") else { return false };
    processes
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_name().to_str().is_some_and(|name| name.bytes().all(|b| b.is_ascii_digit())))
        .any(|entry| {
            std::fs::read_to_string(entry.path().join("maps"))
                .is_ok_and(|maps| maps.lines().any(|line| line.ends_with(shm)))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(error: rusqlite::Error) -> String {
        let error = classify(Path::new("/db"), "testing", error);
        let mut text = error.to_string();
        let mut cause = std::error::Error::source(&error);
        while let Some(inner) = cause {
            text.push_str(&format!(": {inner}"));
            cause = inner.source();
        }
        text
    }

    fn failure(code: std::ffi::c_int) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None)
    }

    #[test]
    fn the_hint_fits_the_failure() {
        let full = message(failure(rusqlite::ffi::SQLITE_FULL));
        assert!(full.contains("the disk is full") && !full.contains("NFS"), "{full}");
        let io = message(failure(rusqlite::ffi::SQLITE_IOERR));
        assert!(io.contains("NFS"), "{io}");
        let plain = message(failure(rusqlite::ffi::SQLITE_CONSTRAINT));
        assert!(!plain.contains("NFS") && !plain.contains('('), "{plain}");
    }

    /// The busy handler keeps the caller's deadline: it gives up at it (not 100 ms later, as SQLite's
    /// steps could), and retries until then.
    #[test]
    fn a_lock_wait_ends_at_its_deadline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lock.db");
        let holder = Connection::open(&path).expect("open");
        holder.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(x); BEGIN IMMEDIATE;").expect("lock");
        let waiter = Connection::open(&path).expect("open");
        let started = Instant::now();
        wait_for_lock(&waiter, started + Duration::from_millis(300)).expect("handler");
        let error = waiter.execute_batch("BEGIN IMMEDIATE").expect_err("still locked");
        let waited = started.elapsed();
        assert!(is_busy(&error), "{error}");
        // A generous upper bound: a loaded machine may deschedule the waiter, but not for seconds.
        assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(3), "{waited:?}");
    }

    #[test]
    fn no_message_quotes_sql() {
        let error = rusqlite::Error::SqlInputError {
            error: rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            msg: "incomplete input".to_owned(),
            sql: "CREATE TABLE secret_statement_text (".to_owned(),
            offset: 36,
        };
        let text = message(error);
        assert!(!text.contains("secret_statement_text"), "{text}");
        assert!(text.contains("testing failed"), "{text}");
    }
}
