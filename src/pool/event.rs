//! History events: what a row of the `history` table records, as one typed word, so that readers (tests,
//! `apijongler history`, a user's SQL) ask "was this a reap?" of a word rather than of a reason's prose.
//!
//! Invariants:
//! - Every history row the store writes names exactly one event, chosen by the code that makes the
//!   change (the store's writer takes it as a required argument), never guessed from the states or the
//!   reason afterwards.
//! - One event per kind of state change; the states before and after stay in the row's own columns
//!   (a release may end in `lockdown` while a lockdown of every model covers the key's scope).
//! - [`HistoryEvent::Unclassified`] is written by nobody: it marks rows written before schema 5 whose
//!   states and reason matched no event (see `migrations/0005_history_events.sql`).
//! - A new word comes with a migration (a schema version bump), even one that changes no table: an
//!   older binary refuses a newer schema at open, rather than failing on a history row it cannot read.

use std::fmt;
use std::str::FromStr;

use super::{Fate, UnknownWord};

/// The kind of state change a history row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HistoryEvent {
    /// A keyring sync inserted the key (no state -> vacant).
    Added,
    /// A process claimed the key (vacant or lockdown -> locked).
    Claimed,
    /// Its holder released it (locked -> vacant, or lockdown while a lockdown of every model covers its
    /// scope).
    Released,
    /// Its holder's answer locked down the key's scope (the key alone or its quota group) for every
    /// model (locked -> lockdown) or for some models (locked -> vacant; the row names them).
    LockedDown,
    /// Another key's answer locked down every model of this key's quota scope, so this free key went
    /// into lockdown with it (vacant or lockdown -> lockdown).
    ScopeLockedDown,
    /// Its holder's answer showed the key is bad (locked -> error).
    Errored,
    /// The reaper freed it because the OS shows its holder is gone: exited, a zombie, or its pid reused
    /// (locked -> vacant or lockdown).
    ReapedDead,
    /// The reaper freed it because its holder, stopped or not visible from this process, let its
    /// heartbeat go stale (locked -> vacant or lockdown).
    ReapedStale,
    /// `cleanup --force` took it from a live holder (locked -> vacant or lockdown).
    ForceEvicted,
    /// `cleanup` lifted its lockdown or error (lockdown or error -> vacant).
    CleanedUp,
    /// A keyring sync found a new secret for it, which lifts an error or lockdown (state -> vacant, or
    /// unchanged).
    SecretChanged,
    /// A keyring sync changed its quota group (state unchanged; the row names the new scope).
    GroupChanged,
    /// A keyring sync found it gone from the keyring (state -> `retired`).
    Retired,
    /// A keyring sync found it back in the keyring (`retired` -> state).
    Restored,
    /// A row written before events existed (schema 4 or older) that the migration could not classify;
    /// its states and reason are kept as written.
    Unclassified,
}

impl HistoryEvent {
    /// Every event, in the order the README lists them.
    pub const ALL: [Self; 15] = [
        Self::Added,
        Self::Claimed,
        Self::Released,
        Self::LockedDown,
        Self::ScopeLockedDown,
        Self::Errored,
        Self::ReapedDead,
        Self::ReapedStale,
        Self::ForceEvicted,
        Self::CleanedUp,
        Self::SecretChanged,
        Self::GroupChanged,
        Self::Retired,
        Self::Restored,
        Self::Unclassified,
    ];

    /// The word stored in the `history.event` column and printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "added",
            Self::Claimed => "claimed",
            Self::Released => "released",
            Self::LockedDown => "locked_down",
            Self::ScopeLockedDown => "scope_locked_down",
            Self::Errored => "errored",
            Self::ReapedDead => "reaped_dead",
            Self::ReapedStale => "reaped_stale",
            Self::ForceEvicted => "force_evicted",
            Self::CleanedUp => "cleaned_up",
            Self::SecretChanged => "secret_changed",
            Self::GroupChanged => "group_changed",
            Self::Retired => "retired",
            Self::Restored => "restored",
            Self::Unclassified => "unclassified",
        }
    }

    /// The event of a lease that ends with `fate`.
    pub fn ending(fate: &Fate) -> Self {
        match fate {
            Fate::Release { .. } => Self::Released,
            Fate::Lockdown(_) => Self::LockedDown,
            Fate::Error { .. } => Self::Errored,
        }
    }

    /// Whether the event ends a lease (the row's `lease` names the lease that ended).
    pub fn ends_lease(self) -> bool {
        matches!(
            self,
            Self::Released
                | Self::LockedDown
                | Self::Errored
                | Self::ReapedDead
                | Self::ReapedStale
                | Self::ForceEvicted
        )
    }

    /// Whether the reaper (or `cleanup --force`) freed a held key.
    pub fn is_eviction(self) -> bool {
        matches!(self, Self::ReapedDead | Self::ReapedStale | Self::ForceEvicted)
    }
}

impl fmt::Display for HistoryEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HistoryEvent {
    type Err = UnknownWord;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|event| event.as_str() == text).ok_or_else(|| {
            UnknownWord::new(
                "history event",
                text,
                "added, claimed, released, locked_down, scope_locked_down, errored, reaped_dead, reaped_stale, \
                 force_evicted, cleaned_up, secret_changed, group_changed, retired, restored or unclassified",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_reads_back_and_unknown_text_is_refused() {
        for event in HistoryEvent::ALL {
            assert_eq!(event.to_string().parse::<HistoryEvent>(), Ok(event));
            let word = event.as_str();
            assert!(word.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "snake_case: {word}");
            assert_eq!(serde_json::to_value(event).expect("json"), serde_json::json!(word));
        }
        let words: std::collections::BTreeSet<_> = HistoryEvent::ALL.iter().map(|event| event.as_str()).collect();
        assert_eq!(words.len(), HistoryEvent::ALL.len(), "one word per event");
        for text in ["", "Claimed", "claim", "locked-down", "reaped", "vacant", "lockdown"] {
            let error = text.parse::<HistoryEvent>().expect_err(text);
            assert_eq!(error.what, "history event");
        }
    }

    /// The error names every word it would have understood.
    #[test]
    fn the_refusal_lists_every_event() {
        let error = "claimd".parse::<HistoryEvent>().expect_err("unknown");
        for event in HistoryEvent::ALL {
            assert!(error.expected.contains(event.as_str()), "{event} missing from {:?}", error.expected);
        }
    }

    #[test]
    fn the_events_that_end_a_lease_are_those_that_leave_locked() {
        let ending: Vec<_> = HistoryEvent::ALL.into_iter().filter(|event| event.ends_lease()).collect();
        assert_eq!(
            ending,
            [
                HistoryEvent::Released,
                HistoryEvent::LockedDown,
                HistoryEvent::Errored,
                HistoryEvent::ReapedDead,
                HistoryEvent::ReapedStale,
                HistoryEvent::ForceEvicted
            ]
        );
        assert!(HistoryEvent::ALL.into_iter().filter(|event| event.is_eviction()).all(HistoryEvent::ends_lease));
    }
}
