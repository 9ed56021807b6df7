//! The error of reading a stored or typed word the pool does not know.

/// A word of the pool's vocabulary that is not one: e.g. a key state `lokced` in a row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {text:?} (expected {expected})")]
pub struct UnknownWord {
    /// What the word should have named (`key state`, `quota scope`, ...).
    pub what: &'static str,
    /// The text found.
    pub text: String,
    /// The words that would have been understood.
    pub expected: &'static str,
}

impl UnknownWord {
    /// The error for `text`, which should have been a `what`, one of `expected`.
    pub fn new(what: &'static str, text: &str, expected: &'static str) -> Self {
        Self { what, text: text.chars().take(64).collect(), expected }
    }
}
