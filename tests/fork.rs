//! Fork safety, with a real `fork()`: an instance created before the fork refuses to run in the child
//! (a typed error, at once, rather than a hang or a claim under the parent's name), its drops there
//! touch nothing, and a coordinator the child opens after the fork holds keys under the child's pid, even
//! when the parent's checkpointer was working at the fork.
//!
//! A plain `main` (`harness = false`): no test-harness thread exists when the process forks, only the
//! library's own (which is what a Python `multiprocessing` parent would have too). The child reports
//! by its exit code; the parent waits for it with a deadline and kills it if it hangs.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use api_jongler::holder::Holder;
use api_jongler::{BlockingJongler, Coordinator, CoordinatorOptions, Error, Lease};
use common::Sandbox;
use rustix::process::{Pid, Signal, WaitOptions};

/// Far more than the child needs (it makes a handful of local database calls); a hang is a failure.
const CHILD_DEADLINE: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    let sandbox = Sandbox::new("gemini", 2);
    // Loopback only: a request the child's jongler should refuse must not reach anything real.
    sandbox.point_connector("gemini", "127.0.0.1", 9, serde_json::json!({}));
    // A heartbeat that never beats during the test: only (c) forks beside a library thread at work.
    let options = CoordinatorOptions { heartbeat_interval: Duration::from_secs(3600), ..sandbox.options() };
    let parent = sandbox.coordinator(options.clone());
    // Claimed through an instance dropped at once: the lease alone keeps that instance's state alive.
    let lease =
        sandbox.coordinator(options.clone()).claim("gemini", &[], Duration::ZERO).expect("the parent claims a key");
    let blocking = BlockingJongler::connect(sandbox.jongler("gemini")).expect("the parent connects a jongler");
    let parent_pid = std::process::id();
    assert_eq!(holder_of(&sandbox, lease.key_name()), Some((parent_pid, lease.token())));

    let child = match fork::fork().expect("fork") {
        fork::Fork::Child => {
            let outcome = catch_unwind(AssertUnwindSafe(|| in_child(&sandbox, &options, parent, lease, blocking)));
            let code = match outcome {
                Ok(Ok(())) => 0,
                Ok(Err(problem)) => {
                    eprintln!("fork test, child: {problem}");
                    1
                }
                Err(_) => 101,
            };
            // Without running the sandbox's drop: the temporary directory is the parent's to remove.
            std::process::exit(code);
        }
        fork::Fork::Parent(child) => Pid::from_raw(child).expect("child pid"),
    };

    let code = wait_for(child);
    assert_eq!(code, Some(0), "the child failed (exit code {code:?}, its message is above)");
    forks_beside_the_checkpointer(&sandbox, &lease);
    // The child dropped its copy of the lease: the key is still the parent's, under the same lease.
    assert_eq!(holder_of(&sandbox, lease.key_name()), Some((parent_pid, lease.token())));
    assert!(lease.renew().expect("renew"), "the parent still holds its key");
    let other = if lease.key_name() == "key0" { "key1" } else { "key0" };
    assert_eq!(holder_of(&sandbox, other), None, "the child released the key it claimed");
    lease.release().expect("release");
    drop(blocking);
    println!("fork: 1 passed, 0 failed");
    ExitCode::SUCCESS
}

/// How many times (c) forks: the checkpointer works for about a millisecond in the 50 ms after each write.
/// Without the fork handlers, each of 6 runs had a child stuck within these forks; with them, none of 10.
const FORKS_BESIDE_THE_CHECKPOINTER: usize = 300;

/// (c) A fork right after a write, while the parent's checkpointer may be inside SQLite, leaves the child
/// free to read the database: the fork handlers hold the fork off until the checkpointer is out of SQLite
/// and take SQLite's process-wide locks across it. (The child reads with plain SQLite: a child's own
/// coordinator, with its pool's threads, is (b)'s test.) SQLite only: PostgreSQL has no such locks.
fn forks_beside_the_checkpointer(sandbox: &Sandbox, lease: &Lease) {
    if common::on_postgres() {
        return;
    }
    for round in 0..FORKS_BESIDE_THE_CHECKPOINTER {
        assert!(lease.renew().expect("renew"), "the parent still holds its key"); // a write to checkpoint
        let child = match fork::fork().expect("fork") {
            fork::Fork::Child => {
                let read = catch_unwind(AssertUnwindSafe(|| {
                    sandbox.sql().row("SELECT count(*) FROM keys", &[]).map(|row| row.get::<i64>(0))
                }));
                std::process::exit(i32::from(!matches!(read, Ok(Ok(2)))));
            }
            fork::Fork::Parent(child) => Pid::from_raw(child).expect("child pid"),
        };
        let code = wait_for(child);
        assert_eq!(code, Some(0), "the child of round {round} could not read the database (exit code {code:?})");
    }
}

/// Everything the child checks; an `Err` names the first thing that went wrong.
fn in_child(
    sandbox: &Sandbox,
    options: &CoordinatorOptions,
    inherited: Coordinator,
    parent_lease: Lease,
    blocking: BlockingJongler,
) -> Result<(), String> {
    let me = std::process::id();
    let parent = std::os::unix::process::parent_id();
    let refused = |what: &str, result: Result<(), Error>| match result {
        Err(Error::ForkedChild { created_by, this_process }) if created_by == parent && this_process == me => Ok(()),
        Err(error) => Err(format!("{what} in the child: expected Error::ForkedChild, got: {error}")),
        Ok(()) => Err(format!("{what} in the child succeeded with the parent's instance")),
    };

    // (a) The inherited instance refuses at once, whatever the entry point.
    let started = Instant::now();
    refused("a claim", inherited.claim("gemini", &[], Duration::ZERO).map(drop))?;
    refused("a claim that may wait", inherited.claim("gemini", &[], Duration::from_secs(30)).map(drop))?;
    refused("key states", inherited.key_states("gemini").map(drop))?;
    refused("a sync", inherited.sync(&sandbox.load_keyring()).map(drop))?;
    refused("a reap", inherited.reap(None).map(drop))?;
    refused("a cleanup", inherited.cleanup(None, false).map(drop))?;
    refused("the blocking jongler's key states", blocking.key_states().map(drop))?;
    refused("the blocking jongler's request", blocking.request("POST", "/v1beta/models", "{}").map(drop))?;
    refused("the parent's lease check", parent_lease.check())?;
    refused("the parent's lease renewal", parent_lease.renew().map(drop))?;
    if parent_lease.is_valid() {
        return Err("the parent's lease is valid in the child".into());
    }
    if inherited.settle(Instant::now()) != 0 {
        return Err("settle in the child reports ends to write: they are the parent's".into());
    }
    // Generous: the refusals make no database call; a hang would be the r2d2 pool's 30 s timeout.
    if started.elapsed() > Duration::from_secs(20) {
        return Err(format!("the refusals took {:?}", started.elapsed()));
    }
    // Dropping the parent's instances in the child, and then releasing its lease (the last thing that
    // holds the inherited instance's state), writes nothing, joins no thread and closes none of the
    // parent's database connections.
    let open_before = database_files_open(options);
    drop(inherited);
    drop(blocking);
    refused("the parent's lease release", parent_lease.release())?;
    let open_after = database_files_open(options);
    if open_after != open_before {
        return Err(format!(
            "the child closed the parent's database files: {open_before} open before, {open_after} after"
        ));
    }

    // (b) A coordinator opened after the fork works, under the child's own identity.
    if Holder::current().pid != me {
        return Err(format!("Holder::current() in the child is pid {}, not {me}", Holder::current().pid));
    }
    let fresh = Coordinator::open(options.clone()).map_err(|error| format!("opening in the child: {error}"))?;
    let lease =
        fresh.claim("gemini", &[], Duration::ZERO).map_err(|error| format!("claiming in the child: {error}"))?;
    match holder_of(sandbox, lease.key_name()) {
        Some((pid, token)) if pid == me && token == lease.token() => {}
        other => return Err(format!("the child's key is held by {other:?}, not by the child (pid {me})")),
    }
    let parents = if lease.key_name() == "key0" { "key1" } else { "key0" };
    match holder_of(sandbox, parents) {
        Some((pid, _)) if pid == parent => {}
        other => return Err(format!("the parent's key is held by {other:?} in the child's eyes")),
    }
    lease.release().map_err(|error| format!("releasing in the child: {error}"))?;
    Ok(())
}

/// How many files of the pool's database (the database, its WAL and shared memory) this process has open;
/// on PostgreSQL, how many sockets (the pool's connections to the server are the only ones in this test).
fn database_files_open(options: &CoordinatorOptions) -> usize {
    let mut db = options.db_path.as_ref().expect("the sandbox names its database").to_string_lossy().into_owned();
    if common::on_postgres() {
        db = "socket:".to_owned();
    }
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with(&db))
        .count()
}

/// The holder pid and lease token of a locked key; `None` when it is not locked.
fn holder_of(sandbox: &Sandbox, key: &str) -> Option<(u32, i64)> {
    let row = sandbox.sql().row("SELECT holder_pid, lease FROM keys WHERE key_name = ?1 AND state = 'locked'", &[&key]);
    row.ok().map(|row| (row.get(0), row.get(1)))
}

/// The child's exit code, or `None` if a signal ended it; a child still running at the deadline is
/// killed, and the test fails.
fn wait_for(child: Pid) -> Option<i32> {
    let deadline = Instant::now() + CHILD_DEADLINE;
    loop {
        if let Some((_, status)) = rustix::process::waitpid(Some(child), WaitOptions::NOHANG).expect("waitpid") {
            return status.exit_status();
        }
        if Instant::now() >= deadline {
            rustix::process::kill_process(child, Signal::KILL).expect("kill the hung child");
            rustix::process::waitpid(Some(child), WaitOptions::empty()).expect("reap the killed child");
            panic!("the child still ran after {CHILD_DEADLINE:?}: it hung");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
