//! SQLite's process-wide locks across a `fork()`. When Python forks, a thread of this process may be
//! inside SQLite (an r2d2 worker opening a pooled connection, the heartbeat thread ending a lease): the
//! child would inherit one of SQLite's static mutexes locked by a thread it does not have, and hang at
//! its first allocation or file open (seen: a `multiprocessing` child stuck in `sqlite3Malloc`).
//!
//! So Python's fork hooks (registered by the package's `__init__`) call [`before_fork`], which takes
//! SQLite's static mutexes, in the order SQLite itself nests them, on the forking thread; the fork then
//! happens while no other thread is inside the sections they guard, and [`after_fork`] leaves them in
//! the parent and in the child (the child's copy of the forking thread owns them there). glibc treats
//! malloc's arenas the same way. SQLite never calls back into this code or Python while holding one, so
//! waiting for them cannot deadlock.

use pyo3::prelude::*;
use rusqlite::ffi;

/// Outer locks first: MAIN (initialisation) may allocate and open, a page cache lock (LRU, PMEM) or the
/// unix VFS's inode list (VFS1..3) may allocate, and MEM (allocation statistics) nests inside them all.
const ORDER: [i32; 9] = [
    ffi::SQLITE_MUTEX_STATIC_MAIN,
    ffi::SQLITE_MUTEX_STATIC_OPEN,
    ffi::SQLITE_MUTEX_STATIC_LRU,
    ffi::SQLITE_MUTEX_STATIC_PMEM,
    ffi::SQLITE_MUTEX_STATIC_VFS1,
    ffi::SQLITE_MUTEX_STATIC_VFS2,
    ffi::SQLITE_MUTEX_STATIC_VFS3,
    ffi::SQLITE_MUTEX_STATIC_PRNG,
    ffi::SQLITE_MUTEX_STATIC_MEM,
];

/// Python's `os.register_at_fork(before=...)`: takes SQLite's static mutexes.
#[pyfunction]
pub fn before_fork() {
    // SAFETY: `sqlite3_initialize` is idempotent and thread-safe; a static mutex exists for the process's
    // life once SQLite is initialised, `sqlite3_mutex_alloc` returns the same one every time, and entering
    // a mutex this thread does not hold is what it is for.
    unsafe {
        if ffi::sqlite3_initialize() != ffi::SQLITE_OK {
            return;
        }
        for id in ORDER {
            ffi::sqlite3_mutex_enter(ffi::sqlite3_mutex_alloc(id));
        }
    }
}

/// Python's `os.register_at_fork(after_in_parent=..., after_in_child=...)`: leaves what
/// [`before_fork`] took.
#[pyfunction]
pub fn after_fork() {
    // SAFETY: called only after `before_fork` on the same thread (Python runs the hooks around its fork
    // on the forking thread; in the child that thread's copy holds the mutexes), and static mutexes are
    // plain (not recursive) pthread mutexes, which the holder may leave.
    unsafe {
        if ffi::sqlite3_initialize() != ffi::SQLITE_OK {
            return;
        }
        for id in ORDER.into_iter().rev() {
            ffi::sqlite3_mutex_leave(ffi::sqlite3_mutex_alloc(id));
        }
    }
}
