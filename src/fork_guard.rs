//! SQLite's locks across a `fork()`. When a process forks, another of its threads may be inside SQLite:
//! the checkpointer (every 50 ms after a write), the heartbeat renewing leases, an r2d2 worker opening a
//! pooled connection. The child would inherit a lock held by a thread it does not have, and hang at its
//! first allocation, file open or read of the database: a child that opens its own coordinator, as it
//! should, would never get to claim (seen: `tests/fork.rs`'s child stuck in one CI run; with the parent's
//! checkpointer working at each fork, most runs had a child stuck, in `unixOpenSharedMemory`).
//!
//! So the first SQLite store opened registers fork handlers (`pthread_atfork`, which `fork()` runs,
//! Python's `os.fork` included). Before the fork, the forking thread
//! 1. waits for the checkpointer to be out of SQLite ([`hold_off_forks`]): a database file's own locks
//!    (its inode's lock and shared-memory mutexes, where a child was seen stuck) have no process-wide
//!    handle to take instead. The checkpointer never waits for a lock (its connection has no busy
//!    timeout) nor for the fork (it skips a round), and a fork waits for it at most 1 s;
//! 2. takes SQLite's static mutexes, in the order SQLite itself nests them, for any other thread.
//!
//! The fork then happens while none of them is held by another thread, and after it the parent and the
//! child (whose copy of the forking thread holds them) leave them. glibc treats malloc's arenas the same
//! way. SQLite never calls back into this code while holding one, so waiting for them cannot deadlock.
//! `posix_spawn` (what `std::process::Command` uses where it can) runs no handlers.
//!
//! Not covered:
//! - a file's lock held at the fork by another thread inside SQLite (a heartbeat, every 5 s while keys
//!   are held, or a claim on another of the caller's threads). Holding forks off for them would make a
//!   fork wait on their lock waits, and on their logging, which in Python needs the GIL the forking thread
//!   holds;
//! - `parking_lot` (r2d2's locks): its process-wide table still lists the parent's parked pool threads,
//!   and glibc gives their stacks, where that table points, to the child's new threads. A child's new
//!   pool then hangs or crashes now and then (about one fork in a hundred, in a stress loop that forks
//!   right after each write); `parking_lot` has no hook to reset the table.
#![allow(unsafe_code)]

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rusqlite::ffi;

/// Outer locks first, as SQLite nests them: OPEN (a shared-cache open) may reach MAIN; the unix VFS's
/// inode list and temporary directory (VFS1..3) may draw random names (PRNG), whose seeding finds the
/// default VFS under MAIN; MAIN (initialisation) may allocate and open; a page cache lock (LRU, PMEM)
/// may allocate; MEM (allocation statistics) nests inside them all.
const ORDER: [i32; 9] = [
    ffi::SQLITE_MUTEX_STATIC_OPEN,
    ffi::SQLITE_MUTEX_STATIC_VFS1,
    ffi::SQLITE_MUTEX_STATIC_VFS2,
    ffi::SQLITE_MUTEX_STATIC_VFS3,
    ffi::SQLITE_MUTEX_STATIC_PRNG,
    ffi::SQLITE_MUTEX_STATIC_MAIN,
    ffi::SQLITE_MUTEX_STATIC_LRU,
    ffi::SQLITE_MUTEX_STATIC_PMEM,
    ffi::SQLITE_MUTEX_STATIC_MEM,
];

/// Forks under way (between their two handlers).
static FORKS: AtomicUsize = AtomicUsize::new(0);

/// Library threads inside SQLite for work of their own ([`hold_off_forks`]).
static AT_WORK: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Whether this thread, forking, took SQLite's static mutexes (in the child: its copy did).
    static HELD: Cell<bool> = const { Cell::new(false) };
}

/// How long the forking thread sleeps between two looks at the checkpointer.
const FORK_POLL: Duration = Duration::from_micros(200);

/// How long a fork waits for the checkpointer at most (a checkpoint stuck on a stalled disk): then it
/// forks without waiting, as it would with no handlers.
const FORK_WAIT: Duration = Duration::from_secs(1);

/// Registers the handlers, once per process; a failure to register is logged (forks then stay the gamble
/// they are in any process with threads).
pub(crate) fn guard_forks() {
    // Not a `Once`: a child forked while another thread registers would inherit it running, and wait
    // for it forever. At worst, here, such a child has no handlers.
    static REGISTERED: AtomicBool = AtomicBool::new(false);
    if REGISTERED.swap(true, Ordering::SeqCst) {
        return;
    }
    // SAFETY: the handlers are plain `extern "C"` functions of this library, which stays loaded for the
    // process's life (a Python extension module is never unloaded).
    let code =
        unsafe { libc::pthread_atfork(Some(before_fork), Some(after_fork_in_parent), Some(after_fork_in_child)) };
    if code != 0 {
        tracing::warn!(code, "no fork handlers: a child forked while a thread is inside SQLite may hang");
    }
}

/// Lets a library thread into SQLite for work of its own that never waits for a lock and logs nothing;
/// a fork waits until the hold is dropped. `None` while a fork is under way: skip the work for now.
/// Never fork while holding one: the fork would wait for itself until [`FORK_WAIT`].
pub(crate) fn hold_off_forks() -> Option<ForkHold> {
    // Sequentially consistent on both sides: of a fork that counts itself and then looks at the work,
    // and work that counts itself and then looks for forks, at least one sees the other.
    if FORKS.load(Ordering::SeqCst) > 0 {
        return None;
    }
    AT_WORK.fetch_add(1, Ordering::SeqCst);
    let hold = ForkHold;
    (FORKS.load(Ordering::SeqCst) == 0).then_some(hold)
}

/// A library thread's work in SQLite, which a fork waits for ([`hold_off_forks`]).
pub(crate) struct ForkHold;

impl Drop for ForkHold {
    fn drop(&mut self) {
        AT_WORK.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Waits for the library's threads to leave SQLite, then takes SQLite's static mutexes.
extern "C" fn before_fork() {
    FORKS.fetch_add(1, Ordering::SeqCst);
    let waited = Instant::now();
    while AT_WORK.load(Ordering::SeqCst) > 0 && waited.elapsed() < FORK_WAIT {
        std::thread::sleep(FORK_POLL);
    }
    // SAFETY: `sqlite3_initialize` is idempotent and thread-safe; a static mutex exists for the process's
    // life once SQLite is initialised, and `sqlite3_mutex_alloc` returns the same one every time. This
    // thread holds none of them: it is forking, not inside SQLite (which never calls out while holding
    // one), and they are entered in the order SQLite nests them, so no thread holds one and waits for
    // another taken here.
    unsafe {
        if ffi::sqlite3_initialize() != ffi::SQLITE_OK {
            return;
        }
        for id in ORDER {
            ffi::sqlite3_mutex_enter(ffi::sqlite3_mutex_alloc(id));
        }
    }
    HELD.set(true);
}

/// Leaves what [`before_fork`] took, in the parent.
extern "C" fn after_fork_in_parent() {
    leave_sqlite();
    FORKS.fetch_sub(1, Ordering::SeqCst);
}

/// Leaves what [`before_fork`] took, in the child, where no other thread is at work or forking.
extern "C" fn after_fork_in_child() {
    leave_sqlite();
    FORKS.store(0, Ordering::SeqCst);
    AT_WORK.store(0, Ordering::SeqCst);
}

/// Leaves SQLite's static mutexes if [`before_fork`] took them.
fn leave_sqlite() {
    if HELD.replace(false) {
        // SAFETY: `fork()` runs this only after `before_fork` on the same thread (in the child, that
        // thread's copy holds the mutexes), which took them; static mutexes are plain (not recursive)
        // pthread mutexes, which the holder may leave.
        unsafe {
            for id in ORDER.into_iter().rev() {
                ffi::sqlite3_mutex_leave(ffi::sqlite3_mutex_alloc(id));
            }
        }
    }
}
