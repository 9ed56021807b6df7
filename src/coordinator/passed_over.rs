//! The keys this host passes over on a store several hosts share (PostgreSQL): those whose secret in
//! the pool is not the one in the keyring this coordinator synced (another host's keyring added the
//! key, or gave it another secret). Claiming one would send another secret, or none, and put a good
//! key in error on every host; failing the request (`Error::KeyringDiffers`) would fail this host's
//! requests whenever the hosts' keyrings disagree. So claims leave them out, as keys already tried.
//!
//! Invariants:
//! - Only connectors the synced keyring has a section for are judged, and only on a shared store:
//!   elsewhere (SQLite, where every sync applies the keyring as the truth) nothing is passed over and a
//!   claimed key the keyring cannot serve still fails with `Error::KeyringDiffers`, as before.
//! - The set is learned at each sync from the pool's rows, and grows when a claim returns a key the
//!   keyring cannot serve (the pool changed since): that claim is given back at once, unused, and the
//!   claim tried again without it. A sync starts the set afresh, so a key set right comes back.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use crate::keyring::Keyring;
use crate::pool::{ForeignKey, KeyRecord, PassedOver};

/// What the keyring of one connector holds, and the pool's keys it cannot serve.
#[derive(Debug)]
struct Connector {
    /// Fingerprint of each of the keyring's keys, by name.
    keyring: HashMap<String, String>,
    /// The pool's keys this keyring cannot serve, by name.
    foreign: BTreeMap<String, ForeignKey>,
}

/// The keys this host passes over, by connector (see the module's invariants).
#[derive(Debug, Default)]
pub(crate) struct Passing {
    state: Mutex<Option<(PathBuf, HashMap<String, Connector>)>>,
}

impl Passing {
    /// Learns `keyring`, just synced, and which of `records` (the pool's keys of its connectors) it
    /// cannot serve.
    pub(crate) fn learn(&self, keyring: &Keyring, records: &[KeyRecord]) {
        let mut connectors: HashMap<String, Connector> = keyring
            .connectors()
            .map(|connector| (connector.to_owned(), Connector { keyring: HashMap::new(), foreign: BTreeMap::new() }))
            .collect();
        for (connector, key) in keyring.all_keys() {
            if let Some(known) = connectors.get_mut(connector) {
                known.keyring.insert(key.name().to_owned(), key.fingerprint().as_str().to_owned());
            }
        }
        for record in records.iter().filter(|record| record.retired_at.is_none()) {
            let Some(known) = connectors.get_mut(&record.connector) else { continue };
            if let Some(foreign) = known.judge(&record.key_name, &record.fingerprint) {
                known.foreign.insert(record.key_name.clone(), foreign);
            }
        }
        *self.lock() = Some((keyring.path().to_owned(), connectors));
    }

    /// Whether this host's keyring serves key `name` of `connector` with the secret `fingerprint`
    /// names; if not, the key is passed over from now on.
    pub(crate) fn serves(&self, connector: &str, name: &str, fingerprint: &str) -> bool {
        let mut state = self.lock();
        let Some(known) = state.as_mut().and_then(|(_, connectors)| connectors.get_mut(connector)) else { return true };
        let Some(foreign) = known.judge(name, fingerprint) else { return true };
        tracing::warn!(
            connector,
            key = name,
            pool_fingerprint = fingerprint,
            keyring_fingerprint = foreign.keyring_fingerprint.as_deref().unwrap_or("-"),
            "claimed a key whose secret in the shared pool is not this keyring's; given back and passed over"
        );
        known.foreign.insert(name.to_owned(), foreign);
        false
    }

    /// `tried` and the names of the keys of `connector` passed over; `None` when none is.
    pub(crate) fn excluding(&self, connector: &str, tried: &[String]) -> Option<Vec<String>> {
        let state = self.lock();
        let known = state.as_ref()?.1.get(connector).filter(|known| !known.foreign.is_empty())?;
        Some(tried.iter().cloned().chain(known.foreign.keys().filter(|name| !tried.contains(name)).cloned()).collect())
    }

    /// The keys of `connector` passed over, for the error of a claim that found no key.
    pub(crate) fn of(&self, connector: &str) -> Option<PassedOver> {
        let state = self.lock();
        let (path, connectors) = state.as_ref()?;
        let known = connectors.get(connector).filter(|known| !known.foreign.is_empty())?;
        Some(PassedOver { keyring: path.clone(), keys: known.foreign.values().cloned().collect() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(PathBuf, HashMap<String, Connector>)>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Connector {
    /// Why this keyring cannot serve key `name` whose secret in the pool has `fingerprint`, if it cannot.
    fn judge(&self, name: &str, fingerprint: &str) -> Option<ForeignKey> {
        let here = self.keyring.get(name);
        (here.map(String::as_str) != Some(fingerprint)).then(|| ForeignKey {
            key: name.to_owned(),
            pool_fingerprint: fingerprint.to_owned(),
            keyring_fingerprint: here.cloned(),
        })
    }
}
