//! Deciding which locks to free: the holder is provably dead, or its heartbeat is stale.
//!
//! Pure: takes a held key as read from the database and the time, returns the reason to free it (or
//! nothing). A dead holder is freed at once whatever its heartbeat says; a stale heartbeat frees the
//! lock whatever the pid says, because a hung or stopped holder is as useless as a dead one, and its
//! fenced writes will change nothing once the lease is gone.

use std::time::Duration;

use crate::holder::Liveness;
use crate::store::HeldKey;

/// Why the lock on `held` should be freed at `now`, or `None` to leave it.
pub fn verdict(held: &HeldKey, now: i64, stale_after: Duration) -> Option<String> {
    let age_ms = now.saturating_sub(held.heartbeat_at);
    let stale_ms = i64::try_from(stale_after.as_millis()).unwrap_or(i64::MAX);
    if age_ms > stale_ms {
        return Some(format!(
            "reaped: heartbeat of holder pid {} is {:.1} s old (stale after {:.1} s)",
            held.holder.pid,
            age_ms as f64 / 1000.0,
            stale_after.as_secs_f64()
        ));
    }
    match held.holder.liveness() {
        Liveness::Dead(why) => Some(format!("reaped: {why}")),
        Liveness::Alive | Liveness::Unknown => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::holder::Holder;

    fn held(holder: Holder, heartbeat_at: i64) -> HeldKey {
        HeldKey { id: 1, connector: "c".into(), key_name: "k".into(), lease: 7, holder, heartbeat_at }
    }

    #[test]
    fn fresh_live_holder_is_kept() {
        let me = Holder::current().clone();
        assert_eq!(verdict(&held(me, 10_000), 10_500, Duration::from_secs(30)), None);
    }

    #[test]
    fn stale_heartbeat_is_freed_even_if_alive() {
        let me = Holder::current().clone();
        let reason = verdict(&held(me, 0), 31_000, Duration::from_secs(30)).expect("stale");
        assert!(reason.contains("31.0 s old"), "{reason}");
    }

    #[test]
    fn dead_holder_is_freed_with_a_fresh_heartbeat() {
        let gone = Holder { pid: u32::MAX - 1, ..Holder::current().clone() };
        let reason = verdict(&held(gone, 10_000), 10_001, Duration::from_secs(30)).expect("dead");
        assert!(reason.contains("has exited"), "{reason}");
    }

    #[test]
    fn holder_on_another_host_is_judged_by_heartbeat_only() {
        let remote = Holder { host: "elsewhere.invalid".into(), pid: u32::MAX - 1, ..Holder::current().clone() };
        assert_eq!(verdict(&held(remote.clone(), 10_000), 20_000, Duration::from_secs(30)), None);
        assert!(verdict(&held(remote, 10_000), 50_000, Duration::from_secs(30)).is_some());
    }
}
