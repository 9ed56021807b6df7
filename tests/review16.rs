//! Hostile review of issue 16 (pacing): declared limits and reserve-before-send. Each test states what
//! the issue or the README promises; the ones marked `repro:` fail on main and show a defect.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use api_jongler::pool::{Fate, Lockdown, Reach};
use api_jongler::{Coordinator, Error, ManualClock};
use common::Sandbox;

const T0: i64 = 1_800_000_000_000;
const HOUR: i64 = 3_600_000;

/// Claims `model` on `c` at once and releases it; whether a key came.
fn claim(coordinator: &Coordinator, model: &str) -> bool {
    match coordinator.claim_for("c", Some(model), &[], Duration::ZERO) {
        Ok(lease) => {
            lease.release().expect("release");
            true
        }
        Err(Error::NoKeyAvailable(_)) => false,
        Err(error) => panic!("unexpected error: {error}"),
    }
}

/// The `at` of every reservation of (scope, model), oldest first.
fn reservations(sandbox: &Sandbox, scope: &str, model: &str) -> Vec<i64> {
    let sql = "SELECT at FROM reservations WHERE quota_scope = ?1 AND model = ?2 ORDER BY at";
    sandbox.sql().column(sql, &[&scope, &model]).expect("reservations")
}

// ---------------------------------------------------------------------------------------------------
// Findings (ignored: they fail on main)
// ---------------------------------------------------------------------------------------------------

/// The parser accepts any count of hours (`2/48h`, a weekly `100/168h`), but every reservation older
/// than 26 h is deleted by the next one (`KEEP_MS`). A 48 h window then forgets its oldest requests:
/// with `m = 2/48h`, claims at 0 h and 27 h go through, and a third at 28 h must be refused (the 48 h
/// window already holds 2) — it goes through, and the window holds 3.
#[test]
fn a_window_longer_than_a_day_never_holds_more_than_its_limit() {
    let sandbox = Sandbox::with_limits("m = 2/48h");
    let clock = Arc::new(ManualClock::new(T0));
    let coordinator = sandbox.coordinator_on(&clock);
    assert!(claim(&coordinator, "m"), "first of 2 in 48 h");
    clock.set(T0 + 27 * HOUR);
    assert!(claim(&coordinator, "m"), "second of 2 in 48 h");
    clock.set(T0 + 28 * HOUR);
    let third = claim(&coordinator, "m");
    assert!(!third, "a third request 28 h after the first is inside its 48 h window: 3 sent against 2/48h");
}

/// The keyring's errors never show a line's text (a line may hold a secret). A base64 secret with one
/// `=` of padding pasted alone on a line of a limits section reads as `MODEL =` with no limits, and
/// the error names that "model": the whole secret but its last character.
#[test]
fn a_secret_pasted_in_a_limits_section_is_never_shown() {
    let secret = "ZmFrZVNlY3JldERvTm90VXNlMDEyMzQ1Njc4OWFi=";
    let sandbox = Sandbox::with_keyring(&format!("[c]\nkey0 = {secret}\n[c limits]\n* = 5/min\n{secret}\n"));
    let error = api_jongler::Keyring::load(&sandbox.keyring).expect_err("a line that is no limit");
    let text = format!("{error:#} {error:?}");
    let body = secret.trim_end_matches('=');
    assert!(!text.contains(body), "the secret reaches the error: {text}");
}

/// Same leak through a secret holding a `:` (`account:token` style): a line without `=` splits at its
/// last `:`, and the "model" (the part before it) is shown in the bad-limit error.
#[test]
fn a_secret_with_a_colon_pasted_in_a_limits_section_is_never_shown() {
    let secret = "acct-9f8e7d6c5b4a:tok3nDoNotUse";
    let sandbox = Sandbox::with_keyring(&format!("[c]\nkey0 = {secret}\n[c limits]\n{secret}\n"));
    let error = api_jongler::Keyring::load(&sandbox.keyring).expect_err("a line that is no limit");
    let text = format!("{error:#} {error:?}");
    assert!(!text.contains("acct-9f8e7d6c5b4a"), "part of the secret reaches the error: {text}");
}

/// A clock that jumps forward more than 26 h (a bad NTP answer, a VM resumed with a stale clock then
/// corrected) and back deletes every reservation of the present: with `m = 3/10s`, the window full at
/// T0 is empty again once one claim ran at the wrong time, and 3 more requests go out in the same
/// real 10 s. Rows should be deleted by age relative to the newest row, or not before the window ends.
#[test]
fn a_clock_jump_forward_and_back_does_not_empty_a_full_window() {
    let sandbox = Sandbox::with_limits("m = 3/10s");
    let clock = Arc::new(ManualClock::new(T0));
    let coordinator = sandbox.coordinator_on(&clock);
    for _ in 0..3 {
        assert!(claim(&coordinator, "m"));
    }
    // The window is full (no claim has met it yet, so no paced lockdown row stands for it).
    clock.set(T0 + 27 * HOUR);
    assert!(claim(&coordinator, "m"), "a claim at the wrong time");
    clock.set(T0 + 100);
    // The present's window still holds the 3 requests really sent at T0 (and the one at the wrong time).
    let sent = (0..3).filter(|_| claim(&coordinator, "m")).count();
    assert_eq!(
        sent,
        0,
        "{sent} more requests went out in a window already full; rows: {:?}",
        reservations(&sandbox, "group:g", "m")
    );
}

/// Reservations are deleted only by the next reservation of the same scope and model. A model asked
/// for once (a client's typo through the gateway, a model since retired, a `*` line matching any name)
/// keeps its rows for ever: the table grows with every distinct name, never pruned.
#[test]
fn reservations_of_a_model_never_asked_again_are_pruned() {
    let sandbox = Sandbox::with_limits("* = 100/min");
    let clock = Arc::new(ManualClock::new(T0));
    let coordinator = sandbox.coordinator_on(&clock);
    for index in 0..50 {
        assert!(claim(&coordinator, &format!("typo-{index}")));
    }
    clock.set(T0 + 48 * HOUR);
    // Rows are aged from the newest earlier reservation (a clock stepped forward for one claim must not
    // make the present's rows look old), so the second claim of the new day, a millisecond later, prunes.
    for _ in 0..10 {
        assert!(claim(&coordinator, "m"));
        clock.advance(1);
    }
    let old = sandbox.count(&format!("SELECT count(*) FROM reservations WHERE at < {}", T0 + 24 * HOUR));
    assert_eq!(old, 0, "{old} reservations older than any window (2 days) are still stored");
}

/// A request for the model `*` (the library takes any name; no upstream has such a model) is not
/// paced: a paced lockdown for model `*` would read as one of EVERY model and stop the whole group for
/// models with their own untouched windows. (Before the fix it did.)
#[test]
fn a_full_window_for_model_star_does_not_lock_every_model() {
    let sandbox = Sandbox::with_limits("* = 1/min");
    let clock = Arc::new(ManualClock::new(T0));
    let coordinator = sandbox.coordinator_on(&clock);
    assert!(claim(&coordinator, "*"));
    assert!(claim(&coordinator, "*"), "a request for '*' is not paced");
    assert!(claim(&coordinator, "other"), "another model's window is empty");
    assert!(!claim(&coordinator, "other"), "and is paced");
}

// ---------------------------------------------------------------------------------------------------
// What held (guards: they pass on main)
// ---------------------------------------------------------------------------------------------------

/// One key re-claimed again and again counts each claim in its group's window.
#[test]
fn the_same_key_reclaimed_counts_every_claim() {
    let sandbox = Sandbox::with_keyring("[c]\nkey0 = fake-secret-c-0-do-not-use\n[c limits]\nm = 3/10s\n");
    let clock = Arc::new(ManualClock::new(T0));
    let coordinator = sandbox.coordinator_on(&clock);
    for _ in 0..3 {
        assert!(claim(&coordinator, "m"));
    }
    assert!(!claim(&coordinator, "m"));
    assert_eq!(reservations(&sandbox, "key:key0", "m").len(), 3, "a key in no group is a group of its own");
}

/// Many threads waiting at once are served by `claim_several` in one transaction: still never more
/// than the limit in the window, and the rest are refused by their deadline (not after it).
#[test]
fn waiters_served_in_one_transaction_stay_under_the_limit() {
    let keys: String = (0..8).map(|i| format!("key{i} = fake-secret-c-{i}-do-not-use\n")).collect();
    let groups: String = (0..8).map(|i| format!("key{i} = g\n")).collect();
    let sandbox = Sandbox::with_keyring(&format!("[c]\n{keys}[c groups]\n{groups}[c limits]\nm = 3/1h\n"));
    let clock = Arc::new(ManualClock::new(T0));
    let coordinator = sandbox.coordinator_on(&clock);
    // Hold every key so the claimers queue, then give them back at once.
    let held: Vec<_> =
        (0..8).map(|_| coordinator.claim_for("c", Some("x"), &[], Duration::ZERO).expect("hold")).collect();
    let started = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let coordinator = coordinator.clone();
            std::thread::spawn(move || coordinator.claim_for("c", Some("m"), &[], Duration::from_millis(1_500)))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    for lease in held {
        lease.release().expect("release");
    }
    let results: Vec<_> = threads.into_iter().map(|thread| thread.join().expect("join")).collect();
    let got = results.iter().filter(|result| result.is_ok()).count();
    assert_eq!(got, 3, "3 of 8 waiters got a key under 3/1h");
    assert_eq!(reservations(&sandbox, "group:g", "m").len(), 3);
    assert!(started.elapsed() < Duration::from_secs(4), "answered by their deadlines: {:?}", started.elapsed());
}

/// A claim that may wait less than the paced lockdown lasts is answered at once, not at its deadline,
/// and one that may wait longer gets a key when the window has room (the real clock).
#[test]
fn a_wait_on_a_full_window_ends_by_its_deadline_or_with_a_key() {
    let sandbox = Sandbox::with_limits("m = 1/s");
    let coordinator = sandbox.coordinator(sandbox.options());
    coordinator.claim_for("c", Some("m"), &[], Duration::ZERO).expect("first").release().expect("release");
    let started = Instant::now();
    let error = coordinator.claim_for("c", Some("m"), &[], Duration::from_millis(300)).expect_err("full");
    assert!(matches!(error, Error::NoKeyAvailable(_)), "{error}");
    assert!(started.elapsed() < Duration::from_millis(1_000), "waited {:?}", started.elapsed());
    let started = Instant::now();
    coordinator.claim_for("c", Some("m"), &[], Duration::from_secs(10)).expect("room after 1.5 s").release().unwrap();
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(3), "woken when the window had room, not later: {waited:?}");
}

/// A clock stepped backwards counts the reservations "from the future" in the present window (never
/// fewer), and the lockdown lasts until they leave it.
#[test]
fn a_clock_stepped_backwards_still_counts_what_was_sent() {
    let sandbox = Sandbox::with_limits("m = 2/10s");
    let clock = Arc::new(ManualClock::new(T0 + 5_000));
    let coordinator = sandbox.coordinator_on(&clock);
    assert!(claim(&coordinator, "m") && claim(&coordinator, "m"));
    clock.set(T0);
    assert!(!claim(&coordinator, "m"), "2 requests sent (at T0 + 5 s by the old clock) fill the window");
}

/// Limits of one connector do not pace another with the same group names and models.
#[test]
fn limits_of_one_connector_do_not_reach_another() {
    let sandbox = Sandbox::with_keyring(
        "[c]\nkey0 = fake-secret-c-0-do-not-use\n[c groups]\nkey0 = g\n[c limits]\nm = 1/min\n\
         [d]\nkey0 = fake-secret-d-0-do-not-use\n[d groups]\nkey0 = g\n",
    );
    let clock = Arc::new(ManualClock::new(T0));
    let coordinator = sandbox.coordinator_on(&clock);
    assert!(claim(&coordinator, "m"));
    assert!(!claim(&coordinator, "m"));
    for _ in 0..5 {
        coordinator.claim_for("d", Some("m"), &[], Duration::ZERO).expect("d is not paced").release().unwrap();
    }
    assert_eq!(sandbox.count("SELECT count(*) FROM reservations WHERE connector = 'd'"), 0);
}

/// A group's own section replaces the section for every group (its keys meet only its lines); a key in
/// no group meets the section for every group; `models/m` asked is `m`.
#[test]
fn a_groups_section_replaces_the_every_group_section_and_models_prefix_is_dropped() {
    let sandbox = Sandbox::with_keyring(
        "[c]\nkey0 = fake-secret-c-0-do-not-use\nkey1 = fake-secret-c-1-do-not-use\n\
         [c groups]\nkey0 = paid\n[c limits]\n* = 1/min\n[c limits paid]\nm = 2/min\n",
    );
    let clock = Arc::new(ManualClock::new(T0));
    let coordinator = sandbox.coordinator_on(&clock);
    // m: paid allows 2, key1 (a group of its own) 1: three in all, the 3rd via `models/m`.
    assert!(claim(&coordinator, "m") && claim(&coordinator, "m") && claim(&coordinator, "models/m"));
    assert!(!claim(&coordinator, "m"));
    assert_eq!(reservations(&sandbox, "group:paid", "m").len(), 2);
    assert_eq!(reservations(&sandbox, "key:key1", "m").len(), 1);
    // Another model: paid's section lists no `*`, so paid is unlimited for it.
    for _ in 0..4 {
        assert!(claim(&coordinator, "other"));
    }
    assert_eq!(reservations(&sandbox, "group:paid", "other").len(), 0);
}

/// `cleanup` clears lockdowns, including paced ones, but not the reservations: the next claim is
/// still refused.
#[test]
fn cleanup_does_not_open_a_full_window() {
    let sandbox = Sandbox::with_limits("m = 1/min");
    let clock = Arc::new(ManualClock::new(T0));
    let coordinator = sandbox.coordinator_on(&clock);
    assert!(claim(&coordinator, "m"));
    assert!(!claim(&coordinator, "m"));
    coordinator.cleanup(Some("c"), true).expect("cleanup");
    assert!(!claim(&coordinator, "m"), "the window is still full after cleanup");
}

/// A 429 met while the scope is paced (a request in flight, traffic from outside the pool) is the
/// scope's first strike, and its lockdown keeps the later end; pacing itself adds none.
#[test]
fn a_429_during_a_paced_lockdown_is_one_strike() {
    let sandbox = Sandbox::with_limits("m = 1/min");
    let clock = Arc::new(ManualClock::new(T0));
    let coordinator = sandbox.coordinator_on(&clock);
    let in_flight = coordinator.claim_for("c", Some("m"), &[], Duration::ZERO).expect("first");
    assert!(!claim(&coordinator, "m"), "paced");
    let paced_until: i64 = sandbox.count("SELECT until FROM lockdowns WHERE quota_id = 'apijongler:paced'");
    let lockdown = Lockdown {
        until: T0 + 5_000,
        reason: "429".into(),
        http_status: Some(429),
        reach: Reach::Group,
        models: vec!["m".into()],
        quota_id: Some("q".into()),
        project: None,
        taught: Vec::new(),
    };
    in_flight.finish(&Fate::Lockdown(lockdown), None).expect("finish");
    let row = sandbox.sql().row("SELECT strikes, until FROM lockdowns WHERE scope = 'group:g' AND model = 'm'", &[]);
    let row = row.expect("row");
    let (strikes, until): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!((strikes, until), (1, paced_until), "one strike; the later end kept");
}

/// A day's limit across the spring-forward day (23 h long in Los Angeles): a day full at 23:30 PDT is
/// paced until that midnight, and the window of the new day is empty.
#[test]
fn a_days_limit_across_daylight_saving() {
    let sandbox = Sandbox::with_limits("* = 1/day");
    // 2027-03-14 (clocks go forward at 2 am), 23:30 PDT = 06:30 UTC on the 15th.
    let late = chrono::NaiveDate::from_ymd_opt(2027, 3, 15).unwrap().and_hms_opt(6, 30, 0).unwrap().and_utc();
    let clock = Arc::new(ManualClock::new(late.timestamp_millis()));
    let coordinator = sandbox.coordinator_on(&clock);
    assert!(claim(&coordinator, "m"));
    assert!(!claim(&coordinator, "m"));
    let until: i64 = sandbox.count("SELECT until FROM lockdowns WHERE quota_id = 'apijongler:paced'");
    assert_eq!(until, late.timestamp_millis() + 30 * 60_000, "midnight PDT");
    clock.set(until);
    assert!(claim(&coordinator, "m"));
    // Fall back (2027-11-07, a 25 h day): a claim at 00:30 PDT and one at 23:30 PST are the same day.
    let morning = chrono::NaiveDate::from_ymd_opt(2027, 11, 7).unwrap().and_hms_opt(7, 30, 0).unwrap().and_utc();
    clock.set(morning.timestamp_millis());
    assert!(claim(&coordinator, "n"));
    clock.set(morning.timestamp_millis() + 24 * HOUR);
    assert!(!claim(&coordinator, "n"), "23:30 PST is still the same Pacific day");
}

/// A pool without limits writes no reservation and no paced lockdown.
#[test]
fn a_pool_without_limits_reserves_nothing() {
    let sandbox = Sandbox::new("c", 1);
    let clock = Arc::new(ManualClock::new(T0));
    let coordinator = sandbox.coordinator_on(&clock);
    for _ in 0..20 {
        assert!(claim(&coordinator, "m"));
    }
    assert_eq!(sandbox.count("SELECT count(*) FROM reservations"), 0);
}

/// Runs the binary on the sandbox with `args`; its stdout.
fn run(sandbox: &Sandbox, args: &[&str]) -> String {
    let output = sandbox.apijongler().args(args).output().expect("run");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("utf-8")
}

/// `why KEY --model m` and `status` tell a paced scope from a 429: the reason names the declared limit,
/// and `why` says the key would not be taken for m (but would for another model).
#[test]
fn why_and_status_report_a_paced_scope() {
    let sandbox = Sandbox::with_limits("m = 1/min");
    let coordinator = sandbox.coordinator(sandbox.options());
    coordinator.claim_for("c", Some("m"), &[], Duration::ZERO).expect("first").release().expect("release");
    assert!(coordinator.claim_for("c", Some("m"), &[], Duration::ZERO).is_err(), "paced");
    let why = run(&sandbox, &["why", "c", "key1", "--model", "m"]);
    assert!(why.contains("paced: 1/min declared for m"), "{why}");
    assert!(why.contains("A request for m does not take key1 before"), "{why}");
    let why_other = run(&sandbox, &["why", "c", "key1", "--model", "other"]);
    assert!(why_other.contains("A request for other takes key1 now"), "{why_other}");
    let status = run(&sandbox, &["status"]);
    assert!(status.contains("[apijongler:paced]"), "{status}");
    let json: serde_json::Value = serde_json::from_str(&run(&sandbox, &["--json", "status"])).expect("json");
    assert_eq!(json[1]["lockdowns"][0]["quota_id"], "apijongler:paced", "{json}");
    assert_eq!(json[1]["lockdowns"][0]["strikes"], 0, "{json}");
}

/// A paced lockdown is written by no answer: the key whose claim found the window full never sent
/// anything. `why` and `status` said "set by key1's answer" (key1 never used), which sent a
/// reader looking for an upstream reply that does not exist.
#[test]
fn a_paced_lockdown_is_not_said_to_be_set_by_an_answer() {
    let sandbox = Sandbox::with_limits("m = 1/min");
    let coordinator = sandbox.coordinator(sandbox.options());
    coordinator.claim_for("c", Some("m"), &[], Duration::ZERO).expect("first").release().expect("release");
    assert!(coordinator.claim_for("c", Some("m"), &[], Duration::ZERO).is_err(), "paced");
    let why = run(&sandbox, &["why", "c", "key1", "--model", "m"]);
    assert!(!why.contains("set by key1's answer"), "{why}");
    assert!(why.contains("set by pacing (its declared limit was full)"), "{why}");
}
