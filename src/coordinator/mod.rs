//! The key coordinator: claims keys for this process, waits politely when none is free, reaps the
//! locks of dead and long-stopped holders (see `reaper`), and answers "which keys are in which state".
//!
//! Waiting never hammers the write lock: a waiter polls with reads (which run beside the writer in WAL
//! mode), backs off with jitter, wakes early at the earliest lockdown deadline, and only then tries the
//! write again. Reaping happens before claims, at most once per `reap_interval` per connector and
//! process, so a dead holder's key comes back within about that interval while anyone is claiming.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

#[cfg(test)]
mod guard_tests;
mod passed_over;
mod server_time;
mod waiting;

use crate::clock::{Clock, SystemClock};
use crate::error::{Error, Result};
use crate::holder::Holder;
use crate::keyring::Keyring;
use crate::lease::{self, HeartbeatWaker, Lease, LeaseOwner, Registry};
use crate::pool::{self, Unavailable};
use crate::pool::{Eviction, KeySpec, KeyState, LimitUsage, SyncReport, Transition};
use crate::reaper::{self, Now};
use crate::retention::{self, Pruned, Retention};
use crate::store::{self, Backend, Location, Postgres, Sqlite, Store};
use server_time::ServerTime;

/// How the coordinator runs; every timing is a parameter so tests can shrink it.
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    /// The database: an SQLite file path, or a `postgres://` URL (see [`Location::parse`]); `None` means
    /// `APIJONGLER_DB` or the per-user state directory. A URL of another scheme is refused.
    pub db_path: Option<PathBuf>,
    /// How often held keys' heartbeats are refreshed (default 5 s).
    pub heartbeat_interval: Duration,
    /// A stopped holder, or one this process cannot see (another host, boot or pid namespace), is
    /// freed once its heartbeat is older than this (default 30 s). A running holder on this host is
    /// never freed for its heartbeat's age; a dead one is freed at once.
    pub stale_after: Duration,
    /// How often, at most, a process looks for dead holders before claiming (default 1 s).
    pub reap_interval: Duration,
    /// Every database operation may wait at least this long for another process's write lock, even
    /// when its caller has less time left (default 5 s); a holder's own writes (ending a lease, a
    /// heartbeat, recording an attempt) three times as long. Then it fails with `Error::DatabaseLocked`.
    pub lock_wait_floor: Duration,
    /// The clocks written to the database.
    pub clock: Arc<dyn Clock>,
    /// How long history and request rows are kept (see [`crate::retention`]); `None`:
    /// `APIJONGLER_RETENTION`, else 30 days. Applied by coordinators that sync a keyring.
    pub retention: Option<Retention>,
}

/// How often, at most, a process looks for rows past retention.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

impl Default for CoordinatorOptions {
    fn default() -> Self {
        Self {
            db_path: None,
            heartbeat_interval: Duration::from_secs(5),
            stale_after: Duration::from_secs(30),
            reap_interval: Duration::from_secs(1),
            lock_wait_floor: store::DEFAULT_LOCK_WAIT_FLOOR,
            clock: Arc::new(SystemClock),
            retention: None,
        }
    }
}

/// Key names of one connector, by state (the seed's `getKeyStates()`). A lockdown whose deadline has
/// passed counts as vacant: it is claimable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyStates {
    /// Claimable now.
    pub vacant: BTreeSet<String>,
    /// Held by a process.
    pub locked: BTreeSet<String>,
    /// Rate-limited, deadline ahead.
    pub lockdown: BTreeSet<String>,
    /// Permanently bad until cleanup.
    pub error: BTreeSet<String>,
    /// Per key (whatever its state above), the models a lockdown of one model in force on its quota
    /// scopes stops, each with the latest end of those lockdowns, unix ms: a key locked down for one
    /// model counts as vacant above for a request that names none, yet shows here. Keys without one
    /// are left out.
    pub locked_down_models: BTreeMap<String, BTreeMap<String, i64>>,
}

/// Shared by all clones of a [`Coordinator`] and by its heartbeat thread.
#[derive(Debug)]
pub(crate) struct Inner {
    /// The database, for every read and write of this process.
    pub(crate) backend: Arc<dyn Backend>,
    /// The same, read-only, for the public API.
    store: Store,
    pub(crate) holder: &'static Holder,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) leases: Registry,
    /// How long a lease is trusted after its last renewal (a margin short of `stale_after`).
    pub(crate) trust_window: Duration,
    options: CoordinatorOptions,
    last_reap: Mutex<HashMap<String, Instant>>,
    /// When this process last looked for rows past retention (`None`: not yet).
    last_prune: Mutex<Option<Instant>>,
    /// Started by the first claim; dropping it (with the coordinator) ends the heartbeat thread.
    heartbeat: OnceLock<HeartbeatWaker>,
    /// The callers waiting for a key, and their watcher.
    pub(crate) waiters: waiting::Waiters,
    /// The keys this host passes over on a store several hosts share.
    passing: passed_over::Passing,
    /// This host's clock corrected to the shared store's server (`None`: SQLite, or a test's clock).
    server_time: Option<ServerTime>,
}

impl Inner {
    /// Ok in the process that created the coordinator; [`Error::ForkedChild`] in a child forked from
    /// it, where its threads and connections do not exist and its leases are the parent's. Called by
    /// every entry point that would touch them.
    pub(crate) fn alive_here(&self) -> Result<()> {
        let here = std::process::id();
        if self.holder.pid == here {
            return Ok(());
        }
        Err(Error::ForkedChild { created_by: self.holder.pid, this_process: here })
    }
}

/// A handle on the shared key database for this process; cheap to clone, safe to share between threads.
/// A child forked from the process gets [`Error::ForkedChild`] from it: open another in the child.
#[derive(Debug, Clone)]
pub struct Coordinator {
    pub(crate) inner: Arc<Inner>,
}

impl Drop for Coordinator {
    /// In a forked child, the shared state is never dropped: closing the parent's connections or
    /// waking its threads from here would act on the parent's behalf.
    fn drop(&mut self) {
        if self.inner.alive_here().is_err() {
            std::mem::forget(Arc::clone(&self.inner));
        }
    }
}

impl Coordinator {
    /// Opens the database (creating and migrating it if needed).
    pub fn open(mut options: CoordinatorOptions) -> Result<Self> {
        if options.retention.is_none() {
            options.retention = Some(Retention::from_env()?);
        }
        let location = match &options.db_path {
            Some(value) => Location::parse(value.as_os_str(), "CoordinatorOptions::db_path")?,
            None => store::default_location()?,
        };
        let backend: Arc<dyn Backend> = match location {
            Location::Sqlite(path) => Arc::new(Sqlite::open(&path)?.with_lock_wait_floor(options.lock_wait_floor)),
            Location::Postgres(url) => Arc::new(Postgres::open(&url)?.with_lock_wait_floor(options.lock_wait_floor)),
        };
        let server_time = ServerTime::of(&*backend, &options.clock)?;
        if let Some(server_time) = &server_time {
            options.clock = server_time.clock();
        }
        Ok(Self::build(backend, options, server_time))
    }

    /// A coordinator of the pool in `backend`.
    #[cfg(test)]
    pub(crate) fn with_backend(backend: Arc<dyn Backend>, options: CoordinatorOptions) -> Self {
        Self::build(backend, options, None)
    }

    /// A coordinator of the pool in `backend`, its clock corrected by `server_time` if given.
    fn build(backend: Arc<dyn Backend>, options: CoordinatorOptions, server_time: Option<ServerTime>) -> Self {
        let trust_window = options.stale_after.saturating_sub(options.heartbeat_interval).max(options.stale_after / 2);
        let inner = Arc::new(Inner {
            store: Store::new(Arc::clone(&backend)),
            backend,
            holder: Holder::current(),
            clock: Arc::clone(&options.clock),
            leases: Registry::default(),
            trust_window,
            options,
            last_reap: Mutex::new(HashMap::new()),
            last_prune: Mutex::new(None),
            heartbeat: OnceLock::new(),
            waiters: waiting::Waiters::default(),
            passing: passed_over::Passing::default(),
            server_time,
        });
        Self { inner }
    }

    /// The database file.
    pub fn db_path(&self) -> &Path {
        self.inner.store.path()
    }

    /// The pool's database, read-only, for what the coordinator does not wrap (history, full key rows).
    /// Writes go through the coordinator and its leases.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The database, for the crate's own writes (an attempt's row).
    pub(crate) fn backend(&self) -> &dyn Backend {
        &*self.inner.backend
    }

    /// Puts the key of lease `lease` on key `id`, which ended with a release, in error with `fate`,
    /// now that the answer that blamed it is confirmed as the key's own (see `exchange::suspicion`).
    /// Fenced by that lease: `Ok(false)` when the key was claimed again since, or is held or in error.
    pub(crate) fn confirm_error(&self, id: i64, lease: i64, fate: &pool::Fate) -> Result<bool> {
        self.inner.alive_here()?;
        self.inner.backend.confirm_error(id, lease, fate, self.now_ms())
    }

    /// Makes the database's keys of the connectors `keyring` has a section for match it (see
    /// `Backend::sync_keys`); keys of other connectors are left alone, so keyrings with different
    /// sections can share a database. Keys it retires name the keyring file in their history row; each
    /// key gets the quota group the keyring declares for it. The limits the keyring declares for its
    /// connectors are the ones this coordinator's claims reserve against from then on (README
    /// "Declared limits").
    ///
    /// On a store several hosts share (PostgreSQL) the sync only adds, restores and regroups keys:
    /// a key the keyring lacks stays, and one whose secret differs keeps the pool's (listed in
    /// [`SyncReport::differing`], logged as a warning) and is passed over by this coordinator's claims.
    /// [`sync_as_truth`](Self::sync_as_truth) applies the keyring whole.
    pub fn sync(&self, keyring: &Keyring) -> Result<SyncReport> {
        self.sync_keyring(keyring, false)
    }

    /// [`sync`](Self::sync) with `keyring` as the truth for its connectors, on any store: keys it lacks
    /// are retired and secrets that differ replaced (lifting the old secret's error and lockdowns), for
    /// every host. On SQLite every sync does this already (`apijongler sync --as-truth`).
    pub fn sync_as_truth(&self, keyring: &Keyring) -> Result<SyncReport> {
        self.sync_keyring(keyring, true)
    }

    fn sync_keyring(&self, keyring: &Keyring, as_truth: bool) -> Result<SyncReport> {
        self.inner.alive_here()?;
        let specs: Vec<KeySpec<'_>> = keyring
            .all_keys()
            .map(|(connector, key)| KeySpec { connector, name: key.name(), fingerprint: key.fingerprint().as_str() })
            .collect();
        let groups: Vec<(&str, &str, &str)> = specs
            .iter()
            .filter_map(|key| Some((key.connector, key.name, keyring.group(key.connector, key.name)?)))
            .collect();
        let connectors: Vec<&str> = keyring.connectors().collect();
        let path = std::path::absolute(keyring.path()).unwrap_or_else(|_| keyring.path().to_owned());
        let source = pool::SyncSource { path: &path, connectors: &connectors, keys: &specs, groups: &groups, as_truth };
        let report = self.inner.backend.sync_keys(&source, self.now_ms())?;
        log_transitions(&report.transitions);
        if self.inner.backend.is_shared() {
            let mut records = Vec::new();
            for connector in source.defined_connectors() {
                records.extend(self.inner.backend.keys(Some(connector))?);
            }
            self.warn_differing(keyring, &report, &records);
            self.inner.passing.learn(keyring, &records);
        }
        self.prune_if_due();
        for connector in keyring.connectors() {
            self.inner.backend.declare_limits(
                connector,
                keyring.limits(connector).cloned().map(Arc::new),
                self.now_ms(),
            );
        }
        Ok(report)
    }

    /// Logs each key whose secret in `keyring` differs from the shared pool's, by both fingerprints.
    fn warn_differing(&self, keyring: &Keyring, report: &SyncReport, records: &[pool::KeyRecord]) {
        for (connector, name) in &report.differing {
            let pool = records.iter().find(|record| record.connector == *connector && record.key_name == *name);
            let here = keyring.key(connector, name).map(|key| key.fingerprint().as_str().to_owned());
            tracing::warn!(
                connector = %connector, key = %name,
                pool_fingerprint = pool.map_or("-", |record| record.fingerprint.as_str()),
                keyring_fingerprint = here.as_deref().unwrap_or("-"), keyring = %keyring.path().display(),
                "the shared pool holds another secret for this key than this keyring; this host passes it over \
                 (`apijongler sync --as-truth` with the keyring that is right settles it)"
            );
        }
    }

    /// Claims the least recently used free key of `connector`, skipping the key names in `tried`,
    /// waiting up to `wait` for one to come free. The error, if none does, says how many keys are held,
    /// in lockdown (and until when) and in error. Only lockdowns of every model stop it: see
    /// [`claim_for`](Self::claim_for).
    pub fn claim(&self, connector: &str, tried: &[String], wait: Duration) -> Result<Lease> {
        self.claim_for(connector, None, tried, wait)
    }

    /// [`claim`](Self::claim) for a request to `model`: keys whose quota scope is locked down for that
    /// model are skipped (they still serve other models), and a waiter wakes when the earliest lockdown
    /// that matters for the model ends.
    pub fn claim_for(&self, connector: &str, model: Option<&str>, tried: &[String], wait: Duration) -> Result<Lease> {
        self.inner.alive_here()?;
        self.claim_on_thread(&self.request(connector, model, tried, wait))
    }

    /// [`claim_for`](Self::claim_for) for async callers: the wait holds no thread (the key comes
    /// from the process's one watcher), and dropping the future gives up the wait. A claim pinned to a
    /// quota scope (the owner of a resource it names, see `crate::resource`) takes only keys of that
    /// scope, and its wait ends at once when none of them can come back (all in error or retired); one
    /// with tokens reserves them against token limits.
    pub(crate) async fn claim_async(&self, request: store::ClaimFor<'_>, wait: Duration) -> Result<Lease> {
        self.inner.alive_here()?;
        let asked = request;
        let mut request = self.request(asked.connector, asked.model, asked.tried, wait);
        (request.claim.pin, request.claim.tokens) = (asked.pin, asked.tokens);
        self.claim_as_task(&request).await
    }

    fn request<'a>(
        &self,
        connector: &'a str,
        model: Option<&'a str>,
        tried: &'a [String],
        wait: Duration,
    ) -> waiting::Request<'a> {
        // `models/x` is `x`, as requests name it and lockdowns are stored.
        let model = model.map(pool::view::model_asked);
        let started = Instant::now();
        // A wait too long to add to an instant is as good as forever.
        let deadline = started.checked_add(wait).unwrap_or_else(|| started + Duration::from_secs(100 * 365 * 86_400));
        waiting::Request { claim: store::ClaimFor::new(connector, model, tried), started, deadline }
    }

    /// One claim, waiting for the write lock as long as the caller may wait (never less than the
    /// store's floor). `Ok(None)`: no key free now, and one may come before the deadline; the error
    /// when none can (every key in error, or locked down past the deadline) or the wait is zero.
    fn try_claim(&self, request: &waiting::Request<'_>) -> Result<Option<Lease>> {
        let store = &self.inner.backend;
        let lock_deadline = store.lock_deadline(request.started, request.deadline);
        let waited = |error| match error {
            // The message says how long the caller waited, not only this last write.
            Error::DatabaseLocked { path, operation, .. } => {
                Error::DatabaseLocked { path, operation, waited: request.started.elapsed() }
            }
            other => other,
        };
        self.reap_if_due(request.claim.connector)?;
        self.prune_if_due();
        if let Some(server_time) = &self.inner.server_time {
            server_time.remeasure_if_due(store.as_ref());
        }
        let connector = request.claim.connector;
        loop {
            let excluded = self.inner.passing.excluding(connector, request.claim.tried);
            let claim = excluding(request.claim_for(), excluded.as_deref());
            let claimed = store.claim(claim, self.inner.holder, &*self.inner.clock, lock_deadline).map_err(waited)?;
            if let Some(claimed) = claimed {
                // Registered before anything else runs (a log handler may block): see `lease::is_own`.
                let lease = self.lease(connector, claimed);
                self.ensure_heartbeat();
                let serves = self.inner.passing.serves(connector, lease.key_name(), lease.fingerprint());
                tracing::info!(
                    connector, key = %lease.key_name(), fingerprint = %lease.fingerprint(), lease = lease.token(),
                    "key claimed"
                );
                if serves {
                    return Ok(Some(lease));
                }
                lease.release()?;
                continue;
            }
            let now = self.now_ms();
            let availability = store.availability(claim, now)?;
            let lockdown_end = waiting::lockdown_end(&availability, now);
            if availability.claimable == 0
                && (Instant::now() >= request.deadline
                    || waiting::hopeless(&availability, lockdown_end, request.deadline))
            {
                let waited = request.started.elapsed();
                let passed_over = self.inner.passing.of(connector);
                return Err(Error::NoKeyAvailable(Box::new(Unavailable {
                    availability,
                    waited,
                    at: now,
                    passed_over,
                })));
            }
            return Ok(None);
        }
    }

    /// Frees the locks of dead holders of `connector` (or of all connectors), and of stopped or
    /// invisible ones whose heartbeat is stale (see the `reaper` module).
    pub fn reap(&self, connector: Option<&str>) -> Result<Vec<Transition>> {
        self.inner.alive_here()?;
        let held = self.inner.backend.held_keys(connector)?;
        // Read the clocks after the read: a heartbeat read is never judged against an earlier time.
        let now = Now { wall_ms: self.now_ms(), boot_ms: self.inner.clock.boot_ms() };
        let evictions: Vec<Eviction> = held
            .into_iter()
            .filter_map(|held| {
                let lease_is_own = || lease::is_own(held.id, held.lease);
                let (event, reason) = reaper::verdict(&held, now, self.inner.options.stale_after, lease_is_own)?;
                Some(Eviction {
                    id: held.id,
                    lease: held.lease,
                    heartbeat_at: held.heartbeat_at,
                    heartbeat_boot_ms: held.heartbeat_boot_ms,
                    event,
                    reason,
                })
            })
            .collect();
        // The history's time is read after the verdicts: a holder seen dead was dead by then (a time read
        // before its /proc check could precede its death).
        let freed = self.inner.backend.evict(&evictions, self.now_ms())?;
        log_transitions(&freed);
        Ok(freed)
    }

    /// The seed's cleanup, made safe: lockdown and error keys of `connector` (or all connectors) go
    /// back to vacant and dead or long-stopped holders' locks are freed; live holders keep their keys unless
    /// `force`. Returns every transition made.
    pub fn cleanup(&self, connector: Option<&str>, force: bool) -> Result<Vec<Transition>> {
        let mut done = self.reap(connector)?;
        let now = self.now_ms();
        if force {
            let evictions: Vec<Eviction> = self
                .inner
                .store
                .held_keys(connector)?
                .into_iter()
                .map(|held| Eviction {
                    id: held.id,
                    lease: held.lease,
                    heartbeat_at: held.heartbeat_at,
                    heartbeat_boot_ms: held.heartbeat_boot_ms,
                    event: pool::HistoryEvent::ForceEvicted,
                    reason: format!("cleanup --force took it from live holder pid {}", held.holder.pid),
                })
                .collect();
            let evicted = self.inner.backend.evict(&evictions, now)?;
            log_transitions(&evicted);
            done.extend(evicted);
        }
        let cleared = self.inner.backend.clear_lockdowns_and_errors(connector, now)?;
        log_transitions(&cleared);
        done.extend(cleared);
        Ok(done)
    }

    /// Key names of `connector` by state; retired keys are left out. Lockdown means locked down for
    /// every model (the seed's meaning); see [`key_states_for`](Self::key_states_for).
    pub fn key_states(&self, connector: &str) -> Result<KeyStates> {
        self.key_states_for(connector, None)
    }

    /// Key names of `connector` by state as a request for `model` sees them: a key whose quota scope
    /// is locked down for that model counts as in lockdown, as the claim would skip it.
    pub fn key_states_for(&self, connector: &str, model: Option<&str>) -> Result<KeyStates> {
        self.inner.alive_here()?;
        let model = model.map(pool::view::model_asked);
        let now = self.now_ms();
        let lockdowns = self.inner.backend.lockdowns(Some(connector))?;
        let mut states = KeyStates::default();
        for key in self.inner.backend.keys(Some(connector))? {
            if key.retired_at.is_some() {
                continue;
            }
            let model_lockdowns = pool::view::models_locked_down(&key, &lockdowns, now);
            if !model_lockdowns.is_empty() {
                states.locked_down_models.insert(key.key_name.clone(), model_lockdowns);
            }
            let state = pool::rule::state_for(&key, &lockdowns, model, now);
            let set = match state {
                KeyState::Vacant => &mut states.vacant,
                KeyState::Locked => &mut states.locked,
                KeyState::Lockdown => &mut states.lockdown,
                KeyState::Error => &mut states.error,
            };
            set.insert(key.key_name);
        }
        Ok(states)
    }

    /// Names of the keys of `connector` that could be claimed now (never secrets).
    pub fn available_keys(&self, connector: &str) -> Result<BTreeSet<String>> {
        Ok(self.key_states(connector)?.vacant)
    }

    /// The coordinator's clock, unix ms.
    pub fn now_ms(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    /// The limits in use on `connector` now (see [`Store::limits_in_use`]): those the keyring this
    /// coordinator synced declares, and those learned from answers.
    pub fn limits_in_use(&self, connector: &str) -> Result<Vec<LimitUsage>> {
        let declared = self.inner.backend.declared_limits(connector);
        self.store().limits_in_use(connector, declared.as_deref(), self.now_ms())
    }

    fn reap_if_due(&self, connector: &str) -> Result<()> {
        {
            let mut last = self.inner.last_reap.lock().unwrap_or_else(PoisonError::into_inner);
            if last.get(connector).is_some_and(|at| at.elapsed() < self.inner.options.reap_interval) {
                return Ok(());
            }
            last.insert(connector.to_owned(), Instant::now());
        }
        match self.reap(Some(connector)) {
            // Reaping is a courtesy to the pool: a lock held elsewhere must not fail this claim, whose
            // own write waits as long as its caller allows.
            Err(error @ Error::DatabaseLocked { .. }) => {
                tracing::warn!(error = %error, "reaping skipped");
                Ok(())
            }
            other => other.map(drop),
        }
    }

    /// Deletes the history and request rows older than `older_than`, a small batch per write so that
    /// claims are never held up for long (see [`crate::retention`]). Whatever the retention setting.
    pub fn prune(&self, older_than: Duration) -> Result<Pruned> {
        self.inner.alive_here()?;
        let before = self.now_ms().saturating_sub(i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX));
        retention::prune(&*self.inner.backend, before, None)
    }

    /// Applies the retention setting at most once per [`PRUNE_INTERVAL`]: for at most
    /// [`retention::INLINE_BUDGET`] here, the rest on a thread of its own; a failure is only logged
    /// (the next look tries again).
    fn prune_if_due(&self) {
        let Some(before) = self.inner.options.retention.unwrap_or_default().cutoff(self.now_ms()) else { return };
        {
            let mut last = self.inner.last_prune.lock().unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|at| at.elapsed() < PRUNE_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
        }
        if !retention::overdue(&*self.inner.backend, before) {
            return;
        }
        let logged = |pruned: &Pruned| {
            if pruned.batches > 0 {
                tracing::info!(history = pruned.history, requests = pruned.requests, "rows past retention pruned");
            }
        };
        match retention::prune(&*self.inner.backend, before, Some(retention::INLINE_BUDGET)) {
            Ok(pruned) if pruned.done => return logged(&pruned),
            Ok(pruned) => logged(&pruned),
            Err(error) => {
                return tracing::warn!(error = %error, "pruning rows past retention failed; retried later");
            }
        }
        let backend = Arc::clone(&self.inner.backend);
        let spawned = std::thread::Builder::new().name("apijongler-retention".into()).spawn(move || {
            match retention::prune(&*backend, before, None) {
                Ok(pruned) if pruned.batches > 0 => {
                    tracing::info!(history = pruned.history, requests = pruned.requests, "rows past retention pruned")
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(error = %error, "pruning rows past retention failed; retried later"),
            }
        });
        if let Err(error) = spawned {
            tracing::warn!(error = %error, "no thread for pruning rows past retention");
        }
    }

    /// Writes the lease ends this process still owes (releases given up on an async runtime or by a
    /// cancelled request, ends that failed) before `deadline`, and returns how many are left. Call it
    /// before exiting: what is left is freed by the next claimer once this process is gone.
    pub fn settle(&self, deadline: Instant) -> usize {
        if self.inner.alive_here().is_err() {
            return 0; // The ends left are the parent's to write.
        }
        lease::settle_deferred(&*self.inner, deadline)
    }

    fn ensure_heartbeat(&self) {
        self.inner.ensure_heartbeat();
    }

    /// A lease of `claimed`, a key of `connector` this coordinator just claimed.
    pub(super) fn lease(&self, connector: &str, claimed: pool::Claimed) -> Lease {
        Lease::new(Arc::clone(&self.inner) as Arc<dyn LeaseOwner>, connector, claimed)
    }
}

impl Inner {
    fn ensure_heartbeat(self: &Arc<Self>) {
        let owner: std::sync::Weak<dyn LeaseOwner> = Arc::downgrade(self) as _;
        self.heartbeat.get_or_init(|| lease::start_heartbeat(owner, self.options.heartbeat_interval));
    }
}

impl LeaseOwner for Inner {
    fn store(&self) -> &dyn Backend {
        &*self.backend
    }

    fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    fn leases(&self) -> &Registry {
        &self.leases
    }

    fn trust_window(&self) -> Duration {
        self.trust_window
    }

    fn key_freed(&self) {
        self.waiters.poke();
    }

    fn alive_here(&self) -> Result<()> {
        Inner::alive_here(self)
    }

    fn wake_heartbeat(self: Arc<Self>) {
        self.ensure_heartbeat();
        if let Some(waker) = self.heartbeat.get() {
            // A closed channel means the thread is gone with the coordinator; nothing to wake.
            let _ = waker.send(());
        }
    }
}

/// `claim` leaving out the keys `excluded` names too (the request's tried keys and those this host
/// passes over, see `passed_over`), if given.
fn excluding<'a>(claim: store::ClaimFor<'a>, excluded: Option<&'a [String]>) -> store::ClaimFor<'a> {
    match excluded {
        Some(tried) => store::ClaimFor { tried, ..claim },
        None => claim,
    }
}

/// Every state transition is logged at info, naming the key by name and fingerprint.
pub(crate) fn log_transitions(transitions: &[Transition]) {
    for t in transitions {
        tracing::info!(
            connector = %t.connector, key = %t.key_name, fingerprint = %t.fingerprint,
            from = t.from_state.as_deref().unwrap_or("-"), to = %t.to_state, reason = %t.reason, "key state changed"
        );
    }
}
