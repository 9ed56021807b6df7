//! One serialisable view of a pool: its keys as a request for one model (or for none) sees them, the
//! lockdowns in force on each, who holds each and whether that holder still runs, how a keyring
//! differs from the database, and the warnings about its quota groups. `status --json` prints its
//! keys, `why --json` one of them (with its verdict around it), and `/metrics` counts them by state.
//!
//! Invariants:
//! - A key has one JSON shape, [`KeyView`], whoever prints it: every field is present for every key
//!   (`null` where it has no value, e.g. a key only the keyring knows has no lease).
//! - The builders are pure: records, the keyring's names and fingerprints, the time and a liveness
//!   judge in, a view out. Whether a key is claimable, and from when, comes from [`super::rule`] alone;
//!   nothing here restates the rule.
//! - A view holds no secret: keys are named by name and fingerprint.
//! - Lockdowns of one model show whatever model the view is for: each key lists the models locked down
//!   on its scopes with their ends ([`models_locked_down`]), and [`PoolView::locked_down_by_model`]
//!   counts them, so a pool locked down for one model never looks all vacant.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use serde::Serialize;

use super::{KeyRecord, KeySpec, KeyState, LimitUsage, LockdownRecord, ModelScope, Scope, rule};
use crate::holder::{Holder, Liveness};

/// The pool as a request for [`model`](Self::model) sees it at [`at`](Self::at).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolView {
    /// When the view was taken, unix ms.
    pub at: i64,
    /// The model the keys' `state` and `claimable_*` are for; `None`: a request that names no model.
    pub model: Option<String>,
    /// The database's keys and the keyring's keys not yet in it, by connector and name.
    pub keys: Vec<KeyView>,
    /// What looks wrong in the pool's set-up (keys of one declared group in different projects).
    pub warnings: Vec<String>,
    /// The limits in use (declared or learned), each with its window's usage (see [`Self::with_limits`]).
    pub limits: Vec<LimitUsage>,
}

impl PoolView {
    /// The same view with the limits in use: listed whole, and each key given those of its quota scope.
    pub fn with_limits(mut self, limits: Vec<LimitUsage>) -> Self {
        for key in &mut self.keys {
            let Some(scope) = key.quota_scope.as_ref().map(Scope::to_string) else { continue };
            key.limits = limits
                .iter()
                .filter(|usage| usage.connector == key.connector && usage.scope == scope)
                .cloned()
                .collect();
        }
        self.limits = limits;
        self
    }

    /// One key of the view.
    pub fn key(&self, connector: &str, key: &str) -> Option<&KeyView> {
        self.keys.iter().find(|view| view.connector == connector && view.key == key)
    }

    /// How many keys of `connector` in the database, not retired, are in `state`.
    pub fn count(&self, connector: &str, state: KeyState) -> usize {
        self.keys.iter().filter(|key| key.connector == connector && key.state == ViewState::Is(state)).count()
    }

    /// How many keys of `connector` in the database, not retired, have a lockdown of one model in force
    /// on their scopes, by model (whatever their state; lockdowns of every model put a key in
    /// [`KeyState::Lockdown`] instead, see [`count`](Self::count)).
    pub fn locked_down_by_model(&self, connector: &str) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        let keys = self.keys.iter().filter(|key| key.connector == connector && matches!(key.state, ViewState::Is(_)));
        for model in keys.flat_map(|key| key.locked_down_models.keys()) {
            *counts.entry(model.clone()).or_insert(0) += 1;
        }
        counts
    }

    /// The keys whose row the keyring would change at its next sync.
    pub fn keyring_differences(&self) -> impl Iterator<Item = &KeyView> {
        self.keys.iter().filter(|key| key.keyring.is_some())
    }
}

/// One key: the one JSON shape of a key that `status --json` and `why --json` print.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyView {
    /// Connector.
    pub connector: String,
    /// Key name.
    pub key: String,
    /// Fingerprint of the secret (of the keyring's secret for a key not yet in the database).
    pub fingerprint: String,
    /// The state as a request for [`model`](Self::model) sees it.
    pub state: ViewState,
    /// The state as stored; `None` for a key not yet in the database.
    pub stored_state: Option<KeyState>,
    /// Whether the database has the key.
    pub in_database: bool,
    /// How the keyring differs from the row, if a keyring was compared and it does.
    pub keyring: Option<KeyringNote>,
    /// The fingerprint of the keyring's secret, when it differs from the row's (`fingerprint`): on a
    /// store several hosts share, another host's keyring set the row's, and this host passes the key over.
    pub keyring_fingerprint: Option<String>,
    /// When the key left the keyring, unix ms.
    pub retired_at: Option<i64>,
    /// The current lease token; `None` for a key not yet in the database.
    pub lease: Option<i64>,
    /// Who holds it, while it is held.
    pub holder: Option<HolderView>,
    /// The deadline of the key's own lockdown of every model (stored, even once past), unix ms.
    pub lockdown_until: Option<i64>,
    /// Why the last lockdown or error happened.
    pub reason: Option<String>,
    /// The upstream status behind that reason.
    pub http_status: Option<u16>,
    /// Consecutive lockdowns.
    pub lockdown_count: i64,
    /// Times claimed.
    pub uses: i64,
    /// Last claim, unix ms; `None`: never.
    pub last_used_at: Option<i64>,
    /// The quota group the keyring declares.
    pub quota_group: Option<String>,
    /// The Google Cloud project number an answer revealed.
    pub project_learned: Option<String>,
    /// The scope its quota lockdowns are recorded under; `None` for a key not yet in the database.
    pub quota_scope: Option<Scope>,
    /// The lockdowns in force on its quota scope and on the key alone, whatever their model: every-model
    /// ones first, then by model.
    pub lockdowns: Vec<LockdownView>,
    /// The models a lockdown of one model in force on its scopes stops, each with the latest end of
    /// those lockdowns, unix ms (lockdowns of every model are not listed: they make the key's `state`
    /// `lockdown`). Whatever the model the view is for.
    pub locked_down_models: BTreeMap<String, i64>,
    /// The model the state and the claimable fields are for; `None`: a request that names no model.
    pub model: Option<String>,
    /// Whether a claim for the model could take it now (if it is first in the claim order).
    pub claimable_now: bool,
    /// The limits (declared or learned) in use on its quota scope, each with its window's usage.
    pub limits: Vec<LimitUsage>,
    /// From when a claim for the model could take it, unix ms: now if it can now, the end of the
    /// lockdowns that stop it otherwise; `None` when time alone does not free it (held, in error,
    /// retired, not yet in the database).
    pub claimable_at: Option<i64>,
}

/// A key's state in a view: a stored state as the request sees it, or one of the two states a key
/// outside the claimable pool has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewState {
    /// In the keyring, not yet in the database.
    New,
    /// Left the keyring: never claimed again.
    Retired,
    /// In the pool, in this state for the request.
    Is(KeyState),
}

impl fmt::Display for ViewState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::New => f.write_str("new"),
            Self::Retired => f.write_str("retired"),
            Self::Is(state) => state.fmt(f),
        }
    }
}

impl Serialize for ViewState {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// How a keyring differs from a key's row: what its next sync would change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum KeyringNote {
    /// A key of the database the keyring no longer lists: the sync retires it.
    #[serde(rename = "not in the keyring")]
    NotInKeyring,
    /// The keyring has another secret under the key's name.
    #[serde(rename = "secret changed in the keyring")]
    SecretChanged,
    /// A retired key the keyring lists again: the sync restores it.
    #[serde(rename = "back in the keyring")]
    BackInKeyring,
    /// A key of the keyring the database does not have yet: the sync adds it, vacant.
    #[serde(rename = "in the keyring, not yet in the database")]
    NotYetInDatabase,
}

impl KeyringNote {
    /// The note as printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotInKeyring => "not in the keyring",
            Self::SecretChanged => "secret changed in the keyring",
            Self::BackInKeyring => "back in the keyring",
            Self::NotYetInDatabase => "in the keyring, not yet in the database",
        }
    }
}

impl fmt::Display for KeyringNote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The process holding a key, and what this process can tell of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HolderView {
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Whether it still runs, as seen from the process that took the view.
    pub liveness: HolderLiveness,
    /// How its death is known, when it is dead.
    pub dead_because: Option<String>,
    /// When it claimed the key, unix ms.
    pub locked_at: Option<i64>,
    /// Its last heartbeat, unix ms.
    pub heartbeat_at: Option<i64>,
}

/// [`Liveness`] as a word: `alive`, `stopped`, `dead` or `unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HolderLiveness {
    /// Running: it keeps its keys whatever its heartbeat's age.
    Alive,
    /// Stopped (SIGSTOP, a debugger): its keys are freed once its heartbeat is stale.
    Stopped,
    /// Provably gone: its keys are freed at once.
    Dead,
    /// Not visible from here (another host, boot or pid namespace): only its heartbeat's age counts.
    Unknown,
}

/// A lockdown in force on one of a key's scopes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LockdownView {
    /// The model it stops (`*`: every model).
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
    /// Whose quota: `group:NAME`, `project:NUMBER` or `key:NAME`.
    pub scope: Scope,
    /// Consecutive lockdowns of this scope and model.
    pub strikes: i64,
}

impl From<&LockdownRecord> for LockdownView {
    fn from(lockdown: &LockdownRecord) -> Self {
        Self {
            model: lockdown.model.clone(),
            until: lockdown.until,
            quota_id: lockdown.quota_id.clone(),
            reason: lockdown.reason.clone(),
            http_status: lockdown.http_status,
            set_by_key: lockdown.set_by_key.clone(),
            set_at: lockdown.set_at,
            scope: lockdown.scope.clone(),
            strikes: lockdown.strikes,
        }
    }
}

/// A keyring's keys as a view compares them with the database: names and fingerprints, no secret.
#[derive(Debug, Clone, Default)]
pub struct KeyringKeys<'a> {
    /// The connectors the keyring has a section for: a sync changes only their keys, so only their
    /// keys get a [`KeyringNote`].
    pub connectors: Vec<&'a str>,
    /// Every key of the keyring.
    pub keys: Vec<KeySpec<'a>>,
}

/// What a view is built from.
#[derive(Debug, Clone, Copy)]
pub struct Sources<'a> {
    /// The database's keys.
    pub keys: &'a [KeyRecord],
    /// The database's lockdowns (those past their deadline are left out of the view).
    pub lockdowns: &'a [LockdownRecord],
    /// The keyring to compare with, if any.
    pub keyring: Option<&'a KeyringKeys<'a>>,
    /// Only this connector's keys; `None`: every connector's.
    pub connector: Option<&'a str>,
    /// The model a request would ask for; `None`: a request that names no model.
    pub model: Option<&'a str>,
    /// Now, unix ms.
    pub now: i64,
}

/// The view of the pool `sources` describe; `liveness` judges each holder (in the CLI,
/// [`Holder::liveness`]).
pub fn pool(sources: &Sources<'_>, liveness: &dyn Fn(&Holder) -> Liveness) -> PoolView {
    let wanted = |connector: &str| sources.connector.is_none_or(|only| only == connector);
    let defined: HashSet<&str> =
        sources.keyring.map(|keyring| keyring.connectors.iter().copied().collect()).unwrap_or_default();
    let mut listed: HashMap<(&str, &str), &str> = sources
        .keyring
        .map(|keyring| {
            keyring
                .keys
                .iter()
                .filter(|spec| wanted(spec.connector))
                .map(|spec| ((spec.connector, spec.name), spec.fingerprint))
                .collect()
        })
        .unwrap_or_default();
    let records: Vec<&KeyRecord> = sources.keys.iter().filter(|key| wanted(&key.connector)).collect();
    let mut keys: Vec<KeyView> = records
        .iter()
        .map(|record| {
            let fingerprint = listed.remove(&(record.connector.as_str(), record.key_name.as_str()));
            let note = keyring_note(record, defined.contains(record.connector.as_str()), fingerprint);
            let mut view = key(record, sources.lockdowns, sources.model, sources.now, liveness, note);
            view.keyring_fingerprint = fingerprint.filter(|listed| *listed != record.fingerprint).map(str::to_owned);
            view
        })
        .collect();
    keys.extend(
        listed
            .into_iter()
            .map(|((connector, name), fingerprint)| new_key(&KeySpec { connector, name, fingerprint }, sources.model)),
    );
    keys.sort_by(|a, b| (&a.connector, &a.key).cmp(&(&b.connector, &b.key)));
    PoolView {
        at: sources.now,
        model: sources.model.map(str::to_owned),
        keys,
        warnings: group_warnings(records.into_iter()),
        limits: Vec::new(),
    }
}

/// The view of one key of the database, for a request for `model` at `now`.
pub fn key(
    record: &KeyRecord,
    lockdowns: &[LockdownRecord],
    model: Option<&str>,
    now: i64,
    liveness: &dyn Fn(&Holder) -> Liveness,
    keyring: Option<KeyringNote>,
) -> KeyView {
    let claimable_now = rule::claimable(record, lockdowns, model, now);
    let state = match record.retired_at {
        Some(_) => ViewState::Retired,
        None => ViewState::Is(rule::state_for(record, lockdowns, model, now)),
    };
    KeyView {
        connector: record.connector.clone(),
        key: record.key_name.clone(),
        fingerprint: record.fingerprint.clone(),
        state,
        stored_state: Some(record.state),
        in_database: true,
        keyring,
        keyring_fingerprint: None,
        retired_at: record.retired_at,
        lease: Some(record.lease),
        holder: holder(record, liveness),
        lockdown_until: record.lockdown_until,
        reason: record.reason.clone(),
        http_status: record.http_status,
        lockdown_count: record.lockdown_count,
        uses: record.uses,
        last_used_at: Some(record.last_used_at).filter(|at| *at > 0),
        quota_group: record.quota_group.clone(),
        project_learned: record.project_learned.clone(),
        quota_scope: Some(record.quota_scope.clone()),
        lockdowns: in_force(record, lockdowns, now).into_iter().map(LockdownView::from).collect(),
        locked_down_models: models_locked_down(record, lockdowns, now),
        model: model.map(str::to_owned),
        claimable_now,
        limits: Vec::new(),
        claimable_at: if claimable_now { Some(now) } else { rule::free_at(record, lockdowns, model, now) },
    }
}

/// The view of a key only the keyring knows: state `new`, nothing recorded yet.
pub fn new_key(spec: &KeySpec<'_>, model: Option<&str>) -> KeyView {
    KeyView {
        connector: spec.connector.to_owned(),
        key: spec.name.to_owned(),
        fingerprint: spec.fingerprint.to_owned(),
        state: ViewState::New,
        stored_state: None,
        in_database: false,
        keyring: Some(KeyringNote::NotYetInDatabase),
        keyring_fingerprint: None,
        retired_at: None,
        lease: None,
        holder: None,
        lockdown_until: None,
        reason: None,
        http_status: None,
        lockdown_count: 0,
        uses: 0,
        last_used_at: None,
        quota_group: None,
        project_learned: None,
        quota_scope: None,
        lockdowns: Vec::new(),
        locked_down_models: BTreeMap::new(),
        model: model.map(str::to_owned),
        claimable_now: false,
        claimable_at: None,
        limits: Vec::new(),
    }
}

/// The lockdowns in force on `key` at `now` ([`rule::in_force_on`]), whatever their model: every-model
/// ones first, then by model and scope.
pub fn in_force<'a>(key: &KeyRecord, lockdowns: &'a [LockdownRecord], now: i64) -> Vec<&'a LockdownRecord> {
    let mut mine: Vec<&LockdownRecord> = lockdowns.iter().filter(|l| rule::in_force_on(l, key, now)).collect();
    mine.sort_by(|a, b| (!a.is_every_model(), &a.model, &a.scope).cmp(&(!b.is_every_model(), &b.model, &b.scope)));
    mine
}

/// A model name as a user gives it (to `why --model`, to a claim): Gemini's full name `models/x` is `x`,
/// the name requests are read under and lockdowns are stored by (see `model`).
pub fn model_asked(name: &str) -> &str {
    name.strip_prefix("models/").filter(|rest| !rest.is_empty()).unwrap_or(name)
}

/// The models that lockdowns of one model in force on `key` at `now` stop, each with the latest end of
/// them, unix ms: what every summary counts by model (a key locked down for one model is vacant for the
/// others, and for a request that names none).
pub fn models_locked_down(key: &KeyRecord, lockdowns: &[LockdownRecord], now: i64) -> BTreeMap<String, i64> {
    let mut models = BTreeMap::new();
    for lockdown in lockdowns.iter().filter(|l| rule::in_force_on(l, key, now)) {
        if let ModelScope::One(model) = &lockdown.model {
            let until = models.entry(model.clone()).or_insert(lockdown.until);
            *until = (*until).max(lockdown.until);
        }
    }
    models
}

/// How the keyring differs from `key`'s row: `defined` says whether the keyring has a section for its
/// connector (a sync leaves the others alone), `listed` is the keyring's fingerprint of that name.
fn keyring_note(key: &KeyRecord, defined: bool, listed: Option<&str>) -> Option<KeyringNote> {
    match (defined, listed, key.retired_at) {
        (false, _, _) => None,
        (true, None, None) => Some(KeyringNote::NotInKeyring),
        (true, None, Some(_)) => None,
        (true, Some(fingerprint), _) if fingerprint != key.fingerprint => Some(KeyringNote::SecretChanged),
        (true, Some(_), Some(_)) => Some(KeyringNote::BackInKeyring),
        (true, Some(_), None) => None,
    }
}

fn holder(key: &KeyRecord, liveness: &dyn Fn(&Holder) -> Liveness) -> Option<HolderView> {
    let holder = key.holder.as_ref()?;
    let (liveness, dead_because) = match liveness(holder) {
        Liveness::Alive => (HolderLiveness::Alive, None),
        Liveness::Stopped => (HolderLiveness::Stopped, None),
        Liveness::Dead(why) => (HolderLiveness::Dead, Some(why)),
        Liveness::Unknown => (HolderLiveness::Unknown, None),
    };
    Some(HolderView {
        host: holder.host.clone(),
        pid: holder.pid,
        liveness,
        dead_because,
        locked_at: key.locked_at,
        heartbeat_at: key.heartbeat_at,
    })
}

/// Keys the keyring puts in one group, yet whose answers revealed different Google Cloud projects: the
/// group is probably wrong (a lockdown of one project then stops keys of another).
fn group_warnings<'a>(keys: impl Iterator<Item = &'a KeyRecord>) -> Vec<String> {
    let mut projects: BTreeMap<(&str, &str), BTreeMap<&str, Vec<&str>>> = BTreeMap::new();
    for key in keys.filter(|key| key.retired_at.is_none()) {
        if let (Some(group), Some(project)) = (&key.quota_group, &key.project_learned) {
            let group = projects.entry((&key.connector, group)).or_default();
            group.entry(project).or_default().push(&key.key_name);
        }
    }
    projects
        .into_iter()
        .filter(|(_, learned)| learned.len() > 1)
        .map(|((connector, group), learned)| {
            let learned: Vec<String> =
                learned.iter().map(|(project, keys)| format!("{} in #{project}", keys.join(", "))).collect();
            format!(
                "the keys of group '{group}' of {connector} are in different Google Cloud projects ({}): the group \
                 may be wrong; check the [{connector} groups] section of the keyring",
                learned.join("; ")
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::fixtures::{NOW, lockdown, record};

    fn alive(_: &Holder) -> Liveness {
        Liveness::Alive
    }

    fn view(keys: &[KeyRecord], lockdowns: &[LockdownRecord], model: Option<&str>) -> PoolView {
        let sources = Sources { keys, lockdowns, keyring: None, connector: None, model, now: NOW };
        pool(&sources, &alive)
    }

    #[test]
    fn a_lockdown_of_one_model_shows_the_key_in_lockdown_for_that_model_and_vacant_for_others() {
        let keys = [record("k0", Scope::Group("g".into())), record("k1", Scope::Key("k1".into()))];
        let lockdowns = [lockdown(Scope::Group("g".into()), ModelScope::One("pro".into()), NOW + 500)];
        let pro = view(&keys, &lockdowns, Some("pro"));
        let k0 = pro.key("c", "k0").expect("k0");
        assert_eq!(k0.state, ViewState::Is(KeyState::Lockdown));
        assert_eq!((k0.claimable_now, k0.claimable_at), (false, Some(NOW + 500)));
        assert_eq!(k0.lockdowns.len(), 1);
        assert_eq!(k0.model.as_deref(), Some("pro"));
        let k1 = pro.key("c", "k1").expect("k1");
        assert_eq!((k1.state, k1.claimable_now, k1.claimable_at), (ViewState::Is(KeyState::Vacant), true, Some(NOW)));
        assert!(k1.lockdowns.is_empty(), "another scope's lockdown is not k1's");
        for model in [Some("flash"), None] {
            let other = view(&keys, &lockdowns, model);
            let k0 = other.key("c", "k0").expect("k0");
            assert_eq!((k0.state, k0.claimable_now), (ViewState::Is(KeyState::Vacant), true), "{model:?}");
            assert_eq!(k0.lockdowns.len(), 1, "the lockdown in force is listed whatever the model");
        }
        assert_eq!(pro.count("c", KeyState::Lockdown), 1);
        assert_eq!(pro.count("c", KeyState::Vacant), 1);
    }

    /// Four keys of one group locked down for one model are vacant for a request that names none, and
    /// every summary still counts them by model (issue 15 item 7).
    #[test]
    fn lockdowns_of_one_model_are_counted_by_model_whatever_the_view_is_for() {
        let group = || Scope::Group("g".into());
        let mut retired = record("k4", group());
        retired.retired_at = Some(NOW - 5);
        let keys =
            [record("k0", group()), record("k1", group()), record("k2", group()), record("k3", group()), retired];
        let lockdowns = [
            lockdown(group(), ModelScope::One("pro".into()), NOW + 500),
            lockdown(group(), ModelScope::One("pro".into()), NOW + 900),
            lockdown(Scope::Key("k3".into()), ModelScope::One("flash".into()), NOW + 100),
            lockdown(group(), ModelScope::One("lite".into()), NOW),
        ];
        let shown = view(&keys, &lockdowns, None);
        assert_eq!(shown.count("c", KeyState::Vacant), 4, "for a request that names no model they are vacant");
        let expected: BTreeMap<String, usize> = [("flash".to_owned(), 1), ("pro".to_owned(), 4)].into();
        assert_eq!(shown.locked_down_by_model("c"), expected, "the retired key and the lockdown that ended are not");
        let k3 = shown.key("c", "k3").expect("k3");
        let until: BTreeMap<String, i64> = [("flash".to_owned(), NOW + 100), ("pro".to_owned(), NOW + 900)].into();
        assert_eq!(k3.locked_down_models, until, "each model with the latest end of its lockdowns");
        assert_eq!(view(&keys, &lockdowns, Some("pro")).locked_down_by_model("c"), expected);
    }

    #[test]
    fn lockdowns_in_force_are_listed_every_model_first_and_expired_ones_left_out() {
        let key = record("k0", Scope::Group("g".into()));
        let lockdowns = [
            lockdown(Scope::Group("g".into()), ModelScope::One("pro".into()), NOW + 500),
            lockdown(Scope::Key("k0".into()), ModelScope::Every, NOW + 100),
            lockdown(Scope::Group("g".into()), ModelScope::One("flash".into()), NOW),
        ];
        let shown = view(std::slice::from_ref(&key), &lockdowns, Some("pro"));
        let k0 = &shown.keys[0];
        let models: Vec<String> = k0.lockdowns.iter().map(|l| l.model.to_string()).collect();
        assert_eq!(models, ["*", "pro"]);
        assert_eq!(k0.state, ViewState::Is(KeyState::Lockdown));
        assert_eq!(k0.claimable_at, Some(NOW + 500), "the later of the two that stop pro");
        let none = view(std::slice::from_ref(&key), &lockdowns, None);
        assert_eq!(none.keys[0].claimable_at, Some(NOW + 100), "only the every-model one stops a request naming none");
    }

    #[test]
    fn held_errored_and_retired_keys_are_not_freed_by_time() {
        let mut held = record("k0", Scope::Key("k0".into()));
        held.state = KeyState::Locked;
        held.holder = Some(Holder { host: "h".into(), pid: 42, ..Holder::default() });
        held.locked_at = Some(NOW - 10);
        let mut errored = record("k1", Scope::Key("k1".into()));
        errored.state = KeyState::Error;
        let mut retired = record("k2", Scope::Key("k2".into()));
        retired.retired_at = Some(NOW - 5);
        let dead = |_: &Holder| Liveness::Dead("holder pid 42 has exited".into());
        let sources = Sources {
            keys: &[held, errored, retired],
            lockdowns: &[],
            keyring: None,
            connector: None,
            model: None,
            now: NOW,
        };
        let shown = pool(&sources, &dead);
        let states: Vec<(String, bool, Option<i64>)> =
            shown.keys.iter().map(|k| (k.state.to_string(), k.claimable_now, k.claimable_at)).collect();
        assert_eq!(
            states,
            [("locked".into(), false, None), ("error".into(), false, None), ("retired".into(), false, None)]
        );
        let holder = shown.keys[0].holder.as_ref().expect("holder");
        assert_eq!((holder.pid, holder.liveness), (42, HolderLiveness::Dead));
        assert_eq!(holder.dead_because.as_deref(), Some("holder pid 42 has exited"));
        assert_eq!(shown.count("c", KeyState::Vacant), 0, "a retired key is counted in no state");
    }

    #[test]
    fn the_keyring_differences_are_noted_on_each_key() {
        let mut changed = record("changed", Scope::Key("changed".into()));
        changed.fingerprint = "old".into();
        let mut back = record("back", Scope::Key("back".into()));
        back.retired_at = Some(1);
        let keys =
            [record("same", Scope::Key("same".into())), record("gone", Scope::Key("gone".into())), changed, back];
        let mut elsewhere = record("other", Scope::Key("other".into()));
        elsewhere.connector = "d".into();
        let keys: Vec<KeyRecord> = keys.into_iter().chain([elsewhere]).collect();
        let keyring = KeyringKeys {
            connectors: vec!["c"],
            keys: vec![
                KeySpec { connector: "c", name: "same", fingerprint: "fp-same" },
                KeySpec { connector: "c", name: "changed", fingerprint: "new" },
                KeySpec { connector: "c", name: "back", fingerprint: "fp-back" },
                KeySpec { connector: "c", name: "fresh", fingerprint: "fp-fresh" },
            ],
        };
        let sources =
            Sources { keys: &keys, lockdowns: &[], keyring: Some(&keyring), connector: None, model: None, now: NOW };
        let shown = pool(&sources, &alive);
        let notes: Vec<(&str, Option<KeyringNote>)> = shown.keys.iter().map(|k| (k.key.as_str(), k.keyring)).collect();
        assert_eq!(
            notes,
            [
                ("back", Some(KeyringNote::BackInKeyring)),
                ("changed", Some(KeyringNote::SecretChanged)),
                ("fresh", Some(KeyringNote::NotYetInDatabase)),
                ("gone", Some(KeyringNote::NotInKeyring)),
                ("same", None),
                ("other", None),
            ]
        );
        let fresh = shown.key("c", "fresh").expect("fresh");
        assert_eq!((fresh.state, fresh.in_database, fresh.lease), (ViewState::New, false, None));
        assert_eq!(shown.keyring_differences().count(), 4);
        let only = pool(&Sources { connector: Some("d"), ..sources }, &alive);
        assert_eq!(only.keys.len(), 1, "the keyring's keys of other connectors are left out");
    }

    #[test]
    fn every_key_has_every_field_in_json() {
        let keyring = KeyringKeys {
            connectors: vec!["c"],
            keys: vec![KeySpec { connector: "c", name: "fresh", fingerprint: "f" }],
        };
        let keys = [record("k0", Scope::Group("g".into()))];
        let sources =
            Sources { keys: &keys, lockdowns: &[], keyring: Some(&keyring), connector: None, model: None, now: NOW };
        let shown = serde_json::to_value(pool(&sources, &alive)).expect("json");
        let fields = |index: usize| -> Vec<String> {
            shown["keys"][index].as_object().expect("object").keys().cloned().collect()
        };
        assert_eq!(fields(0), fields(1), "one shape for a key of the database and one of the keyring");
        assert_eq!(
            (shown["keys"][0]["key"].as_str(), shown["keys"][0]["state"].as_str()),
            (Some("fresh"), Some("new"))
        );
        assert_eq!(shown["keys"][0]["keyring"], "in the keyring, not yet in the database");
        assert_eq!(shown["keys"][1]["quota_scope"], "group:g");
    }

    #[test]
    fn keys_of_one_group_in_different_projects_are_warned_of() {
        let mut k0 = record("k0", Scope::Group("g".into()));
        let mut k1 = record("k1", Scope::Group("g".into()));
        k0.quota_group = Some("g".into());
        k1.quota_group = Some("g".into());
        k0.project_learned = Some("111".into());
        k1.project_learned = Some("111".into());
        assert!(view(&[k0.clone(), k1.clone()], &[], None).warnings.is_empty());
        k1.project_learned = Some("222".into());
        let warnings = view(&[k0, k1], &[], None).warnings;
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("group 'g'") && warnings[0].contains("k1 in #222"), "{warnings:?}");
    }
}
