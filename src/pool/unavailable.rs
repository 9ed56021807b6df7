//! Why no key could be claimed: the counts read when a caller gave up, and the message that tells
//! the user what to do about it.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::Availability;

/// Why no key could be claimed: the counts, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    /// The counts read when giving up.
    pub availability: Availability,
    /// How long the caller waited.
    pub waited: Duration,
    /// When, unix ms.
    pub at: i64,
    /// The keys this host passed over on a store several hosts share (counted in the availability's
    /// `tried`): the pool's secret for them is not its keyring's. `None`: none.
    pub passed_over: Option<PassedOver>,
}

/// Keys of a store several hosts share that this host does not use: the pool holds a secret for each
/// that its keyring does not have (another host's keyring synced it), and sending another secret, or
/// none, would only put a good key in error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassedOver {
    /// This host's keyring.
    pub keyring: PathBuf,
    /// The keys, by name.
    pub keys: Vec<ForeignKey>,
}

/// A key whose secret in the pool is not this host's (by fingerprint; never a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignKey {
    /// The key's name.
    pub key: String,
    /// The fingerprint of the secret the pool holds.
    pub pool_fingerprint: String,
    /// The fingerprint of this host's keyring's secret under that name; `None`: it has none.
    pub keyring_fingerprint: Option<String>,
}

impl fmt::Display for ForeignKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.keyring_fingerprint {
            Some(here) => write!(f, "'{}' (pool {}, this keyring {here})", self.key, self.pool_fingerprint),
            None => write!(f, "'{}' (pool {}, not in this keyring)", self.key, self.pool_fingerprint),
        }
    }
}

impl fmt::Display for PassedOver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<String> = self.keys.iter().map(ToString::to_string).collect();
        write!(
            f,
            "this host passes over {} key(s) whose secret in the shared pool is not the one in its keyring {}: {}. \
             Run `apijongler sync --as-truth` with the keyring that is right (or fix this one)",
            self.keys.len(),
            self.keyring.display(),
            keys.join(", ")
        )
    }
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = &self.availability;
        if a.total() == 0 && a.retired > 0 {
            let how = match (&a.last_retired_reason, a.last_retired_at) {
                (Some(reason), Some(at)) => format!(" ({reason} at {})", format_time(at)),
                (None, Some(at)) => format!(" (at {})", format_time(at)),
                _ => String::new(),
            };
            return write!(
                f,
                "all {} keys of '{}' were retired{how}: a keyring whose [{}] section lacks them synced this \
                 database. Put them back in that keyring, or give each keyring its own database (APIJONGLER_DB)",
                a.retired, a.connector, a.connector
            );
        }
        if let Some(passed) = self.passed_over.as_ref().filter(|passed| passed.keys.len() >= a.total() as usize) {
            return write!(f, "no key of '{}' can be used from this host: {passed}", a.connector);
        }
        if a.total() == 0 {
            return write!(
                f,
                "connector '{}' has no keys in the database: add a [{}] section with keys to the keyring",
                a.connector, a.connector
            );
        }
        if let (Some(model), true) = (&a.model, a.model_lockdown > 0) {
            write!(
                f,
                "0 of {} keys of '{}' free for {model} after waiting {:.1} s: {} locked down for it",
                a.total(),
                a.connector,
                self.waited.as_secs_f64(),
                a.model_lockdown
            )?;
            if let Some(end) = a.earliest_model_lockdown_end {
                write!(f, " until {} (in {}", format_time(end), format_delay(end - self.at))?;
                match a.model_lockdown_quota.as_deref().map(quota_kind) {
                    Some(kind) => write!(f, ", {kind})")?,
                    None => write!(f, ")")?,
                }
            }
            write!(f, ", {} locked, {} in lockdown for every model", a.locked, a.lockdown)?;
        } else {
            write!(
                f,
                "no key of '{}' is free after waiting {:.1} s: {} locked, {} in lockdown",
                a.connector,
                self.waited.as_secs_f64(),
                a.locked,
                a.lockdown
            )?;
        }
        if let Some(end) = a.earliest_lockdown_end.filter(|_| a.lockdown > 0) {
            write!(f, " (the earliest key comes back at {}, in {})", format_time(end), format_delay(end - self.at))?;
        }
        write!(f, ", {} in error", a.error)?;
        if a.tried > 0 {
            write!(f, ", {} already tried by this request", a.tried)?;
        }
        if let Some(passed) = &self.passed_over {
            write!(f, "; {passed}")?;
        }
        let wait = if a.may_free_up() { ", or wait longer" } else { "" };
        write!(
            f,
            ". Add keys to the keyring, run `apijongler cleanup {}` to clear lockdowns and errors{wait}",
            a.connector
        )
    }
}

/// A unix-ms time as RFC 3339 UTC, to the second.
fn format_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map_or_else(|| ms.to_string(), |time| time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// A quota id in words: `GenerateRequestsPerDayPerProjectPerModel-FreeTier` is a daily quota.
fn quota_kind(quota: &str) -> String {
    if super::learned::is_daily_quota(quota) {
        format!("daily quota {quota}")
    } else if quota.contains("PerMinute") {
        format!("per-minute quota {quota}")
    } else {
        quota.to_owned()
    }
}

fn format_delay(ms: i64) -> String {
    let seconds = ms.max(0) as f64 / 1000.0;
    if seconds < 120.0 { format!("{seconds:.1} s") } else { format!("{:.0} min", seconds / 60.0) }
}
