//! Keyrings on several hosts sharing one PostgreSQL pool (issue 17, item 4): a sync only adds,
//! restores and regroups keys; `sync --as-truth` applies a keyring whole; `status` names the keys
//! whose secret differs by both fingerprints; and a host passes over the keys its keyring cannot serve
//! instead of failing requests with them. Each host is a coordinator (or a CLI run) with a keyring of
//! its own on one database.
//!
//! Runs on PostgreSQL only (`.ci/postgres`, or `APIJONGLER_TEST_PG` set by hand: see
//! `tests/common/store.rs`); on SQLite the tests say so and pass.

mod common;

use std::time::Duration;

use api_jongler::pool::{HistoryEvent, HistoryQuery, KeyRecord};
use api_jongler::{Coordinator, Error, KeyState, Keyring};
use common::Sandbox;

const C: &str = "c";

/// The first host of a test, whose sandbox owns the shared database; `None` on SQLite, where a
/// store belongs to one host (every sync applies the keyring as the truth: `tests/sync.rs`).
fn first_host(ini: &str) -> Option<Sandbox> {
    if !common::store::on_postgres() {
        eprintln!("skipped: a store shared by hosts is PostgreSQL's (set APIJONGLER_TEST_PG, or run .ci/postgres)");
        return None;
    }
    Some(Sandbox::with_keyring(ini))
}

fn open(host: &Sandbox) -> Coordinator {
    Coordinator::open(host.options()).expect("open the shared database")
}

fn keys(coordinator: &Coordinator) -> Vec<KeyRecord> {
    coordinator.store().keys(Some(C)).expect("keys")
}

fn fingerprint(host: &Sandbox, name: &str) -> String {
    Keyring::load(&host.keyring).expect("keyring").key(C, name).expect("key").fingerprint().to_string()
}

/// (name, fingerprint, retired) of every key.
fn rows(coordinator: &Coordinator) -> Vec<(String, String, bool)> {
    keys(coordinator).into_iter().map(|key| (key.key_name, key.fingerprint, key.retired_at.is_some())).collect()
}

const A_INI: &str = "[c]\nk1 = fake-secret-a-1-do-not-use\nk2 = fake-secret-a-2-do-not-use\n";
const B_INI: &str = "[c]\nk1 = fake-secret-b-1-do-not-use\nk3 = fake-secret-b-3-do-not-use\n";

#[test]
fn hosts_with_different_keyrings_only_add_keys_until_one_is_applied_as_the_truth() {
    let Some(a) = first_host(A_INI) else { return };
    let b = a.beside(B_INI);
    let (on_a, on_b) = (open(&a), open(&b));
    on_a.sync(&a.load_keyring()).expect("sync a");
    let report = on_b.sync(&b.load_keyring()).expect("sync b");
    assert_eq!(report.added, [(C.to_owned(), "k3".to_owned())]);
    assert_eq!(report.differing, [(C.to_owned(), "k1".to_owned())]);
    assert!(report.retired.is_empty() && report.changed.is_empty(), "{report:?}");
    let shared = vec![
        ("k1".to_owned(), fingerprint(&a, "k1"), false),
        ("k2".to_owned(), fingerprint(&a, "k2"), false),
        ("k3".to_owned(), fingerprint(&b, "k3"), false),
    ];
    assert_eq!(rows(&on_b), shared, "b's sync neither retired k2 nor replaced k1's secret");
    assert!(on_a.sync(&a.load_keyring()).expect("sync a again").is_empty(), "a's sync does not undo b's");
    assert_eq!(rows(&on_a), shared);

    // k1 in error under a's secret; b's keyring applied as the truth gives it b's secret, vacant.
    let lease = on_a.claim(C, &["k2".to_owned()], Duration::ZERO).expect("a claims k1");
    assert_eq!(lease.key_name(), "k1");
    lease.mark_error("401 bad key", Some(401)).expect("error");
    let report = on_b.sync_as_truth(&b.load_keyring()).expect("b as the truth");
    assert_eq!(report.changed, [(C.to_owned(), "k1".to_owned())]);
    assert_eq!(report.retired, [(C.to_owned(), "k2".to_owned())]);
    assert!(report.differing.is_empty() && report.added.is_empty(), "{report:?}");
    assert_eq!(
        rows(&on_b),
        [
            ("k1".to_owned(), fingerprint(&b, "k1"), false),
            ("k2".to_owned(), fingerprint(&a, "k2"), true),
            ("k3".to_owned(), fingerprint(&b, "k3"), false),
        ]
    );
    let k1 = keys(&on_b).into_iter().find(|key| key.key_name == "k1").expect("k1");
    assert_eq!(k1.state, KeyState::Vacant, "the old secret's error is lifted");
    let history = on_b.store().history(&HistoryQuery { connector: Some(C.to_owned()), ..HistoryQuery::default() });
    let events: Vec<(HistoryEvent, String)> =
        history.expect("history").into_iter().take(2).map(|row| (row.event, row.key_name)).collect();
    assert!(events.contains(&(HistoryEvent::SecretChanged, "k1".to_owned())), "{events:?}");
    assert!(events.contains(&(HistoryEvent::Retired, "k2".to_owned())), "{events:?}");
    assert!(on_b.sync_as_truth(&b.load_keyring()).expect("again").is_empty(), "applied once, nothing left");
}

#[test]
fn a_host_passes_over_the_keys_its_keyring_cannot_serve() {
    let Some(a) = first_host(A_INI) else { return };
    let b = a.beside(B_INI);
    let (on_a, on_b) = (open(&a), open(&b));
    on_a.sync(&a.load_keyring()).expect("sync a");
    on_b.sync(&b.load_keyring()).expect("sync b");
    // k1 has a's secret, k2 is a's alone: b claims k3 only, however often it claims.
    for _ in 0..4 {
        let lease = on_b.claim(C, &[], Duration::ZERO).expect("b claims");
        assert_eq!(lease.key_name(), "k3");
        lease.release().expect("release");
    }
    let held = on_b.claim(C, &[], Duration::ZERO).expect("b claims k3");
    let Err(Error::NoKeyAvailable(why)) = on_b.claim(C, &[], Duration::ZERO) else { panic!("k3 is held") };
    let message = why.to_string();
    let (a1, b1) = (fingerprint(&a, "k1"), fingerprint(&b, "k1"));
    assert!(message.contains(&format!("'k1' (pool {a1}, this keyring {b1})")), "{message}");
    assert!(message.contains("'k2' (pool") && message.contains("not in this keyring"), "{message}");
    assert!(message.contains("sync --as-truth"), "{message}");
    held.release().expect("release");
    // a, whose keyring has k1 and k2, never gets k3.
    let mut got: Vec<String> = Vec::new();
    let mut leases = Vec::new();
    while let Ok(lease) = on_a.claim(C, &[], Duration::ZERO) {
        got.push(lease.key_name().to_owned());
        leases.push(lease);
    }
    got.sort();
    assert_eq!(got, ["k1", "k2"]);
}

#[test]
fn a_key_whose_secret_changed_after_the_sync_is_given_back_and_passed_over() {
    let Some(only) = first_host("[c]\nk1 = fake-secret-b-1-do-not-use\n") else { return };
    let other = only.beside("[c]\nk1 = fake-secret-z-1-do-not-use\n");
    let (on_only, on_other) = (open(&only), open(&other));
    on_only.sync(&only.load_keyring()).expect("sync");
    // Another host applies its keyring as the truth after this one synced: k1 now has its secret.
    on_other.sync_as_truth(&other.load_keyring()).expect("as the truth");
    let Err(Error::NoKeyAvailable(why)) = on_only.claim(C, &[], Duration::from_secs(30)) else {
        panic!("the only key has another secret")
    };
    let message = why.to_string();
    assert!(message.starts_with("no key of 'c' can be used from this host"), "{message}");
    assert!(message.contains(&fingerprint(&other, "k1")) && message.contains(&fingerprint(&only, "k1")), "{message}");
    let k1 = keys(&on_only).into_iter().next().expect("k1");
    assert_eq!((k1.state, k1.fingerprint), (KeyState::Vacant, fingerprint(&other, "k1")), "given back untouched");
    // The other host, whose keyring the pool holds, uses it.
    on_other.claim(C, &[], Duration::ZERO).expect("the other host claims k1").release().expect("release");
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn status_names_both_fingerprints_and_sync_as_truth_applies_the_keyring() {
    let Some(a) = first_host(A_INI) else { return };
    let b = a.beside(B_INI);
    let synced = b.apijongler().args(["sync"]).output().expect("run");
    assert!(synced.status.success(), "{}", text(&synced.stderr));
    let synced = a.apijongler().args(["--json", "sync"]).output().expect("run");
    assert!(synced.status.success(), "{}", text(&synced.stderr));
    let report: serde_json::Value = serde_json::from_slice(&synced.stdout).expect("json");
    let (a1, b1) = (fingerprint(&a, "k1"), fingerprint(&b, "k1"));
    assert_eq!(report["differing"][0]["pool_fingerprint"], b1.as_str(), "{report}");
    assert_eq!(report["differing"][0]["keyring_fingerprint"], a1.as_str(), "{report}");

    let status = a.apijongler().args(["--json", "status"]).output().expect("run");
    assert!(status.status.success(), "{}", text(&status.stderr));
    let warning = text(&status.stderr);
    assert!(
        warning.contains(&format!("key 'k1' of 'c' has another secret in the shared pool (fingerprint {b1})"))
            && warning.contains(&format!("(fingerprint {a1})")),
        "{warning}"
    );
    for secret in ["fake-secret-a-1", "fake-secret-b-1"] {
        assert!(!warning.contains(secret) && !text(&status.stdout).contains(secret), "no secret printed");
    }
    let shown: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    let k1 = shown.as_array().expect("keys").iter().find(|key| key["key"] == "k1").expect("k1");
    assert_eq!(
        (k1["fingerprint"].as_str(), k1["keyring_fingerprint"].as_str()),
        (Some(b1.as_str()), Some(a1.as_str()))
    );

    let applied = a.apijongler().args(["sync", "--as-truth"]).output().expect("run");
    assert!(applied.status.success(), "{}", text(&applied.stderr));
    let out = text(&applied.stdout);
    assert!(out.contains("c k1: changed") && out.contains("c k3: retired"), "{out}");
    let status = a.apijongler().args(["status"]).output().expect("run");
    assert!(!text(&status.stderr).contains("another secret"), "{}", text(&status.stderr));
}

/// A host whose wall clock is `.0` ms off (negative: behind), as after a bad NTP step.
#[derive(Debug)]
struct OffWall(i64);

impl api_jongler::Clock for OffWall {
    fn now_ms(&self) -> i64 {
        api_jongler::SystemClock.now_ms() + self.0
    }

    fn boot_ms(&self) -> i64 {
        api_jongler::SystemClock.boot_ms()
    }

    fn reads_the_wall(&self) -> bool {
        true
    }
}

/// Issue 17, item 3: a host whose clock is minutes behind puts a key in lockdown for a minute, and the
/// deadline it writes is a minute from now on the server's clock, not minutes past: the other hosts
/// keep off the key.
#[test]
fn a_host_whose_clock_is_minutes_off_writes_deadlines_on_the_servers_time() {
    use api_jongler::{Clock, CoordinatorOptions, SystemClock};
    let Some(host) = first_host("[c]\nk1 = fake-secret-1-do-not-use\n") else { return };
    let behind =
        Coordinator::open(CoordinatorOptions { clock: std::sync::Arc::new(OffWall(-5 * 60_000)), ..host.options() })
            .expect("open the shared database");
    behind.sync(&host.load_keyring()).expect("sync");
    let other = open(&host);
    let lease = behind.claim(C, &[], Duration::ZERO).expect("claim");
    lease.lockdown(behind.now_ms() + 60_000, "quota", Some(429)).expect("lockdown");
    let until = keys(&other)[0].lockdown_until.expect("a lockdown deadline");
    // The server and this test read the same machine's clock. The offset is measured to within the
    // duration of one read (up to seconds on a loaded machine), and time passes before this check: a
    // wide margin, still far from the 4 minutes past that an uncorrected deadline would be.
    let ahead = until - SystemClock.now_ms();
    assert!((30_000..=90_000).contains(&ahead), "the deadline is {ahead} ms from now, not about a minute");
    assert!(
        matches!(other.claim(C, &[], Duration::ZERO), Err(Error::NoKeyAvailable(_))),
        "another host claimed a key locked down for a minute"
    );
}
