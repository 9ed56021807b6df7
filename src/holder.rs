//! Who holds a key, and whether that holder is provably dead.
//!
//! A pid alone proves nothing (pids are reused), so a holder is host + boot id + pid + process start
//! time. A holder on this host and boot whose pid is gone, is a zombie, or has another start time is
//! dead for certain and its locks can be freed at once. Anything else (another host, another boot, an
//! unreadable /proc) is "unknown": only the heartbeat age can free such a lock.

use std::fs;
use std::io;
use std::sync::OnceLock;

/// The identity of a process holding keys, as recorded in a key's row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holder {
    /// Host name.
    pub host: String,
    /// `/proc/sys/kernel/random/boot_id`; empty where the system has none.
    pub boot_id: String,
    /// Process id.
    pub pid: u32,
    /// Process start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`); 0 if unknown.
    pub started: i64,
}

/// What can be said about a recorded holder from this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// The holder is running.
    Alive,
    /// The holder is provably gone; the text says how we know.
    Dead(String),
    /// Nothing can be proven (another host or boot, or no /proc): trust only the heartbeat.
    Unknown,
}

impl Holder {
    /// This process.
    pub fn current() -> &'static Holder {
        static CURRENT: OnceLock<Holder> = OnceLock::new();
        CURRENT.get_or_init(|| {
            let pid = std::process::id();
            Holder {
                host: rustix::system::uname().nodename().to_string_lossy().into_owned(),
                boot_id: boot_id(),
                pid,
                started: read_stat(pid).ok().flatten().map_or(0, |stat| stat.started),
            }
        })
    }

    /// Whether `self` (a holder recorded in the database) is still running, judged from this process.
    pub fn liveness(&self) -> Liveness {
        let me = Holder::current();
        if self.host != me.host || self.boot_id.is_empty() || self.boot_id != me.boot_id {
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
            Ok(None) => Liveness::Dead(format!("holder pid {} has exited", self.pid)),
            Ok(Some(stat)) if matches!(stat.state, 'Z' | 'X') => {
                Liveness::Dead(format!("holder pid {} is a zombie", self.pid))
            }
            Ok(Some(stat)) if self.started != 0 && stat.started != self.started => Liveness::Dead(format!(
                "holder pid {} was reused by another process (start time {} instead of {})",
                self.pid, stat.started, self.started
            )),
            Ok(Some(_)) => Liveness::Alive,
            Err(_) => Liveness::Unknown,
        }
    }
}

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|id| id.trim().to_owned()).unwrap_or_default()
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
    }
}
