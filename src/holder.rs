//! Who holds a key, and what the OS can prove about that holder.
//!
//! A pid alone proves nothing (pids are reused), so a holder is host + boot id + pid namespace + pid +
//! process start time. A holder the OS of this process can see (same host, boot and pid namespace) is
//! judged by the OS alone, never by its heartbeat's age, because a heartbeat can be late for reasons
//! that are not the holder's (another connection held the write lock; a wall clock stepped):
//! - its pid is gone, a zombie, or has another start time: dead, its locks are freed at once;
//! - it is stopped (`T`/`t` in `/proc/PID/stat`: SIGSTOP, a debugger): it may resume any time, so it
//!   is freed once its heartbeat is older than the stale threshold;
//! - anything else is alive and keeps its keys however old its heartbeat is.
//!
//! [`Holder::current`] is this process's identity, read once per process: a child forked after the
//! parent asked gets its own, never the parent's pid.
//!
//! A holder the OS cannot see (another host, boot or pid namespace; an unreadable /proc) is "unknown":
//! only its heartbeat's age can free its locks.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

/// The identity of a process holding keys, as recorded in a key's row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holder {
    /// Host name.
    pub host: String,
    /// `/proc/sys/kernel/random/boot_id`; empty where the system has none.
    pub boot_id: String,
    /// The pid namespace (the inode of `/proc/self/ns/pid`), so that a process in another container
    /// never judges a pid it cannot see; empty where unknown.
    pub pid_namespace: String,
    /// Process id.
    pub pid: u32,
    /// Process start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`); 0 if unknown.
    pub started: i64,
}

/// What can be said about a recorded holder from this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// The holder is running: it keeps its keys whatever its heartbeat's age.
    Alive,
    /// The holder is stopped (SIGSTOP, a debugger): free its keys once its heartbeat is stale.
    Stopped,
    /// The holder is provably gone; the text says how we know.
    Dead(String),
    /// Nothing can be proven (another host, boot or pid namespace, or no /proc): trust only the heartbeat.
    Unknown,
}

impl Holder {
    /// This process. Read once per process: a child forked after the parent asked gets its own
    /// identity, never the parent's (the cached pid is compared with `getpid()` on every call).
    pub fn current() -> &'static Holder {
        &Identity::current().holder
    }

    /// Whether `self` (a holder recorded in the database) is still running, judged from this process.
    pub fn liveness(&self) -> Liveness {
        let me = Holder::current();
        let visible = self.host == me.host
            && !self.boot_id.is_empty()
            && self.boot_id == me.boot_id
            && !self.pid_namespace.is_empty()
            && self.pid_namespace == me.pid_namespace;
        if !visible {
            return Liveness::Unknown;
        }
        if self.pid == me.pid {
            return if self.started == me.started {
                Liveness::Alive
            } else {
                Liveness::Dead(format!("pid {} is now this process, started later", self.pid))
            };
        }
        match read_stat(self.pid) {
            // /proc may hide other users' processes (hidepid): ask the kernel before calling it dead.
            Ok(None) if !exists(self.pid) => Liveness::Dead(format!("holder pid {} has exited", self.pid)),
            Ok(None) => Liveness::Unknown,
            Ok(Some(stat)) if matches!(stat.state, 'Z' | 'X') => {
                Liveness::Dead(format!("holder pid {} is a zombie", self.pid))
            }
            Ok(Some(stat)) if self.started != 0 && stat.started != self.started => Liveness::Dead(format!(
                "holder pid {} was reused by another process (start time {} instead of {})",
                self.pid, stat.started, self.started
            )),
            Ok(Some(stat)) if matches!(stat.state, 'T' | 't') => Liveness::Stopped,
            Ok(Some(_)) => Liveness::Alive,
            Err(_) => Liveness::Unknown,
        }
    }
}

/// The identities of this process and of the ancestors it was forked from (those that asked for
/// theirs), oldest first: the current process's is always the last, since a process only ever adds its
/// own. Each is leaked once per process; a chain is as long as a process's fork ancestry.
static IDENTITIES: OnceLock<&'static Identity> = OnceLock::new();

/// One link of [`IDENTITIES`].
#[derive(Debug)]
struct Identity {
    holder: Holder,
    /// The leases this process holds or is still ending (see [`own_leases`]).
    leases: Mutex<HashMap<(i64, i64), usize>>,
    next: OnceLock<&'static Identity>,
}

/// The leases this very process holds or has not finished ending, by `(key id, lease token)`, with how
/// many of its coordinators hold each pair (see `lease`). Kept per process, beside its identity: a child
/// forked while a parent's thread held the parent's lock never waits for it.
pub(crate) fn own_leases() -> MutexGuard<'static, HashMap<(i64, i64), usize>> {
    Identity::current().leases.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Identity {
    /// This process's link, added after its parent's when it is a forked child.
    fn current() -> &'static Identity {
        let pid = std::process::id();
        let mut last = IDENTITIES.get_or_init(|| Identity::of(pid));
        while let Some(next) = last.next.get() {
            last = next;
        }
        if last.holder.pid == pid {
            return last;
        }
        // A forked child: its identity goes after its parent's (or its nearest ancestor's that asked),
        // which stays in place for the threads that read it, so nothing is ever freed or locked.
        last.next.get_or_init(|| Identity::of(pid))
    }

    fn of(pid: u32) -> &'static Identity {
        let holder = Holder {
            host: rustix::system::uname().nodename().to_string_lossy().into_owned(),
            boot_id: boot_id(),
            pid_namespace: pid_namespace(),
            pid,
            started: read_stat(pid).ok().flatten().map_or(0, |stat| stat.started),
        };
        Box::leak(Box::new(Identity { holder, leases: Mutex::default(), next: OnceLock::new() }))
    }
}

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|id| id.trim().to_owned()).unwrap_or_default()
}

/// The inode of this process's pid namespace, as text; empty where /proc does not say, or where the
/// /proc mounted here belongs to another pid namespace (its pids are not ours to judge).
fn pid_namespace() -> String {
    use std::os::unix::fs::MetadataExt;
    let own_proc = fs::read_link("/proc/self")
        .ok()
        .and_then(|target| target.to_str().and_then(|pid| pid.parse::<u32>().ok()))
        .is_some_and(|pid| pid == std::process::id());
    if !own_proc {
        return String::new();
    }
    fs::metadata("/proc/self/ns/pid").map(|meta| meta.ino().to_string()).unwrap_or_default()
}

/// Whether a process with this pid exists, by the kernel's answer to signal 0 (EPERM: it does).
fn exists(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) else { return false };
    !matches!(rustix::process::test_kill_process(pid), Err(rustix::io::Errno::SRCH))
}

/// The two fields of `/proc/<pid>/stat` that matter here.
#[derive(Debug)]
struct Stat {
    state: char,
    started: i64,
}

/// `Ok(None)` when the process does not exist.
fn read_stat(pid: u32) -> io::Result<Option<Stat>> {
    let text = match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    Ok(Some(parse_stat(&text).ok_or_else(|| io::Error::other("malformed /proc stat"))?))
}

/// The command name (field 2) may contain spaces and parentheses, so fields are counted from the last
/// `)`: what follows it is field 3 (state) onwards, which puts the start time (field 22) at index 19.
fn parse_stat(text: &str) -> Option<Stat> {
    let after_name = &text[text.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let started = fields.nth(18)?.parse().ok()?;
    Some(Stat { state, started })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_a_hostile_command_name() {
        let text = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        let stat = parse_stat(text).expect("parses");
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.started, 987_654);
    }

    #[test]
    fn this_process_is_alive_and_identified() {
        let me = Holder::current();
        assert_eq!(me.pid, std::process::id());
        assert!(me.started > 0, "start time read from /proc");
        assert!(!me.boot_id.is_empty());
        assert!(!me.pid_namespace.is_empty());
        assert_eq!(me.liveness(), Liveness::Alive);
    }

    #[test]
    fn another_start_time_or_a_missing_pid_is_dead() {
        let me = Holder::current();
        let reused = Holder { pid: 1, started: 1, ..me.clone() };
        assert!(matches!(reused.liveness(), Liveness::Dead(_) | Liveness::Unknown));
        let gone = Holder { pid: u32::MAX - 1, ..me.clone() };
        assert!(matches!(gone.liveness(), Liveness::Dead(_)));
        let elsewhere = Holder { host: format!("{}-other", me.host), ..me.clone() };
        assert_eq!(elsewhere.liveness(), Liveness::Unknown);
        let other_container = Holder { pid_namespace: "1".into(), pid: u32::MAX - 1, ..me.clone() };
        assert_eq!(other_container.liveness(), Liveness::Unknown, "a pid of another namespace is not ours to judge");
    }

    #[test]
    fn a_stopped_process_is_seen_as_stopped_and_a_continued_one_as_alive() {
        let mut child = std::process::Command::new("sleep").arg("60").spawn().expect("spawn sleep");
        let pid = child.id();
        let holder = Holder {
            pid,
            started: read_stat(pid).expect("stat").expect("exists").started,
            ..Holder::current().clone()
        };
        assert_eq!(holder.liveness(), Liveness::Alive);
        let process = rustix::process::Pid::from_raw(pid.try_into().expect("pid")).expect("pid");
        rustix::process::kill_process(process, rustix::process::Signal::STOP).expect("SIGSTOP");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while holder.liveness() != Liveness::Stopped {
            assert!(std::time::Instant::now() < deadline, "the stop never showed in /proc");
            std::thread::yield_now();
        }
        rustix::process::kill_process(process, rustix::process::Signal::CONT).expect("SIGCONT");
        while holder.liveness() != Liveness::Alive {
            assert!(std::time::Instant::now() < deadline, "the continue never showed in /proc");
            std::thread::yield_now();
        }
        child.kill().expect("kill");
        child.wait().expect("reap");
        assert!(matches!(holder.liveness(), Liveness::Dead(_)));
    }
}
