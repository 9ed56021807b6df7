//! The database's `-shm` file deleted while processes use it: commands say what happened and that
//! nothing is lost, not that the file is damaged.

mod common;

use common::{Sandbox, SqliteShell, assert_integrity};

/// Item 15: a process writes the database while its `-shm` is deleted; a user's `sqlite3` opened
/// after that builds a new index beside the writer's, and once the writer has started its log again
/// the commands that use the new index read other pages than they ask for: SQLite reports the file
/// as malformed. The message must say the shared-memory index was deleted while in use and that
/// nothing is lost; and the file is sound.
///
/// The writer is this process (one connection, open throughout, on the deleted index), so every
/// step happens in a known order: the keys' pages in the log, the deletion, the new index that
/// points at them, then the log started again over them with other pages.
#[test]
fn deleted_shm_under_a_writer_says_nothing_is_lost() {
    let sandbox = Sandbox::new("c", 4);
    drop(sandbox.coordinator(sandbox.options()));
    let writer = rusqlite::Connection::open(&sandbox.db).expect("open the writer");
    writer.pragma_update(None, "wal_autocheckpoint", 0).expect("no automatic checkpoints");
    writer
        .execute_batch(
            "CREATE TABLE IF NOT EXISTS filler (bytes BLOB);
             PRAGMA wal_checkpoint(TRUNCATE);
             UPDATE keys SET uses = uses + 1;",
        )
        .expect("write the keys' pages into an empty log");
    let shm = sandbox.db.with_file_name("apijongler.db-shm");
    std::fs::remove_file(&shm).expect("delete the -shm file");

    // A user's `sqlite3` opens now: it builds a new index (a new -shm) from the log, in which the
    // keys' pages are the log's first frames, and keeps it while it stays open.
    let shell = SqliteShell::read(&sandbox);
    assert!(shm.exists(), "sqlite3 made a new index");
    // The writer copies the log into the database and starts it again: its first frames now hold
    // other pages (random bytes), which the new index still takes for the keys' pages.
    writer
        .execute_batch("PRAGMA wal_checkpoint(RESTART); INSERT INTO filler VALUES (randomblob(1000000));")
        .expect("start the log again over the keys' frames");

    let output = sandbox.apijongler().arg("status").output().expect("run status");
    assert!(!output.status.success(), "status read through a stale index and succeeded");
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("shared-memory index") && message.contains("deleted while"), "{message}");
    assert!(message.contains("nothing is lost") && message.contains("run the command again"), "{message}");
    assert!(!message.contains("damaged") && !message.contains("move it away"), "{message}");

    // The shell quits while the writer is open (so it does not checkpoint through its stale index);
    // the writer, last to close, copies its log into the database with its own, right index.
    shell.quit();
    drop(writer);
    assert_integrity(&sandbox.db);
    let output = sandbox.apijongler().arg("status").output().expect("run status");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}
