//! A key's state as stored: vacant, locked, lockdown or error.

use std::fmt;
use std::str::FromStr;

use super::UnknownWord;

/// The state of a key, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyState {
    /// Free to be claimed.
    Vacant,
    /// Held by a live process.
    Locked,
    /// Rate-limited for every model until a deadline (a lockdown of some models only leaves the key
    /// vacant: see [`super::rule`]).
    Lockdown,
    /// Permanently bad until cleaned up or its secret changes.
    Error,
}

impl KeyState {
    /// Every state, in the order `status` lists them.
    pub const ALL: [Self; 4] = [Self::Vacant, Self::Locked, Self::Lockdown, Self::Error];

    /// The word stored in the database and printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vacant => "vacant",
            Self::Locked => "locked",
            Self::Lockdown => "lockdown",
            Self::Error => "error",
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyState {
    type Err = UnknownWord;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
            .ok_or_else(|| UnknownWord::new("key state", text, "vacant, locked, lockdown or error"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_reads_back_and_unknown_text_is_refused() {
        for state in KeyState::ALL {
            assert_eq!(state.to_string().parse::<KeyState>(), Ok(state));
        }
        for text in ["", "Vacant", "lokced", "retired"] {
            assert!(text.parse::<KeyState>().is_err(), "{text:?}");
        }
    }
}
