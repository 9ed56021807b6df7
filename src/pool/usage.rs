//! Usage: the `requests` table counted per key, model or quota group, over a span and optionally in
//! time buckets (`apijongler usage`, the dashboard's strip of the last hour).
//!
//! Invariants:
//! - An attempt counts once, in exactly one of three columns besides `requests`: a success (outcome
//!   `success`), a 429 (the upstream answered 429, whatever the outcome it was judged), or an error
//!   (anything else: another status, a timeout, a broken connection...). [`Tally::add`] is that rule
//!   in Rust; the store's SQL applies the same one, and a test checks they agree.
//! - Usage carries names only (connector, key name, model, quota scope), never a secret.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use super::UnknownWord;
use super::outcome::{Judged, Outcome};

/// What usage is counted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum UsageBy {
    /// Per connector and key.
    #[default]
    Key,
    /// Per connector and model (requests that named none count under `-`).
    Model,
    /// Per connector and quota scope (`group:NAME`, `project:NUMBER`, `key:NAME`).
    Group,
}

impl UsageBy {
    /// Every grouping, in the order above.
    pub const ALL: [Self; 3] = [Self::Key, Self::Model, Self::Group];

    /// The word of `--by`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Key => "key",
            Self::Model => "model",
            Self::Group => "group",
        }
    }
}

impl fmt::Display for UsageBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for UsageBy {
    type Err = UnknownWord;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|by| by.as_str() == text)
            .ok_or_else(|| UnknownWord::new("usage grouping", text, "one of 'key', 'model', 'group'"))
    }
}

/// What to count: attempts at or after `since` (unix ms), of one connector or all, grouped by `by`,
/// and, with `bucket_ms`, per bucket of that length counted from `since`.
#[derive(Debug, Clone, Default)]
pub struct UsageQuery {
    /// Only attempts at or after this, unix ms.
    pub since: i64,
    /// Only this connector.
    pub connector: Option<String>,
    /// What the rows are per.
    pub by: UsageBy,
    /// Also per bucket of this many ms from `since` (`None`: one row for the whole span).
    pub bucket_ms: Option<i64>,
}

/// How many attempts, and what they came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Tally {
    /// Every attempt.
    pub requests: u64,
    /// Attempts answered with success.
    pub successes: u64,
    /// Attempts the upstream answered 429.
    pub rate_limited: u64,
    /// The rest: other statuses, timeouts, broken connections.
    pub errors: u64,
}

impl Tally {
    /// Counts one attempt of `outcome` whose answer had `status` (see the module's rule).
    pub fn add(&mut self, outcome: Outcome, status: Option<u16>) {
        self.requests += 1;
        if status == Some(429) {
            self.rate_limited += 1;
        } else if outcome == Outcome::Answered(Judged::Success) {
            self.successes += 1;
        } else {
            self.errors += 1;
        }
    }
}

/// One row of usage: a connector and the key, model or scope it is per, in a bucket or the whole span.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageRow {
    /// Connector.
    pub connector: String,
    /// The key name, model or quota scope, as the query's `by` says (`-` when the attempt had none).
    pub name: String,
    /// With buckets, the key's model for key rows (the dashboard's strip is per key and model), else
    /// `None`.
    pub model: Option<String>,
    /// The bucket's start, unix ms (`None` without buckets).
    pub bucket: Option<i64>,
    /// The counts.
    #[serde(flatten)]
    pub tally: Tally,
    /// Input tokens used, as the answers told them (`usageMetadata.promptTokenCount`,
    /// `usage.prompt_tokens`; the `requests` table records them where a token limit binds); `None`
    /// when no attempt of the row has them.
    pub tokens: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_and_unknown_ones_are_refused() {
        for by in UsageBy::ALL {
            assert_eq!(by.to_string().parse::<UsageBy>(), Ok(by));
        }
        assert!("keys".parse::<UsageBy>().is_err());
    }

    #[test]
    fn each_attempt_counts_in_one_column() {
        let mut tally = Tally::default();
        tally.add(Outcome::SUCCESS, Some(200));
        tally.add(Outcome::Answered(Judged::RateLimited), Some(429));
        tally.add(Outcome::Answered(Judged::ClientError), Some(429));
        tally.add(Outcome::Answered(Judged::BadKey), Some(400));
        tally.add(Outcome::Timeout, None);
        tally.add(Outcome::StreamError(Judged::Success), Some(200));
        assert_eq!(tally, Tally { requests: 6, successes: 1, rate_limited: 2, errors: 3 });
    }
}
