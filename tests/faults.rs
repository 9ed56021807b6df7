//! The guarantees under real faults: a holder stopped between its claim and its send, a user's
//! `sqlite3` holding the write lock for longer than the stale threshold, wall clocks stepped by minutes,
//! a release that cannot get the lock, the database deleted under a request, `cleanup --force`, SIGINT
//! in the middle of a request, and a PostgreSQL server that can forget commits (`status` warns). Real
//! processes, a real `sqlite3`, real signals; the upstream is the loopback mock, which counts how many
//! requests each key had in flight at once.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use api_jongler::mock::{MockConfig, MockUpstream};
use api_jongler::pool::HistoryEvent::{self, ReapedDead, ReapedStale};
use api_jongler::{Clock, CoordinatorOptions, Error, SystemClock};
use common::{Sandbox, SqliteShell, wait_until};

const GEMINI: &str = "generativelanguage.googleapis.com";
const ENDPOINT: &str = "/v1beta/models/gemini-2.5-flash:generateContent";

/// Generous for anything a loaded 2-core machine does in well under a second.
const LIMIT: Duration = Duration::from_secs(60);

fn sandbox(keys: usize, mock: &MockUpstream) -> Sandbox {
    let sandbox = Sandbox::new(GEMINI, keys);
    sandbox.point_connector(GEMINI, "127.0.0.1", mock.port(), serde_json::json!({"backoff_ms": 5, "retries": 3}));
    // Every key in the database before any fault starts, so no process needs to sync under a lock.
    drop(sandbox.coordinator(sandbox.options()));
    sandbox
}

/// A worker sending `requests` requests; stale after 1 s with a heartbeat every 100 ms, so that the
/// faults below outlast the stale threshold many times over.
fn request_worker(sandbox: &Sandbox, extra: &[&str]) -> Child {
    sandbox
        .worker(GEMINI)
        .env("APIJONGLER_CONNECTORS", sandbox.connectors_dir())
        .env("APIJONGLER_LOG", "warn")
        .args(["--requests", "1", "--wait-ms", "120000", "--reap-ms", "50", "--stale-ms", "1000"])
        .args(["--heartbeat-ms", "100"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn request worker")
}

/// The CLI's request form against the mock.
fn cli_request(sandbox: &Sandbox) -> Command {
    let mut command = sandbox.apijongler();
    command.env("APIJONGLER_CONNECTORS", sandbox.connectors_dir()).args([GEMINI, "POST", ENDPOINT, "{}"]);
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    command
}

async fn finished(child: Child) -> std::process::Output {
    tokio::task::spawn_blocking(move || child.wait_with_output().expect("wait")).await.expect("join")
}

/// The child's output, or a failure (and the child killed) if it runs past `limit`: a wait that
/// regressed to unbounded must fail the test, not hang the suite.
async fn finished_within(mut child: Child, limit: Duration) -> std::process::Output {
    let deadline = Instant::now() + limit;
    let exited = tokio::task::spawn_blocking(move || {
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                return Err(child.wait_with_output().expect("reap"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(child.wait_with_output().expect("output"))
    })
    .await
    .expect("join");
    exited.unwrap_or_else(|output| panic!("still running after {limit:?}: {}", String::from_utf8_lossy(&output.stderr)))
}

async fn succeeded(child: Child) -> String {
    tokio::task::spawn_blocking(move || common::wait_success(child)).await.expect("join")
}

/// A mock that answers after `latency`, shared with the closures that watch it.
async fn mock_answering_after(latency: Duration) -> Arc<MockUpstream> {
    Arc::new(MockUpstream::start(MockConfig { latency, ..MockConfig::default() }).await.expect("mock"))
}

/// Waits until the mock has `count` requests in flight.
async fn until_in_flight(mock: &Arc<MockUpstream>, count: u64, what: &str) {
    let watched = Arc::clone(mock);
    eventually(what, move || in_flight(&watched) == count).await;
}

/// The CLI's request form, started and in flight at the mock.
async fn cli_request_in_flight(sandbox: &Sandbox, mock: &Arc<MockUpstream>) -> Child {
    let child = cli_request(sandbox).spawn().expect("spawn");
    until_in_flight(mock, 1, "the request in flight").await;
    child
}

/// Requests in flight at the mock now, over all keys.
fn in_flight(mock: &MockUpstream) -> u64 {
    mock.stats().1.values().map(|stats| stats.in_flight()).sum()
}

/// The most requests one key ever had in flight at once.
fn most_at_once_on_one_key(mock: &MockUpstream) -> u64 {
    mock.stats().1.values().map(|stats| stats.max_in_flight).max().unwrap_or(0)
}

fn process_state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rfind(')')
        .and_then(|end| stat[end + 1..].split_whitespace().next())
        .and_then(|s| s.chars().next())
        .unwrap_or('?')
}

fn signal(pid: u32, signal: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).expect("pid")).expect("pid");
    rustix::process::kill_process(pid, signal).expect("signal");
}

/// Polls from an async test without blocking its runtime (the mock runs on it).
async fn eventually(what: &str, condition: impl FnMut() -> bool + Send + 'static) {
    let what = what.to_owned();
    tokio::task::spawn_blocking(move || wait_until(LIMIT, &what, condition)).await.expect("join");
}

/// The lines a child writes on stderr, as they come.
fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (send, lines) = mpsc::channel();
    let stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = send.send(line);
        }
    });
    lines
}

/// How old the heartbeat of the only locked key is, on the boot clock.
fn heartbeat_age(db: &std::path::Path) -> Option<Duration> {
    let beat: Option<i64> = rusqlite::Connection::open(db)
        .ok()?
        .query_row("SELECT heartbeat_boot_ms FROM keys WHERE state = 'locked'", [], |row| row.get(0))
        .ok()?;
    Some(Duration::from_millis(u64::try_from(SystemClock.boot_ms() - beat?).unwrap_or(0)))
}

/// Removes the database file and its WAL and shared-memory files, as `rm` would.
fn delete_database(sandbox: &Sandbox) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", sandbox.db.display()));
    }
}

/// The reaper's evictions (dead holders and stale heartbeats): event and reason.
fn reaped(sandbox: &Sandbox) -> Vec<(HistoryEvent, String)> {
    let reaps = sandbox.history().into_iter().filter(|row| matches!(row.event, ReapedDead | ReapedStale));
    reaps.map(|row| (row.event, row.reason)).collect()
}

/// Item 1: A claims, is stopped (SIGSTOP, by itself, right after the claim commits) for longer than
/// the stale threshold; B frees A's key, claims it and sends; A is continued while B's request is in
/// flight. A must not send with the key it held before the stop: its lease is no longer trusted, so it
/// claims again and waits for B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_stopped_after_its_claim_never_sends_once_its_key_was_taken() {
    let mock = mock_answering_after(Duration::from_secs(3)).await;
    let sandbox = sandbox(1, &mock);
    let a = request_worker(&sandbox, &["--stop-after-claim"]);
    let a_pid = a.id();
    eventually("A stopped right after its claim", move || process_state(a_pid) == 'T').await;
    assert_eq!(in_flight(&mock), 0, "A stopped before sending");

    let b = request_worker(&sandbox, &[]);
    until_in_flight(&mock, 1, "B's request reaches the upstream with A's old key").await;
    signal(a_pid, rustix::process::Signal::CONT);

    succeeded(b).await;
    succeeded(a).await;
    assert_eq!(most_at_once_on_one_key(&mock), 1, "the upstream saw the key twice at once");
    assert_eq!(mock.stats().1.values().map(|stats| stats.ok).sum::<u64>(), 2, "both requests went through");
    let reaped = reaped(&sandbox);
    let stale = |(event, reason): &(HistoryEvent, String)| {
        *event == ReapedStale && reason.contains(&format!("pid {a_pid} is stopped"))
    };
    assert!(reaped.iter().any(stale), "{reaped:?}");
}

/// Item 2: a user's `sqlite3` holds the write lock for several stale thresholds while A's request is in
/// flight, so A's heartbeat cannot be written; B asks for a key during the lock. When the lock ends, B
/// must not evict A (alive and running) and must wait for A's key instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_external_write_lock_never_makes_a_live_holder_lose_its_key() {
    if common::sqlite_only("a sqlite3 shell holds the write lock") {
        return;
    }
    let mock = mock_answering_after(Duration::from_secs(8)).await;
    let sandbox = sandbox(1, &mock);
    let a = request_worker(&sandbox, &[]);
    until_in_flight(&mock, 1, "A's request in flight").await;

    let shell = SqliteShell::lock(&sandbox);
    let mut b = request_worker(&sandbox, &[]);
    let b_stderr = stderr_lines(&mut b);
    // B has waited on the lock for a second (it says so), and A's heartbeat is three thresholds old.
    let said = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + LIMIT;
        std::iter::from_fn(|| b_stderr.recv_timeout(deadline.saturating_duration_since(Instant::now())).ok())
            .any(|line| line.contains("stays locked"))
    });
    assert!(said.await.expect("join"), "B waits on the write lock");
    let db = sandbox.db.clone();
    eventually("A's heartbeat three stale thresholds old", move || {
        heartbeat_age(&db).is_some_and(|age| age > Duration::from_secs(3))
    })
    .await;
    shell.release();

    succeeded(a).await;
    b.stderr = None;
    succeeded(b).await;
    assert_eq!(most_at_once_on_one_key(&mock), 1, "the upstream saw the key twice at once");
    assert_eq!(reaped(&sandbox), [], "nobody was evicted");
}

/// Item 3: a process whose wall clock is two minutes ahead (an NTP step), or two minutes behind, sees
/// a live holder's heartbeat as minutes old or from the future; it must not evict it either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stepped_wall_clock_never_evicts_a_live_holder() {
    for (a_offset, b_offset) in [("0", "120000"), ("-120000", "0"), ("120000", "-120000")] {
        let mock = mock_answering_after(Duration::from_secs(3)).await;
        let sandbox = sandbox(1, &mock);
        let a = request_worker(&sandbox, &["--clock-offset-ms", a_offset]);
        until_in_flight(&mock, 1, "A's request in flight").await;
        let b = request_worker(&sandbox, &["--clock-offset-ms", b_offset]);
        succeeded(a).await;
        succeeded(b).await;
        assert_eq!(most_at_once_on_one_key(&mock), 1, "A at {a_offset} ms, B at {b_offset} ms: key used twice at once");
        assert_eq!(reaped(&sandbox), [], "A at {a_offset} ms, B at {b_offset} ms");
    }
}

/// Item 4: `--wait 0` under a lock nobody releases fails with exit 6 after the floor (5 s), saying how
/// long and how to find the holder, instead of retrying for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_under_a_lock_that_never_ends_fails_with_exit_6() {
    if common::sqlite_only("a sqlite3 shell holds the write lock") {
        return;
    }
    let mock = MockUpstream::start(MockConfig::default()).await.expect("mock");
    let sandbox = sandbox(1, &mock);
    let shell = SqliteShell::lock(&sandbox);
    let mut command = cli_request(&sandbox);
    command.arg("--wait=0");
    let child = command.spawn().expect("run");
    let output = finished_within(child, LIMIT).await;
    shell.release();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("stayed locked by another process for") && stderr.contains("fuser"), "{stderr}");
    assert_eq!(mock.stats().0, 0, "nothing was sent");
}

/// Item 5: a release that cannot get the lock fails in bounded time, and the key is not kept alive
/// by the heartbeat of the process's other lease: the failed end is written once the lock is gone,
/// while the process lives and goes on holding its other key.
#[test]
fn a_release_that_failed_is_written_later_and_never_renewed_meanwhile() {
    if common::sqlite_only("a sqlite3 shell holds the write lock") {
        return;
    }
    let sandbox = Sandbox::new("c", 2);
    let options = CoordinatorOptions {
        heartbeat_interval: Duration::from_millis(50),
        lock_wait_floor: Duration::from_millis(300),
        ..sandbox.options()
    };
    let coordinator = sandbox.coordinator(options);
    let first = coordinator.claim("c", &[], Duration::ZERO).expect("first key");
    let second = coordinator.claim("c", &[], Duration::ZERO).expect("second key");
    let (released, kept) = (first.key_name().to_owned(), second.key_name().to_owned());
    assert_eq!((first.connector(), second.connector()), ("c", "c"));

    let shell = SqliteShell::lock(&sandbox);
    let asked = Instant::now();
    let error = first.release().expect_err("the lock is held");
    assert!(matches!(error, Error::DatabaseLocked { .. }), "{error:?}");
    assert!(asked.elapsed() < LIMIT, "bounded");
    shell.release();

    let state = |name: &str| sandbox.states().into_iter().find(|(key, _)| key == name).map(|(_, state)| state);
    wait_until(LIMIT, "the failed release written in the background", || state(&released).as_deref() == Some("vacant"));
    assert_eq!(state(&kept).as_deref(), Some("locked"));
    let before: i64 = sandbox.count(&format!("SELECT heartbeat_boot_ms FROM keys WHERE key_name = '{kept}'"));
    wait_until(LIMIT, "the kept lease renewed", || {
        sandbox.count(&format!("SELECT heartbeat_boot_ms FROM keys WHERE key_name = '{kept}'")) > before
    });
    assert!(second.is_valid());
    second.release().expect("release");
}

/// Item 6: the database deleted while a process has it open: the next claim fails (exit 6 for the
/// CLI) instead of working on a file nobody else sees.
#[test]
fn a_deleted_database_is_noticed_before_the_next_claim() {
    if common::sqlite_only("the database file is deleted") {
        return;
    }
    let sandbox = Sandbox::new("c", 1);
    let coordinator = sandbox.coordinator(sandbox.options());
    coordinator.claim("c", &[], Duration::ZERO).expect("claim").release().expect("release");
    delete_database(&sandbox);
    let error = coordinator.claim("c", &[], Duration::ZERO).expect_err("deleted");
    assert!(matches!(error, Error::DatabaseReplaced { .. }), "{error:?}");
    assert!(error.to_string().contains("was deleted"), "{error}");
    assert!(!sandbox.db.exists(), "not re-created behind the other processes' backs");
}

/// Items 6 and 10: the database is deleted while a request is in flight. The answer (the quota is
/// spent) is printed; the bookkeeping failure is reported on stderr with exit 9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_is_printed_even_when_the_database_cannot_record_it() {
    if common::sqlite_only("the database file is deleted") {
        return;
    }
    let mock = mock_answering_after(Duration::from_secs(8)).await;
    let sandbox = sandbox(1, &mock);
    let child = cli_request_in_flight(&sandbox, &mock).await;
    delete_database(&sandbox);
    let output = finished(child).await;
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert_eq!(output.status.code(), Some(9), "{stderr}");
    assert!(stdout.contains("candidates"), "the answer is on stdout: {stdout}");
    assert!(stderr.contains("could not record") && stderr.contains("was deleted"), "{stderr}");
}

/// Item 17: `cleanup --force` takes the key during the request: the answer is printed and the command
/// exits 8, as documented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_lost_during_the_request_exits_8() {
    let mock = mock_answering_after(Duration::from_secs(8)).await;
    let sandbox = sandbox(1, &mock);
    let child = cli_request_in_flight(&sandbox, &mock).await;
    let cleanup = sandbox.apijongler().args(["cleanup", "--force", GEMINI]).output().expect("cleanup");
    assert!(cleanup.status.success(), "{}", String::from_utf8_lossy(&cleanup.stderr));
    let output = finished(child).await;
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert_eq!(output.status.code(), Some(8), "{stderr}");
    assert!(stdout.contains("candidates"), "the answer is on stdout: {stdout}");
    assert!(stderr.contains("taken away"), "{stderr}");
}

/// Item 19: SIGINT or SIGTERM in the middle of a request releases the key at once and records the
/// attempt as cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_request_gives_its_key_back_at_once() {
    for (signal_sent, code) in [(rustix::process::Signal::INT, 130), (rustix::process::Signal::TERM, 143)] {
        let mock = mock_answering_after(Duration::from_secs(600)).await;
        let sandbox = sandbox(1, &mock);
        let child = cli_request_in_flight(&sandbox, &mock).await;
        signal(child.id(), signal_sent);
        let output = finished(child).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "{stderr}");
        assert!(stderr.contains("key released"), "{stderr}");
        assert_eq!(
            sandbox.states(),
            vec![("key0".to_owned(), "vacant".to_owned())],
            "released, not left to the reaper"
        );
        assert_eq!(sandbox.count("SELECT count(*) FROM requests WHERE outcome = 'cancelled'"), 1);
        assert_eq!(reaped(&sandbox), []);
    }
}

/// A PostgreSQL server that does not keep its commits (`fsync = off`, as CI's throwaway cluster runs)
/// can forget a claim it confirmed when its machine crashes, and then hand that key, still in use, to a
/// second holder; one with `full_page_writes = off` can be left with torn pages: `status` warns of each
/// on stderr, naming the setting, and of neither when the server keeps them or on SQLite (whose settings
/// apijongler chooses itself).
#[test]
fn status_warns_of_a_server_that_does_not_keep_its_commits() {
    let sandbox = Sandbox::new(GEMINI, 1);
    let off = |setting: &str| {
        common::store::on_postgres()
            && sandbox.sql().column::<String>(&format!("SELECT current_setting('{setting}')"), &[]).expect(setting)
                == ["off"]
    };
    let status = sandbox.apijongler().arg("status").output().expect("run status");
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let stderr = String::from_utf8_lossy(&status.stderr);
    let warned = |setting: &str| {
        stderr
            .lines()
            .any(|line| line.starts_with("apijongler: warning: ") && line.contains(&format!("{setting} = off")))
    };
    assert_eq!(warned("fsync"), off("fsync"), "stderr: {stderr}");
    assert_eq!(warned("full_page_writes"), off("full_page_writes"), "stderr: {stderr}");
}
