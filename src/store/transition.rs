//! A history row about to be written, as every backend writes it: the one shape of a state change.

use crate::pool::{HistoryEvent, Transition};

/// A history row about to be written.
pub(in crate::store) struct NewTransition<'a> {
    pub(in crate::store) event: HistoryEvent,
    pub(in crate::store) connector: &'a str,
    pub(in crate::store) key_name: &'a str,
    pub(in crate::store) fingerprint: &'a str,
    pub(in crate::store) from_state: Option<&'a str>,
    pub(in crate::store) to_state: &'a str,
    pub(in crate::store) reason: &'a str,
    pub(in crate::store) http_status: Option<u16>,
    pub(in crate::store) holder_pid: Option<u32>,
    pub(in crate::store) lease: Option<i64>,
    pub(in crate::store) lockdown_until: Option<i64>,
    pub(in crate::store) model: Option<&'a str>,
    pub(in crate::store) quota_scope: Option<&'a str>,
}

impl<'a> NewTransition<'a> {
    /// A transition with no status, holder, lease or deadline; set those with struct update syntax.
    /// `key` is (connector, key name, fingerprint). The event is required: no row is written without one.
    pub(in crate::store) fn new(
        event: HistoryEvent,
        (connector, key_name, fingerprint): (&'a str, &'a str, &'a str),
        from_state: Option<&'a str>,
        to_state: &'a str,
        reason: &'a str,
    ) -> Self {
        Self {
            event,
            connector,
            key_name,
            fingerprint,
            from_state,
            to_state,
            reason,
            http_status: None,
            holder_pid: None,
            lease: None,
            lockdown_until: None,
            model: None,
            quota_scope: None,
        }
    }

    /// The row as written, with its id and time.
    pub(in crate::store) fn written(&self, id: i64, at: i64) -> Transition {
        Transition {
            id,
            event: self.event,
            at,
            connector: self.connector.to_owned(),
            key_name: self.key_name.to_owned(),
            fingerprint: self.fingerprint.to_owned(),
            from_state: self.from_state.map(str::to_owned),
            to_state: self.to_state.to_owned(),
            reason: self.reason.to_owned(),
            http_status: self.http_status,
            holder_pid: self.holder_pid,
            lease: self.lease,
            lockdown_until: self.lockdown_until,
            model: self.model.map(str::to_owned),
            quota_scope: self.quota_scope.map(str::to_owned),
        }
    }
}
