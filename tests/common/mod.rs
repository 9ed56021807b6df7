//! Shared by the integration tests: a temporary home for a keyring and a database (an SQLite file, or
//! a fresh PostgreSQL database when `APIJONGLER_TEST_PG` is set: see `store`), the real `apijongler`
//! binary, and direct reads of the database the way a user's `sqlite3` or `psql` would.

#![allow(dead_code)] // each test binary uses a different part of this module

pub mod browser;
pub mod gateway;
pub mod hosts;
pub mod socks;
pub mod store;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use api_jongler::pool::HistoryEvent;
use api_jongler::{Coordinator, CoordinatorOptions, Jongler, JonglerBuilder, Keyring, StreamingBody};
use tempfile::TempDir;

pub use store::{Sql, on_postgres};
// Used by the test binaries whose list has SQLite-only tests, not by every binary.
#[allow(unused_imports)]
pub use store::sqlite_only;

/// A temporary directory with a keyring, and a database: a path in that directory, or on PostgreSQL
/// the URL of the sandbox's own database (a `PathBuf` holding the URL's text, which `APIJONGLER_DB`
/// and `CoordinatorOptions::db_path` both read as a URL).
pub struct Sandbox {
    pub dir: TempDir,
    pub keyring: PathBuf,
    pub db: PathBuf,
    /// The PostgreSQL database behind `db`, dropped with the sandbox.
    pg: Option<store::PgDatabase>,
}

impl Sandbox {
    /// A keyring with `keys` keys in section `connector`.
    pub fn new(connector: &str, keys: usize) -> Self {
        let mut ini = format!("[{connector}]\n");
        for index in 0..keys {
            ini.push_str(&format!("key{index} = fake-secret-{connector}-{index}-do-not-use\n"));
        }
        Self::with_keyring(&ini)
    }

    /// Two keys of quota group g of connector c, with `limits` as the lines of `[c limits]` (the
    /// pacing tests' pool).
    pub fn with_limits(limits: &str) -> Self {
        Self::with_keyring(&format!(
            "[c]\nkey0 = fake-secret-c-0-do-not-use\nkey1 = fake-secret-c-1-do-not-use\n\
             [c groups]\nkey0 = g\nkey1 = g\n[c limits]\n{limits}\n"
        ))
    }

    /// A coordinator synced with the keyring whose clock is `clock`.
    pub fn coordinator_on(&self, clock: &std::sync::Arc<api_jongler::ManualClock>) -> Coordinator {
        self.coordinator(CoordinatorOptions { clock: clock.clone(), ..self.options() })
    }

    /// A sandbox whose keyring holds `ini`.
    pub fn with_keyring(ini: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let keyring = dir.path().join("keys.ini");
        std::fs::write(&keyring, ini).expect("write keyring");
        let pg = store::PgDatabase::create();
        let db = match &pg {
            Some(database) => PathBuf::from(database.url()),
            None => dir.path().join("state/apijongler.db"),
        };
        Self { dir, keyring, db, pg }
    }

    /// Another host on this sandbox's database: a directory and a keyring (`ini`) of its own. The
    /// database stays this sandbox's (dropped with it, so drop this one first).
    pub fn beside(&self, ini: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let keyring = dir.path().join("keys.ini");
        std::fs::write(&keyring, ini).expect("write keyring");
        Self { dir, keyring, db: self.db.clone(), pg: None }
    }

    /// The directory of this sandbox's connector files (`APIJONGLER_CONNECTORS`).
    pub fn connectors_dir(&self) -> PathBuf {
        self.dir.path().join("connectors")
    }

    /// Writes a connector file that sends `name` to `host:port` over plain HTTP with Gemini's key header
    /// (overriding the shipped connector of that name), with `policy` overrides.
    pub fn point_connector(&self, name: &str, host: &str, port: u16, policy: serde_json::Value) {
        let dir = self.connectors_dir();
        std::fs::create_dir_all(&dir).expect("mkdir connectors");
        let connector = serde_json::json!({
            "name": name, "host": host, "port": port, "protocol": "http",
            "api_key_header": "x-goog-api-key", "api_key_prefix": "", "policy": policy,
            "model": {"path_markers": ["models", "tunedModels"], "path_segments": 1, "body_field": "model"}
        });
        std::fs::write(dir.join(format!("{name}.json")), connector.to_string()).expect("write connector");
    }

    /// A library builder for `connector` on this sandbox's keyring, database and connector files.
    pub fn jongler(&self, connector: &str) -> JonglerBuilder {
        Jongler::builder(connector).keyring(&self.keyring).database(&self.db).connectors_dir(self.connectors_dir())
    }

    pub fn options(&self) -> CoordinatorOptions {
        CoordinatorOptions { db_path: Some(self.db.clone()), ..CoordinatorOptions::default() }
    }

    /// A coordinator on this sandbox's database, synced with its keyring.
    pub fn coordinator(&self, options: CoordinatorOptions) -> Coordinator {
        let coordinator = Coordinator::open(options).expect("open database");
        coordinator.sync(&self.load_keyring()).expect("sync keyring");
        coordinator
    }

    pub fn load_keyring(&self) -> Keyring {
        Keyring::load(&self.keyring).expect("keyring")
    }

    /// The real binary, with an empty environment apart from what the test gives it.
    pub fn apijongler(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_apijongler"));
        command.env_clear().env("APIJONGLER_DB", &self.db).env("APIJONGLER_CONFIG", &self.keyring);
        command
    }

    /// A worker process cycling keys of `connector` (see `src/cli/worker.rs`).
    pub fn worker(&self, connector: &str) -> Command {
        let mut command = self.apijongler();
        command.args(["--quiet", "worker", "--connector", connector]);
        command
    }

    /// A connection to the database for the test's own SQL, as a user's `sqlite3` or `psql` would open it.
    pub fn sql(&self) -> Sql {
        Sql::open(&self.db)
    }

    /// The SQLite file, for a test of the file itself (see `sqlite_only`).
    pub fn sqlite(&self) -> rusqlite::Connection {
        assert!(!on_postgres(), "an SQLite-only test ran on PostgreSQL: it should return at `sqlite_only`");
        let connection = rusqlite::Connection::open(&self.db).expect("open db");
        connection.busy_timeout(Duration::from_secs(10)).expect("busy timeout");
        connection
    }

    /// The single number a query such as `SELECT count(*) ...` answers.
    pub fn count(&self, sql: &str) -> i64 {
        self.sql().value(sql, &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Everything the store holds, as text to search: the SQLite file and its write-ahead log byte for
    /// byte (free pages included), or on PostgreSQL every row of every apijongler table.
    pub fn stored_text(&self) -> String {
        if on_postgres() {
            return self.sql().dump().expect("dump");
        }
        let mut bytes = std::fs::read(&self.db).expect("db");
        bytes.extend(std::fs::read(self.db.with_extension("db-wal")).unwrap_or_default());
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Every history row, oldest first, as a user's SQL reads it (an event the library does not know fails
    /// the test).
    pub fn history(&self) -> Vec<HistoryRow> {
        let rows = self
            .sql()
            .query(
                "SELECT id, key_name, from_state, to_state, lease, reason, at, holder_pid, event
                   FROM history ORDER BY id",
                &[],
            )
            .expect("history");
        rows.iter()
            .map(|row| HistoryRow {
                key: row.get(1),
                from: row.get(2),
                to: row.get(3),
                lease: row.get(4),
                reason: row.get(5),
                at: row.get(6),
                holder_pid: row.get(7),
                event: row.get::<String>(8).parse().expect("a known history event"),
            })
            .collect()
    }

    /// The pids recorded as holders of locked keys, as a reaper would read them.
    pub fn holder_pids(&self) -> Vec<u32> {
        let sql = "SELECT holder_pid FROM keys WHERE state = 'locked' AND holder_pid IS NOT NULL";
        self.sql().column(sql, &[]).expect("holder pids")
    }

    /// `(key_name, state)` of every key, by name.
    pub fn states(&self) -> Vec<(String, String)> {
        let rows = self.sql().query("SELECT key_name, state FROM keys ORDER BY key_name", &[]).expect("states");
        rows.iter().map(|row| (row.get(0), row.get(1))).collect()
    }
}

#[derive(Debug, Clone)]
pub struct HistoryRow {
    pub key: String,
    pub from: Option<String>,
    pub to: String,
    pub lease: Option<i64>,
    pub reason: String,
    pub at: i64,
    pub holder_pid: Option<u32>,
    pub event: HistoryEvent,
}

/// Checks the history's lease discipline and returns the number of completed claim/release cycles:
/// per key, every claim has a lease one above the last, and the key is never claimed again before
/// the lease that holds it has ended (released, locked down, errored or reaped). A claim's event is
/// `claimed` and it ends in `locked`; every row that leaves `locked` is an event that ends a lease.
pub fn check_leases(history: &[HistoryRow]) -> usize {
    use std::collections::HashMap;
    let mut holder: HashMap<&str, i64> = HashMap::new();
    let mut last_lease: HashMap<&str, i64> = HashMap::new();
    let mut released = 0;
    for row in history {
        let key = row.key.as_str();
        let (from_locked, to_locked) = (row.from.as_deref() == Some("locked"), row.to == "locked");
        assert_eq!(row.event == HistoryEvent::Claimed, to_locked && !from_locked, "{row:?}");
        assert_eq!(row.event.ends_lease(), from_locked && !to_locked, "{row:?}");
        if row.event == HistoryEvent::Claimed {
            let lease = row.lease.expect("claim has a lease");
            assert!(
                !holder.contains_key(key),
                "key {key} claimed under lease {lease} while lease {:?} still held it",
                holder.get(key)
            );
            let previous = last_lease.get(key).copied().unwrap_or(0);
            assert!(lease > previous, "lease of {key} went from {previous} to {lease}");
            holder.insert(key, lease);
            last_lease.insert(key, lease);
        } else if row.event.ends_lease() {
            let lease = row.lease.expect("end of a lease names it");
            assert_eq!(holder.remove(key), Some(lease), "key {key}: lease {lease} ended but was not the holder");
            if row.event == HistoryEvent::Released {
                released += 1;
            }
        }
    }
    released
}

/// Waits for a worker and returns its stdout; a failure shows its stdout and stderr.
pub fn wait_success(child: Child) -> String {
    let output = child.wait_with_output().expect("wait for worker");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "worker failed with {}: stdout {stdout} stderr {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Polls `condition` every few milliseconds until it holds or `limit` passes.
pub fn wait_until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reads `stream` to its end for at most `limit`: the bytes read, and whether it ended in time.
pub async fn drain(stream: &mut StreamingBody, limit: Duration) -> (Vec<u8>, bool) {
    let mut bytes = Vec::new();
    let ended = tokio::time::timeout(limit, async {
        while let Some(chunk) = stream.chunk().await {
            bytes.extend_from_slice(&chunk);
        }
    })
    .await;
    (bytes, ended.is_ok())
}

/// `PRAGMA integrity_check` says ok. A check of the SQLite file that processes were killed over; on
/// PostgreSQL the server keeps its own files whole, and there is no file to check.
pub fn assert_integrity(db: &Path) {
    if on_postgres() {
        return;
    }
    let connection = rusqlite::Connection::open(db).expect("open");
    let verdict: String = connection.query_row("PRAGMA integrity_check", [], |row| row.get(0)).expect("check");
    assert_eq!(verdict, "ok");
}

/// A user's `sqlite3` shell, open on the database until `release`.
pub struct SqliteShell {
    child: Child,
    stdin: ChildStdin,
}

impl SqliteShell {
    /// A shell holding the write lock (`BEGIN IMMEDIATE`) until `release`.
    pub fn lock(sandbox: &Sandbox) -> Self {
        Self::open(sandbox, "BEGIN IMMEDIATE;\nSELECT 'locked';", "locked")
    }

    /// A shell that has read the database once and stays open (keeping the `-shm` index it uses).
    pub fn read(sandbox: &Sandbox) -> Self {
        Self::open(sandbox, "SELECT 'read ' || count(*) FROM keys;", "read ")
    }

    /// Runs `commands` in a new shell and waits for its first line of output, which starts with `answer`.
    fn open(sandbox: &Sandbox, commands: &str, answer: &str) -> Self {
        assert!(!on_postgres(), "a sqlite3 shell on PostgreSQL: the test should return at `sqlite_only`");
        let mut child = Command::new("sqlite3")
            .arg(&sandbox.db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("sqlite3 is installed (.ci/run installs it)");
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, "{commands}").expect("write");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
        assert!(line.starts_with(answer), "sqlite3 answered {line:?} to {commands:?}");
        Self { child, stdin }
    }

    /// Commits the shell's transaction and quits.
    pub fn release(self) {
        self.run_and_quit("COMMIT;");
    }

    /// Quits the shell.
    pub fn quit(self) {
        self.run_and_quit("");
    }

    fn run_and_quit(mut self, commands: &str) {
        writeln!(self.stdin, "{commands}\n.quit").expect("write");
        drop(self.stdin);
        let status = self.child.wait().expect("sqlite3 exits");
        assert!(status.success(), "sqlite3 exits with {status}");
    }
}

/// A child process killed (and waited for) when this is dropped, so that a failing assertion never
/// leaves a server or a watch loop running after its test.
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
