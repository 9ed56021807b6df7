//! Every wait honours its caller: claims and lease ends under another process's write lock (a real
//! `sqlite3` holding `BEGIN IMMEDIATE`) are each answered by their own deadline, a claim waits for the
//! lock as long as its caller may (never less than the floor), a wait that cannot succeed fails at
//! once, and waiters hold no thread.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use api_jongler::mock::{MockConfig, MockUpstream};
use api_jongler::{Coordinator, CoordinatorOptions, Error, Jongler};
use common::{Sandbox, SqliteShell};

const CONNECTOR: &str = "generativelanguage.googleapis.com";
const ENDPOINT: &str = "/v1beta/models/gemini-2.5-flash:generateContent";

/// A coordinator whose floor for lock waits is `floor` (short, so the tests are quick).
fn coordinator(sandbox: &Sandbox, floor: Duration) -> Coordinator {
    sandbox.coordinator(CoordinatorOptions { lock_wait_floor: floor, ..sandbox.options() })
}

/// Item 1: 16 threads of one process claim at once while another process holds the write lock.
/// Group commit puts them in batches, but each claim gives up at its own deadline (1 s: the floor),
/// not after the others' waits one by one (16 s before).
#[test]
fn claims_under_a_held_lock_are_each_answered_by_their_own_deadline() {
    if common::sqlite_only("a sqlite3 shell holds the write lock") {
        return;
    }
    let sandbox = Sandbox::new(CONNECTOR, 4);
    let floor = Duration::from_secs(1);
    let coordinator = coordinator(&sandbox, floor);
    let shell = SqliteShell::lock(&sandbox);
    let started = Instant::now();
    let answered: Vec<(Duration, String)> = std::thread::scope(|scope| {
        let callers: Vec<_> = (0..16)
            .map(|_| {
                let coordinator = coordinator.clone();
                scope.spawn(move || {
                    let answer = coordinator.claim(CONNECTOR, &[], Duration::ZERO);
                    (started.elapsed(), format!("{:?}", answer.map(|lease| lease.key_name().to_owned())))
                })
            })
            .collect();
        callers.into_iter().map(|caller| caller.join().expect("caller")).collect()
    });
    shell.release();
    for (after, answer) in &answered {
        assert!(answer.contains("DatabaseLocked"), "{answer}");
        // The floor, plus a margin for a loaded machine; in sequence the last would answer after 16 s.
        assert!(*after < floor + Duration::from_secs(4), "answered after {after:?}: {answer}");
    }
}

/// Item 1, lease ends: 8 holders end their leases while the lock is held; each end gives up at its
/// own deadline (three floors) and is retried in the background, instead of one after the other.
#[test]
fn lease_ends_under_a_held_lock_are_each_answered_by_their_own_deadline() {
    if common::sqlite_only("a sqlite3 shell holds the write lock") {
        return;
    }
    let sandbox = Sandbox::new(CONNECTOR, 8);
    let floor = Duration::from_millis(500);
    let coordinator = coordinator(&sandbox, floor);
    let leases: Vec<_> =
        (0..8).map(|_| coordinator.claim(CONNECTOR, &[], Duration::ZERO).expect("a key is free")).collect();
    let shell = SqliteShell::lock(&sandbox);
    let started = Instant::now();
    let answered: Vec<(Duration, bool)> = std::thread::scope(|scope| {
        let ends: Vec<_> = leases
            .into_iter()
            .map(|lease| {
                scope.spawn(move || {
                    let failed = lease.release().is_err();
                    (started.elapsed(), failed)
                })
            })
            .collect();
        ends.into_iter().map(|end| end.join().expect("end")).collect()
    });
    shell.release();
    for (after, failed) in &answered {
        assert!(failed, "the end could not be written under the lock");
        // Three floors (1.5 s), plus a margin; in sequence the last would answer after 12 s.
        assert!(*after < Duration::from_millis(1_500) + Duration::from_secs(4), "answered after {after:?}");
    }
    // The ends are written once the lock is gone.
    common::wait_until(Duration::from_secs(30), "the deferred ends land", || {
        sandbox.states().iter().all(|(_, state)| state == "vacant")
    });
}

fn builder(sandbox: &Sandbox, floor: Duration) -> api_jongler::JonglerBuilder {
    Jongler::builder(CONNECTOR)
        .keyring(&sandbox.keyring)
        .database(&sandbox.db)
        .connectors_dir(sandbox.connectors_dir())
        .coordinator(CoordinatorOptions { lock_wait_floor: floor, ..sandbox.options() })
}

fn sandbox_at(mock: &MockUpstream, keys: usize) -> Sandbox {
    let sandbox = Sandbox::new(CONNECTOR, keys);
    sandbox.point_connector(CONNECTOR, "127.0.0.1", mock.port(), serde_json::json!({ "backoff_ms": 5 }));
    sandbox
}

/// Item 2: a request that may wait 30 s for a key also waits that long for the write lock: a lock of
/// 3 s (past the 1 s floor) delays it and does not fail it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_waits_for_the_lock_as_long_as_its_caller_may() {
    if common::sqlite_only("a sqlite3 shell holds the write lock") {
        return;
    }
    let mock = MockUpstream::start(MockConfig::default()).await.expect("mock");
    let sandbox = sandbox_at(&mock, 1);
    let jongler =
        builder(&sandbox, Duration::from_secs(1)).wait(Duration::from_secs(30)).connect().await.expect("jongler");
    let shell = SqliteShell::lock(&sandbox);
    let request = tokio::spawn(async move { jongler.request("POST", ENDPOINT, "{}").await });
    // The lock outlives the floor three times over, then goes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!request.is_finished(), "the request gave up on the lock before its wait");
    tokio::task::spawn_blocking(move || shell.release()).await.expect("release");
    let response = request.await.expect("task").expect("the request went through once the lock was gone");
    assert_eq!(response.status, 200);
}

/// Item 2: under a lock that never ends, the error says how long the caller really waited (its whole
/// wait), not the last write's share of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_under_a_lock_that_never_ends_says_how_long_it_waited() {
    if common::sqlite_only("a sqlite3 shell holds the write lock") {
        return;
    }
    let mock = MockUpstream::start(MockConfig::default()).await.expect("mock");
    let sandbox = sandbox_at(&mock, 1);
    let wait = Duration::from_secs(2);
    let jongler = builder(&sandbox, Duration::from_millis(500)).wait(wait).connect().await.expect("jongler");
    let shell = SqliteShell::lock(&sandbox);
    let answer = jongler.request("POST", ENDPOINT, "{}").await;
    tokio::task::spawn_blocking(move || shell.release()).await.expect("release");
    match answer {
        Err(Error::DatabaseLocked { waited, .. }) => assert!(waited >= wait, "said {waited:?}, waited {wait:?}"),
        other => panic!("expected DatabaseLocked, got {other:?}"),
    }
}

/// Item 5: when every key is in error, or locked down for the model past the whole wait, a claim that
/// may wait a minute fails at once, saying why and (for a lockdown) when the earliest key comes back;
/// a lockdown that ends within the wait is waited for.
#[test]
fn a_wait_that_cannot_succeed_fails_at_once() {
    let sandbox = Sandbox::new(CONNECTOR, 2);
    let coordinator = coordinator(&sandbox, Duration::from_secs(1));
    let minute = Duration::from_secs(60);
    let now = coordinator.now_ms();
    // Both keys locked down for an hour.
    for _ in 0..2 {
        let lease = coordinator.claim(CONNECTOR, &[], Duration::ZERO).expect("free");
        lease.lockdown(now + 3_600_000, "per-day quota", Some(429)).expect("lockdown");
    }
    let started = Instant::now();
    let answer = coordinator.claim(CONNECTOR, &[], minute);
    let took = started.elapsed();
    let Err(Error::NoKeyAvailable(unavailable)) = answer else { panic!("expected NoKeyAvailable: {answer:?}") };
    assert!(took < Duration::from_secs(10), "waited {took:?} for a key that comes back in an hour");
    assert!(unavailable.to_string().contains("comes back at"), "{unavailable}");

    // Both in error: nothing can come back.
    coordinator.cleanup(Some(CONNECTOR), false).expect("cleanup");
    for _ in 0..2 {
        let lease = coordinator.claim(CONNECTOR, &[], Duration::ZERO).expect("free");
        lease.mark_error("invalid key", Some(400)).expect("error");
    }
    let started = Instant::now();
    let answer = coordinator.claim(CONNECTOR, &[], minute);
    assert!(started.elapsed() < Duration::from_secs(10), "waited {:?} with every key in error", started.elapsed());
    let Err(Error::NoKeyAvailable(unavailable)) = answer else { panic!("expected NoKeyAvailable: {answer:?}") };
    assert!(unavailable.to_string().contains("2 in error"), "{unavailable}");

    // A lockdown of 1 s inside a wait of a minute is waited for.
    coordinator.cleanup(Some(CONNECTOR), false).expect("cleanup");
    let now = coordinator.now_ms();
    for _ in 0..2 {
        let lease = coordinator.claim(CONNECTOR, &[], Duration::ZERO).expect("free");
        lease.lockdown(now + 1_000, "per-minute quota", Some(429)).expect("lockdown");
    }
    coordinator.claim(CONNECTOR, &[], minute).expect("a key comes back within the wait");
}

/// Item 3: a hundred requests waiting for the one key of their pool hold no thread each: the process
/// never has more than a few dozen threads (before, each waiter held one of the blocking pool), and
/// every request gets the key in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_waiters_hold_no_thread_each() {
    let mock = MockUpstream::start(MockConfig { latency: Duration::from_millis(20), ..MockConfig::default() })
        .await
        .expect("mock");
    let sandbox = sandbox_at(&mock, 1);
    let jongler =
        builder(&sandbox, Duration::from_secs(5)).wait(Duration::from_secs(120)).connect().await.expect("jongler");
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = Arc::clone(&done);
        tokio::task::spawn_blocking(move || {
            let mut most = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                most = most.max(std::fs::read_dir("/proc/self/task").map_or(0, Iterator::count));
                std::thread::sleep(Duration::from_millis(5));
            }
            most
        })
    };
    let requests: Vec<_> = (0..100)
        .map(|_| {
            let jongler = jongler.clone();
            tokio::spawn(async move { jongler.request("POST", ENDPOINT, "{}").await })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.expect("task").expect("request").status, 200);
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let most = sampler.await.expect("sampler");
    // The test harness, the runtime's workers, the mock, the heartbeat, the watcher and a few blocking
    // threads; a thread per waiter would be over 100.
    assert!(most < 50, "{most} threads at once for 100 waiters");
}

/// Item 1 through the gateway: 16 clients of `serve --wait 2s` while a user's `sqlite3` holds the write
/// lock. Each gets its 503 once the floor (5 s) is over, all at about the same time (before, one by one:
/// the last after 85 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_clients_under_a_held_lock_are_each_answered_by_their_own_deadline() {
    if common::sqlite_only("a sqlite3 shell holds the write lock") {
        return;
    }
    let mock = MockUpstream::start(MockConfig::default()).await.expect("mock");
    let sandbox = sandbox_at(&mock, 4);
    // The gateway syncs the keyring before the lock is taken.
    let gateway = common::gateway::Gateway::start(&sandbox, &["--wait", "2s"], &[]);
    let client = common::gateway::client();
    let ready = client.get(gateway.url("/__apijongler/health")).send().await.expect("health");
    assert_eq!(ready.status(), 200);
    let shell = SqliteShell::lock(&sandbox);
    let started = Instant::now();
    let requests: Vec<_> = (0..16)
        .map(|_| {
            let request = client.post(gateway.url(&format!("/{CONNECTOR}{ENDPOINT}"))).body("{}").send();
            tokio::spawn(async move { (request.await.map(|response| response.status().as_u16()), started.elapsed()) })
        })
        .collect();
    let mut answers = Vec::new();
    for request in requests {
        answers.push(request.await.expect("task"));
    }
    tokio::task::spawn_blocking(move || shell.release()).await.expect("release");
    for (status, after) in answers {
        assert_eq!(status.expect("an answer"), 503, "the database stayed locked");
        // The 5 s floor, plus a margin for a loaded machine.
        assert!(after < Duration::from_secs(10), "answered after {after:?}");
    }
    assert_eq!(mock.stats().0, 0, "nothing was sent");
}

/// "Every waiter is answered by its own deadline": the watcher's claim waits for the write lock until
/// the earliest lock deadline among the waiters *it saw when the round began*. A waiter that arrives
/// while that claim is blocked, with a shorter deadline, is answered only when the claim returns (the
/// older waiter's whole wait, or when the lock ends), not by its own deadline (plus the floor).
///
/// Setup: one key in lockdown for 3 s; waiter A (wait 60 s) queues for it; an external `sqlite3`
/// takes the write lock; the lockdown ends, so the watcher starts a claim that may wait 60 s for the
/// lock. Then waiter B (wait 1 s, floor 1 s) queues behind A. B must hear back within a few seconds.
#[test]
fn a_newcomer_with_a_short_wait_is_not_held_by_an_older_waiters_lock_wait() {
    if common::sqlite_only("a sqlite3 shell holds the write lock") {
        return;
    }
    let sandbox = Sandbox::new(CONNECTOR, 1);
    let floor = Duration::from_secs(1);
    let coordinator = coordinator(&sandbox, floor);
    let lease = coordinator.claim(CONNECTOR, &[], Duration::ZERO).expect("the key is free");
    let lockdown = Duration::from_secs(3);
    let lockdown_ends = Instant::now() + lockdown;
    lease.lockdown(coordinator.now_ms() + 3_000, "per-minute quota", Some(429)).expect("lockdown");

    std::thread::scope(|scope| {
        let older = {
            let coordinator = coordinator.clone();
            scope.spawn(move || coordinator.claim(CONNECTOR, &[], Duration::from_secs(60)).map(drop))
        };
        // A has made its in-place attempt (no key: lockdown) and queued well before the lockdown ends.
        std::thread::sleep(Duration::from_millis(1_000));
        let shell = SqliteShell::lock(&sandbox);
        // The lockdown ends under the lock: the watcher sees a claimable key and blocks in its claim.
        std::thread::sleep(lockdown_ends.saturating_duration_since(Instant::now()) + Duration::from_millis(500));
        let asked = Instant::now();
        let newcomer = {
            let coordinator = coordinator.clone();
            scope.spawn(move || {
                let answer = coordinator.claim(CONNECTOR, &[], Duration::from_secs(1)).map(drop);
                (asked.elapsed(), answer)
            })
        };
        // Keep the lock for 20 s at most (or until the newcomer is answered).
        let limit = Instant::now() + Duration::from_secs(20);
        while !newcomer.is_finished() && Instant::now() < limit {
            std::thread::sleep(Duration::from_millis(50));
        }
        shell.release();
        let (took, answer) = newcomer.join().expect("newcomer");
        drop(older.join().expect("older"));
        // Its own deadline is 1 s (the floor is 1 s); 5 s is a generous margin for a loaded machine.
        assert!(took < Duration::from_secs(5), "a 1 s wait was answered after {took:?}: {answer:?}");
    });
}

/// A clock that panics when read on the waiters' watcher thread: stands for any panic there (a bug,
/// a user's clock).
#[derive(Debug)]
struct PanicsOnWatcher;

impl api_jongler::Clock for PanicsOnWatcher {
    fn now_ms(&self) -> i64 {
        if std::thread::current().name() == Some("apijongler-waiters") {
            panic!("a panic on the watcher thread");
        }
        api_jongler::SystemClock.now_ms()
    }

    fn boot_ms(&self) -> i64 {
        api_jongler::SystemClock.boot_ms()
    }
}

/// waiting.rs says "a watcher that died (a panic) drops the sender", so a blocked caller hears of it.
/// It does not: the waiters (and their senders) live in the shared queue, not in the watcher, and
/// `watching` stays true, so no later waiter starts a new watcher either. A panic on the watcher
/// thread leaves every thread waiter of the process blocked forever, past its deadline.
#[test]
fn a_panicking_watcher_does_not_leave_waiters_blocked_forever() {
    let sandbox = Sandbox::new(CONNECTOR, 1);
    let options = CoordinatorOptions {
        lock_wait_floor: Duration::from_secs(1),
        clock: Arc::new(PanicsOnWatcher),
        ..sandbox.options()
    };
    let coordinator = sandbox.coordinator(options);
    let _held = coordinator.claim(CONNECTOR, &[], Duration::ZERO).expect("the key is free");
    let waiter = {
        let coordinator = coordinator.clone();
        std::thread::spawn(move || coordinator.claim(CONNECTOR, &[], Duration::from_secs(1)).map(drop))
    };
    // Its deadline is 1 s; 15 s is far past it.
    let limit = Instant::now() + Duration::from_secs(15);
    while !waiter.is_finished() && Instant::now() < limit {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(waiter.is_finished(), "a waiter with a 1 s wait is still blocked after 15 s (the watcher panicked)");
    let answer = waiter.join().expect("waiter");
    assert!(answer.is_err(), "{answer:?}");
}

/// Waiters for different models are served apart: a key freed while it is locked down for one model
/// goes to the waiter of the other model, and the waiter of the locked-down model hears at once that
/// its wait cannot succeed (rather than the two being judged by the first one's model).
#[test]
fn waiters_for_different_models_are_served_apart() {
    use api_jongler::pool::{Fate, Lockdown};
    let sandbox = Sandbox::new(CONNECTOR, 1);
    let coordinator = coordinator(&sandbox, Duration::from_secs(1));
    let pro = coordinator.claim_for(CONNECTOR, Some("pro"), &[], Duration::ZERO).expect("free");
    let hour = coordinator.now_ms() + 3_600_000;
    let lockdown = Lockdown { models: vec!["pro".to_owned()], ..Lockdown::whole_key(hour, "daily quota", Some(429)) };
    pro.finish(&Fate::Lockdown(lockdown), None).expect("locked down for pro");
    let held = coordinator.claim_for(CONNECTOR, Some("flash"), &[], Duration::ZERO).expect("free for flash");
    std::thread::scope(|scope| {
        let waiter = |model: &'static str| {
            let coordinator = coordinator.clone();
            scope.spawn(move || coordinator.claim_for(CONNECTOR, Some(model), &[], Duration::from_secs(20)))
        };
        let pro_waiter = waiter("pro");
        // The pro waiter queues first (were it not queued yet, the flash one would be served first
        // and the test could only pass).
        std::thread::sleep(Duration::from_millis(300));
        let flash_waiter = waiter("flash");
        std::thread::sleep(Duration::from_millis(300));
        held.release().expect("release");
        let flash = flash_waiter.join().expect("flash waiter");
        assert_eq!(flash.expect("the freed key serves flash").key_name(), "key0");
        let started = Instant::now();
        let pro = pro_waiter.join().expect("pro waiter");
        assert!(matches!(pro, Err(Error::NoKeyAvailable(_))), "{pro:?}");
        assert!(started.elapsed() < Duration::from_secs(10), "the pro waiter waited out its wait");
    });
}

/// Under another session's write lock (a transaction held open, as by a stopped process), a claim and
/// a release each end by their own deadlines on either store. On PostgreSQL each is one statement
/// committed on its own, its waits bounded by the session's timeouts, which the store sets only when
/// they would not end in time: without them both would wait for as long as the lock is held.
#[test]
fn a_claim_and_a_release_under_a_held_write_lock_end_by_their_deadlines() {
    let sandbox = Sandbox::new(CONNECTOR, 2);
    let coordinator = coordinator(&sandbox, Duration::from_millis(300));
    // A claim that may wait a minute (it needs not) leaves its session's timeouts long: the writes below
    // shorten them when they run on the same connection.
    let held = coordinator.claim(CONNECTOR, &[], Duration::from_secs(60)).expect("a claim before the lock");
    let blocker = sandbox.sql();
    blocker.lock_writes().expect("take the write lock");
    let (claim, release) = std::thread::scope(|scope| {
        let writes = scope.spawn(|| {
            let claim = coordinator.claim(CONNECTOR, &[], Duration::ZERO).map(|lease| lease.key_name().to_owned());
            (claim, held.release())
        });
        // Polled by hand rather than with `wait_until`, so the lock is released even when this fails; a
        // minute against deadlines of 0.3 and 0.9 s.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !writes.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let finished = writes.is_finished();
        blocker.rollback().expect("release the write lock");
        let answers = writes.join().expect("writes");
        assert!(finished, "a write waited for the lock past its deadline: {answers:?}");
        answers
    });
    assert!(matches!(claim, Err(Error::DatabaseLocked { .. })), "{claim:?}");
    assert!(matches!(release, Err(Error::DatabaseLocked { .. })), "{release:?}");
    // The release goes on in the background once the lock is gone.
    assert_eq!(coordinator.settle(Instant::now() + Duration::from_secs(60)), 0, "the release was written");
    assert_eq!(sandbox.states().iter().filter(|(_, state)| state == "vacant").count(), 2, "{:?}", sandbox.states());
}
