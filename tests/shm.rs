//! The database's `-shm` file deleted while processes use it: commands say what happened and that
//! nothing is lost, not that the file is damaged.

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{Sandbox, assert_integrity, wait_until};

/// A worker process that keeps claiming and releasing keys until killed.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Item 15: a worker writes the database while its `-shm` is deleted; the next commands use a new
/// index beside the worker's, and SQLite reports the file as malformed or as not a database. The message must say the
/// shared-memory index was deleted while in use and that nothing is lost; and the file is sound.
#[test]
fn deleted_shm_under_load_says_nothing_is_lost() {
    let sandbox = Sandbox::new("c", 4);
    drop(sandbox.coordinator(sandbox.options()));
    let worker = Worker(
        sandbox
            .worker("c")
            .args(["--duration-ms", "120000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn worker"),
    );
    let shm = sandbox.db.with_file_name("apijongler.db-shm");
    wait_until(Duration::from_secs(30), "the worker's first cycles", || {
        shm.exists() && sandbox.count("SELECT count(*) FROM history") > 10
    });
    std::fs::remove_file(&shm).expect("delete the -shm file");

    // A user's `sqlite3` opens the database now: it builds a new index (a new -shm) from the log and
    // keeps it, so the commands after it use that index while the worker goes on with the deleted one.
    // Once the worker has checkpointed and started the log again (its header's salt changes), that
    // index points at frames that now hold other pages.
    let reader = sandbox.sql();
    let _: i64 = reader.query_row("SELECT count(*) FROM history", [], |row| row.get(0)).expect("read");
    let salt = || std::fs::read(sandbox.db.with_file_name("apijongler.db-wal")).expect("read the log")[16..24].to_vec();
    let before = salt();
    wait_until(Duration::from_secs(60), "the worker to start the log again", || salt() != before);

    let deadline = Instant::now() + Duration::from_secs(60);
    let message = loop {
        let output = sandbox.apijongler().arg("status").output().expect("run status");
        if !output.status.success() {
            break String::from_utf8_lossy(&output.stderr).into_owned();
        }
        assert!(Instant::now() < deadline, "no command failed within 60 s of the log starting again");
    };
    assert!(message.contains("shared-memory index") && message.contains("deleted while"), "{message}");
    assert!(message.contains("nothing is lost") && message.contains("run the command again"), "{message}");
    assert!(!message.contains("damaged") && !message.contains("move it away"), "{message}");

    drop((reader, worker));
    assert_integrity(&sandbox.db);
    let output = sandbox.apijongler().arg("status").output().expect("run status");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}
