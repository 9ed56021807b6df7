//! The dashboard's live data: one thread per process asks the database every [`POLL`] whether any
//! connection of any process committed (SQLite's `data_version`, microseconds a look), and while a
//! page is connected, rebuilds the snapshot and hands it to every page's stream.
//!
//! Invariants:
//! - No snapshot is built while no page listens: a busy gateway with no dashboard open pays one
//!   `data_version` read per [`POLL`].
//! - A snapshot holds names and fingerprints only (the pool's view, see [`snapshot`]), never a secret.
//! - [`Feed::close`] ends the thread and every page's stream, so a stopping server does not wait for
//!   them.

use std::time::{Duration, Instant};

use api_jongler::pool::usage::{UsageBy, UsageQuery};
use api_jongler::{Coordinator, Keyring};
use bytes::Bytes;
use tokio::sync::watch;

use crate::cli::status::{pool_view, with_limits};

/// How often the thread asks whether the database changed.
pub const POLL: Duration = Duration::from_millis(250);

/// A snapshot is rebuilt at least this often while pages listen, so that what time alone changes
/// (a lockdown that ended, a holder that died) shows without any write.
const REFRESH: Duration = Duration::from_secs(5);

/// The activity strip: this long back, in buckets of this length.
pub const ACTIVITY_SPAN_MS: i64 = 3_600_000;
/// One bucket of the activity strip.
pub const ACTIVITY_BUCKET_MS: i64 = 60_000;

/// The latest snapshot (JSON bytes), and the thread that keeps it fresh.
#[derive(Debug)]
pub struct Feed {
    latest: watch::Sender<Bytes>,
    closed: watch::Sender<bool>,
}

impl Feed {
    /// Starts the watching thread on `coordinator`'s database; `keyring`, if given, is compared with
    /// the database as `status` does.
    pub fn start(coordinator: Coordinator, keyring: Option<Keyring>) -> Self {
        let (latest, _) = watch::channel(Bytes::new());
        let (closed, _) = watch::channel(false);
        let (sender, stop) = (latest.clone(), closed.clone());
        let spawned = std::thread::Builder::new()
            .name("apijongler-dashboard".into())
            .spawn(move || watch_database(&coordinator, keyring.as_ref(), &sender, &stop));
        if let Err(error) = spawned {
            tracing::warn!(error = %error, "no thread for the dashboard's live data; pages will not update");
        }
        Self { latest, closed }
    }

    /// A page's view of the snapshots: the latest at once, then each new one.
    pub fn subscribe(&self) -> watch::Receiver<Bytes> {
        self.latest.subscribe()
    }

    /// Resolves once [`close`](Self::close) was called: a page's stream ends then.
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }

    /// Ends the thread and every page's stream.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }
}

impl Drop for Feed {
    /// A feed dropped without [`close`](Feed::close) ends its thread all the same.
    fn drop(&mut self) {
        self.close();
    }
}

/// The thread's loop: a new snapshot whenever the database changed (or [`REFRESH`] passed, or a page
/// arrived) while pages listen.
fn watch_database(
    coordinator: &Coordinator,
    keyring: Option<&Keyring>,
    latest: &watch::Sender<Bytes>,
    closed: &watch::Sender<bool>,
) {
    let mut changes = match coordinator.store().changes() {
        Ok(changes) => changes,
        Err(error) => {
            tracing::warn!(error = %error, "the dashboard cannot watch the database; pages will not update");
            return;
        }
    };
    let mut built: Option<Instant> = None;
    let mut listeners = 0;
    while !*closed.borrow() {
        let changed = match changes.changed() {
            Ok(changed) => changed,
            Err(error) => {
                tracing::warn!(error = %error, "the dashboard's watch on the database failed; trying again");
                true
            }
        };
        let now_listening = latest.receiver_count();
        let arrived = now_listening > listeners;
        listeners = now_listening;
        if listeners > 0 && (changed || arrived || built.is_none_or(|at| at.elapsed() >= REFRESH)) {
            match snapshot(coordinator, keyring) {
                Ok(json) => {
                    latest.send_replace(Bytes::from(json.to_string()));
                    built = Some(Instant::now());
                }
                Err(error) => tracing::warn!(error = %error, "the dashboard's snapshot could not be read"),
            }
        }
        std::thread::sleep(POLL);
    }
}

/// What the page shows, as JSON: the pool's view (the keys as `status --json` prints them, with their
/// holders, lockdowns by model and quota groups, and the limits in use, declared or learned, with their
/// windows' usage), and the last hour's attempts per key and model in one-minute buckets.
pub fn snapshot(coordinator: &Coordinator, keyring: Option<&Keyring>) -> api_jongler::Result<serde_json::Value> {
    let store = coordinator.store();
    let now = coordinator.now_ms();
    let keys = store.keys(None)?;
    let lockdowns = store.lockdowns(None)?;
    let view = with_limits(pool_view(&keys, &lockdowns, keyring, None, None, now), store, keyring)?;
    // Buckets aligned on the minute, so a bar does not shift as time passes.
    let since = (now - ACTIVITY_SPAN_MS).div_euclid(ACTIVITY_BUCKET_MS) * ACTIVITY_BUCKET_MS + ACTIVITY_BUCKET_MS;
    let query = UsageQuery { since, connector: None, by: UsageBy::Key, bucket_ms: Some(ACTIVITY_BUCKET_MS) };
    let activity = store.usage(&query)?;
    Ok(serde_json::json!({
        "at": now,
        "view": view,
        "activity": {"since": since, "bucket_ms": ACTIVITY_BUCKET_MS, "rows": activity},
    }))
}
