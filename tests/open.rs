//! Bad input: every one gives an error that names what to fix, and nothing existing is overwritten.

mod common;

use std::os::unix::fs::PermissionsExt;

use api_jongler::{Coordinator, CoordinatorOptions, Error, Keyring};
use common::Sandbox;

fn open(path: &std::path::Path) -> api_jongler::Result<Coordinator> {
    Coordinator::open(CoordinatorOptions { db_path: Some(path.to_owned()), ..CoordinatorOptions::default() })
}

#[test]
fn unset_config_variable_names_it() {
    let error = Keyring::from_env_value(None).expect_err("not set");
    assert!(matches!(error, Error::ConfigNotSet));
    assert!(error.to_string().contains("APIJONGLER_CONFIG"), "{error}");
    let empty = Keyring::from_env_value(Some("".as_ref())).expect_err("empty");
    assert!(matches!(empty, Error::ConfigNotSet));
}

#[test]
fn missing_keyring_file_names_the_path() {
    let sandbox = Sandbox::new("c", 1);
    let missing = sandbox.dir.path().join("nope.ini");
    let error = Keyring::from_env_value(Some(missing.as_os_str())).expect_err("missing");
    let message = error.to_string();
    assert!(matches!(error, Error::ConfigMissing { .. }));
    assert!(message.contains(&missing.display().to_string()) && message.contains("APIJONGLER_CONFIG"), "{message}");
}

#[test]
fn malformed_keyring_names_file_and_line() {
    let sandbox = Sandbox::with_keyring("[gemini]\nkey1 = fake\n\n[unclosed\nkey2 = fake\n");
    let message = Keyring::load(&sandbox.keyring).expect_err("malformed").to_string();
    assert!(message.starts_with(&format!("{}:4:", sandbox.keyring.display())), "{message}");
}

#[test]
fn connector_without_section_or_keys_says_what_to_add() {
    let sandbox = Sandbox::with_keyring("[empty]\n[gemini]\nkey1 = fake\n");
    let keyring = Keyring::load(&sandbox.keyring).expect("valid");
    let missing = keyring.keys("router.huggingface.co").expect_err("no section").to_string();
    assert!(missing.contains("[router.huggingface.co]") && missing.contains("keys.ini"), "{missing}");
    let empty = keyring.keys("empty").expect_err("no keys").to_string();
    assert!(empty.contains("[empty]") && empty.contains("no keys"), "{empty}");
}

#[test]
fn database_is_created_private_with_its_directory() {
    let sandbox = Sandbox::new("c", 1);
    sandbox.coordinator(sandbox.options());
    let mode = std::fs::metadata(&sandbox.db).expect("db exists").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn unwritable_database_directory_names_the_path_and_variable() {
    let sandbox = Sandbox::new("c", 1);
    // A regular file where a directory should be: refused even for root, unlike a read-only directory.
    let blocker = sandbox.dir.path().join("blocker");
    std::fs::write(&blocker, "a file, not a directory").expect("write");
    let db = blocker.join("apijongler.db");
    let error = open(&db).expect_err("cannot create");
    let message = format!("{error}");
    assert!(matches!(error, Error::DatabaseCreate { .. }), "{error:?}");
    assert!(message.contains(&db.display().to_string()) && message.contains("APIJONGLER_DB"), "{message}");
    assert_eq!(std::fs::read_to_string(&blocker).expect("still there"), "a file, not a directory");
}

#[test]
fn newer_schema_is_refused_untouched() {
    let sandbox = Sandbox::new("c", 1);
    std::fs::create_dir_all(sandbox.db.parent().expect("parent")).expect("mkdir");
    {
        let connection = rusqlite::Connection::open(&sandbox.db).expect("create");
        connection
            .execute_batch(&format!(
                "CREATE TABLE future (x); PRAGMA user_version = 99; PRAGMA application_id = {};",
                api_jongler::store::APPLICATION_ID
            ))
            .expect("future schema");
    }
    let before = std::fs::read(&sandbox.db).expect("read");
    let error = open(&sandbox.db).expect_err("too new");
    let message = error.to_string();
    assert!(matches!(error, Error::SchemaTooNew { found: 99, .. }), "{error:?}");
    assert!(message.contains("version 99") && message.contains("upgrade apijongler"), "{message}");
    assert_eq!(std::fs::read(&sandbox.db).expect("read"), before, "file unchanged");
}

#[test]
fn a_file_that_is_not_sqlite_is_refused_untouched() {
    let sandbox = Sandbox::new("c", 1);
    std::fs::create_dir_all(sandbox.db.parent().expect("parent")).expect("mkdir");
    let text = "these are my notes, not a database\n".repeat(100);
    std::fs::write(&sandbox.db, &text).expect("write");
    let error = open(&sandbox.db).expect_err("not a database");
    let message = error.to_string();
    assert!(matches!(error, Error::NotADatabase { .. }), "{error:?}");
    assert!(message.contains("not an apijongler database") && message.contains("APIJONGLER_DB"), "{message}");
    assert_eq!(std::fs::read_to_string(&sandbox.db).expect("read"), text, "file unchanged");
}

#[test]
fn another_applications_database_is_refused_untouched() {
    let sandbox = Sandbox::new("c", 1);
    std::fs::create_dir_all(sandbox.db.parent().expect("parent")).expect("mkdir");
    for setup in [
        "CREATE TABLE users (name TEXT); INSERT INTO users VALUES ('ada');",
        // Another application that happens to have a `keys` table, but not apijongler's version.
        "CREATE TABLE keys (id INTEGER); PRAGMA user_version = 7;",
        "CREATE TABLE notes (x); PRAGMA application_id = 42;",
    ] {
        std::fs::remove_file(&sandbox.db).ok();
        rusqlite::Connection::open(&sandbox.db).expect("create").execute_batch(setup).expect("setup");
        let before = std::fs::read(&sandbox.db).expect("read");
        let error = open(&sandbox.db).expect_err(setup);
        assert!(matches!(error, Error::ForeignDatabase { .. }), "{setup}: {error:?}");
        assert!(error.to_string().contains("another application") && error.to_string().contains("APIJONGLER_DB"));
        assert_eq!(std::fs::read(&sandbox.db).expect("read"), before, "{setup}: file unchanged");
        let wal = sandbox.db.with_extension("db-wal");
        assert!(!wal.exists(), "{setup}: not switched to WAL");
    }
}

#[test]
fn a_database_of_schema_2_is_adopted_stamped_and_migrated() {
    let sandbox = Sandbox::new("c", 1);
    std::fs::create_dir_all(sandbox.db.parent().expect("parent")).expect("mkdir");
    {
        let connection = rusqlite::Connection::open(&sandbox.db).expect("create");
        connection.execute_batch(include_str!("../migrations/0001_initial.sql")).expect("v1");
        connection.execute_batch(include_str!("../migrations/0002_requests.sql")).expect("v2");
        connection.execute_batch("PRAGMA user_version = 2;").expect("version");
    }
    open(&sandbox.db).expect("an apijongler database of schema 2 is ours");
    let connection = rusqlite::Connection::open(&sandbox.db).expect("reopen");
    let (version, id): (i64, i64) = connection
        .query_row("SELECT user_version, application_id FROM pragma_user_version, pragma_application_id", [], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .expect("read");
    assert_eq!((version, id), (api_jongler::store::SCHEMA_VERSION, api_jongler::store::APPLICATION_ID));
}

/// Migration 4 turns a key lockdown of schema 3 into a lockdown of every model of the key's scope,
/// keeps every history row, and the key stays out of claims until its deadline.
#[test]
fn migration_4_turns_key_lockdowns_into_whole_scope_ones_and_keeps_the_history() {
    let sandbox = Sandbox::new("c", 1);
    std::fs::create_dir_all(sandbox.db.parent().expect("parent")).expect("mkdir");
    let until = 4_102_444_800_000_i64; // 2100-01-01: far ahead of any test run
    {
        let connection = rusqlite::Connection::open(&sandbox.db).expect("create");
        for migration in [
            include_str!("../migrations/0001_initial.sql"),
            include_str!("../migrations/0002_requests.sql"),
            include_str!("../migrations/0003_liveness.sql"),
        ] {
            connection.execute_batch(migration).expect("migration");
        }
        connection
            .execute_batch(&format!(
                "PRAGMA user_version = 3;
                 INSERT INTO keys (connector, key_name, fingerprint, state, lockdown_until, reason, http_status,
                                   lockdown_count, last_used_at, created_at)
                 VALUES ('c', 'key0', 'fp', 'lockdown', {until}, '429 daily quota', 429, 2, 5, 1);
                 INSERT INTO history (at, connector, key_name, fingerprint, from_state, to_state, reason)
                 VALUES (2, 'c', 'key0', 'fp', 'locked', 'lockdown', '429 daily quota');"
            ))
            .expect("a schema-3 pool with a key in lockdown");
    }
    let coordinator = open(&sandbox.db).expect("migrated");
    use api_jongler::pool::{ModelScope, Scope};
    let store = coordinator.store();
    let lockdowns = store.lockdowns(Some("c")).expect("lockdowns");
    assert_eq!(lockdowns.len(), 1, "{lockdowns:?}");
    let lockdown = &lockdowns[0];
    assert_eq!(
        (&lockdown.scope, &lockdown.model, lockdown.until, lockdown.strikes),
        (&Scope::Key("key0".into()), &ModelScope::Every, until, 2)
    );
    assert_eq!(lockdown.reason, "429 daily quota");
    let history = store.history(&api_jongler::pool::HistoryQuery::default()).expect("history");
    assert_eq!(history.len(), 1, "kept: {history:?}");
    let key = &store.keys(Some("c")).expect("keys")[0];
    assert_eq!((&key.quota_scope, key.quota_group.as_deref()), (&Scope::Key("key0".into()), None));
}

/// Migration 5 gives every history row written before it a typed event, read from its states and reason
/// (the prose every earlier version wrote), and `unclassified` to a row it cannot read; the rows are
/// otherwise kept as written, and a new row names its event.
#[test]
fn migration_5_gives_old_history_rows_their_events() {
    use api_jongler::pool::HistoryEvent::{self, *};
    let sandbox = Sandbox::new("c", 1);
    std::fs::create_dir_all(sandbox.db.parent().expect("parent")).expect("mkdir");
    /// (from, to, reason, lockdown_until, model) as written, and the event the migration must give it.
    type OldRow = (Option<&'static str>, &'static str, &'static str, Option<i64>, Option<&'static str>, HistoryEvent);
    // Each kind of row schema 4 wrote (with both proofs of a reaped holder's death), and one it never did.
    let rows: [OldRow; 19] = [
        (None, "vacant", "added to the keyring", None, None, Added),
        (Some("vacant"), "locked", "claimed", None, Some("gemini-2.5-pro"), Claimed),
        (Some("lockdown"), "locked", "claimed", Some(1), None, Claimed),
        (Some("locked"), "vacant", "released", None, None, Released),
        (Some("locked"), "lockdown", "released", Some(9), None, Released),
        (Some("locked"), "lockdown", "429 rate limit, Retry-After 30.0 s", Some(9), None, LockedDown),
        (
            Some("locked"),
            "vacant",
            "429 daily quota (GenerateRequestsPerDay)",
            Some(9),
            Some("gemini-2.5-pro"),
            LockedDown,
        ),
        (
            Some("vacant"),
            "lockdown",
            "group:team locked down for every model by key1's answer: 429 project rate limit",
            Some(9),
            None,
            ScopeLockedDown,
        ),
        (Some("locked"), "error", "401 invalid credentials", None, None, Errored),
        (Some("locked"), "vacant", "reaped: holder pid 41 has exited", None, None, ReapedDead),
        (Some("locked"), "lockdown", "reaped: holder pid 41 was reused by another process", Some(9), None, ReapedDead),
        (
            Some("locked"),
            "vacant",
            "reaped: holder pid 41 is stopped and its last heartbeat is 31.0 s old (stale after 30.0 s)",
            None,
            None,
            ReapedStale,
        ),
        (Some("locked"), "vacant", "cleanup --force took it from live holder pid 41", None, None, ForceEvicted),
        (Some("error"), "vacant", "cleanup", None, None, CleanedUp),
        (Some("lockdown"), "vacant", "secret changed in the keyring", None, None, SecretChanged),
        (Some("vacant"), "vacant", "quota group set to 'team' (keyring /k.ini)", None, None, GroupChanged),
        (Some("vacant"), "retired", "removed from the keyring /k.ini", None, None, Retired),
        (Some("retired"), "vacant", "back in the keyring /k.ini", None, None, Restored),
        // The bench's raw reference wrote rows no version of the library writes.
        (Some("locked"), "vacant", "reference", None, None, Unclassified),
    ];
    {
        let connection = rusqlite::Connection::open(&sandbox.db).expect("create");
        for migration in [
            include_str!("../migrations/0001_initial.sql"),
            include_str!("../migrations/0002_requests.sql"),
            include_str!("../migrations/0003_liveness.sql"),
            include_str!("../migrations/0004_quotas.sql"),
        ] {
            connection.execute_batch(migration).expect("migration");
        }
        connection.execute_batch("PRAGMA user_version = 4;").expect("version");
        connection
            .execute(
                "INSERT INTO keys (connector, key_name, fingerprint, created_at) VALUES ('c', 'key0', 'fp', 1)",
                [],
            )
            .expect("a key");
        for (at, (from, to, reason, until, model, _)) in rows.iter().enumerate() {
            connection
                .execute(
                    "INSERT INTO history (at, connector, key_name, fingerprint, from_state, to_state, reason,
                                          lockdown_until, model)
                     VALUES (?1, 'c', 'key0', 'fp', ?2, ?3, ?4, ?5, ?6)",
                    rusqlite::params![at as i64, from, to, reason, until, model],
                )
                .expect("a schema-4 history row");
        }
    }
    let coordinator = open(&sandbox.db).expect("migrated");
    let store = coordinator.store();
    assert_eq!(store.schema_version().expect("version"), api_jongler::store::SCHEMA_VERSION);
    let mut history = store.history(&api_jongler::pool::HistoryQuery::default()).expect("history");
    history.reverse();
    assert_eq!(history.len(), rows.len(), "every row kept: {history:?}");
    for (row, (from, to, reason, until, model, event)) in history.iter().zip(&rows) {
        assert_eq!(
            (row.from_state.as_deref(), row.to_state.as_str(), row.reason.as_str(), row.lockdown_until),
            (*from, *to, *reason, *until),
            "kept as written"
        );
        assert_eq!(row.model.as_deref(), *model);
        assert_eq!(row.event, *event, "{row:?}");
    }

    // Rows written from now on name their event.
    coordinator.claim("c", &[], std::time::Duration::ZERO).expect("claim").release().expect("release");
    let newest = store.history(&api_jongler::pool::HistoryQuery { limit: Some(2), ..Default::default() });
    let events: Vec<_> = newest.expect("history").iter().map(|row| row.event).collect();
    assert_eq!(events, [Released, Claimed]);
}

/// A new file is made at schema 9: its history has the event column (schema 5), it has the
/// `resources` table (schema 6), the `reservations` of limits (schema 7) with their tokens, the
/// `learned_limits` and the requests' `prompt_tokens` (schema 8), and schema 9 (PostgreSQL's scope
/// watermark) changes nothing on SQLite; an older build refuses it (see
/// `newer_schema_is_refused_untouched`).
#[test]
fn a_new_file_has_schema_9_history_events_resources_reservations_and_learned_limits() {
    let sandbox = Sandbox::new("c", 1);
    drop(open(&sandbox.db).expect("created"));
    let connection = rusqlite::Connection::open(&sandbox.db).expect("reopen");
    let version: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0)).expect("version");
    assert_eq!(version, 9);
    let event: String = connection
        .query_row("SELECT type FROM pragma_table_info('history') WHERE name = 'event'", [], |row| row.get(0))
        .expect("the history has an event column");
    assert_eq!(event, "TEXT");
    let columns = |table: &str| -> Vec<String> {
        connection
            .prepare(&format!("SELECT name FROM pragma_table_info('{table}') ORDER BY cid"))
            .expect("prepare")
            .query_map([], |row| row.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("columns")
    };
    assert_eq!(columns("resources"), ["connector", "name", "key_name", "quota_scope", "expires_at", "created_at"]);
    assert_eq!(columns("reservations"), ["connector", "quota_scope", "model", "at", "key_name", "lease", "tokens"]);
    let learned = columns("learned_limits");
    assert_eq!(
        learned,
        ["connector", "quota_scope", "model", "quota_id", "limit_text", "until", "learned_at", "key_name"]
    );
    assert!(columns("requests").contains(&"prompt_tokens".to_owned()));
}

/// A second store opened on a file this process already uses must not drop this process's SQLite
/// locks (closing any descriptor of a file drops them all): otherwise another process, closing its own
/// connection, finds itself the last user, checkpoints and deletes the WAL under this one.
#[test]
fn opening_the_database_twice_in_one_process_keeps_its_locks() {
    let sandbox = Sandbox::new("c", 2);
    let first = sandbox.coordinator(sandbox.options());
    let lease = first.claim("c", &[], std::time::Duration::ZERO).expect("claim");
    let wal = sandbox.db.with_extension("db-wal");
    assert!(wal.exists(), "a WAL while in use");
    let second = sandbox.coordinator(sandbox.options());
    // Another process opens and closes the database, as a user's `sqlite3` would.
    let output = std::process::Command::new("sqlite3")
        .arg(&sandbox.db)
        .arg("SELECT count(*) FROM keys;")
        .output()
        .expect("the sqlite3 shell (apt-get install sqlite3)");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(wal.exists(), "the WAL of a database this process still uses was checkpointed and deleted");
    lease.release().expect("release");
    let states = second.key_states("c").expect("states");
    assert_eq!(states.vacant.len(), 2, "the release is visible to every store: {states:?}");
}

/// A database value shaped like a URL is never taken for a file path: a scheme apijongler does not
/// speak is refused (exit 2, naming the variable or flag), a `postgres://` one is not made a file, and
/// no message shows the URL's password. Run from an empty directory, which must stay empty.
#[test]
fn database_urls_are_never_taken_for_paths() {
    let sandbox = Sandbox::new("c", 1);
    let cwd = tempfile::tempdir().expect("cwd");
    let run = |db_env: Option<&str>, args: &[&str]| {
        let mut command = sandbox.apijongler();
        command.env_remove("APIJONGLER_DB").current_dir(cwd.path()).args(args);
        if let Some(value) = db_env {
            command.env("APIJONGLER_DB", value);
        }
        let output = command.output().expect("run apijongler");
        (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let cases: [(Option<&str>, &[&str], i32, &str); 5] = [
        (Some("xyz://u:hunter2@/db?host=/run/pg"), &["status"], 2, "APIJONGLER_DB holds a xyz:// URL"),
        (None, &["--db", "mysql://me:hunter2@127.0.0.1/pool", "status"], 2, "--db holds a mysql:// URL"),
        (Some("/tmp/ignored.db"), &["status", "--db", "MySQL://h/db"], 2, "--db holds a MySQL:// URL"),
        (Some("file:///tmp/hunter2.db"), &["keys"], 2, "APIJONGLER_DB holds a file:// URL"),
        (Some("postgres://u:hunter2@/db?host=/nonexistent"), &["status"], 6, "cannot reach the server"),
    ];
    for (db_env, args, code, says) in cases {
        let (status, stderr) = run(db_env, args);
        assert_eq!(status, Some(code), "{db_env:?} {args:?}: {stderr}");
        assert!(stderr.contains(says), "{db_env:?} {args:?}: {stderr}");
        assert!(!stderr.contains("hunter2"), "{db_env:?} {args:?}: {stderr}");
        let left: Vec<_> = std::fs::read_dir(cwd.path()).expect("cwd").collect();
        assert!(left.is_empty(), "{db_env:?} {args:?} created {left:?}");
    }

    // The library refuses the same, naming its option.
    let refused = open(std::path::Path::new("xyz://h/db")).expect_err("xyz");
    assert!(
        matches!(&refused, Error::UnsupportedDatabaseUrl { given_by, scheme } if given_by == "CoordinatorOptions::db_path" && scheme == "xyz"),
        "{refused:?}"
    );
}
