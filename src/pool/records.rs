//! The records the store takes and gives: plain Rust types, no SQL in sight, so that every backend
//! produces the same.

use super::outcome::Outcome;
use super::{HistoryEvent, KeyState, ModelScope, Scope};
use std::path::Path;

use crate::holder::Holder;

/// A key as the keyring describes it, for a keyring sync.
#[derive(Debug, Clone, Copy)]
pub struct KeySpec<'a> {
    /// Connector (INI section).
    pub connector: &'a str,
    /// Key name (INI option).
    pub name: &'a str,
    /// Fingerprint of the secret.
    pub fingerprint: &'a str,
}

/// A keyring, as a sync reads it.
#[derive(Debug, Clone, Copy)]
pub struct SyncSource<'a> {
    /// The keyring file, named in the history rows of the keys it retires or restores.
    pub path: &'a Path,
    /// The connectors the keyring has a section for, even an empty one: only their keys are synced.
    /// A connector of one of `keys` counts as defined even if missing here.
    pub connectors: &'a [&'a str],
    /// Every key of those connectors.
    pub keys: &'a [KeySpec<'a>],
    /// `(connector, key name, quota group)` of the keys of `keys` that the keyring puts in a quota group;
    /// any other key is a group of its own.
    pub groups: &'a [(&'a str, &'a str, &'a str)],
    /// Whether the keyring is the truth for its connectors: keys it lacks are retired and secrets that
    /// differ are replaced. A store of one host (SQLite) always syncs so; a store several hosts share
    /// (PostgreSQL) only when asked (`apijongler sync --as-truth`), else it adds, restores and regroups.
    pub as_truth: bool,
}

impl SyncSource<'_> {
    /// The connectors this sync may touch: those with a section, and those of its keys.
    pub fn defined_connectors(&self) -> std::collections::BTreeSet<&str> {
        self.connectors.iter().copied().chain(self.keys.iter().map(|key| key.connector)).collect()
    }

    /// The quota group of each key in a group, by (connector, key name).
    pub fn groups_by_key(&self) -> std::collections::HashMap<(&str, &str), &str> {
        self.groups.iter().map(|&(connector, name, group)| ((connector, name), group)).collect()
    }
}

/// What a keyring sync changed, as `(connector, key name)` pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Keys new to the database, inserted vacant.
    pub added: Vec<(String, String)>,
    /// Keys whose secret changed (an error or lockdown of the old secret, and the lockdowns of that key
    /// alone, were lifted), or whose quota group alone changed.
    pub changed: Vec<(String, String)>,
    /// Keys that left the keyring: never claimed again.
    pub retired: Vec<(String, String)>,
    /// Retired keys that came back to the keyring.
    pub restored: Vec<(String, String)>,
    /// Keys whose secret in this keyring differs from the one a shared store (PostgreSQL) holds,
    /// synced first by another host's keyring: left as they are (see `crate::store`'s PostgreSQL sync),
    /// unless the sync applies the keyring as the truth ([`SyncSource::as_truth`]).
    pub differing: Vec<(String, String)>,
    /// The history rows written.
    pub transitions: Vec<Transition>,
}

impl SyncReport {
    /// True when the sync changed nothing.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.retired.is_empty() && self.restored.is_empty()
    }
}

/// A key just claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// Row id.
    pub id: i64,
    /// Key name.
    pub key_name: String,
    /// Fingerprint of the secret the row was synced with.
    pub fingerprint: String,
    /// The lease token: every later write must name it.
    pub lease: i64,
    /// The key's consecutive lockdowns for the requested model so far (for escalating default lockdowns).
    pub lockdown_count: i64,
    /// The boot-clock time (`CLOCK_BOOTTIME` ms) written as the lease's first heartbeat.
    pub boot_ms: i64,
    /// The key's quota scope when it was claimed (`group:NAME`, `project:NUMBER` or `key:NAME`).
    pub scope: String,
}

/// One upstream attempt, for the `requests` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// When it started, unix ms.
    pub at: i64,
    /// Connector.
    pub connector: String,
    /// The key used, if the connector needs one.
    pub key_name: Option<String>,
    /// HTTP method.
    pub method: String,
    /// The endpoint path, without its query string.
    pub endpoint: String,
    /// The answer's status; `None` when no answer came.
    pub status: Option<u16>,
    /// How long it took, ms.
    pub latency_ms: i64,
    /// What the attempt came to (success, rate limited, bad key, ...).
    pub outcome: Outcome,
    /// The model the request named, if any.
    pub model: Option<String>,
    /// The input tokens the answer said the request used (`usageMetadata.promptTokenCount`,
    /// `usage.prompt_tokens`), if it said.
    pub prompt_tokens: Option<u64>,
}

/// A held key, as the reaper sees it.
#[derive(Debug, Clone)]
pub struct HeldKey {
    /// Row id.
    pub id: i64,
    /// Connector.
    pub connector: String,
    /// Key name.
    pub key_name: String,
    /// The current lease token.
    pub lease: i64,
    /// The recorded holder.
    pub holder: Holder,
    /// Last heartbeat, wall-clock unix ms.
    pub heartbeat_at: Option<i64>,
    /// Last heartbeat on the holder's boot clock (`CLOCK_BOOTTIME` ms), comparable with this
    /// process's when both run in one boot.
    pub heartbeat_boot_ms: Option<i64>,
    /// The last heartbeat's age on the database server's clock, where the store has a server
    /// (PostgreSQL): how a holder on another host is judged, whatever either host's wall clock says.
    pub heartbeat_age_on_server_ms: Option<i64>,
}

/// A lock to free, and why.
#[derive(Debug, Clone)]
pub struct Eviction {
    /// Row id.
    pub id: i64,
    /// The lease being ended; if the key was re-leased meanwhile, nothing happens.
    pub lease: i64,
    /// The heartbeat the decision was based on; if another landed meanwhile, nothing happens.
    pub heartbeat_at: Option<i64>,
    /// The same, on the boot clock.
    pub heartbeat_boot_ms: Option<i64>,
    /// Which eviction: a dead holder, a stale heartbeat, or `cleanup --force`.
    pub event: HistoryEvent,
    /// Why, for the history.
    pub reason: String,
}

/// How many keys of a connector are in each situation, read without taking the write lock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Availability {
    /// The connector.
    pub connector: String,
    /// Keys that could be claimed now (vacant, or lockdown past its deadline), not counting tried ones.
    pub claimable: u32,
    /// Keys held by some process.
    pub locked: u32,
    /// Keys in lockdown (for every model) whose deadline is ahead.
    pub lockdown: u32,
    /// The model asked for, if any.
    pub model: Option<String>,
    /// Keys otherwise free whose quota scope is locked down for that model.
    pub model_lockdown: u32,
    /// The earliest deadline among the lockdowns for that model that keep a key from being claimed.
    pub earliest_model_lockdown_end: Option<i64>,
    /// The quota behind that earliest lockdown for the model (e.g. a daily quota), if named.
    pub model_lockdown_quota: Option<String>,
    /// Keys in error.
    pub error: u32,
    /// Keys otherwise claimable that the caller said it already tried.
    pub tried: u32,
    /// The earliest moment a key that is not held or in error becomes claimable again (the end of its
    /// lockdowns, for every model or for the one asked for), unix ms.
    pub earliest_lockdown_end: Option<i64>,
    /// Keys that left the keyring (never claimed; not counted in [`total`](Self::total)).
    pub retired: u32,
    /// When the most recent of them was retired, unix ms.
    pub last_retired_at: Option<i64>,
    /// Why (e.g. `removed from the keyring /path/keys.ini`); read only when no key is left.
    pub last_retired_reason: Option<String>,
}

impl Availability {
    /// All configured (not retired) keys of the connector.
    pub fn total(&self) -> u32 {
        self.claimable + self.locked + self.lockdown + self.model_lockdown + self.error + self.tried
    }

    /// Whether waiting could help: some key is held or in lockdown, so it may come back.
    pub fn may_free_up(&self) -> bool {
        self.locked > 0 || self.lockdown > 0 || self.model_lockdown > 0
    }
}

/// Everything the database knows about one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Connector.
    pub connector: String,
    /// Key name.
    pub key_name: String,
    /// Fingerprint of the secret.
    pub fingerprint: String,
    /// State as stored.
    pub state: KeyState,
    /// When the key left the keyring, unix ms.
    pub retired_at: Option<i64>,
    /// Current lease token.
    pub lease: i64,
    /// The holder, while locked.
    pub holder: Option<Holder>,
    /// When the current holder claimed it, unix ms.
    pub locked_at: Option<i64>,
    /// The holder's last heartbeat, unix ms.
    pub heartbeat_at: Option<i64>,
    /// Lockdown deadline, unix ms.
    pub lockdown_until: Option<i64>,
    /// Why the last lockdown or error happened.
    pub reason: Option<String>,
    /// The upstream status behind that reason.
    pub http_status: Option<u16>,
    /// Consecutive lockdowns.
    pub lockdown_count: i64,
    /// Times claimed.
    pub uses: i64,
    /// Last claim, unix ms (0 = never).
    pub last_used_at: i64,
    /// The quota group the keyring declares for the key, if any.
    pub quota_group: Option<String>,
    /// The Google Cloud project number an answer revealed, if any.
    pub project_learned: Option<String>,
    /// The scope its quota lockdowns are recorded under: its group, its learned project, or itself.
    pub quota_scope: Scope,
}

impl KeyRecord {
    /// The state that matters to a claimer at `now`: a lockdown whose deadline has passed is vacant.
    pub fn effective_state(&self, now: i64) -> KeyState {
        match (self.state, self.lockdown_until) {
            (KeyState::Lockdown, Some(until)) if until <= now => KeyState::Vacant,
            (state, _) => state,
        }
    }
}

/// One row of the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// Row id: the order in which transitions were committed.
    pub id: i64,
    /// What kind of change it was: read this, not the reason's prose.
    pub event: HistoryEvent,
    /// When, unix ms.
    pub at: i64,
    /// Connector.
    pub connector: String,
    /// Key name.
    pub key_name: String,
    /// Fingerprint of the key's secret at the time.
    pub fingerprint: String,
    /// State before (`None` when the key first appeared).
    pub from_state: Option<String>,
    /// State after, or `retired`.
    pub to_state: String,
    /// Why.
    pub reason: String,
    /// Upstream status, if any.
    pub http_status: Option<u16>,
    /// The pid of the holder involved, if any.
    pub holder_pid: Option<u32>,
    /// The lease involved, if any.
    pub lease: Option<i64>,
    /// The lockdown deadline set, if any.
    pub lockdown_until: Option<i64>,
    /// The model the transition is about (a lockdown of one model), if any.
    pub model: Option<String>,
    /// The key's quota scope at the time (or the scope a lockdown was set on).
    pub quota_scope: Option<String>,
}

/// A lockdown of one model (or every model, `*`) of one quota scope, as recorded. Rows stay after
/// their deadline, to count consecutive lockdowns, until a success clears them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockdownRecord {
    /// Connector.
    pub connector: String,
    /// Whose quota: a group, a project or one key.
    pub scope: Scope,
    /// One model, or every model.
    pub model: ModelScope,
    /// Deadline, unix ms.
    pub until: i64,
    /// The provider's quota, if it named one.
    pub quota_id: Option<String>,
    /// Why.
    pub reason: String,
    /// The upstream status behind it.
    pub http_status: Option<u16>,
    /// The key whose answer set it.
    pub set_by_key: String,
    /// When, unix ms.
    pub set_at: i64,
    /// Consecutive lockdowns of this scope and model.
    pub strikes: i64,
}

impl LockdownRecord {
    /// Whether it covers every model.
    pub fn is_every_model(&self) -> bool {
        self.model == ModelScope::Every
    }

    /// Whether pacing set it (a declared limit's window was full), not an upstream's answer.
    pub fn is_paced(&self) -> bool {
        self.quota_id.as_deref() == Some(crate::pool::limit::PACED_QUOTA_ID)
    }
}

/// Which history rows to read, newest first.
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    /// Only this connector.
    pub connector: Option<String>,
    /// Only this key name.
    pub key_name: Option<String>,
    /// Only at or after this time, unix ms.
    pub since: Option<i64>,
    /// At most this many rows (`None`: all).
    pub limit: Option<u64>,
}
