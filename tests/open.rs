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
        connection.execute_batch("CREATE TABLE future (x); PRAGMA user_version = 99;").expect("future schema");
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
