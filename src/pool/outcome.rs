//! Request outcomes: what one upstream attempt came to ([`Outcome`], the `requests` table's
//! `outcome`), and what a gateway request the pool could not answer came to ([`Unanswered`], the
//! metrics' `outcome` label).
//!
//! Invariants:
//! - Each word is written once, here, and stored exactly as it always was: users query the
//!   `requests` table with SQL (`WHERE outcome = 'rate limited'`), so a word never changes.
//! - `FromStr` refuses text it does not know ([`UnknownWord`]): a row written by a newer version, or
//!   edited by hand, fails its read instead of passing through as text.
//! - The two enums stay apart: an attempt's outcome is stored per attempt, a gateway failure is
//!   counted per request and never stored, and no word of one is a word of the other.

use std::fmt;
use std::str::FromStr;

use super::UnknownWord;

/// What an answer that came was judged to be (`classify`): the words of an attempt that got one, and
/// of an upstream error event in a stream already relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Judged {
    /// A 2xx answer: `success`.
    Success,
    /// The key was locked down: `rate limited`.
    RateLimited,
    /// The key was put in error: `bad key`.
    BadKey,
    /// The provider's trouble (5xx, overload), retried after a backoff: `provider error`.
    ProviderError,
    /// A location refusal, retried through a new Tor circuit: `location refused`.
    LocationRefused,
    /// Anything else the request's own fault (a 4xx that blames no key): `client error`.
    ClientError,
}

impl Judged {
    /// Every judgement, in the order above.
    pub const ALL: [Self; 6] =
        [Self::Success, Self::RateLimited, Self::BadKey, Self::ProviderError, Self::LocationRefused, Self::ClientError];

    /// The word stored in the `requests` table.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::RateLimited => "rate limited",
            Self::BadKey => "bad key",
            Self::ProviderError => "provider error",
            Self::LocationRefused => "location refused",
            Self::ClientError => "client error",
        }
    }
}

/// What one upstream attempt came to, as stored in the `requests` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// An answer came, judged so (a whole answer, or a stream's first event).
    Answered(Judged),
    /// A relayed stream ended with an upstream error event, judged so: `stream error: <judged>`.
    StreamError(Judged),
    /// No answer (or first event) within the attempt's time: `timeout`.
    Timeout,
    /// The connection failed or broke before an answer: `connection error`.
    ConnectionError,
    /// The stream ended before its first event: `stream failed`.
    StreamFailed,
    /// The lease was no longer trusted when the connection was ready; nothing was sent:
    /// `lease lost, not sent`.
    NotSent,
    /// The answer, or one event of it, was larger than its limit: `too large`.
    TooLarge,
    /// The caller went away (SIGINT, a client gone) while the attempt was on the wire: `cancelled`.
    Cancelled,
    /// A relayed stream ended without its terminal event (broken, idle, truncated): `stream broken`.
    StreamBroken,
    /// A relayed stream's lease was lost or its trust ran out, and the stream was stopped:
    /// `lease lost`.
    LeaseLost,
}

impl Outcome {
    /// Every outcome, each judgement included.
    pub const ALL: [Self; 20] = [
        Self::Answered(Judged::Success),
        Self::Answered(Judged::RateLimited),
        Self::Answered(Judged::BadKey),
        Self::Answered(Judged::ProviderError),
        Self::Answered(Judged::LocationRefused),
        Self::Answered(Judged::ClientError),
        Self::StreamError(Judged::Success),
        Self::StreamError(Judged::RateLimited),
        Self::StreamError(Judged::BadKey),
        Self::StreamError(Judged::ProviderError),
        Self::StreamError(Judged::LocationRefused),
        Self::StreamError(Judged::ClientError),
        Self::Timeout,
        Self::ConnectionError,
        Self::StreamFailed,
        Self::NotSent,
        Self::TooLarge,
        Self::Cancelled,
        Self::StreamBroken,
        Self::LeaseLost,
    ];

    /// A successful attempt.
    pub const SUCCESS: Self = Self::Answered(Judged::Success);
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = match self {
            Self::Answered(judged) => judged.as_str(),
            Self::StreamError(judged) => return write!(f, "stream error: {}", judged.as_str()),
            Self::Timeout => "timeout",
            Self::ConnectionError => "connection error",
            Self::StreamFailed => "stream failed",
            Self::NotSent => "lease lost, not sent",
            Self::TooLarge => "too large",
            Self::Cancelled => "cancelled",
            Self::StreamBroken => "stream broken",
            Self::LeaseLost => "lease lost",
        };
        f.write_str(word)
    }
}

impl FromStr for Outcome {
    type Err = UnknownWord;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|outcome| outcome.to_string() == text).ok_or_else(|| {
            UnknownWord::new(
                "request outcome",
                text,
                "one of 'success', 'rate limited', 'bad key', 'provider error', 'location refused', 'client error', \
                 'timeout', 'connection error', 'stream failed', 'lease lost, not sent', 'too large', 'cancelled', \
                 'stream broken', 'lease lost', or 'stream error: ' followed by one of the first six",
            )
        })
    }
}

/// What a gateway request the pool could not answer came to: the metrics' `outcome` label besides
/// the upstream's status class. Counted per request, never stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unanswered {
    /// No key within the wait (the gateway's 429): `no_key`.
    NoKey,
    /// No answer from the upstream (the gateway's 502): `unreachable`.
    Unreachable,
    /// The database or a lease failed (the gateway's 503): `unavailable`.
    Unavailable,
    /// Anything else (the gateway's 500): `failed`.
    Failed,
}

impl Unanswered {
    /// Every failure, in the order above.
    pub const ALL: [Self; 4] = [Self::NoKey, Self::Unreachable, Self::Unavailable, Self::Failed];

    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoKey => "no_key",
            Self::Unreachable => "unreachable",
            Self::Unavailable => "unavailable",
            Self::Failed => "failed",
        }
    }
}

impl fmt::Display for Unanswered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Unanswered {
    type Err = UnknownWord;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|failure| failure.as_str() == text)
            .ok_or_else(|| UnknownWord::new("gateway failure", text, "no_key, unreachable, unavailable or failed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The words users query the `requests` table with, exactly as every earlier version stored them.
    #[test]
    fn every_outcome_is_stored_as_the_word_it_always_was() {
        let words = [
            "success",
            "rate limited",
            "bad key",
            "provider error",
            "location refused",
            "client error",
            "stream error: success",
            "stream error: rate limited",
            "stream error: bad key",
            "stream error: provider error",
            "stream error: location refused",
            "stream error: client error",
            "timeout",
            "connection error",
            "stream failed",
            "lease lost, not sent",
            "too large",
            "cancelled",
            "stream broken",
            "lease lost",
        ];
        let stored: Vec<String> = Outcome::ALL.iter().map(Outcome::to_string).collect();
        assert_eq!(stored, words);
        for outcome in Outcome::ALL {
            assert_eq!(outcome.to_string().parse::<Outcome>(), Ok(outcome));
        }
        assert_eq!(Outcome::SUCCESS.to_string(), "success");
    }

    #[test]
    fn unknown_outcomes_are_refused() {
        for text in
            ["", "Success", "sucess", "stream error: ", "stream error: timeout", "stream error: stream error: bad key"]
        {
            assert!(text.parse::<Outcome>().is_err(), "{text:?}");
        }
    }

    #[test]
    fn gateway_failures_are_the_metrics_labels_and_nothing_else() {
        let labels: Vec<String> = Unanswered::ALL.iter().map(Unanswered::to_string).collect();
        assert_eq!(labels, ["no_key", "unreachable", "unavailable", "failed"]);
        for failure in Unanswered::ALL {
            assert_eq!(failure.to_string().parse::<Unanswered>(), Ok(failure));
            assert!(failure.to_string().parse::<Outcome>().is_err(), "{failure} is no attempt's outcome");
        }
        for text in ["", "2xx", "timeout", "No_Key"] {
            assert!(text.parse::<Unanswered>().is_err(), "{text:?}");
        }
    }
}
