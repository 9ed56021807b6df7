//! Many real worker processes sending requests through the pool to a loopback mock with a per-key
//! quota (20 ms latency, Gemini's real 429 with the delay until the key's window is free), and a worker
//! killed in the middle of a request.

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use api_jongler::mock::{MockConfig, MockUpstream};
use api_jongler::pool::HistoryEvent;
use common::{Sandbox, wait_until};

const GEMINI: &str = "generativelanguage.googleapis.com";

/// A sandbox of `keys` Gemini keys whose connector points at the mock. Backoffs are short and the retry
/// budget generous, so that the mock's every-n-th 503 can never exhaust a request's retries.
fn sandbox(keys: usize, mock: &MockUpstream) -> Sandbox {
    let sandbox = Sandbox::new(GEMINI, keys);
    sandbox.point_connector(GEMINI, "127.0.0.1", mock.port(), serde_json::json!({"backoff_ms": 5, "retries": 10}));
    sandbox
}

fn request_worker(sandbox: &Sandbox, requests: u32, extra: &[&str]) -> Child {
    sandbox
        .worker(GEMINI)
        .env("APIJONGLER_CONNECTORS", sandbox.connectors_dir())
        .args(["--requests", &requests.to_string(), "--wait-ms", "60000", "--reap-ms", "100"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn request worker")
}

async fn wait_success(child: Child) -> String {
    tokio::task::spawn_blocking(move || common::wait_success(child)).await.expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_succeeds_one_at_a_time_per_key_and_never_before_its_deadline() {
    const QUOTA: u32 = 2;
    const WINDOW: Duration = Duration::from_millis(1000);
    const REQUESTS: u32 = 3;
    for (workers, keys) in [(1, 1), (4, 4), (4, 16), (16, 4), (16, 16)] {
        let config = MockConfig { quota: Some(QUOTA), window: WINDOW, ..MockConfig::default() };
        let mock = MockUpstream::start(config).await.expect("mock");
        let sandbox = sandbox(keys, &mock);
        // The keys are in the database before the workers start: this test is about quotas, not about
        // many processes creating one file (see `processes::sixteen_processes_open_a_fresh_database_at_once`).
        drop(sandbox.coordinator(sandbox.options()));
        let started = Instant::now();
        let children: Vec<Child> = (0..workers).map(|_| request_worker(&sandbox, REQUESTS, &[])).collect();
        for child in children {
            let stdout = wait_success(child).await;
            assert!(stdout.contains(&format!("requests {REQUESTS}")), "{stdout}");
        }
        let elapsed = started.elapsed();
        let (_, per_key) = mock.stats();
        let ok: u64 = per_key.values().map(|stats| stats.ok).sum();
        assert_eq!(ok, u64::from(workers * REQUESTS), "W={workers} K={keys}: every request succeeded once");
        let limited: u64 = per_key.values().map(|stats| stats.rate_limited).sum();
        eprintln!("W={workers} K={keys}: {ok} requests, {limited} 429s, {:.1} s", elapsed.as_secs_f64());
        // Whether many workers meet 429s depends on how their starts line up, which a loaded machine
        // decides. One worker alone sending more requests than all keys allow per window does not
        // depend on it: its requests go back to back, so the one after the quota reaches the mock
        // two round trips (a claim, the mock's 20 ms, a release: tens of ms) after the first, far
        // inside the 1 s window. This keeps the deadline checks below from passing vacuously.
        if workers == 1 && REQUESTS > keys as u32 * QUOTA {
            assert!(limited > 0, "W={workers} K={keys}: one worker's requests beyond the quota meet a 429");
        }
        // At most one 429 per key per window, from orderings alone: after a 429 the key's next request
        // comes after the announced deadline, when its window is empty, so a key's next 429 needs a
        // full window of new requests; n 429s span more than (n - 2) windows, all inside `elapsed`.
        let windows = (elapsed.as_secs_f64() / WINDOW.as_secs_f64()).ceil() as u64 + 1;
        for (secret, stats) in &per_key {
            let key = secret.rsplit('-').nth(3).unwrap_or("?");
            assert_eq!(stats.max_in_flight, 1, "W={workers} K={keys}: key {key} served two requests at once");
            // The client's deadline is its clock when the 429 arrives (after the mock's 20 ms latency)
            // plus the delay, rounded up: never earlier than the mock's, however slow the machine.
            assert_eq!(stats.before_deadline, 0, "W={workers} K={keys}: key {key} was used before its deadline");
            assert!(
                stats.rate_limited <= windows,
                "W={workers} K={keys}: key {key} got {} 429s in {windows} windows",
                stats.rate_limited
            );
            assert_eq!(stats.invalid, 0);
        }
        assert!(sandbox.states().iter().all(|(_, state)| state == "vacant" || state == "lockdown"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_key_goes_to_error_and_overloads_blame_no_key() {
    let bad = format!("fake-secret-{GEMINI}-1-do-not-use");
    let config = MockConfig { bad_keys: [bad].into(), overload_every: Some(3), ..MockConfig::default() };
    let mock = MockUpstream::start(config).await.expect("mock");
    let sandbox = sandbox(3, &mock);
    let children: Vec<Child> = (0..4).map(|_| request_worker(&sandbox, 10, &[])).collect();
    for child in children {
        wait_success(child).await;
    }
    let (_, per_key) = mock.stats();
    let bad_stats = per_key.iter().find(|(secret, _)| secret.contains("-1-")).map(|(_, s)| s.clone()).expect("bad");
    assert_eq!(bad_stats.invalid, 1, "the bad key was used once, then never again");
    let overloads: u64 = per_key.values().map(|stats| stats.overloaded).sum();
    assert!(overloads > 0, "the mock did answer 503s");
    let states = sandbox.states();
    assert_eq!(
        states,
        [("key0".into(), "vacant".into()), ("key1".into(), "error".into()), ("key2".into(), "vacant".into())],
        "only the bad key is blamed; 503s left the good keys vacant"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_request_leaves_its_key_to_the_others() {
    let mock = MockUpstream::start(MockConfig::default()).await.expect("mock");
    let sandbox = sandbox(1, &mock);
    let mut victim = request_worker(&sandbox, 1, &["--endpoint", "/slow/v1beta/models/m:generateContent"]);
    let in_flight = || mock.stats().1.values().any(|stats| stats.max_in_flight > 0);
    wait_until(Duration::from_secs(20), "the victim's request to reach the mock", in_flight);
    victim.kill().expect("SIGKILL");
    victim.wait().expect("reap the victim");
    assert_eq!(sandbox.states(), [("key0".into(), "locked".into())], "the dead worker's lock is still there");

    let survivor = request_worker(&sandbox, 2, &[]);
    wait_success(survivor).await;
    let reaped = sandbox.history().into_iter().find(|row| row.event.is_eviction()).expect("a reap");
    assert_eq!(reaped.event, HistoryEvent::ReapedDead, "{reaped:?}");
    assert!(reaped.reason.contains("has exited"), "{}", reaped.reason);
    assert_eq!(sandbox.states(), [("key0".into(), "vacant".into())]);
}

/// Workers on two models through one pool, with Gemini's metering per (project, model): pro allows 2
/// requests per window per project, flash 4. Pro's lockdowns never hold up flash's requests, no key is
/// used twice at once, and no bucket is asked before the deadline it announced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_on_two_models_each_meet_only_their_own_model_s_limits() {
    use api_jongler::mock::ModelQuota;
    const WINDOW: Duration = Duration::from_millis(1000);
    let quota = |model: &str, per_minute| ModelQuota {
        model: model.to_owned(),
        per_minute: Some(per_minute),
        ..ModelQuota::default()
    };
    let config = MockConfig {
        model_quotas: vec![quota("gemini-2.5-pro", 2), quota("gemini-2.5-flash", 4)],
        minute: WINDOW,
        ..MockConfig::default()
    };
    let mock = MockUpstream::start(config).await.expect("mock");
    let sandbox = sandbox(4, &mock);
    drop(sandbox.coordinator(sandbox.options()));
    let pro = ["--endpoint", "/v1beta/models/gemini-2.5-pro:generateContent"];
    let flash = ["--endpoint", "/v1beta/models/gemini-2.5-flash:generateContent"];
    let children: Vec<Child> = [&pro, &pro, &flash, &flash, &flash]
        .into_iter()
        .map(|endpoint| request_worker(&sandbox, 8, endpoint))
        .collect();
    for child in children {
        let stdout = wait_success(child).await;
        assert!(stdout.contains("requests 8"), "{stdout}");
    }
    let buckets = mock.model_stats();
    let ok = |model: &str| buckets.iter().filter(|((_, m), _)| m == model).map(|(_, s)| s.ok).sum::<u64>();
    assert_eq!((ok("gemini-2.5-pro"), ok("gemini-2.5-flash")), (16, 24), "every request succeeded once");
    for ((project, model), stats) in &buckets {
        assert_eq!(stats.before_deadline, 0, "{project} {model} was asked before its deadline: {stats:?}");
    }
    let (_, per_key) = mock.stats();
    assert!(per_key.values().all(|stats| stats.max_in_flight == 1), "{per_key:?}");
    // How many 429s the workers met depends on how a loaded machine schedules them; the invariants
    // above hold whatever the number.
    let limited = sandbox.count("SELECT count(*) FROM requests WHERE status = 429");
    eprintln!("429s met: {limited}");
}
