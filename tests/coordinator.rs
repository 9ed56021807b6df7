//! The state machine in one process: deadlines with an injected clock, error and retired keys,
//! keyring changes, cleanup boundaries, fencing, reaping by pid identity, waiting, and the claim's
//! query plan.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api_jongler::pool::HistoryEvent;
use api_jongler::pool::HistoryQuery;
use api_jongler::{Clock, CoordinatorOptions, Error, ManualClock, SystemClock};
use common::{Sandbox, check_leases, wait_until};

const T0: i64 = 1_800_000_000_000;

fn manual(sandbox: &Sandbox) -> (CoordinatorOptions, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(T0));
    (CoordinatorOptions { clock: clock.clone(), ..sandbox.options() }, clock)
}

fn unavailable(result: api_jongler::Result<api_jongler::Lease>) -> String {
    match result {
        Err(error @ Error::NoKeyAvailable(_)) => error.to_string(),
        other => panic!("expected no key available, got {other:?}"),
    }
}

#[test]
fn lockdown_holds_until_its_deadline_by_the_injected_clock() {
    let sandbox = Sandbox::new("c", 1);
    let (options, clock) = manual(&sandbox);
    let coordinator = sandbox.coordinator(options);
    let lease = coordinator.claim("c", &[], Duration::ZERO).expect("claim");
    lease.lockdown(T0 + 60_000, "429 per-minute quota", Some(429)).expect("lockdown");

    clock.set(T0 + 59_999);
    let message = unavailable(coordinator.claim("c", &[], Duration::ZERO));
    assert!(message.contains("1 in lockdown") && message.contains("in 0.0 s"), "{message}");
    assert!(message.contains("apijongler cleanup c"), "{message}");
    assert_eq!(coordinator.key_states("c").expect("states").lockdown.len(), 1);

    clock.set(T0 + 60_000);
    assert_eq!(coordinator.available_keys("c").expect("available").len(), 1, "an expired lockdown is claimable");
    let lease = coordinator.claim("c", &[], Duration::ZERO).expect("claim after the deadline");
    assert_eq!(lease.token(), 2);
    lease.release().expect("release");

    let history = coordinator.store().history(&HistoryQuery::default()).expect("history");
    let claimed_again = &history[1];
    assert_eq!(
        (claimed_again.event, claimed_again.from_state.as_deref(), claimed_again.to_state.as_str()),
        (HistoryEvent::Claimed, Some("lockdown"), "locked")
    );
    let locked_down = &history[2];
    assert_eq!(locked_down.event, HistoryEvent::LockedDown);
    assert_eq!(locked_down.lockdown_until, Some(T0 + 60_000));
    assert_eq!(locked_down.http_status, Some(429));
    let record = &coordinator.store().keys(Some("c")).expect("keys")[0];
    assert_eq!((record.lockdown_count, record.uses, record.lockdown_until), (1, 2, None));
}

#[test]
fn error_keys_are_never_claimed() {
    let sandbox = Sandbox::new("c", 2);
    let (options, clock) = manual(&sandbox);
    let coordinator = sandbox.coordinator(options);
    let bad = coordinator.claim("c", &[], Duration::ZERO).expect("claim");
    let bad_name = bad.key_name().to_owned();
    bad.mark_error("API_KEY_INVALID", Some(400)).expect("error");
    for _ in 0..10 {
        clock.advance(1_000);
        let lease = coordinator.claim("c", &[], Duration::ZERO).expect("the other key");
        assert_ne!(lease.key_name(), bad_name);
        lease.release().expect("release");
    }
    let held = coordinator.claim("c", &[], Duration::ZERO).expect("the other key");
    let message = unavailable(coordinator.claim("c", &[], Duration::ZERO));
    assert!(message.contains("1 locked") && message.contains("1 in error"), "{message}");
    drop(held);
    let states = coordinator.key_states("c").expect("states");
    assert_eq!(states.error.into_iter().collect::<Vec<_>>(), [bad_name]);
    let record = coordinator.store().keys(Some("c")).expect("keys").into_iter().find(|k| k.reason.is_some());
    let record = record.expect("the error key keeps its reason");
    assert_eq!((record.reason.as_deref(), record.http_status), (Some("API_KEY_INVALID"), Some(400)));
}

#[test]
fn tried_keys_are_skipped_and_counted() {
    let sandbox = Sandbox::new("c", 2);
    let coordinator = sandbox.coordinator(sandbox.options());
    let first = coordinator.claim("c", &[], Duration::ZERO).expect("claim");
    let tried = vec![first.key_name().to_owned()];
    first.release().expect("release");
    let second = coordinator.claim("c", &tried, Duration::ZERO).expect("claim");
    assert_ne!(second.key_name(), tried[0]);
    let message = unavailable(coordinator.claim("c", &tried, Duration::ZERO));
    assert!(message.contains("1 already tried"), "{message}");
}

#[test]
fn keys_removed_from_the_keyring_are_retired_and_come_back() {
    let sandbox = Sandbox::with_keyring("[c]\nkeep = fake-keep\ngone = fake-gone\n");
    let coordinator = sandbox.coordinator(sandbox.options());
    std::fs::write(&sandbox.keyring, "[c]\nkeep = fake-keep\n").expect("rewrite");
    let report = coordinator.sync_as_truth(&sandbox.load_keyring()).expect("sync");
    assert_eq!(report.retired, [("c".to_owned(), "gone".to_owned())]);
    for _ in 0..5 {
        let lease = coordinator.claim("c", &[], Duration::ZERO).expect("claim");
        assert_eq!(lease.key_name(), "keep");
        lease.release().expect("release");
    }
    let states = coordinator.key_states("c").expect("states");
    assert!(!states.vacant.contains("gone"), "retired keys are not reported as available");
    assert_eq!(coordinator.store().keys(Some("c")).expect("rows").len(), 2, "the row and its history stay");

    std::fs::write(&sandbox.keyring, "[c]\nkeep = fake-keep\ngone = fake-gone\n").expect("rewrite");
    let report = coordinator.sync(&sandbox.load_keyring()).expect("sync");
    assert_eq!(report.restored, [("c".to_owned(), "gone".to_owned())]);
    assert!(coordinator.key_states("c").expect("states").vacant.contains("gone"));
    let gone: Vec<HistoryEvent> =
        sandbox.history().into_iter().filter(|row| row.key == "gone").map(|row| row.event).collect();
    assert_eq!(gone, [HistoryEvent::Added, HistoryEvent::Retired, HistoryEvent::Restored]);
}

#[test]
fn a_changed_secret_lifts_the_error_state() {
    let sandbox = Sandbox::with_keyring("[c]\nk = fake-old-secret\n");
    let coordinator = sandbox.coordinator(sandbox.options());
    coordinator.claim("c", &[], Duration::ZERO).expect("claim").mark_error("leaked", Some(403)).expect("error");
    assert_eq!(coordinator.sync(&sandbox.load_keyring()).expect("same file").changed.len(), 0);
    assert_eq!(coordinator.key_states("c").expect("states").error.len(), 1, "unchanged secret stays in error");

    std::fs::write(&sandbox.keyring, "[c]\nk = fake-new-secret\n").expect("rewrite");
    let report = coordinator.sync_as_truth(&sandbox.load_keyring()).expect("sync");
    assert_eq!(report.changed, [("c".to_owned(), "k".to_owned())]);
    let lease = coordinator.claim("c", &[], Duration::ZERO).expect("claimable again");
    let expected = sandbox.load_keyring().key("c", "k").expect("key").fingerprint().to_string();
    assert_eq!(lease.fingerprint(), expected);
}

#[test]
fn cleanup_stays_inside_its_connector_and_spares_live_holders() {
    let sandbox = Sandbox::with_keyring("[foo]\na = fake-a\nheld = fake-held\n[foo_bar]\nb = fake-b\n");
    let coordinator = sandbox.coordinator(sandbox.options());
    let far = SystemClock.now_ms() + 3_600_000;
    let a = coordinator.claim("foo", &[], Duration::ZERO).expect("claim");
    let a_name = a.key_name().to_owned();
    a.lockdown(far, "quota", Some(429)).expect("lockdown");
    let held = coordinator.claim("foo", &[], Duration::ZERO).expect("claim");
    coordinator.claim("foo_bar", &[], Duration::ZERO).expect("claim").lockdown(far, "quota", Some(429)).expect("ld");

    let done = coordinator.cleanup(Some("foo"), false).expect("cleanup");
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(
        (done[0].key_name.as_str(), done[0].event, done[0].to_state.as_str()),
        (a_name.as_str(), HistoryEvent::CleanedUp, "vacant")
    );
    assert_eq!(coordinator.key_states("foo_bar").expect("states").lockdown.len(), 1, "foo_bar untouched");
    assert!(held.is_valid(), "a live holder keeps its key");
    assert_eq!(coordinator.key_states("foo").expect("states").locked.len(), 1);

    let forced = coordinator.cleanup(Some("foo"), true).expect("forced cleanup");
    assert_eq!(forced.len(), 1);
    assert_eq!(forced[0].event, HistoryEvent::ForceEvicted, "{:?}", forced[0]);
    let error = held.release().expect_err("the lease is gone");
    assert!(matches!(error, Error::LeaseLost { .. }), "{error:?}");
    assert!(error.to_string().contains("must not be used"), "{error}");

    coordinator.cleanup(None, false).expect("cleanup all");
    assert!(sandbox.states().iter().all(|(_, state)| state == "vacant"), "{:?}", sandbox.states());
}

#[test]
fn a_lost_lease_cannot_overwrite_the_new_holder() {
    let sandbox = Sandbox::new("c", 1);
    let coordinator = sandbox.coordinator(sandbox.options());
    let old = coordinator.claim("c", &[], Duration::ZERO).expect("claim");
    coordinator.cleanup(Some("c"), true).expect("force");
    let new = coordinator.claim("c", &[], Duration::ZERO).expect("claim again");
    assert!(matches!(old.lockdown(i64::MAX, "late", Some(429)), Err(Error::LeaseLost { .. })));
    assert_eq!(sandbox.states(), [("key0".to_owned(), "locked".to_owned())]);
    assert!(new.is_valid());
    new.release().expect("the new holder's release works");
    check_leases(&sandbox.history());
}

/// Start time (clock ticks since boot) of a process, from `/proc/<pid>/stat`.
fn start_time(pid: u32) -> i64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after_name = &stat[stat.rfind(')').expect(")") + 1..];
    after_name.split_whitespace().nth(19).expect("field 22").parse().expect("number")
}

#[test]
fn a_reused_pid_is_reaped_but_a_live_holder_is_not() {
    let sandbox = Sandbox::new("c", 2);
    let coordinator = sandbox.coordinator(sandbox.options());
    let first = coordinator.claim("c", &[], Duration::ZERO).expect("claim");
    let second = coordinator.claim("c", &[], Duration::ZERO).expect("claim");
    let mut stranger = Command::new("sleep").arg("60").stdout(Stdio::null()).spawn().expect("spawn sleep");
    let pid = stranger.id();
    let started = start_time(pid);
    // Pretend both locks were taken by whoever had `pid` before: one recorded with another start time
    // (the pid was reused since), one with the stranger's real start time (it is the live holder).
    let forge = |key: &str, recorded_start: i64| {
        sandbox
            .sql()
            .execute(
                "UPDATE keys SET holder_pid = ?1, holder_started = ?2 WHERE key_name = ?3",
                &[&pid, &recorded_start, &key],
            )
            .expect("forge holder");
    };
    forge(first.key_name(), started + 12_345);
    forge(second.key_name(), started);

    let reaped = coordinator.reap(Some("c")).expect("reap");
    stranger.kill().expect("kill sleep");
    stranger.wait().expect("wait sleep");
    assert_eq!(reaped.len(), 1, "{reaped:?}");
    assert_eq!((reaped[0].key_name.as_str(), reaped[0].event), (first.key_name(), HistoryEvent::ReapedDead));
    // Which proof of death: the event says dead, the reason says how.
    assert!(reaped[0].reason.contains("reused"), "{}", reaped[0].reason);
    let states = coordinator.key_states("c").expect("states");
    assert!(states.locked.contains(second.key_name()), "the live holder keeps its key");

    // Now the stranger is gone: its lock is freed at once, whatever its heartbeat says.
    let reaped = coordinator.reap(Some("c")).expect("reap");
    assert_eq!(reaped.len(), 1);
    assert_eq!(reaped[0].event, HistoryEvent::ReapedDead);
    assert!(reaped[0].reason.contains("has exited"), "{}", reaped[0].reason);
}

/// A claim that committed while its answer was lost with the connection (on PostgreSQL) leaves a key held
/// by this very process under a lease it never received: nothing here renews or ends it, and another
/// process of this host sees its holder alive. Once its heartbeat is stale this process's own reaper
/// frees it; a lease this process holds, through this coordinator or another, is never taken so however
/// old its heartbeat.
#[test]
fn a_key_this_process_holds_under_a_lease_it_never_received_is_reaped_once_stale() {
    let sandbox = Sandbox::new("c", 3);
    let (options, clock) = manual(&sandbox);
    let options = CoordinatorOptions { stale_after: Duration::from_secs(30), ..options };
    let coordinator = sandbox.coordinator(options.clone());
    let other = sandbox.coordinator(options);
    let mine = coordinator.claim("c", &[], Duration::ZERO).expect("claim");
    let others = other.claim("c", &[], Duration::ZERO).expect("claim");
    let lost = ["key0", "key1", "key2"]
        .into_iter()
        .find(|key| ![mine.key_name(), others.key_name()].contains(key))
        .expect("a third key");
    // The lost claim, as the claim statement writes it: this process's holder and heartbeat, a new lease.
    let columns = ["holder_host", "holder_boot_id", "holder_pid_namespace", "holder_pid", "holder_started"];
    let copied = columns
        .into_iter()
        .chain(["locked_at", "heartbeat_at", "heartbeat_boot_ms"])
        .map(|column| format!("{column} = (SELECT {column} FROM keys WHERE key_name = ?2)"))
        .collect::<Vec<_>>()
        .join(", ");
    let forged = sandbox
        .sql()
        .execute(
            &format!("UPDATE keys SET state = 'locked', lease = lease + 1, {copied} WHERE key_name = ?1"),
            &[&lost, &mine.key_name()],
        )
        .expect("forge the lost claim");
    assert_eq!(forged, 1);

    assert_eq!(coordinator.reap(Some("c")).expect("reap"), [], "a fresh heartbeat: maybe a claim in flight");
    clock.advance(30_001);
    let reaped = coordinator.reap(Some("c")).expect("reap");
    assert_eq!(reaped.len(), 1, "{reaped:?}");
    assert_eq!((reaped[0].key_name.as_str(), reaped[0].event), (lost, HistoryEvent::ReapedStale));
    assert!(reaped[0].reason.contains("never received"), "{}", reaped[0].reason);
    assert_eq!(other.reap(Some("c")).expect("reap"), [], "the other coordinator's lease is this process's too");
    mine.release().expect("this coordinator's lease kept");
    others.release().expect("the other coordinator's lease kept");
}

#[test]
fn heartbeats_keep_a_held_key_from_going_stale() {
    let sandbox = Sandbox::new("c", 1);
    // A 2 s threshold against beats every 20 ms: only a stall of the heartbeat thread 100 times its
    // interval could fail this.
    let options = CoordinatorOptions {
        heartbeat_interval: Duration::from_millis(20),
        stale_after: Duration::from_secs(2),
        ..sandbox.options()
    };
    let holder = sandbox.coordinator(options.clone());
    let lease = holder.claim("c", &[], Duration::ZERO).expect("claim");
    // As if the holder ran in another container: the reaper can judge it by its heartbeat alone.
    sandbox.sql().execute("UPDATE keys SET holder_pid_namespace = 'another'", &[]).expect("forge");
    let heartbeat_at = || -> i64 { sandbox.sql().value("SELECT heartbeat_at FROM keys", &[]).expect("heartbeat_at") };
    let first = heartbeat_at();
    // Wait until the heartbeat has moved the row well past the stale threshold since the claim.
    wait_until(Duration::from_secs(60), "heartbeats past the stale threshold", || heartbeat_at() > first + 3_000);
    let reaper = sandbox.coordinator(options);
    assert_eq!(reaper.reap(None).expect("reap"), [], "a heartbeating holder is not stale");
    assert!(lease.is_valid());
    lease.release().expect("release");
}

#[test]
fn a_waiter_wakes_at_the_lockdown_deadline() {
    let sandbox = Sandbox::new("c", 1);
    let coordinator = sandbox.coordinator(sandbox.options());
    let deadline = SystemClock.now_ms() + 300;
    coordinator.claim("c", &[], Duration::ZERO).expect("claim").lockdown(deadline, "quota", Some(429)).expect("ld");
    let asked = Instant::now();
    let lease = coordinator.claim("c", &[], Duration::from_secs(30)).expect("claimed at the deadline");
    assert!(SystemClock.now_ms() >= deadline, "not before the deadline");
    assert!(asked.elapsed() < Duration::from_secs(20), "woke near the deadline, not at the end of the wait");
    lease.release().expect("release");
}

#[test]
fn no_wait_when_no_key_can_come_back() {
    let sandbox = Sandbox::new("c", 1);
    let coordinator = sandbox.coordinator(sandbox.options());
    coordinator.claim("c", &[], Duration::ZERO).expect("claim").mark_error("bad", Some(401)).expect("error");
    let asked = Instant::now();
    let message = unavailable(coordinator.claim("c", &[], Duration::from_secs(60)));
    assert!(asked.elapsed() < Duration::from_secs(30), "gave up at once instead of waiting 60 s");
    assert!(message.contains("1 in error") && !message.contains("wait longer"), "{message}");
    let unknown = unavailable(coordinator.claim("nope", &[], Duration::ZERO));
    assert!(unknown.contains("has no keys"), "{unknown}");
}

#[test]
fn the_claim_walks_an_index_in_lru_order_with_ten_thousand_keys() {
    let sandbox = Sandbox::new("big", 10_000);
    let coordinator = sandbox.coordinator(sandbox.options());
    let plan = coordinator.store().explain_claim().expect("plan");
    if common::store::on_postgres() {
        // PostgreSQL's words: the walk is the index's, in its order (no sort), and the lockdowns are
        // probed by their primary key.
        assert!(plan.iter().any(|step| step.contains("Index Scan using keys_lru on keys k")), "{plan:?}");
        assert!(!plan.iter().any(|step| step.contains("Sort") || step.contains("Seq Scan on keys")), "{plan:?}");
        assert!(plan.iter().any(|step| step.contains("using lockdowns_pkey")), "{plan:?}");
        assert!(!plan.iter().any(|step| step.contains("Seq Scan on lockdowns")), "{plan:?}");
        let first = coordinator.claim("big", &[], Duration::ZERO).expect("claim");
        let second = coordinator.claim("big", &[], Duration::ZERO).expect("claim");
        assert_eq!((first.key_name(), second.key_name()), ("key0", "key1"));
        return;
    }
    assert!(plan.iter().any(|step| step.contains("USING INDEX keys_claim_order")), "{plan:?}");
    assert!(plan.iter().any(|step| step.contains("USING INDEX keys_lru")), "{plan:?}");
    assert!(!plan.iter().any(|step| step.contains("TEMP B-TREE")), "no sort of every key: {plan:?}");
    // The lockdowns that keep a key from the model are probed by their primary key, never scanned.
    assert!(
        plan.iter().any(|step| step.contains("SEARCH q USING PRIMARY KEY (connector=? AND scope=? AND model=?)")),
        "{plan:?}"
    );
    assert!(!plan.iter().any(|step| step.contains("SCAN q")), "{plan:?}");
    // And it is the least recently used key that comes out.
    let first = coordinator.claim("big", &[], Duration::ZERO).expect("claim");
    let second = coordinator.claim("big", &[], Duration::ZERO).expect("claim");
    assert_eq!((first.key_name(), second.key_name()), ("key0", "key1"));
}

#[test]
fn keys_come_out_least_recently_used_first() {
    let sandbox = Sandbox::new("c", 3);
    let (options, clock) = manual(&sandbox);
    let coordinator = sandbox.coordinator(options);
    let use_key = |tried: &[String]| {
        clock.advance(1_000);
        let lease = coordinator.claim("c", tried, Duration::ZERO).expect("claim");
        let name = lease.key_name().to_owned();
        lease.release().expect("release");
        name
    };
    let first_round: Vec<String> = (0..3).map(|_| use_key(&[])).collect();
    assert_eq!(first_round, ["key0", "key1", "key2"], "never used: in the order they were added");
    // key1 is used once more (key0 excluded), so it becomes the most recently used.
    assert_eq!(use_key(&["key0".to_owned()]), "key1");
    let next_round: Vec<String> = (0..3).map(|_| use_key(&[])).collect();
    assert_eq!(next_round, ["key0", "key2", "key1"], "least recently used first");
}

#[test]
fn no_secret_reaches_the_database_file() {
    let sandbox = Sandbox::new("c", 3);
    let (options, clock) = manual(&sandbox);
    let coordinator = sandbox.coordinator(options);
    for round in 0..30 {
        clock.advance(1_000);
        let lease = coordinator.claim("c", &[], Duration::ZERO).expect("claim");
        match round % 3 {
            0 => lease.release().expect("release"),
            1 => lease.lockdown(clock.now_ms() + 500, "quota", Some(429)).expect("lockdown"),
            _ => lease.mark_error("invalid", Some(400)).expect("error"),
        }
        coordinator.cleanup(None, false).expect("cleanup");
    }
    let held = coordinator.claim("c", &[], Duration::ZERO).expect("claim");
    let keyring = sandbox.load_keyring();
    let text = sandbox.stored_text();
    assert!(text.contains(keyring.keys("c").expect("keys")[0].fingerprint().as_str()), "fingerprints are stored");
    for (_, key) in keyring.all_keys() {
        use secrecy::ExposeSecret;
        assert!(!text.contains(key.secret().expose_secret()), "secret of {} found in the database", key.name());
    }
    held.release().expect("release");
}

#[test]
fn a_lease_is_trusted_until_the_trust_window_ends_on_the_boot_clock() {
    let sandbox = Sandbox::new("c", 1);
    let (options, clock) = manual(&sandbox);
    // The window is stale_after - heartbeat_interval: 25 s with the defaults.
    let coordinator = sandbox.coordinator(options);
    let lease = coordinator.claim("c", &[], Duration::ZERO).expect("claim");
    clock.advance(24_999);
    assert!(lease.is_valid() && lease.check().is_ok(), "trusted just inside the window");
    clock.advance(1);
    assert!(!lease.is_valid(), "no longer trusted once the window has passed");
    assert!(matches!(lease.check(), Err(Error::LeaseLost { .. })));
}

#[test]
fn escalation_counts_consecutive_lockdowns_and_a_success_resets_it() {
    let sandbox = Sandbox::new("c", 1);
    let (options, clock) = manual(&sandbox);
    let coordinator = sandbox.coordinator(options);
    for expected in 0..2 {
        let lease = coordinator.claim("c", &[], Duration::ZERO).expect("claim");
        assert_eq!(lease.lockdown_count(), expected);
        lease.lockdown(clock.now_ms() + 1_000, "quota", Some(429)).expect("lockdown");
        clock.advance(1_000);
    }
    let mut lease = coordinator.claim("c", &[], Duration::ZERO).expect("claim");
    assert_eq!(lease.lockdown_count(), 2);
    lease.reset_escalation(None).expect("reset");
    assert_eq!(lease.lockdown_count(), 0);
    assert_eq!(sandbox.count("SELECT lockdown_count FROM keys"), 0, "written to the row");
    lease.release().expect("release");
}

/// A release after a success for a model records the attempt and ends the key's expired lockdowns of
/// that model, so its strikes start again at 0; a plain release keeps them. On PostgreSQL the key's scope
/// watermark then falls back to NULL: its claims and releases read no lockdowns again.
#[test]
fn a_success_ends_the_expired_lockdowns_of_its_model_and_a_plain_release_keeps_them() {
    use api_jongler::pool::outcome::Outcome;
    use api_jongler::pool::{Attempt, Fate, Lockdown};
    let sandbox = Sandbox::new("c", 1);
    let (options, clock) = manual(&sandbox);
    let coordinator = sandbox.coordinator(options);
    let lockdown =
        |until: i64| Lockdown { models: vec!["m".to_owned()], ..Lockdown::whole_key(until, "quota", Some(429)) };
    let lease = coordinator.claim_for("c", Some("m"), &[], Duration::ZERO).expect("claim");
    lease.finish(&Fate::Lockdown(lockdown(clock.now_ms() + 1_000)), None).expect("lockdown");
    if common::store::on_postgres() {
        let marked = sandbox.count("SELECT count(*) FROM keys WHERE scope_watermark IS NOT NULL");
        assert_eq!(marked, 1, "the lockdown marked its key");
    }
    clock.advance(1_000);
    coordinator.claim_for("c", Some("m"), &[], Duration::ZERO).expect("claim").release().expect("plain release");
    let lease = coordinator.claim_for("c", Some("m"), &[], Duration::ZERO).expect("claim");
    assert_eq!(lease.lockdown_count(), 1, "a plain release keeps the strike");
    let attempt = Attempt {
        at: clock.now_ms(),
        connector: "c".to_owned(),
        key_name: Some(lease.key_name().to_owned()),
        method: "POST".to_owned(),
        endpoint: "/v1/m".to_owned(),
        status: Some(200),
        latency_ms: 5,
        outcome: Outcome::SUCCESS,
        model: Some("m".to_owned()),
        prompt_tokens: None,
    };
    lease.finish(&Fate::Release { success: true }, Some(&attempt)).expect("release after a success");
    assert_eq!(sandbox.count("SELECT count(*) FROM lockdowns"), 0, "the expired lockdown of m is gone");
    if common::store::on_postgres() {
        let unmarked = sandbox.count("SELECT count(*) FROM keys WHERE scope_watermark IS NULL");
        assert_eq!(unmarked, 1, "no row left on the key's scopes, so no watermark");
    }
    assert_eq!(sandbox.count("SELECT count(*) FROM requests WHERE status = 200 AND model = 'm'"), 1);
    let lease = coordinator.claim_for("c", Some("m"), &[], Duration::ZERO).expect("claim");
    assert_eq!(lease.lockdown_count(), 0, "strikes start again after the success");
    lease.release().expect("release");
    let released = sandbox.count("SELECT count(*) FROM history WHERE event = 'released' AND to_state = 'vacant'");
    assert_eq!(released, 3, "each release wrote its history row");
}

#[test]
fn a_dropped_lease_gives_its_key_back() {
    let sandbox = Sandbox::new("c", 1);
    let coordinator = sandbox.coordinator(sandbox.options());
    drop(coordinator.claim("c", &[], Duration::ZERO).expect("claim"));
    assert_eq!(sandbox.states(), [("key0".to_owned(), "vacant".to_owned())]);
}

/// Many threads of one process claiming and releasing at once (their claims and ends written in shared
/// transactions): every claim gets a key no other thread holds, and every key ends vacant.
#[test]
fn threads_of_one_process_claiming_at_once_never_share_a_key() {
    const THREADS: usize = 16;
    const ROUNDS: usize = 50;
    let sandbox = Sandbox::new("c", THREADS);
    let coordinator = sandbox.coordinator(sandbox.options());
    let held = std::sync::Mutex::new(std::collections::HashSet::new());
    let start = std::sync::Barrier::new(THREADS);
    std::thread::scope(|scope| {
        for _ in 0..THREADS {
            scope.spawn(|| {
                start.wait();
                for _ in 0..ROUNDS {
                    let lease = coordinator.claim("c", &[], Duration::from_secs(30)).expect("a key for each thread");
                    let name = lease.key_name().to_owned();
                    assert!(held.lock().expect("held").insert(name.clone()), "{name} handed out twice");
                    held.lock().expect("held").remove(&name);
                    lease.release().expect("release");
                }
            });
        }
    });
    assert!(sandbox.states().iter().all(|(_, state)| state == "vacant"), "{:?}", sandbox.states());
    let claims = sandbox.count("SELECT count(*) FROM history WHERE event = 'claimed'");
    assert_eq!(claims, i64::try_from(THREADS * ROUNDS).expect("count"));
}

/// Every kind of write names its own event, with the states it moves between: a sync's additions,
/// claims, a group's lockdown of every model (the answering key and its free sibling), a lockdown of one
/// model, an error, a cleanup, a forced eviction, and a keyring's new secret, regrouping, removal and
/// return. Reaps are checked where a holder really dies (`a_dead_holder_is_reaped...` above, `processes`).
#[test]
fn every_write_names_its_event() {
    use HistoryEvent::*;
    use api_jongler::pool::{Fate, Lockdown, Reach};
    let sandbox = Sandbox::with_keyring(
        "[c]\nkey0 = fake-0\nkey1 = fake-1\nsolo = fake-solo\n[c groups]\nkey0 = team\nkey1 = team\n",
    );
    let coordinator = sandbox.coordinator(sandbox.options());
    let mut seen = 0;
    // The rows written since the last call, oldest first: (key, event, from, to).
    let mut rows_since = || {
        let mut rows = coordinator.store().history(&HistoryQuery::default()).expect("history");
        rows.retain(|row| row.id > seen);
        rows.reverse();
        seen = rows.last().map_or(seen, |row| row.id);
        rows.into_iter().map(|row| (row.key_name, row.event, row.from_state, row.to_state)).collect::<Vec<_>>()
    };
    let row = |key: &str, event, from: Option<&str>, to: &str| {
        (key.to_owned(), event, from.map(str::to_owned), to.to_owned())
    };
    let mut added = rows_since();
    added.sort();
    assert_eq!(
        added,
        [row("key0", Added, None, "vacant"), row("key1", Added, None, "vacant"), row("solo", Added, None, "vacant")]
    );

    let until = SystemClock.now_ms() + 3_600_000;
    let every_model = Lockdown { reach: Reach::Group, ..Lockdown::whole_key(until, "429 project quota", Some(429)) };
    let member = coordinator.claim("c", &["solo".to_owned()], Duration::ZERO).expect("a member of the team");
    let (member_name, sibling) = match member.key_name() {
        "key0" => ("key0", "key1"),
        _ => ("key1", "key0"),
    };
    member.finish(&Fate::Lockdown(every_model), None).expect("lockdown of the team");
    assert_eq!(
        rows_since(),
        [
            row(member_name, Claimed, Some("vacant"), "locked"),
            row(sibling, ScopeLockedDown, Some("vacant"), "lockdown"),
            row(member_name, LockedDown, Some("locked"), "lockdown"),
        ]
    );

    let one_model =
        Lockdown { models: vec!["m".to_owned()], ..Lockdown::whole_key(until, "429 model quota", Some(429)) };
    let solo = coordinator.claim_for("c", Some("m"), &[], Duration::ZERO).expect("solo is the free one");
    assert_eq!(solo.key_name(), "solo");
    solo.finish(&Fate::Lockdown(one_model), None).expect("lockdown of m");
    coordinator
        .claim("c", &[], Duration::ZERO)
        .expect("solo still serves other models")
        .mark_error("bad", Some(401))
        .expect("error");
    assert_eq!(
        rows_since(),
        [
            row("solo", Claimed, Some("vacant"), "locked"),
            row("solo", LockedDown, Some("locked"), "vacant"),
            row("solo", Claimed, Some("vacant"), "locked"),
            row("solo", Errored, Some("locked"), "error"),
        ]
    );

    coordinator.cleanup(Some("c"), false).expect("cleanup");
    let mut cleaned = rows_since();
    cleaned.sort();
    assert_eq!(
        cleaned,
        [
            row("key0", CleanedUp, Some("lockdown"), "vacant"),
            row("key1", CleanedUp, Some("lockdown"), "vacant"),
            row("solo", CleanedUp, Some("error"), "vacant"),
        ]
    );

    let held = coordinator.claim("c", &["key1".to_owned(), "solo".to_owned()], Duration::ZERO).expect("key0");
    coordinator.cleanup(Some("c"), true).expect("cleanup --force");
    assert_eq!(
        rows_since(),
        [row("key0", Claimed, Some("vacant"), "locked"), row("key0", ForceEvicted, Some("locked"), "vacant")]
    );
    drop(held);

    std::fs::write(&sandbox.keyring, "[c]\nkey0 = fake-new-0\nkey1 = fake-1\n[c groups]\nkey0 = team\n")
        .expect("rewrite");
    coordinator.sync_as_truth(&sandbox.load_keyring()).expect("sync");
    std::fs::write(
        &sandbox.keyring,
        "[c]\nkey0 = fake-new-0\nkey1 = fake-1\nsolo = fake-solo\n[c groups]\nkey0 = team\n",
    )
    .expect("rewrite");
    coordinator.sync(&sandbox.load_keyring()).expect("sync");
    assert_eq!(
        rows_since(),
        [
            row("key0", SecretChanged, Some("vacant"), "vacant"),
            row("solo", Retired, Some("vacant"), "retired"),
            row("key1", GroupChanged, Some("vacant"), "vacant"),
            row("solo", Restored, Some("retired"), "vacant"),
        ]
    );
}
