//! Deciding which locks to free, from what the OS proves about the holder and, only where it proves
//! nothing, from the age of the holder's heartbeat.
//!
//! Pure apart from reading `/proc`: takes a held key as read from the database and the time, returns
//! the event and reason to free it (or nothing).
//! - A dead holder is freed at once, whatever its heartbeat says.
//! - A running holder on this host, boot and pid namespace keeps its key however old its heartbeat is:
//!   the heartbeat may be late because another connection held the write lock, and a stepped wall
//!   clock cannot make it look old because ages are measured on `CLOCK_BOOTTIME`. One exception: a key
//!   held by this very process under a lease it does not hold (a claim that committed while its answer
//!   was lost with the connection, so nothing here renews or ends it) is freed by this process once its
//!   heartbeat is older than `stale_after`, as a stopped holder's is.
//! - A stopped holder is freed once its heartbeat is older than `stale_after`: it may resume any
//!   time, but it will then find its lease untrusted (see `lease`) and claim again before sending.
//! - A holder the OS cannot see (another host, boot or pid namespace) is freed once its heartbeat is
//!   older than `stale_after`. Ages are on the boot clock when the holder ran in this boot; only a
//!   holder of another boot or host is judged on the wall clock (SQLite's file lives on one host, so
//!   that is a holder of a previous boot, long gone).

use std::time::Duration;

use crate::holder::{Holder, Liveness};
use crate::pool::HeldKey;
use crate::pool::HistoryEvent;

/// The time on both clocks, read once per reaping pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Wall clock, unix ms.
    pub wall_ms: i64,
    /// `CLOCK_BOOTTIME`, ms.
    pub boot_ms: i64,
}

/// Why the lock on `held` should be freed at `now` ([`HistoryEvent::ReapedDead`] or
/// [`HistoryEvent::ReapedStale`], and the reason), or `None` to leave it. `lease_is_own`: this process
/// holds the lease `held` names, or is still ending it (only asked of a key this very process holds).
pub fn verdict(
    held: &HeldKey,
    now: Now,
    stale_after: Duration,
    lease_is_own: impl FnOnce() -> bool,
) -> Option<(HistoryEvent, String)> {
    let pid = held.holder.pid;
    let stale = || heartbeat_age(held, now).filter(|age| *age > stale_after);
    match held.holder.liveness() {
        Liveness::Dead(why) => Some((HistoryEvent::ReapedDead, format!("reaped: {why}"))),
        Liveness::Alive if held.holder == *Holder::current() && !lease_is_own() => stale().map(|age| {
            let reason = format!(
                "reaped: held by this process (pid {pid}) under lease {}, which it never received (the claim \
                 committed while its answer was lost with the connection); its heartbeat is {:.1} s old (stale \
                 after {:.1} s)",
                held.lease,
                age.as_secs_f64(),
                stale_after.as_secs_f64()
            );
            (HistoryEvent::ReapedStale, reason)
        }),
        Liveness::Alive => None,
        Liveness::Stopped => stale().map(|age| {
            let reason = format!(
                "reaped: holder pid {pid} is stopped and its last heartbeat is {:.1} s old (stale after {:.1} s)",
                age.as_secs_f64(),
                stale_after.as_secs_f64()
            );
            (HistoryEvent::ReapedStale, reason)
        }),
        Liveness::Unknown => stale().map(|age| {
            let reason = format!(
                "reaped: heartbeat of holder pid {pid} on {} (not visible from this process) is {:.1} s old (stale after {:.1} s)",
                if held.holder.host.is_empty() { "an unknown host" } else { &held.holder.host },
                age.as_secs_f64(),
                stale_after.as_secs_f64()
            );
            (HistoryEvent::ReapedStale, reason)
        }),
    }
}

/// How old the holder's last heartbeat is: on the boot clock when the holder ran in this boot, else on
/// the wall clock. A row with no heartbeat at all is as old as can be.
fn heartbeat_age(held: &HeldKey, now: Now) -> Option<Duration> {
    let same_boot = !held.holder.boot_id.is_empty() && held.holder.boot_id == Holder::current().boot_id;
    let age_ms = match (same_boot, held.heartbeat_boot_ms, held.heartbeat_age_on_server_ms, held.heartbeat_at) {
        (true, Some(boot_ms), ..) => now.boot_ms.saturating_sub(boot_ms),
        (_, _, Some(server_age_ms), _) => server_age_ms,
        (.., Some(wall_ms)) => now.wall_ms.saturating_sub(wall_ms),
        _ => i64::MAX,
    };
    Some(Duration::from_millis(u64::try_from(age_ms).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALE: Duration = Duration::from_secs(30);

    fn held(holder: Holder, heartbeat_boot_ms: i64, heartbeat_at: i64) -> HeldKey {
        HeldKey {
            id: 1,
            connector: "c".into(),
            key_name: "k".into(),
            lease: 7,
            holder,
            heartbeat_at: Some(heartbeat_at),
            heartbeat_boot_ms: Some(heartbeat_boot_ms),
            heartbeat_age_on_server_ms: None,
        }
    }

    fn at(boot_ms: i64, wall_ms: i64) -> Now {
        Now { wall_ms, boot_ms }
    }

    #[test]
    fn a_key_this_process_holds_under_a_lease_it_never_received_is_freed_once_stale() {
        let orphan = held(Holder::current().clone(), 100_000, 100_000);
        assert_eq!(verdict(&orphan, at(130_000, 130_000), STALE, || false), None, "exactly stale_after");
        let (event, reason) = verdict(&orphan, at(130_001, 130_001), STALE, || false).expect("stale");
        assert_eq!(event, HistoryEvent::ReapedStale);
        assert!(reason.contains("never received") && reason.contains("lease 7"), "{reason}");
        assert_eq!(verdict(&orphan, at(130_001, 130_001), STALE, || true), None, "a lease this process holds");
    }

    #[test]
    fn a_running_holder_keeps_its_key_whatever_its_heartbeat_age_or_the_wall_clock() {
        let me = Holder::current().clone();
        assert_eq!(verdict(&held(me.clone(), 10_000, 10_000), at(10_500, 10_500), STALE, || true), None);
        assert_eq!(
            verdict(&held(me.clone(), 0, 0), at(3_600_000, 3_600_000), STALE, || true),
            None,
            "an hour-old heartbeat"
        );
        assert_eq!(verdict(&held(me, 0, 0), at(0, 120_000), STALE, || true), None, "wall clock two minutes ahead");
    }

    #[test]
    fn a_dead_holder_is_freed_with_a_fresh_heartbeat() {
        let gone = Holder { pid: u32::MAX - 1, ..Holder::current().clone() };
        let (event, reason) = verdict(&held(gone, 10_000, 10_000), at(10_001, 10_001), STALE, || true).expect("dead");
        assert_eq!(event, HistoryEvent::ReapedDead);
        assert!(reason.contains("has exited"), "{reason}");
    }

    #[test]
    fn an_invisible_holder_of_this_boot_is_judged_on_the_boot_clock_only() {
        let other_container = Holder { pid_namespace: "1".into(), pid: u32::MAX - 1, ..Holder::current().clone() };
        let fresh = held(other_container, 100_000, 100_000);
        assert_eq!(
            verdict(&fresh, at(110_000, 100_000 + 3_600_000), STALE, || true),
            None,
            "the wall clock stepped an hour"
        );
        assert_eq!(
            verdict(&fresh, at(110_000, 100_000 - 3_600_000), STALE, || true),
            None,
            "the wall clock stepped back"
        );
        let (event, reason) = verdict(&fresh, at(131_000, 100_000), STALE, || true).expect("stale on the boot clock");
        assert_eq!(event, HistoryEvent::ReapedStale);
        assert!(reason.contains("31.0 s old") && reason.contains("not visible"), "{reason}");
        assert_eq!(verdict(&fresh, at(130_000, 100_000), STALE, || true), None, "exactly stale_after is not yet stale");
    }

    #[test]
    fn a_holder_of_another_host_or_boot_is_judged_on_the_wall_clock() {
        let remote =
            Holder { host: "elsewhere.invalid".into(), boot_id: "other-boot".into(), ..Holder::current().clone() };
        assert_eq!(verdict(&held(remote.clone(), 999_999_999, 10_000), at(0, 20_000), STALE, || true), None);
        let (event, _) =
            verdict(&held(remote, 0, 10_000), at(0, 50_000), STALE, || true).expect("stale on the wall clock");
        assert_eq!(event, HistoryEvent::ReapedStale);
    }

    #[test]
    fn a_stopped_holder_is_freed_only_once_its_heartbeat_is_stale() {
        let mut child = std::process::Command::new("sleep").arg("60").spawn().expect("spawn sleep");
        let pid = child.id();
        let process = rustix::process::Pid::from_raw(pid.try_into().expect("pid")).expect("pid");
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let started = stat[stat.rfind(')').expect(")") + 1..].split_whitespace().nth(19).expect("field 22");
        let holder = Holder { pid, started: started.parse().expect("number"), ..Holder::current().clone() };
        rustix::process::kill_process(process, rustix::process::Signal::STOP).expect("SIGSTOP");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while holder.liveness() != Liveness::Stopped {
            assert!(std::time::Instant::now() < deadline, "the stop never showed in /proc");
            std::thread::yield_now();
        }
        let key = held(holder, 100_000, 100_000);
        assert_eq!(verdict(&key, at(129_000, 100_000), STALE, || true), None, "stopped, but its heartbeat is fresh");
        let (event, reason) = verdict(&key, at(131_000, 100_000), STALE, || true).expect("stopped and stale");
        assert_eq!(event, HistoryEvent::ReapedStale);
        assert!(reason.contains("is stopped"), "{reason}");
        child.kill().expect("kill");
        child.wait().expect("reap");
    }
}
