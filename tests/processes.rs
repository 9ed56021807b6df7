//! Proofs with many real processes: races, SIGKILL chaos, a hung (SIGSTOPped) holder, and many
//! processes opening a fresh database at once. Each worker is the real `apijongler` binary
//! (`apijongler worker`, see `src/cli/worker.rs`).

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use api_jongler::pool::HistoryEvent;
use api_jongler::{Clock, SystemClock};
use common::{Sandbox, assert_integrity, check_leases, wait_success, wait_until};
use rustix::process::{Pid, Signal, kill_process};

fn signal(child: &Child, signal: Signal) {
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits")).expect("nonzero pid");
    kill_process(pid, signal).expect("signal the worker");
}

#[test]
fn sixteen_processes_race_for_four_keys_without_sharing_one() {
    const PROCESSES: usize = 16;
    const CYCLES: usize = 200;
    let sandbox = Sandbox::new("race", 4);
    let workers: Vec<Child> = (0..PROCESSES)
        .map(|_| {
            sandbox
                .worker("race")
                .args(["--cycles", &CYCLES.to_string(), "--hold-max-us", "5000"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn worker")
        })
        .collect();
    for worker in workers {
        // Success means no error (SQLITE_BUSY included) ever reached a worker.
        let stdout = wait_success(worker);
        assert!(stdout.contains(&format!("cycles {CYCLES}")), "{stdout}");
    }

    let history = sandbox.history();
    assert_eq!(check_leases(&history), PROCESSES * CYCLES, "every cycle is in the history");
    assert!(sandbox.states().iter().all(|(_, state)| state == "vacant"), "{:?}", sandbox.states());
    assert_integrity(&sandbox.db);
}

/// One worker process's life, in the order the test saw it: `spawned` and `died` count the test's own
/// steps (spawns and reaped deaths), so "spawned after that death" is an ordering, not a time.
struct Life {
    pid: u32,
    spawned: usize,
    spawned_ms: i64,
    killed_ms: Option<i64>,
    died: Option<(usize, i64)>,
}

impl Life {
    /// Whether this life could have written a row stamped `at` (its own clock is the test's clock).
    fn covers(&self, pid: u32, at: i64) -> bool {
        self.pid == pid && self.spawned_ms <= at && self.died.is_none_or(|(_, died_ms)| at <= died_ms)
    }
}

#[test]
fn killed_holders_keys_come_back_without_cleanup() {
    const WORKERS: usize = 8;
    const KILLS: usize = 60;
    const REAP_MS: i64 = 200;
    let sandbox = Sandbox::new("chaos", 4);
    // The keys are in the database before the chaos starts: this test is about dead holders, not
    // about many processes creating one file (`sixteen_processes_open_a_fresh_database_at_once`).
    drop(sandbox.coordinator(sandbox.options()));
    let mut lives: Vec<Life> = Vec::new();
    let step = std::cell::Cell::new(0);
    let next_step = || {
        step.set(step.get() + 1);
        step.get()
    };
    // Stale after an hour: no key in this test can come back for its heartbeat's age, so every key
    // that comes back does so because its holder died.
    let spawn = |lives: &mut Vec<Life>, extra: &[&str]| {
        let (spawned, spawned_ms) = (next_step(), SystemClock.now_ms());
        let child = sandbox
            .worker("chaos")
            .args(["--hold-max-us", "5000", "--reap-ms", &REAP_MS.to_string(), "--stale-ms", "3600000"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn worker");
        lives.push(Life { pid: child.id(), spawned, spawned_ms, killed_ms: None, died: None });
        (child, lives.len() - 1)
    };
    let kill = |(mut child, life): (Child, usize), lives: &mut Vec<Life>| {
        if let Some(status) = child.try_wait().expect("poll worker") {
            let output = child.wait_with_output().expect("worker output");
            panic!("a worker ended on its own ({status}): {}", String::from_utf8_lossy(&output.stderr));
        }
        lives[life].killed_ms = Some(SystemClock.now_ms());
        child.kill().expect("SIGKILL");
        let status = child.wait().expect("reap child");
        assert!(!status.success(), "the worker was killed, it did not finish: {status}");
        // Reaped by `wait`: from here on its pid is gone (or another process's), so a reaper proves it dead.
        lives[life].died = Some((next_step(), SystemClock.now_ms()));
    };

    let mut workers: Vec<(Child, usize)> = (0..WORKERS).map(|_| spawn(&mut lives, &[])).collect();
    // Each victim's replacement starts a round early and is claiming before the victim dies, so the
    // victim's key must come back through processes that were already running (their reap throttle),
    // not through a new process's first reap.
    let mut replacement = spawn(&mut lives, &[]);
    for round in 0..KILLS {
        let claims_by =
            format!("SELECT count(*) FROM history WHERE event = 'claimed' AND holder_pid = {}", replacement.0.id());
        wait_until(Duration::from_secs(60), "the replacement's first claim", || sandbox.count(&claims_by) > 0);
        // The chaos cadence: the workers run between kills. Nothing here waits for a state.
        std::thread::sleep(Duration::from_millis(fastrand::u64(0..=100)));
        // Three kills in four hit a worker that holds a key (it may release it before the signal
        // lands); the rest hit anyone, mid-claim or mid-release.
        let holders = sandbox.holder_pids();
        let victim = workers
            .iter()
            .position(|(child, _)| holders.contains(&child.id()))
            .filter(|_| round % 4 != 0)
            .unwrap_or_else(|| fastrand::usize(..WORKERS));
        let next = spawn(&mut lives, &[]);
        kill(std::mem::replace(&mut workers[victim], std::mem::replace(&mut replacement, next)), &mut lives);
    }
    for worker in workers.into_iter().chain([replacement]) {
        kill(worker, &mut lives);
    }
    // One more process claiming keys reaps whatever the last victims held; no cleanup command is run.
    let (finisher, finisher_life) = spawn(&mut lives, &["--cycles", "8"]);
    wait_success(finisher);

    let history = sandbox.history();
    check_leases(&history);
    assert!(sandbox.states().iter().all(|(_, state)| state == "vacant"), "{:?}", sandbox.states());
    assert_integrity(&sandbox.db);

    // Who wrote each claim, and each life's claims in order (history positions, oldest first).
    let life_of = |pid: u32, at: i64| {
        lives.iter().position(|life| life.covers(pid, at)).unwrap_or_else(|| panic!("pid {pid} at {at} is no worker"))
    };
    let mut owner: HashMap<(&str, i64), usize> = HashMap::new();
    let mut claims: Vec<Vec<usize>> = lives.iter().map(|_| Vec::new()).collect();
    let mut reaps = Vec::new();
    for (position, row) in history.iter().enumerate() {
        let (Some(lease), key) = (row.lease, row.key.as_str()) else { continue };
        if row.event == HistoryEvent::Claimed {
            let life = life_of(row.holder_pid.expect("a claim names its holder"), row.at);
            owner.insert((key, lease), life);
            claims[life].push(position);
        } else if row.event.ends_lease() {
            let life = owner[&(key, lease)];
            if matches!(row.event, HistoryEvent::ReapedDead | HistoryEvent::ReapedStale) {
                let killed = lives[life].killed_ms.unwrap_or_else(|| panic!("a live holder's key was reaped: {row:?}"));
                assert!(row.at >= killed, "reaped before its holder was killed: {row:?}");
                reaps.push((position, life));
            } else {
                assert_eq!((row.event, row.holder_pid), (HistoryEvent::Released, Some(lives[life].pid)), "{row:?}");
            }
        }
    }
    assert!(!reaps.is_empty(), "some victim held a key when it was killed");
    assert!(!claims[finisher_life].is_empty(), "the finisher claimed keys");

    // When each dead holder's key came back, as orderings in the history (no wall-clock bound):
    // - A process that starts after the death reaps before its first claim (its reap is due at once).
    // - A process that was running reaps at most REAP_MS apart, before a claim: take its first claim
    //   stamped after the death (c1), its first claim stamped more than REAP_MS after c1 (c2, plus
    //   10 ms for millisecond stamps and the two clocks), and the claim after that (c3). Whenever c3's
    //   reap check ran, its last reap started after c1, so after the death: the key was reaped before c3.
    let first_after = |positions: &[usize], at: i64| positions.iter().copied().find(|&p| history[p].at >= at);
    let (mut worst_ms, mut by_running, mut by_fresh) = (0, 0, 0);
    for &(reaped_at, victim) in &reaps {
        let (death_step, died_ms) = lives[victim].died.expect("a reaped holder died");
        worst_ms = worst_ms.max(history[reaped_at].at - died_ms);
        for (other, life) in lives.iter().enumerate().filter(|&(other, _)| other != victim) {
            let mine = &claims[other];
            let bound = if life.spawned > death_step {
                mine.first().copied()
            } else if life.died.is_none_or(|(step, _)| step > death_step) {
                first_after(mine, died_ms + 1)
                    .and_then(|c1| first_after(mine, history[c1].at + REAP_MS + 10))
                    .and_then(|c2| mine.iter().copied().find(|&p| p > c2))
            } else {
                None
            };
            if let Some(bound) = bound {
                if life.spawned > death_step {
                    by_fresh += 1
                } else {
                    by_running += 1
                }
                assert!(
                    reaped_at < bound,
                    "pid {}'s key was reaped only after pid {} claimed again: {:?} then {:?}",
                    lives[victim].pid,
                    life.pid,
                    history[bound],
                    history[reaped_at]
                );
            }
        }
    }
    eprintln!(
        "chaos: {KILLS} kills, {} keys reaped, each before claims of {by_running} running and {by_fresh} new \
         processes; worst death-to-reap {worst_ms} ms (not a bound)",
        reaps.len()
    );
    assert!(by_running > 0, "the history shows running processes reaping, not only new ones");
}

#[test]
fn a_stopped_holder_is_reaped_and_its_late_writes_change_nothing() {
    let sandbox = Sandbox::new("hung", 1);
    let short = ["--heartbeat-ms", "50", "--stale-ms", "400", "--reap-ms", "50"];
    let mut holder = sandbox
        .worker("hung")
        .args(["--cycles", "1", "--hold-ms", "1500", "--report"])
        .args(short)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn holder");
    let mut holder_out = BufReader::new(holder.stdout.take().expect("stdout"));
    let mut line = String::new();
    holder_out.read_line(&mut line).expect("read claim");
    assert_eq!(line.trim(), "claimed key0 1");
    signal(&holder, Signal::STOP);

    let stopped_at = Instant::now();
    let rival = sandbox
        .worker("hung")
        .args(["--cycles", "1", "--report", "--wait-ms", "10000"])
        .args(short)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn rival");
    let rival_out = wait_success(rival);
    assert!(rival_out.contains("claimed key0 2"), "{rival_out}");
    // The last heartbeat came at most one interval (50 ms) before the stop; stale means 400 ms after it.
    assert!(stopped_at.elapsed() >= Duration::from_millis(340), "reaped only once the heartbeat was stale");
    let before = (sandbox.states(), sandbox.history().len());

    signal(&holder, Signal::CONT);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut holder_out, &mut rest).expect("read rest");
    let status = holder.wait().expect("wait holder");
    assert!(rest.contains("lost key0 1"), "the holder learns it lost the lease: {rest}");
    assert_eq!(status.code(), Some(8), "lease-lost exit code");
    assert_eq!((sandbox.states(), sandbox.history().len()), before, "the late release changed nothing");
    let reap = sandbox.history().into_iter().find(|row| row.event.is_eviction()).expect("a reap row");
    assert_eq!(reap.event, HistoryEvent::ReapedStale, "{reap:?}");
}

#[test]
fn sixteen_processes_open_a_fresh_database_at_once() {
    let sandbox = Sandbox::new("fresh", 4);
    let openers: Vec<Child> = (0..16)
        .map(|_| {
            sandbox
                .worker("fresh")
                .args(["--cycles", "0"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn opener")
        })
        .collect();
    for opener in openers {
        wait_success(opener);
    }
    // The file's own stamps (PostgreSQL keeps its schema version in a table of the store's own).
    if !common::on_postgres() {
        let connection = sandbox.sqlite();
        let version: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0)).expect("version");
        assert_eq!(version, api_jongler::store::SCHEMA_VERSION);
        let mode: String = connection.query_row("PRAGMA journal_mode", [], |row| row.get(0)).expect("mode");
        assert_eq!(mode, "wal");
    }
    assert_eq!(sandbox.states().len(), 4);
    let added = sandbox.history().iter().filter(|row| row.event == HistoryEvent::Added).count();
    assert_eq!(added, 4, "each key was added once, by one of the sixteen");
    assert_integrity(&sandbox.db);
}
