//! Keyring syncs under faults: a keyring never retires the keys of connectors it does not define, the
//! read-only commands write nothing, a key pool emptied by a sync says which keyring emptied it, a sync
//! that changes nothing takes no write lock, and a wait of any length cannot overflow.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use api_jongler::mock::{MockConfig, MockUpstream};
use api_jongler::pool::HistoryEvent;
use api_jongler::{Coordinator, Error, Keyring};
use common::Sandbox;

const GEMINI: &str = "generativelanguage.googleapis.com";
const HF: &str = "router.huggingface.co";
const ENDPOINT: &str = "/v1beta/models/gemini-2.5-flash:generateContent";

/// Writes a second keyring file next to the sandbox's and returns its path.
fn other_keyring(sandbox: &Sandbox, name: &str, ini: &str) -> PathBuf {
    let path = sandbox.dir.path().join(name);
    std::fs::write(&path, ini).expect("write keyring");
    path
}

fn load(path: &Path) -> Keyring {
    Keyring::load(path).expect("keyring")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
fn assert_exit(output: &Output, code: i32) {
    assert_eq!(output.status.code(), Some(code), "stdout: {}\nstderr: {}", text(&output.stdout), text(&output.stderr));
}

/// Every row of `keys`, `history` and `requests`, as text: equal snapshots mean nothing was written.
fn snapshot(sandbox: &Sandbox) -> String {
    let connection = sandbox.sql();
    let mut dump = String::new();
    for table in ["keys", "history", "requests"] {
        for row in connection.query(&format!("SELECT * FROM {table} ORDER BY id"), &[]).expect("snapshot") {
            dump.push_str(&format!("{table} {row:?}\n"));
        }
    }
    dump
}

fn retired_rows(sandbox: &Sandbox) -> Vec<(String, String)> {
    let retired = sandbox.history().into_iter().filter(|row| row.event == HistoryEvent::Retired);
    retired.map(|row| (row.key, row.reason)).collect()
}

#[test]
fn a_keyring_never_retires_the_keys_of_a_connector_it_does_not_define() {
    let sandbox = Sandbox::new(GEMINI, 3);
    let coordinator = sandbox.coordinator(sandbox.options());
    let other = other_keyring(&sandbox, "other.ini", &format!("[{HF}]\nhf0 = fake-hf-secret-0\n"));

    let report = coordinator.sync(&load(&other)).expect("sync the other keyring");
    assert!(report.retired.is_empty(), "{:?}", report.retired);
    assert_eq!(report.added, [(HF.to_owned(), "hf0".to_owned())]);
    assert_eq!(retired_rows(&sandbox), []);
    assert_eq!(coordinator.key_states(GEMINI).expect("states").vacant.len(), 3, "every Gemini key stays claimable");
    // Back and forth: neither keyring ever touches the other's connector.
    coordinator.sync(&sandbox.load_keyring()).expect("sync");
    coordinator.sync(&load(&other)).expect("sync");
    assert_eq!(retired_rows(&sandbox), []);
    assert_eq!(coordinator.key_states(HF).expect("states").vacant.len(), 1);
}

#[test]
fn a_pool_emptied_by_a_keyring_says_which_keyring_and_when() {
    let sandbox = Sandbox::new(GEMINI, 3);
    let coordinator = sandbox.coordinator(sandbox.options());
    // A keyring that keeps the section but drops key1 and key2 retires exactly those two.
    let fewer = other_keyring(
        &sandbox,
        "fewer.ini",
        &format!("[{GEMINI}]\nkey0 = fake-secret-{GEMINI}-0-do-not-use\n[{HF}]\nhf0 = fake-hf-secret-0\n"),
    );
    let report = coordinator.sync_as_truth(&load(&fewer)).expect("sync");
    let pair = |key: &str| (GEMINI.to_owned(), key.to_owned());
    assert_eq!(report.retired, [pair("key1"), pair("key2")]);
    let expected = format!("removed from the keyring {}", fewer.display());
    assert_eq!(retired_rows(&sandbox), [("key1".to_owned(), expected.clone()), ("key2".to_owned(), expected.clone())]);

    // A keyring whose section is empty retires the rest: no key left, and the error says why.
    let empty = other_keyring(&sandbox, "empty.ini", &format!("[{GEMINI}]\n"));
    coordinator.sync_as_truth(&load(&empty)).expect("sync");
    let error = coordinator.claim(GEMINI, &[], Duration::ZERO).expect_err("every key is retired");
    let Error::NoKeyAvailable(unavailable) = &error else { panic!("{error:?}") };
    assert_eq!((unavailable.availability.retired, unavailable.availability.total()), (3, 0));
    let message = error.to_string();
    assert!(message.contains(&format!("all 3 keys of '{GEMINI}' were retired")), "{message}");
    assert!(message.contains(&format!("removed from the keyring {}", empty.display())), "{message}");
    assert!(!message.contains("add a ["), "the section is there; the advice must not say to add it: {message}");

    // The same keyring as before brings them all back.
    let report = coordinator.sync(&sandbox.load_keyring()).expect("sync");
    assert_eq!(report.restored, [pair("key0"), pair("key1"), pair("key2")]);
    coordinator.claim(GEMINI, &[], Duration::ZERO).expect("claimable again").release().expect("release");
}

#[test]
fn a_connector_never_configured_still_says_to_add_a_section() {
    let sandbox = Sandbox::new(GEMINI, 1);
    let coordinator = sandbox.coordinator(sandbox.options());
    let message = coordinator.claim(HF, &[], Duration::ZERO).expect_err("no keys").to_string();
    assert!(message.contains(&format!("add a [{HF}] section")) && !message.contains("retired"), "{message}");
}

#[test]
fn every_kind_of_change_in_a_large_keyring_is_planned_and_applied_once() {
    const KEYS: usize = 5_000;
    let sandbox = Sandbox::new("big", KEYS);
    let coordinator = sandbox.coordinator(sandbox.options());
    assert_eq!(coordinator.key_states("big").expect("states").vacant.len(), KEYS);
    // Every 7th key leaves, every 11th gets a new secret, and 100 new keys arrive.
    let mut ini = String::from("[big]\n");
    for index in 0..KEYS {
        match (index % 7, index % 11) {
            (0, _) => {}
            (_, 0) => ini.push_str(&format!("key{index} = fake-new-secret-{index}\n")),
            _ => ini.push_str(&format!("key{index} = fake-secret-big-{index}-do-not-use\n")),
        }
    }
    for index in KEYS..KEYS + 100 {
        ini.push_str(&format!("key{index} = fake-secret-big-{index}-do-not-use\n"));
    }
    std::fs::write(&sandbox.keyring, &ini).expect("rewrite");
    let report = coordinator.sync_as_truth(&sandbox.load_keyring()).expect("sync");
    let gone = (0..KEYS).filter(|index| index.is_multiple_of(7)).count();
    let changed = (0..KEYS).filter(|index| !index.is_multiple_of(7) && index.is_multiple_of(11)).count();
    assert_eq!((report.retired.len(), report.changed.len(), report.added.len()), (gone, changed, 100));
    assert_eq!(report.transitions.len(), gone + changed + 100, "one history row per change");
    let keyring = sandbox.load_keyring();
    for key in coordinator.store().keys(Some("big")).expect("rows") {
        let index: usize = key.key_name.trim_start_matches("key").parse().expect("index");
        assert_eq!(key.retired_at.is_some(), index < KEYS && index.is_multiple_of(7), "{}", key.key_name);
        if let Some(spec) = keyring.key("big", &key.key_name) {
            assert_eq!(
                key.fingerprint,
                spec.fingerprint().as_str(),
                "{} has its own secret's fingerprint",
                key.key_name
            );
        }
    }
    assert!(coordinator.sync(&keyring).expect("again").is_empty(), "a second sync finds nothing to do");
}

#[test]
fn a_sync_that_changes_nothing_takes_no_write_lock() {
    let sandbox = Sandbox::new(GEMINI, 3);
    let coordinator = sandbox.coordinator(sandbox.options());
    let other = other_keyring(&sandbox, "other.ini", &format!("[{HF}]\nhf0 = fake-hf-secret-0\n"));
    coordinator.sync(&load(&other)).expect("sync");

    // Another process holds the write lock until the syncs below are done (or the test gives up).
    let blocker = sandbox.sql();
    blocker.lock_writes().expect("take the write lock");
    let done = std::thread::scope(|scope| {
        let syncs = scope.spawn(|| {
            // The same keyring again, then a keyring of another connector: neither has anything to change.
            let same = coordinator.sync(&sandbox.load_keyring()).expect("no-op sync");
            let other = coordinator.sync(&load(&other)).expect("no-op sync of the other keyring");
            (same.is_empty(), other.is_empty())
        });
        // Polled by hand rather than with `wait_until`, so the lock is released even when this fails.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !syncs.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let finished = syncs.is_finished();
        blocker.rollback().expect("release the write lock");
        let result = syncs.join().expect("syncs");
        assert!(finished, "the no-op syncs waited for the write lock held by another connection");
        result
    });
    assert_eq!(done, (true, true));
}

/// `(connector, key, quota_group, quota_scope)` of every key, by connector and name.
fn groups(sandbox: &Sandbox) -> Vec<(String, String, Option<String>, String)> {
    let sql = "SELECT connector, key_name, quota_group, quota_scope FROM keys ORDER BY connector, key_name";
    let rows = sandbox.sql().query(sql, &[]).expect("groups");
    rows.iter().map(|row| (row.get(0), row.get(1), row.get(2), row.get(3))).collect()
}

/// A history row as `(key, from, to, reason, quota_scope)`.
type Entry = (String, Option<String>, String, String, Option<String>);

/// The history rows after row `after`.
fn history_since(sandbox: &Sandbox, after: i64) -> Vec<Entry> {
    let sql = "SELECT key_name, from_state, to_state, reason, quota_scope FROM history WHERE id > ?1 ORDER BY id";
    let rows = sandbox.sql().query(sql, &[&after]).expect("history");
    rows.iter().map(|row| (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4))).collect()
}

#[test]
fn a_keyring_change_regroups_keys_with_a_history_row_and_leaves_other_connectors_alone() {
    let gemini = |index: usize| format!("key{index} = fake-secret-{GEMINI}-{index}-do-not-use\n");
    let hf = format!("[{HF}]\nhf0 = fake-hf-secret-0\n[{HF} groups]\nhf0 = my-account\n");
    let sandbox = Sandbox::with_keyring(&format!("[{GEMINI}]\n{}{}{}{hf}", gemini(0), gemini(1), gemini(2)));
    let coordinator = sandbox.coordinator(sandbox.options());
    let row = |connector: &str, key: &str, group: Option<&str>, scope: &str| {
        (connector.to_owned(), key.to_owned(), group.map(str::to_owned), scope.to_owned())
    };
    let own = |key: &str| row(GEMINI, key, None, &format!("key:{key}"));
    let account = row(HF, "hf0", Some("my-account"), "group:my-account");
    assert_eq!(groups(&sandbox), [own("key0"), own("key1"), own("key2"), account.clone()]);
    let held = coordinator.claim(GEMINI, &[], Duration::ZERO).expect("claim key0");
    assert_eq!(held.key_name(), "key0");

    // key0 (held) and key1 join a project, key2 gets a new secret and the project, key3 arrives in it.
    let grouped = format!(
        "[{GEMINI} groups]\nkey0 = my-project\nkey1 = my-project\n[{GEMINI}]\n{}{}key2 = fake-new-secret\n{}\
         [{GEMINI} groups]\nkey2 = my-project\nkey3 = my-project\n{hf}",
        gemini(0),
        gemini(1),
        gemini(3)
    );
    std::fs::write(&sandbox.keyring, grouped).expect("rewrite");
    let last = sandbox.count("SELECT max(id) FROM history");
    let report = coordinator.sync_as_truth(&sandbox.load_keyring()).expect("sync");
    assert!(!report.is_empty());
    let project = |key: &str| row(GEMINI, key, Some("my-project"), "group:my-project");
    assert_eq!(groups(&sandbox), [project("key0"), project("key1"), project("key2"), project("key3"), account.clone()]);
    let file = sandbox.keyring.display();
    let set = format!("quota group set to 'my-project' (keyring {file})");
    let entry = |key: &str, from: Option<&str>, to: &str, reason: &str| {
        (key.to_owned(), from.map(str::to_owned), to.to_owned(), reason.to_owned(), Some("group:my-project".to_owned()))
    };
    assert_eq!(
        history_since(&sandbox, last),
        [
            entry("key3", None, "vacant", "added to the keyring"),
            (
                "key2".to_owned(),
                Some("vacant".to_owned()),
                "vacant".to_owned(),
                "secret changed in the keyring".to_owned(),
                Some("key:key2".to_owned())
            ),
            entry("key0", Some("locked"), "locked", &set),
            entry("key1", Some("vacant"), "vacant", &set),
            entry("key2", Some("vacant"), "vacant", &set),
        ]
    );
    assert_eq!(report.transitions.len(), 5, "{:?}", report.transitions);
    held.release().expect("the held key's lease survived its regrouping");

    // The same keyring again changes nothing.
    assert!(coordinator.sync(&sandbox.load_keyring()).expect("again").is_empty());
    // A keyring of the other connector alone, without its groups section, ungroups only its own key.
    let other = other_keyring(&sandbox, "other.ini", &format!("[{HF}]\nhf0 = fake-hf-secret-0\n"));
    let last = sandbox.count("SELECT max(id) FROM history");
    assert!(!coordinator.sync(&load(&other)).expect("sync").is_empty(), "a change of group alone is a change");
    let ungrouped = format!("quota group 'my-account' removed (keyring {})", other.display());
    assert_eq!(
        history_since(&sandbox, last),
        [("hf0".to_owned(), Some("vacant".to_owned()), "vacant".to_owned(), ungrouped, Some("key:hf0".to_owned()))]
    );
    let hf_alone = row(HF, "hf0", None, "key:hf0");
    assert_eq!(groups(&sandbox), [project("key0"), project("key1"), project("key2"), project("key3"), hf_alone]);

    // key1 moves to another project and key0 leaves its group.
    let moved = format!(
        "[{GEMINI}]\n{}{}{}{}[{GEMINI} groups]\nkey1 = other\nkey2 = my-project\nkey3 = my-project\n",
        gemini(0),
        gemini(1),
        gemini(3),
        "key2 = fake-new-secret\n"
    );
    std::fs::write(&sandbox.keyring, moved).expect("rewrite");
    let last = sandbox.count("SELECT max(id) FROM history");
    coordinator.sync(&sandbox.load_keyring()).expect("sync");
    let reasons: Vec<_> = history_since(&sandbox, last).into_iter().map(|row| (row.0, row.3, row.4)).collect();
    assert_eq!(
        reasons,
        [
            (
                "key0".to_owned(),
                format!("quota group 'my-project' removed (keyring {file})"),
                Some("key:key0".to_owned())
            ),
            (
                "key1".to_owned(),
                format!("quota group changed from 'my-project' to 'other' (keyring {file})"),
                Some("group:other".to_owned())
            ),
        ]
    );
    assert_eq!(groups(&sandbox)[..2], [own("key0"), row(GEMINI, "key1", Some("other"), "group:other")]);
}

#[test]
fn a_claim_may_wait_for_duration_max() {
    let sandbox = Sandbox::new(GEMINI, 1);
    let coordinator = sandbox.coordinator(sandbox.options());
    let held = coordinator.claim(GEMINI, &[], Duration::ZERO).expect("hold the only key");
    let waiter: Coordinator = coordinator.clone();
    let claim = std::thread::spawn(move || {
        waiter.claim(GEMINI, &[], Duration::MAX).map(|lease| (lease.key_name().to_owned(), lease.release()))
    });
    held.release().expect("release");
    let (key, released) = claim.join().expect("the claim did not panic").expect("claimed once the key came free");
    assert_eq!(key, "key0");
    released.expect("release");
}

/// The real binary with the sandbox's environment, its connectors pointing at the mock.
fn apijongler(sandbox: &Sandbox) -> Command {
    let mut command = sandbox.apijongler();
    command.env("APIJONGLER_CONNECTORS", sandbox.connectors_dir());
    command
}

#[test]
fn read_only_commands_write_nothing_whatever_the_keyring() {
    let sandbox = Sandbox::new(GEMINI, 2);
    let coordinator = sandbox.coordinator(sandbox.options());
    coordinator.claim(GEMINI, &[], Duration::ZERO).expect("claim").release().expect("release");
    // Another keyring: a new Gemini key, key0 with another secret, key1 gone, and a connector of its own.
    let other = other_keyring(
        &sandbox,
        "other.ini",
        &format!("[{GEMINI}]\nkey0 = fake-changed-secret\nkey9 = fake-secret-9\n[{HF}]\nhf0 = fake-hf-secret-0\n"),
    );
    let before = snapshot(&sandbox);
    let commands: &[&[&str]] = &[
        &["status"],
        &["status", "--json"],
        &["status", GEMINI],
        &["why", GEMINI, "key0"],
        &["why", GEMINI, "key9"],
        &["history"],
        &["history", "--json"],
        &["db"],
        &["db", "--json"],
        &["connectors"],
    ];
    for keyring in [&sandbox.keyring, &other] {
        for args in commands {
            let output = sandbox.apijongler().arg("--config").arg(keyring).args(*args).output().expect("run");
            // key9 is in the other keyring only; with the sandbox's, `why` does not know it (usage).
            let unknown = args.contains(&"key9") && *keyring == sandbox.keyring;
            assert_exit(&output, if unknown { 2 } else { 0 });
            assert_eq!(snapshot(&sandbox), before, "`apijongler {}` with {} wrote", args.join(" "), keyring.display());
        }
    }

    // What status shows of a keyring that differs from the database, without applying it.
    let output = sandbox.apijongler().arg("--config").arg(&other).args(["status", "--json"]).output().expect("run");
    let rows: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    let row = |connector: &str, key: &str| {
        rows.as_array()
            .expect("array")
            .iter()
            .find(|row| row["connector"] == connector && row["key"] == key)
            .unwrap_or_else(|| panic!("no row {connector} {key}: {rows:#}"))
            .clone()
    };
    let new = row(GEMINI, "key9");
    assert_eq!((new["state"].as_str(), new["in_database"].as_bool()), (Some("new"), Some(false)), "{new}");
    assert_eq!(row(HF, "hf0")["state"], "new");
    assert_eq!(row(GEMINI, "key0")["keyring"], "secret changed in the keyring");
    assert_eq!(row(GEMINI, "key1")["keyring"], "not in the keyring");
    assert_eq!(
        (row(GEMINI, "key1")["state"].as_str(), row(GEMINI, "key1")["in_database"].as_bool()),
        (Some("vacant"), Some(true))
    );
    let output = sandbox.apijongler().arg("--config").arg(&other).args(["why", GEMINI, "key9"]).output().expect("run");
    let why = text(&output.stdout);
    assert!(why.contains("not yet in the database") && why.contains(&other.display().to_string()), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_with_one_keyring_survive_status_with_another() {
    const LOOPS: usize = 4;
    const REQUESTS: usize = 10;
    let mock = MockUpstream::start(MockConfig::default()).await.expect("mock");
    let sandbox = Sandbox::new(GEMINI, 2);
    sandbox.point_connector(GEMINI, "127.0.0.1", mock.port(), serde_json::json!({"backoff_ms": 5, "retries": 10}));
    let other = other_keyring(&sandbox, "other.ini", &format!("[{HF}]\nhf0 = fake-hf-secret-0\n"));
    let request = |sandbox: &Sandbox| {
        let output = apijongler(sandbox).args(["--quiet", GEMINI, "POST", ENDPOINT, "{}"]).output().expect("run");
        assert_exit(&output, 0);
    };
    // One request first, so that every `status` below runs while the Gemini keys are in the database.
    request(&sandbox);

    let statuses = tokio::task::spawn_blocking(move || {
        let requests_done = AtomicBool::new(false);
        let statuses = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            let loops: Vec<_> = (0..LOOPS)
                .map(|_| {
                    scope.spawn(|| {
                        for _ in 0..REQUESTS {
                            request(&sandbox);
                        }
                    })
                })
                .collect();
            scope.spawn(|| {
                while !requests_done.load(Ordering::SeqCst) || statuses.load(Ordering::SeqCst) < 3 {
                    let output = apijongler(&sandbox).arg("--config").arg(&other).arg("status").output().expect("run");
                    assert_exit(&output, 0);
                    statuses.fetch_add(1, Ordering::SeqCst);
                }
            });
            let results: Vec<_> = loops.into_iter().map(|handle| handle.join()).collect();
            requests_done.store(true, Ordering::SeqCst);
            assert!(results.iter().all(Result::is_ok), "a request failed (see its exit code above)");
        });
        assert_eq!(retired_rows(&sandbox), [], "no sync retired the Gemini keys");
        let ok = sandbox.count("SELECT count(*) FROM requests WHERE outcome = 'success'");
        assert_eq!(ok, (1 + LOOPS * REQUESTS) as i64);
        statuses.into_inner()
    })
    .await
    .expect("every request succeeded and no key was retired");
    eprintln!("{} requests beside {statuses} status commands with another keyring", 1 + LOOPS * REQUESTS);
}
