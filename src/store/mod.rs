//! The seam between the pool and its database: `Backend`, what every backend implements (SQLite, the
//! default, in `sqlite`; PostgreSQL for pools shared by several hosts next), and [`Store`], the
//! read-only handle on it that the public API gives out.
//!
//! Invariants every backend keeps (the SQLite one documents how):
//! - A claim is one atomic statement: two processes never both get a key, and it increments the key's
//!   lease; every later write by the holder is fenced by that lease and changes nothing once it is lost.
//! - Every state change writes its history row in the same transaction.
//! - No operation waits for another writer past its caller's deadline (never less than the backend's
//!   floor): it fails with `Error::DatabaseLocked` instead.
//! - The rule of which lockdowns bind a key (`crate::pool::rule`) is the one its statements apply.
//! - A claim pinned to a quota scope (a request naming a resource of a known owner, `crate::resource`)
//!   takes only keys of that scope, in the same one statement; availability counts only those keys.
//! - A resource's owner is read only while its mapping has not expired.
//!
//! Writes are crate-private: users read the pool through [`Store`]; they change it only through a
//! `Coordinator` and its leases, which keep the invariants above.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod location;
mod paced;
mod postgres;
mod rule_sql;
mod sqlite;
mod transition;
mod usage;

use crate::clock::Clock;
use crate::error::Result;
use crate::holder::Holder;
use crate::pool::usage::{UsageQuery, UsageRow};
use crate::pool::{
    Attempt, Availability, Claimed, Eviction, Fate, HeldKey, HistoryQuery, KeyRecord, LearnedLimit, LimitUsage, Limits,
    LockdownRecord, Measure, Pacing, SyncReport, SyncSource, Transition,
};
use crate::resource::{Created, Owner};

pub(crate) use postgres::Postgres;
pub(crate) use sqlite::Sqlite;

/// What a claim is for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClaimFor<'a> {
    /// The connector.
    pub(crate) connector: &'a str,
    /// The requested model (`None`: a request that names none).
    pub(crate) model: Option<&'a str>,
    /// The key names not to take.
    pub(crate) tried: &'a [String],
    /// The quota scope it is pinned to (`None`: any; a request naming a resource of a known owner
    /// takes only keys of the owner's scope, see `crate::resource`).
    pub(crate) pin: Option<&'a str>,
    /// The request's estimated input tokens, reserved against token limits (see `crate::tokens`).
    pub(crate) tokens: u64,
}

impl<'a> ClaimFor<'a> {
    /// A claim for a request of `connector` for `model`, taking none of `tried`, any scope, no tokens.
    pub(crate) fn new(connector: &'a str, model: Option<&'a str>, tried: &'a [String]) -> Self {
        Self { connector, model, tried, pin: None, tokens: 0 }
    }
}
pub use location::{DB_ENV, Location, PostgresUrl, default_location};
pub use postgres::DURABLE_COMMITS as POSTGRES_DURABLE_COMMITS;
pub use sqlite::{APPLICATION_ID, DEFAULT_LOCK_WAIT_FLOOR, SCHEMA_VERSION};

/// The append-only tables that retention prunes (`crate::retention`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Journal {
    /// `history`: the state transitions.
    History,
    /// `requests`: the upstream attempts.
    Requests,
}

impl Journal {
    /// Both, in the order retention prunes them.
    pub(crate) const ALL: [Self; 2] = [Self::History, Self::Requests];
}

/// What a database must do for the pool. Object-safe, so a coordinator holds any backend (and a test
/// a fake one) behind one `Arc<dyn Backend>`.
pub(crate) trait Backend: Send + Sync + fmt::Debug {
    /// Queries for the user's own database shell (`sqlite3`, `psql`), in its dialect.
    fn example_queries(&self) -> String;

    /// The deadline for an operation asked for at `asked` whose caller may wait until `deadline`: that
    /// deadline, but never less than the store's floor after `asked`.
    fn lock_deadline(&self, asked: Instant, deadline: Instant) -> Instant;

    /// The database file.
    fn path(&self) -> &Path;

    /// How far the server's wall clock is ahead of `clock`, ms, on a store several hosts share (whose
    /// hosts' clocks may differ); `None` on a store with no clock of its own (SQLite).
    fn server_clock_offset(&self, _clock: &dyn Clock) -> Result<Option<i64>> {
        Ok(None)
    }

    /// Whether claims run side by side (PostgreSQL's row locks) rather than one at a time under one
    /// write lock (SQLite, where reads run beside it): then a claim that finds no key costs no more than
    /// a read of availability, and a waiting process claims before it reads.
    fn claims_in_parallel(&self) -> bool {
        false
    }

    /// Whether hosts with different keyrings may share this store: then a sync only adds, restores
    /// and regroups keys unless told to apply its keyring as the truth (`SyncSource::as_truth`), and a
    /// coordinator passes over the keys its keyring cannot serve. SQLite's file belongs to one host.
    fn is_shared(&self) -> bool {
        false
    }

    /// The schema version recorded in the file.
    fn schema_version(&self) -> Result<i64>;

    /// What in the database's own settings puts the pool's guarantees at risk, one sentence each
    /// naming the setting to fix; none on SQLite, whose settings apijongler chooses itself.
    fn durability_warnings(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// Makes the keys of the connectors `source` defines match it: inserts new keys vacant, lifts error
    /// and lockdown from keys whose secret changed, retires keys that left the keyring and restores those
    /// that came back. Keys of other connectors are not touched. Writes nothing (takes no write lock)
    /// when everything already matches. A shared store (see [`Backend::is_shared`]) retires no key and
    /// replaces no secret unless `source.as_truth`: a secret that differs is reported in `differing`.
    fn sync_keys(&self, source: &SyncSource<'_>, now: i64) -> Result<SyncReport>;

    /// Claims the first claimable key of `connector` not named in `tried`, of the pinned scope if any,
    /// and not locked down for `model` (`None`: a request that names no model), for `holder`; waits for the write lock until
    /// `deadline` exactly (the caller applies the store's floor: see [`Backend::lock_deadline`]), then
    /// fails with [`Error::DatabaseLocked`] saying how long it waited. The times written are read from `clock`
    /// once the lock is held, so a long wait never makes a fresh lease look old; the claim's boot-clock
    /// time comes back in [`Claimed::boot_ms`]. Claims made at the same time by threads of this process
    /// share one transaction, whose times come from the clock of the thread that writes it: callers of
    /// one store pass one clock (a coordinator's).
    fn claim(
        &self,
        request: ClaimFor<'_>,
        holder: &Holder,
        clock: &dyn Clock,
        deadline: Instant,
    ) -> Result<Option<Claimed>>;

    /// The limits this process's claims of `connector` reserve against (`None`: none declared), as the
    /// keyring it synced declares them: a claim for a model then takes a key only if every window of
    /// the key's quota scope and the model has room, and records its reservation in the same
    /// transaction; a full window becomes a lockdown of the scope for the model until it has room.
    fn declare_limits(&self, connector: &str, limits: Option<Arc<Limits>>, now: i64);

    /// The limits the keyring this process synced declares for `connector`, if any.
    fn declared_limits(&self, connector: &str) -> Option<Arc<Limits>>;

    /// Whether a token limit (declared or learned, as last read) may pace `connector`'s claims: only then
    /// is a request's size read to estimate its tokens.
    fn paces_tokens(&self, connector: &str, now: i64) -> bool;

    /// Up to `count` claims of one request (as [`claim`](Self::claim) would make them) in one
    /// transaction, for as many waiters: the keys claimed, in order, fewer when fewer were free.
    fn claim_several(
        &self,
        request: ClaimFor<'_>,
        count: usize,
        holder: &Holder,
        clock: &dyn Clock,
        deadline: Instant,
    ) -> Result<Vec<Claimed>>;

    /// Ends lease `lease` on key `id` with `fate`. `Ok(false)` means the lease was already lost: the
    /// key now belongs to someone else (or to nobody) and was not touched.
    /// `attempt`, if given, is recorded in the same transaction.
    ///
    /// A lockdown is recorded on its scope (the key alone, or its quota group) for its models; one of
    /// every model also puts the group's free keys in lockdown. The key goes back to vacant, or to
    /// lockdown while a lockdown of every model covers its scope. A success clears the strikes of the
    /// attempt's model on the key's scopes once their lockdowns are over.
    fn end_lease(&self, id: i64, lease: i64, fate: &Fate, attempt: Option<&Attempt>, now: i64) -> Result<bool>;

    /// Puts key `id` in error with `fate` (a [`Fate::Error`]) after its lease `lease` ended with a
    /// release: the answer that blamed it was confirmed as the key's own (another key answered the same
    /// request). Fenced by that lease: `Ok(false)`, and nothing written, when the key was claimed again
    /// since, is held, or is already in error.
    fn confirm_error(&self, id: i64, lease: i64, fate: &Fate, now: i64) -> Result<bool>;

    /// Records an attempt made without ending a lease (no key, or the lease is kept).
    fn record_attempt(&self, attempt: &Attempt) -> Result<()>;

    /// After a success for `model` on a key that is kept (per-connection leases), the strikes of that
    /// model on the key's scopes start again at 0 (their lockdowns being over). `Ok(false)`: the lease
    /// was lost.
    fn reset_escalation(&self, id: i64, lease: i64, model: Option<&str>, now: i64) -> Result<bool>;

    /// Whether a lockdown in force keeps key `id` from serving `model` (the claim's rule).
    fn is_locked_down_for(&self, id: i64, model: &str, now: i64) -> Result<bool>;

    /// Reserves one more request for `model` (and its `tokens`) on key `id` of `connector`, held under
    /// `lease` and kept across requests (per-connection leases), as a claim would: `Ok(false)` when a
    /// window of its scope has no room (the scope is then paced for the model, and the caller gives the
    /// key back and claims another) or the lease was lost. Writes nothing where nothing paces the
    /// connector.
    fn reserve_held(&self, held: (&str, i64, i64), model: &str, tokens: u64, now: i64) -> Result<bool>;

    /// The lockdowns recorded for `connector` (or for all connectors), in force or not, by connector,
    /// scope and model.
    fn lockdowns(&self, connector: Option<&str>) -> Result<Vec<LockdownRecord>>;

    /// A watch on the database that tells when another connection (of any process, this one's
    /// included) committed a change: SQLite's `data_version`, which costs microseconds to read.
    fn watch_changes(&self) -> Result<Box<dyn ChangeWatch>>;

    /// Every recorded attempt, oldest first (for the demo's summary and for tests).
    fn attempts(&self, connector: Option<&str>) -> Result<Vec<Attempt>>;

    /// Refreshes the heartbeat of exactly the given leases (`(key id, lease token)`), with times read
    /// from `clock` once the lock is held, and returns those still held (a lease missing from the
    /// answer was lost) and the boot-clock time written. Keys this process holds under no listed lease
    /// are not touched.
    fn heartbeat(&self, leases: &[(i64, i64)], clock: &dyn Clock) -> Result<(Vec<(i64, i64)>, i64)>;

    /// The held keys of `connector` (or of all connectors), for the reaper.
    fn held_keys(&self, connector: Option<&str>) -> Result<Vec<HeldKey>>;

    /// Frees the given locks, each only if its lease and heartbeat are still the ones the caller read
    /// (a heartbeat that landed first wins): back to vacant, or to lockdown if the key's deadline is
    /// still ahead. Returns the transitions written.
    fn evict(&self, evictions: &[Eviction], now: i64) -> Result<Vec<Transition>>;

    /// Puts every key in lockdown or error of `connector` (or of all connectors) back to vacant.
    /// Locks are not touched here: the reaper frees dead ones, and a forced cleanup evicts the rest.
    fn clear_lockdowns_and_errors(&self, connector: Option<&str>, now: i64) -> Result<Vec<Transition>>;

    /// How many keys of `connector` (of the pinned scope, if any) are claimable for `model`, held, in
    /// lockdown (for every model or for `model`) or in error, from a read (no write lock), so waiters
    /// can poll without slowing the writers.
    fn availability(&self, request: ClaimFor<'_>, now: i64) -> Result<Availability>;

    /// Records that the answer key `key_name` of `connector` got created `created` (unless already
    /// expired at `now`), and forgets the connector's resources expired by `now`. Returns how many were
    /// recorded.
    fn record_resources(&self, connector: &str, key_name: &str, created: &[Created], now: i64) -> Result<usize>;

    /// The owner of the first of `names` (`KIND/ID`) that `connector` knows and that has not expired at
    /// `now`, with its key's quota scope of now.
    fn resource_owner(&self, connector: &str, names: &[String], now: i64) -> Result<Option<Owner>>;

    /// How much of `measure` (requests, or input tokens) quota scope `scope` reserved for `model` at or
    /// after `since` (unix ms): a window's usage.
    fn used_since(&self, of: (&str, &str, &str), measure: Measure, since: i64) -> Result<u64>;

    /// The limits `connector`'s scopes learned from answers, not yet forgotten at `now`.
    fn learned_limits(&self, connector: &str, now: i64) -> Result<Vec<LearnedLimit>>;

    /// The (quota scope, model) pairs of `connector` with reservations at or after `since`, in order.
    fn reserved_models(&self, connector: &str, since: i64) -> Result<Vec<(String, String)>>;

    /// Every key of `connector` (or of all connectors), retired ones included, by connector and name.
    fn keys(&self, connector: Option<&str>) -> Result<Vec<KeyRecord>>;

    /// History rows matching `query`, newest first.
    fn history(&self, query: &HistoryQuery) -> Result<Vec<Transition>>;

    /// The attempts `query` asks for, counted (see `crate::pool::usage`), by connector, name, model
    /// and bucket. A read.
    fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>>;

    /// Whether `journal` holds any row older than `before` (unix ms). A read.
    fn has_older(&self, journal: Journal, before: i64) -> Result<bool>;

    /// Deletes up to `batch` of the oldest rows of `journal` older than `before` (unix ms) in one short
    /// write transaction; how many it deleted, and how long the deletion held the write lock (the wait
    /// for the lock left out).
    fn prune_batch(&self, journal: Journal, before: i64, batch: u32) -> Result<(u64, Duration)>;

    /// The plan SQLite chooses for the very statement [`claim`](Self::claim) runs, one line per step
    /// (for tests and docs).
    fn explain_claim(&self) -> Result<Vec<String>>;
}

/// Sees other connections' (and processes') commits, so waiters look again only when something changed.
pub(crate) trait ChangeWatch: Send {
    /// Whether anything was committed since the last call (true on the first).
    fn changed(&mut self) -> Result<bool>;

    /// How often a look is worth its cost: SQLite's costs microseconds, a server's a round trip that
    /// every waiting process of every host would pay.
    fn interval(&self) -> Duration {
        Duration::from_millis(1)
    }
}

/// A watch on the database that tells, for microseconds a look, whether any connection of any
/// process committed since the last look (SQLite's `data_version`): what a live view polls.
pub struct Changes(Box<dyn ChangeWatch>);

impl Changes {
    /// Whether anything was committed since the last call (true on the first).
    pub fn changed(&mut self) -> Result<bool> {
        self.0.changed()
    }
}

impl fmt::Debug for Changes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Changes").finish_non_exhaustive()
    }
}

/// A read-only handle on the pool's database: the keys, lockdowns, history and attempts as `status`,
/// `why` and the user's own tools see them. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
}

impl Store {
    pub(crate) fn new(backend: Arc<dyn Backend>) -> Self {
        Self { backend }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        self.backend.path()
    }

    /// The schema version recorded in the file.
    pub fn schema_version(&self) -> Result<i64> {
        self.backend.schema_version()
    }

    /// What in the database's own settings puts the pool's guarantees at risk (a PostgreSQL server
    /// that does not keep its commits), one sentence each naming the setting to fix.
    pub fn durability_warnings(&self) -> Result<Vec<String>> {
        self.backend.durability_warnings()
    }

    /// Whether several hosts (with keyrings of their own) may share this store: PostgreSQL. A keyring
    /// sync then only adds, restores and regroups keys, unless it applies the keyring as the truth
    /// (`Coordinator::sync_as_truth`).
    pub fn is_shared(&self) -> bool {
        self.backend.is_shared()
    }

    /// Every key of `connector` (or of all connectors), retired ones included, by connector and name.
    pub fn keys(&self, connector: Option<&str>) -> Result<Vec<KeyRecord>> {
        self.backend.keys(connector)
    }

    /// The lockdowns recorded for `connector` (or for all connectors), in force or not.
    pub fn lockdowns(&self, connector: Option<&str>) -> Result<Vec<LockdownRecord>> {
        self.backend.lockdowns(connector)
    }

    /// History rows, newest first.
    pub fn history(&self, query: &HistoryQuery) -> Result<Vec<Transition>> {
        self.backend.history(query)
    }

    /// The upstream attempts recorded for `connector` (or for all connectors), oldest first.
    pub fn attempts(&self, connector: Option<&str>) -> Result<Vec<Attempt>> {
        self.backend.attempts(connector)
    }

    /// The keys held by some process, with their holders and heartbeats.
    pub fn held_keys(&self, connector: Option<&str>) -> Result<Vec<HeldKey>> {
        self.backend.held_keys(connector)
    }

    /// How many keys of `connector` could serve `model` now, and why the others cannot.
    pub fn availability(
        &self,
        connector: &str,
        model: Option<&str>,
        tried: &[String],
        now: i64,
    ) -> Result<Availability> {
        self.backend.availability(ClaimFor::new(connector, model, tried), now)
    }

    /// Who owns the first of the resources `names` (`files/abc`, `cachedContents/x`...) that
    /// `connector` knows and that has not expired at `now`: the key that created it and its quota
    /// scope, to which requests naming it are pinned.
    pub fn resource_owner(&self, connector: &str, names: &[String], now: i64) -> Result<Option<Owner>> {
        self.backend.resource_owner(connector, names, now)
    }

    /// The limits `connector`'s quota scopes learned from the provider's answers (a 429's
    /// `quotaValue`), not yet forgotten at `now`.
    pub fn learned_limits(&self, connector: &str, now: i64) -> Result<Vec<LearnedLimit>> {
        self.backend.learned_limits(connector, now)
    }

    /// Every limit that binds requests for `model` on keys of quota scope `scope` at `now` (`declared`:
    /// the keyring's limits of the connector, if any; and the learned ones), each with its window's usage.
    pub fn usage_of(
        &self,
        (connector, scope, model): (&str, &str, &str),
        declared: Option<&Limits>,
        now: i64,
    ) -> Result<Vec<LimitUsage>> {
        let pacing = Pacing {
            declared: Arc::new(declared.cloned().unwrap_or_default()),
            learned: self.learned_limits(connector, now)?,
        };
        usage::of(self.backend.as_ref(), &pacing, (connector, scope, model), now)
    }

    /// The limits in use on `connector` at `now`: for each (quota scope, model) that reserved within
    /// its limits' longest window or learned a limit not yet forgotten, every limit that binds it with
    /// its window's usage, by scope and model.
    pub fn limits_in_use(&self, connector: &str, declared: Option<&Limits>, now: i64) -> Result<Vec<LimitUsage>> {
        let pacing = Pacing {
            declared: Arc::new(declared.cloned().unwrap_or_default()),
            learned: self.learned_limits(connector, now)?,
        };
        usage::in_use(self.backend.as_ref(), &pacing, connector, now)
    }

    /// The (quota scope, model) pairs of `connector` that reserved against limits (declared or learned)
    /// at or after `since` (unix ms), by scope and model.
    pub fn reserved_models(&self, connector: &str, since: i64) -> Result<Vec<(String, String)>> {
        self.backend.reserved_models(connector, since)
    }

    /// Whether a lockdown in force keeps key row `id` from serving `model` at `now` (the claim's rule).
    pub fn is_locked_down_for(&self, id: i64, model: &str, now: i64) -> Result<bool> {
        self.backend.is_locked_down_for(id, model, now)
    }

    /// The upstream attempts `query` asks for, counted per key, model or quota scope (and per time
    /// bucket, if asked), by connector, name, model and bucket.
    pub fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>> {
        self.backend.usage(query)
    }

    /// A watch that tells when the database changed (see [`Changes`]); it keeps one connection open.
    pub fn changes(&self) -> Result<Changes> {
        self.backend.watch_changes().map(Changes)
    }

    /// Queries worth keeping at hand in the user's own database shell, with a comment line above each.
    pub fn example_queries(&self) -> String {
        self.backend.example_queries()
    }

    /// The claim statement's query plan, one line per step.
    pub fn explain_claim(&self) -> Result<Vec<String>> {
        self.backend.explain_claim()
    }
}
