//! The pool's vocabulary and rules: what a key's state, a lockdown's scope, a lease's fate, a history
//! event and a request's outcome are, as types every other module (the store backends, the
//! coordinator, the CLI, the gateway) speaks, and each rule about them written once.
//!
//! Invariants:
//! - Every word that is stored or printed has one `Display` and one `FromStr`, and `FromStr` refuses
//!   text it does not know ([`UnknownWord`]) rather than guessing: a row written by a newer version
//!   is an error to report, not a vacant key.
//! - This module depends on nothing of the crate but [`crate::holder`]: it is the bottom of the pool,
//!   so that the store below the coordinator and the error type can both use it.

/// Serialises a word of the vocabulary as its `Display` text, the same text the database stores.
macro_rules! serialize_as_text {
    ($($word:ty),*) => {$(
        impl serde::Serialize for $word {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }
    )*};
}

pub mod event;
mod fate;
#[cfg(test)]
mod fixtures;
pub mod learned;
pub mod limit;
pub mod outcome;
pub mod pacing;
mod records;
pub mod rule;
mod scope;
mod state;
mod unavailable;
pub mod usage;
pub mod view;
mod word;

pub use event::HistoryEvent;
pub use fate::{Fate, Lockdown, Reach};
pub use learned::{LearnedLimit, Taught};
pub use limit::{Limit, LimitProblem, Limits, Measure, Window};
pub use pacing::{LimitUsage, Pacing, Source};
pub use records::*;
pub use scope::{ModelScope, Scope};
pub use state::KeyState;
pub use unavailable::{ForeignKey, PassedOver, Unavailable};
pub use word::UnknownWord;

// Here, not next to the macro, so that `word` (which every word's module uses) uses none of them.
serialize_as_text!(KeyState, Scope, ModelScope, HistoryEvent, outcome::Outcome, outcome::Unanswered);
