//! Proofs with many real processes: races, SIGKILL chaos, a hung (SIGSTOPped) holder, and many
//! processes opening a fresh database at once. Each worker is the real `apijongler` binary
//! (`apijongler worker`, see `src/cli/worker.rs`).

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use api_jongler::{Clock, SystemClock};
use common::{Sandbox, assert_integrity, check_leases, wait_success};
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

#[test]
fn killed_holders_keys_come_back_without_cleanup() {
    const WORKERS: usize = 8;
    const REAP_MS: u64 = 200;
    let sandbox = Sandbox::new("chaos", 4);
    let spawn = || {
        sandbox
            .worker("chaos")
            .args(["--hold-max-us", "5000", "--reap-ms", &REAP_MS.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn worker")
    };
    let mut workers: Vec<Child> = (0..WORKERS).map(|_| spawn()).collect();
    let mut killed_at: HashMap<u32, i64> = HashMap::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(fastrand::u64(50..=200)));
        let victim = fastrand::usize(..WORKERS);
        let mut child = std::mem::replace(&mut workers[victim], spawn());
        child.kill().expect("SIGKILL");
        killed_at.insert(child.id(), SystemClock.now_ms());
        let status = child.wait().expect("reap child");
        assert!(!status.success(), "the worker was killed, it did not finish: {status}");
    }
    for mut child in workers {
        child.kill().expect("SIGKILL");
        killed_at.insert(child.id(), SystemClock.now_ms());
        child.wait().expect("reap child");
    }
    // One more process claiming keys reaps whatever the last victims held; no cleanup command is run.
    let finisher = sandbox.worker("chaos").args(["--cycles", "8"]).stdout(Stdio::piped()).spawn().expect("spawn");
    wait_success(finisher);

    let history = sandbox.history();
    check_leases(&history);
    assert!(sandbox.states().iter().all(|(_, state)| state == "vacant"), "{:?}", sandbox.states());
    assert_integrity(&sandbox.db);

    // Reaping bound: from each SIGKILL of a holder to the reap of its key.
    let mut claims: HashMap<(&str, i64), u32> = HashMap::new();
    let mut delays = Vec::new();
    for row in &history {
        let (Some(lease), key) = (row.lease, row.key.as_str()) else { continue };
        if row.to == "locked" {
            claims.insert((key, lease), row.holder_pid.expect("claim names its holder"));
        } else if row.reason.starts_with("reaped") {
            let pid = claims[&(key, lease)];
            let killed = killed_at.get(&pid).unwrap_or_else(|| panic!("reaped pid {pid} was never killed: {row:?}"));
            delays.push(row.at - killed);
        }
    }
    let worst = delays.iter().copied().max().unwrap_or(0);
    eprintln!("chaos: {} kills, {} keys reaped, worst kill-to-reap {worst} ms", killed_at.len(), delays.len());
    assert!(!delays.is_empty(), "some victim held a key when killed");
    // Any claimer reaps at most every REAP_MS; the rest is scheduling on a loaded 2-core machine.
    assert!(worst <= REAP_MS as i64 + 800, "a killed holder's key stayed locked {worst} ms");
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
    let reap = sandbox.history().into_iter().find(|row| row.reason.starts_with("reaped")).expect("a reap row");
    assert!(reap.reason.contains("heartbeat"), "{}", reap.reason);
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
    let connection = sandbox.sql();
    let version: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0)).expect("version");
    assert_eq!(version, api_jongler::store::SCHEMA_VERSION);
    let mode: String = connection.query_row("PRAGMA journal_mode", [], |row| row.get(0)).expect("mode");
    assert_eq!(mode, "wal");
    assert_eq!(sandbox.states().len(), 4);
    let added = sandbox.history().iter().filter(|row| row.reason == "added to the keyring").count();
    assert_eq!(added, 4, "each key was added once, by one of the sixteen");
    assert_integrity(&sandbox.db);
}
