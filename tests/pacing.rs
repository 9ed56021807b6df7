//! Keys that pace themselves: declared limits (`[CONNECTOR limits]`) are reserved in the claim's own
//! transaction, so no window ever holds more requests than its limit, whatever the number of processes.

mod common;

use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use api_jongler::{Clock, Error, ManualClock};
use common::{Sandbox, wait_until};

const T0: i64 = 1_800_000_000_000;

/// The paced lockdowns of the pool: (scope, model, until, reason).
fn paced(sandbox: &Sandbox) -> Vec<(String, String, i64, String)> {
    let sql =
        "SELECT scope, model, until, reason FROM lockdowns WHERE quota_id = 'apijongler:paced' ORDER BY scope, model";
    let rows = sandbox.sql().query(sql, &[]).expect("paced lockdowns");
    rows.iter().map(|row| (row.get(0), row.get(1), row.get(2), row.get(3))).collect()
}

/// A group limited to 3 requests per 10 s for model m: three claims in a row go through on either
/// key; the fourth finds the group's window full, which becomes a lockdown of the group for m until
/// the first reservation leaves the window (10 s and the half-second margin after it). Another model
/// is not paced; once the window moves, m is claimed again.
#[test]
fn a_full_window_is_a_lockdown_of_the_group_for_the_model_until_it_has_room() {
    let sandbox = Sandbox::with_limits("m = 3/10s");
    let clock = Arc::new(ManualClock::new(T0));
    let coordinator = sandbox.coordinator_on(&clock);
    for _ in 0..3 {
        coordinator
            .claim_for("c", Some("m"), &[], Duration::ZERO)
            .expect("room in the window")
            .release()
            .expect("release");
        clock.advance(1_000);
    }
    let error = coordinator.claim_for("c", Some("m"), &[], Duration::ZERO).expect_err("the window is full");
    assert!(matches!(error, Error::NoKeyAvailable(_)), "{error}");
    let until = T0 + 10_000 + 500;
    assert_eq!(paced(&sandbox), [("group:g".into(), "m".into(), until, "paced: 3/10s declared for m".into())]);
    coordinator
        .claim_for("c", Some("other"), &[], Duration::ZERO)
        .expect("another model is not paced")
        .release()
        .unwrap();
    assert_eq!(sandbox.count("SELECT count(*) FROM reservations WHERE model = 'other'"), 0, "nor reserved");
    let strikes = sandbox.count("SELECT strikes FROM lockdowns WHERE quota_id = 'apijongler:paced'");
    assert_eq!(strikes, 0, "pacing is no refusal: the scope's escalation is untouched");
    clock.set(until - 1);
    assert!(coordinator.claim_for("c", Some("m"), &[], Duration::ZERO).is_err(), "still full a millisecond before");
    clock.set(until);
    coordinator.claim_for("c", Some("m"), &[], Duration::ZERO).expect("room again").release().expect("release");
    let reserved = sandbox.count("SELECT count(*) FROM reservations WHERE quota_scope = 'group:g' AND model = 'm'");
    assert_eq!(reserved, 4, "one reservation per request that went through, none for the refused ones");
}

/// A day's limit counts from Gemini's midnight (America/Los_Angeles): a full day is paced until the
/// next midnight there, and the new day has room at once.
#[test]
fn a_days_limit_ends_at_pacific_midnight() {
    let sandbox = Sandbox::with_limits("* = 2/day");
    // 2027-01-15 23:00 in Los Angeles (UTC-8): 07:00 UTC the next day.
    let late = chrono::NaiveDate::from_ymd_opt(2027, 1, 16).unwrap().and_hms_opt(7, 0, 0).unwrap().and_utc();
    let clock = Arc::new(ManualClock::new(late.timestamp_millis()));
    let coordinator = sandbox.coordinator_on(&clock);
    for _ in 0..2 {
        coordinator.claim_for("c", Some("m"), &[], Duration::ZERO).expect("room today").release().expect("release");
    }
    assert!(coordinator.claim_for("c", Some("m"), &[], Duration::ZERO).is_err(), "the day is full");
    let midnight = late.timestamp_millis() + 3_600_000;
    assert_eq!(paced(&sandbox)[0].2, midnight, "paced until midnight in Los Angeles");
    clock.set(midnight);
    coordinator.claim_for("c", Some("m"), &[], Duration::ZERO).expect("a new day").release().expect("release");
}

/// A worker process cycling keys of `c` for model m, reserving against the keyring's limits.
fn worker(sandbox: &Sandbox) -> Child {
    sandbox
        .worker("c")
        .args(["--model", "m", "--duration-ms", "4000", "--wait-ms", "60000", "--reap-ms", "100"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn worker")
}

/// 16 processes claim for one group limited to 10 requests per second, and 4 of them are killed with
/// SIGKILL midway: in the reservations the database recorded, no window (a second and the margin) ever
/// holds 11. A killed claimer's reservation still counts, so kills can only leave room unused.
#[test]
fn sixteen_processes_never_put_eleven_in_a_window_even_when_some_are_killed() {
    let sandbox = Sandbox::with_limits("* = 10/s");
    drop(sandbox.coordinator(sandbox.options()));
    let mut workers: Vec<Child> = (0..16).map(|_| worker(&sandbox)).collect();
    let reserved = || sandbox.count("SELECT count(*) FROM reservations");
    wait_until(Duration::from_secs(30), "a first window's worth of reservations", || reserved() >= 10);
    for victim in workers.iter_mut().take(4) {
        victim.kill().expect("SIGKILL");
        victim.wait().expect("reap");
    }
    for survivor in workers.into_iter().skip(4) {
        let output = survivor.wait_with_output().expect("wait");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
    let at: Vec<i64> = sandbox.sql().column("SELECT at FROM reservations ORDER BY at", &[]).expect("reservations");
    assert!(at.len() > 10, "more than one window's worth went through ({} reservations)", at.len());
    const WINDOW: i64 = 1_000 + 500;
    for (index, &end) in at.iter().enumerate() {
        let in_window = at[..=index].iter().filter(|&&start| start > end - WINDOW).count();
        assert!(in_window <= 10, "{in_window} reservations in the window ending at {end}");
    }
}

const GEMINI: &str = "generativelanguage.googleapis.com";

/// `keys` Gemini keys pointed at `mock`, with `limits` (if any) as `[GEMINI limits]`.
fn gemini_sandbox(keys: usize, mock: &api_jongler::mock::MockUpstream, limits: Option<&str>) -> Sandbox {
    let sandbox = Sandbox::new(GEMINI, keys);
    sandbox.point_connector(GEMINI, "127.0.0.1", mock.port(), serde_json::json!({"backoff_ms": 5, "retries": 10}));
    if let Some(limits) = limits {
        let mut ini = std::fs::read_to_string(&sandbox.keyring).expect("read keyring");
        ini.push_str(&format!("[{GEMINI} limits]\n{limits}\n"));
        std::fs::write(&sandbox.keyring, ini).expect("write keyring");
    }
    drop(sandbox.coordinator(sandbox.options()));
    sandbox
}

/// `workers` processes sending `requests` requests each through the pool; how long they took.
async fn send_load(sandbox: &Sandbox, workers: usize, requests: u32) -> Duration {
    let started = std::time::Instant::now();
    let children: Vec<Child> = (0..workers)
        .map(|_| {
            sandbox
                .worker(GEMINI)
                .env("APIJONGLER_CONNECTORS", sandbox.connectors_dir())
                .args(["--requests", &requests.to_string(), "--wait-ms", "120000", "--reap-ms", "100"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn request worker")
        })
        .collect();
    for child in children {
        let stdout = tokio::task::spawn_blocking(move || common::wait_success(child)).await.expect("join");
        assert!(stdout.contains(&format!("requests {requests}")), "{stdout}");
    }
    started.elapsed()
}

/// Against the mock's per-key quota of 3 requests per rolling 2 s (each key a group of its own), with
/// `* = 3/2s` declared: 4 processes x 12 requests on 4 keys all succeed, and the mock answers no 429:
/// the pool never sends a key's 4th request inside its window. (The margin this leans on: a request
/// reaches the mock within 500 ms of its claim, on a loopback with 4 processes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_limits_meet_the_upstreams_window_without_a_429() {
    let config = api_jongler::mock::MockConfig {
        quota: Some(3),
        window: Duration::from_secs(2),
        ..api_jongler::mock::MockConfig::default()
    };
    let mock = api_jongler::mock::MockUpstream::start(config).await.expect("mock");
    let sandbox = gemini_sandbox(4, &mock, Some("* = 3/2s"));
    send_load(&sandbox, 4, 12).await;
    let (_, per_key) = mock.stats();
    let ok: u64 = per_key.values().map(|stats| stats.ok).sum();
    let limited: u64 = per_key.values().map(|stats| stats.rate_limited).sum();
    assert_eq!((ok, limited), (48, 0), "every request succeeded, none met a 429");
    // The pool paced it (without limits, 4 processes send 12 requests a key in well under a second):
    // each key's 12 reservations, at most 3 per 2.5 s, span more than 3 windows.
    let spans = "SELECT quota_scope, count(*), max(at) - min(at) FROM reservations GROUP BY quota_scope";
    let spans: Vec<(String, i64, i64)> = (sandbox.sql().query(spans, &[]).expect("spans").iter())
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(spans.len(), 4, "{spans:?}");
    for (scope, count, span) in spans {
        assert_eq!(count, 12, "{scope}: one reservation per request");
        assert!(span > 3 * 2_500, "{scope}: 12 requests, 3 per window, over {span} ms");
    }
}

/// The load, for the README: 16 processes x 25 requests on 16 keys against a mock admitting
/// 20 requests per key per rolling 10 s, reactive (no limits) and paced (`* = 20/10s`). Run with
/// `cargo test --release --test pacing -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement (about 25 s), quoted in the README"]
async fn measure_sixteen_by_twenty_five_reactive_and_paced() {
    for limits in [None, Some("* = 20/10s")] {
        let config = api_jongler::mock::MockConfig {
            quota: Some(20),
            window: Duration::from_secs(10),
            ..api_jongler::mock::MockConfig::default()
        };
        let mock = api_jongler::mock::MockUpstream::start(config).await.expect("mock");
        let sandbox = gemini_sandbox(16, &mock, limits);
        let elapsed = send_load(&sandbox, 16, 25).await;
        let (_, per_key) = mock.stats();
        let ok: u64 = per_key.values().map(|stats| stats.ok).sum();
        let limited: u64 = per_key.values().map(|stats| stats.rate_limited).sum();
        println!("limits {limits:?}: {ok}/400 succeeded, {limited} answers 429, {:.2} s", elapsed.as_secs_f64());
    }
}

/// `why KEY --model M` and `status` say each declared limit with its window's usage (an hour's window, so the
/// machine's pace cannot move a reservation out of it during the test).
#[test]
fn why_and_status_say_the_declared_limits_and_their_usage() {
    let sandbox = Sandbox::with_limits("m = 3/h, 1000 tokens/min, 250/day\n* = 5/min");
    let coordinator = sandbox.coordinator(sandbox.options());
    for _ in 0..2 {
        coordinator.claim_for("c", Some("models/m"), &[], Duration::ZERO).expect("room").release().expect("release");
    }
    let output = sandbox.apijongler().args(["why", "c", "key1", "--model", "m"]).output().expect("run why");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let line = "Limits of m for group:g: 2/3 this hour (3/h, declared), 0/1000 tokens this minute (1000 tokens/min, \
                declared), 2/250 today (250/day, declared).";
    assert!(text.contains(line), "{text}");
    let output = sandbox.apijongler().args(["why", "c", "key1", "--model", "other"]).output().expect("run why");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("Limits of other for group:g: 0/5 this minute (5/min, declared)."), "{text}");
    // `status` lists the scopes and models in use, each with its limits' usage (whole lines with --long).
    let output = sandbox.apijongler().args(["status", "--long"]).output().expect("run status");
    let text = String::from_utf8_lossy(&output.stdout);
    let line = "\n  c group:g m: 2/3 this hour (3/h, declared), 0/1000 tokens this minute (1000 tokens/min, declared), \
                2/250 today (250/day, declared)\n";
    assert!(
        text.contains("Limits in use (declared by the keyring or learned from a 429; each window's usage):"),
        "{text}"
    );
    assert!(text.contains(line), "{text}");
}

/// The simulated hour, on an injected clock: a pool that always has work (every key claimed
/// the moment pacing lets it) against an upstream counting a rolling window of 10 requests per minute
/// per group, each request reaching it 0 to 450 ms after its claim (pseudo-random, below the 500 ms
/// margin). The upstream answers no 429, and the group's quota is used to at least 99 %: 600 requests
/// fit in the hour's 60 minutes.
#[test]
fn a_simulated_hour_at_full_demand_meets_a_rolling_window_without_a_429() {
    const HOUR_MS: i64 = 3_600_000;
    const WINDOW_MS: i64 = 60_000;
    const QUOTA: usize = 10;
    let sandbox = Sandbox::with_limits("m = 10/min");
    let clock = Arc::new(ManualClock::new(T0));
    let coordinator = sandbox.coordinator_on(&clock);
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut jitter = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        i64::try_from(seed % 451).expect("small")
    };
    let mut arrivals = Vec::new();
    while clock.now_ms() < T0 + HOUR_MS {
        match coordinator.claim_for("c", Some("m"), &[], Duration::ZERO) {
            Ok(lease) => {
                arrivals.push(clock.now_ms() + jitter());
                lease.release().expect("release");
            }
            Err(Error::NoKeyAvailable(_)) => {
                // Nothing to do until the window has room: the paced lockdown says when.
                let next: i64 = sandbox
                    .sql()
                    .value("SELECT min(until) FROM lockdowns WHERE until > ?1", &[&clock.now_ms()])
                    .expect("a paced lockdown ends");
                clock.set(next);
            }
            Err(error) => panic!("{error}"),
        }
    }
    arrivals.retain(|&at| at < T0 + HOUR_MS);
    arrivals.sort_unstable();
    let mut accepted: Vec<i64> = Vec::new();
    let mut rate_limited = 0;
    for at in arrivals {
        if accepted.iter().filter(|&&earlier| earlier > at - WINDOW_MS).count() < QUOTA {
            accepted.push(at);
        } else {
            rate_limited += 1;
        }
    }
    assert_eq!(rate_limited, 0, "the upstream answered 429s");
    let capacity = QUOTA * usize::try_from(HOUR_MS / WINDOW_MS).expect("60");
    assert!(accepted.len() * 100 >= capacity * 99, "{} of {capacity} requests of the hour's quota", accepted.len());
}

/// The seed's model, a key kept across requests (`LeaseScope::PerConnection`), is paced too: each
/// request on the kept key reserves in its scope's window; a full window gives the key back for one
/// with room. Two keys limited to 2 requests an hour each: 4 requests go (2 on each key), the 5th finds
/// no room anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_kept_across_requests_is_paced_like_a_claim() {
    let mock = api_jongler::mock::MockUpstream::start(Default::default()).await.expect("mock");
    let sandbox = gemini_sandbox(2, &mock, Some("* = 2/h"));
    let jongler = sandbox
        .jongler(GEMINI)
        .scope(api_jongler::LeaseScope::PerConnection)
        .wait(Duration::ZERO)
        .connect()
        .await
        .expect("connect");
    let endpoint = "/v1beta/models/gemini-2.5-flash:generateContent";
    let mut keys = Vec::new();
    for turn in 0..4 {
        let response = jongler.request("POST", endpoint, "{}").await.unwrap_or_else(|error| panic!("{turn}: {error}"));
        assert_eq!(response.status, 200);
        keys.push(response.key_name.expect("a key"));
    }
    assert_eq!(keys[0], keys[1], "the key is kept while its window has room");
    assert_eq!(keys[2], keys[3]);
    assert_ne!(keys[1], keys[2], "then exchanged for one with room");
    let error = jongler.request("POST", endpoint, "{}").await.expect_err("no window has room");
    assert!(matches!(error, Error::NoKeyAvailable(_)), "{error}");
    let (_, per_key) = mock.stats();
    assert!(per_key.values().all(|stats| stats.ok == 2), "{per_key:?}");
    assert_eq!(sandbox.count("SELECT count(*) FROM reservations"), 4);
}
