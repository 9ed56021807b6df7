//! The claim's loop ends by its caller's deadline even if the store's availability count and its claim
//! ever disagree (a count that says a key is free while the claim finds none): a backend that counts
//! a free key and never hands one out must not keep a caller past its wait.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Coordinator, CoordinatorOptions};
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::holder::Holder;
use crate::keyring::Keyring;
use crate::pool::SyncSource;
use crate::pool::{
    Attempt, Availability, Claimed, Eviction, Fate, HeldKey, HistoryQuery, KeyRecord, LockdownRecord, SyncReport,
    Transition,
};
use crate::resource::{Created, Owner};
use crate::store::{Backend, ChangeWatch, ClaimFor, Sqlite};

/// A real SQLite pool whose claims never find a key, though its availability counts one.
#[derive(Debug)]
struct Disagreeing(Sqlite);

impl Backend for Disagreeing {
    fn example_queries(&self) -> String {
        self.0.example_queries()
    }
    fn lock_deadline(&self, asked: Instant, deadline: Instant) -> Instant {
        self.0.lock_deadline(asked, deadline)
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
    fn schema_version(&self) -> Result<i64> {
        self.0.schema_version()
    }
    fn sync_keys(&self, source: &SyncSource<'_>, now: i64) -> Result<SyncReport> {
        self.0.sync_keys(source, now)
    }
    fn claim(&self, _: ClaimFor<'_>, _: &Holder, _: &dyn Clock, _: Instant) -> Result<Option<Claimed>> {
        Ok(None)
    }
    fn reserved_models(&self, _: &str, _: i64) -> Result<Vec<(String, String)>> {
        Ok(Vec::new())
    }

    fn used_since(&self, _: (&str, &str, &str), _: crate::pool::Measure, _: i64) -> Result<u64> {
        Ok(0)
    }

    fn learned_limits(&self, _: &str, _: i64) -> Result<Vec<crate::pool::LearnedLimit>> {
        Ok(Vec::new())
    }

    fn declared_limits(&self, _: &str) -> Option<Arc<crate::pool::Limits>> {
        None
    }

    fn reserve_held(&self, _: (&str, i64, i64), _: &str, _: u64, _: i64) -> Result<bool> {
        Ok(true)
    }

    fn paces_tokens(&self, _: &str, _: i64) -> bool {
        false
    }

    fn declare_limits(&self, _: &str, _: Option<Arc<crate::pool::Limits>>, _: i64) {}

    fn claim_several(&self, _: ClaimFor<'_>, _: usize, _: &Holder, _: &dyn Clock, _: Instant) -> Result<Vec<Claimed>> {
        Ok(Vec::new())
    }
    fn end_lease(&self, id: i64, lease: i64, fate: &Fate, attempt: Option<&Attempt>, now: i64) -> Result<bool> {
        self.0.end_lease(id, lease, fate, attempt, now)
    }
    fn confirm_error(&self, id: i64, lease: i64, fate: &Fate, now: i64) -> Result<bool> {
        self.0.confirm_error(id, lease, fate, now)
    }
    fn record_attempt(&self, attempt: &Attempt) -> Result<()> {
        self.0.record_attempt(attempt)
    }
    fn reset_escalation(&self, id: i64, lease: i64, model: Option<&str>, now: i64) -> Result<bool> {
        self.0.reset_escalation(id, lease, model, now)
    }
    fn is_locked_down_for(&self, id: i64, model: &str, now: i64) -> Result<bool> {
        self.0.is_locked_down_for(id, model, now)
    }
    fn lockdowns(&self, connector: Option<&str>) -> Result<Vec<LockdownRecord>> {
        self.0.lockdowns(connector)
    }
    fn watch_changes(&self) -> Result<Box<dyn ChangeWatch>> {
        self.0.watch_changes()
    }
    fn attempts(&self, connector: Option<&str>) -> Result<Vec<Attempt>> {
        self.0.attempts(connector)
    }
    fn heartbeat(&self, leases: &[(i64, i64)], clock: &dyn Clock) -> Result<(Vec<(i64, i64)>, i64)> {
        self.0.heartbeat(leases, clock)
    }
    fn held_keys(&self, connector: Option<&str>) -> Result<Vec<HeldKey>> {
        self.0.held_keys(connector)
    }
    fn evict(&self, evictions: &[Eviction], now: i64) -> Result<Vec<Transition>> {
        self.0.evict(evictions, now)
    }
    fn clear_lockdowns_and_errors(&self, connector: Option<&str>, now: i64) -> Result<Vec<Transition>> {
        self.0.clear_lockdowns_and_errors(connector, now)
    }
    fn availability(&self, request: ClaimFor<'_>, now: i64) -> Result<Availability> {
        self.0.availability(request, now)
    }
    fn record_resources(&self, connector: &str, key_name: &str, created: &[Created], now: i64) -> Result<usize> {
        self.0.record_resources(connector, key_name, created, now)
    }
    fn resource_owner(&self, connector: &str, names: &[String], now: i64) -> Result<Option<Owner>> {
        self.0.resource_owner(connector, names, now)
    }
    fn keys(&self, connector: Option<&str>) -> Result<Vec<KeyRecord>> {
        self.0.keys(connector)
    }
    fn history(&self, query: &HistoryQuery) -> Result<Vec<Transition>> {
        self.0.history(query)
    }
    fn explain_claim(&self) -> Result<Vec<String>> {
        self.0.explain_claim()
    }
    fn usage(&self, query: &crate::pool::usage::UsageQuery) -> Result<Vec<crate::pool::usage::UsageRow>> {
        self.0.usage(query)
    }
    fn has_older(&self, journal: crate::store::Journal, before: i64) -> Result<bool> {
        self.0.has_older(journal, before)
    }
    fn prune_batch(&self, journal: crate::store::Journal, before: i64, batch: u32) -> Result<(u64, Duration)> {
        self.0.prune_batch(journal, before, batch)
    }
}

fn disagreeing_pool(dir: &Path) -> Coordinator {
    let sqlite = Sqlite::open(&dir.join("pool.db")).expect("open");
    let coordinator = Coordinator::with_backend(Arc::new(Disagreeing(sqlite)), CoordinatorOptions::default());
    let keyring = Keyring::parse(&dir.join("keys.ini"), "[c]\nkey0 = fake-secret-0\n").expect("keyring");
    coordinator.sync(&keyring).expect("sync");
    let availability = coordinator.store().availability("c", None, &[], coordinator.now_ms()).expect("read");
    assert_eq!(availability.claimable, 1, "the count says a key is free: {availability:?}");
    coordinator
}

/// How late an answer may come after its deadline on a loaded 2-core machine: a few watcher rounds
/// (each at most a poll interval and one read), far below the minutes a loop would take.
const LATE: Duration = Duration::from_secs(10);

#[test]
fn a_zero_wait_claim_ends_even_when_the_count_and_the_claim_disagree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = disagreeing_pool(dir.path());
    let (sender, receiver) = std::sync::mpsc::channel();
    let claimer = coordinator.clone();
    std::thread::spawn(move || sender.send(claimer.claim_for("c", None, &[], Duration::ZERO).map(drop)));
    let answer = receiver.recv_timeout(LATE).expect("a zero-wait claim answered, not looping");
    assert!(matches!(answer, Err(Error::NoKeyAvailable(_))), "{answer:?}");
}

#[test]
fn a_waiting_claim_ends_by_its_deadline_when_the_count_and_the_claim_disagree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = disagreeing_pool(dir.path());
    let wait = Duration::from_millis(300);
    let (sender, receiver) = std::sync::mpsc::channel();
    let claimer = coordinator.clone();
    std::thread::spawn(move || sender.send(claimer.claim_for("c", None, &[], wait).map(drop)));
    let answer = receiver.recv_timeout(wait + LATE).expect("answered by the deadline, not looping");
    assert!(matches!(answer, Err(Error::NoKeyAvailable(_))), "{answer:?}");
}

#[test]
fn an_async_claim_ends_by_its_deadline_when_the_count_and_the_claim_disagree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = disagreeing_pool(dir.path());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    for wait in [Duration::ZERO, Duration::from_millis(300)] {
        let answer = runtime
            .block_on(async {
                tokio::time::timeout(wait + LATE, coordinator.claim_async(ClaimFor::new("c", None, &[]), wait)).await
            })
            .expect("answered by the deadline, not looping");
        assert!(matches!(answer, Err(Error::NoKeyAvailable(_))), "{wait:?}: {answer:?}");
    }
}
