//! Limits learned from the provider: a 429's `QuotaFailure` states the limit it enforces
//! (`quotaValue`) beside its quota id (`GenerateRequestsPerMinutePerProjectPerModel-FreeTier`). The id
//! says what is counted (requests, or input tokens) and per which window; the value says how many.
//!
//! A learned limit binds the quota scope that got the answer, for the model the quota names, until the
//! provider's next midnight (Gemini: America/Los_Angeles), when tiers and free quotas may change: the
//! next 429 teaches it again. A quota of the whole project (no model) is not learned: reservations are
//! counted per model, and a lockdown of every model already stops the project.

use crate::pool::limit::{Limit, Measure, Window};

/// A limit learned for one model of a quota scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LearnedLimit {
    /// The quota scope that got the answer (`group:NAME`, `project:NUMBER` or `key:NAME`).
    pub scope: String,
    /// The model the quota names.
    pub model: String,
    /// The limit.
    pub limit: Limit,
    /// The provider's quota id.
    pub quota_id: String,
    /// Forgotten at this instant, unix ms (the provider's next midnight after it was learned).
    pub until: i64,
}

/// Whether a provider's quota id is a quota per day (`GenerateRequestsPerDayPerProjectPerModel-FreeTier`,
/// `...Daily...`): the provider's day, not a sliding window.
pub fn is_daily_quota(quota_id: &str) -> bool {
    quota_id.contains("PerDay") || quota_id.contains("Daily")
}

/// A limit a 429 states, before it is bound to a scope: `quota_id` with `value` for `model`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taught {
    /// The model the quota names (or the requested one, when the quota is per model but names none).
    pub model: String,
    /// The limit.
    pub limit: Limit,
    /// The provider's quota id.
    pub quota_id: String,
}

impl Taught {
    /// What `quota_id` with `quotaValue` `value` teaches about `model`, if it can be read: a per-model
    /// quota whose id names a window (`PerMinute`, `PerDay`, `PerHour`, `PerSecond`) and a count from 1.
    /// A value of 0 is no limit to pace by (the model is not on the tier: a lockdown's business).
    pub fn from_quota(quota_id: &str, value: &str, model: &str) -> Option<Self> {
        let count: u64 = value.trim().parse().ok().filter(|count| *count >= 1)?;
        let window = if is_daily_quota(quota_id) {
            Window::Day
        } else {
            let seconds = [("PerSecond", 1), ("PerMinute", 60), ("PerHour", 3_600)]
                .into_iter()
                .find_map(|(word, seconds)| quota_id.contains(word).then_some(seconds))?;
            Window::Sliding(std::time::Duration::from_secs(seconds))
        };
        // Gemini's token limits count input tokens (`GenerateContentInputTokensPerModelPerMinute`); a quota
        // of other tokens is not one a reservation's estimate stands for.
        let measure = match (quota_id.contains("InputToken"), quota_id.contains("Token")) {
            (true, _) => Measure::Tokens,
            (false, true) => return None,
            (false, false) => Measure::Requests,
        };
        let limit = Limit { count, measure, window };
        Some(Self { model: model.to_owned(), limit, quota_id: quota_id.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taught(quota_id: &str, value: &str) -> Option<String> {
        Taught::from_quota(quota_id, value, "m").map(|taught| taught.limit.to_string())
    }

    #[test]
    fn a_quota_id_and_its_value_teach_a_limit() {
        let cases = [
            ("GenerateRequestsPerMinutePerProjectPerModel-FreeTier", "10", Some("10/min")),
            ("GenerateRequestsPerDayPerProjectPerModel-FreeTier", "250", Some("250/day")),
            ("GenerateContentInputTokensPerModelPerMinute-FreeTier", "250000", Some("250000 tokens/min")),
            ("GenerateContentPaidTierInputTokensPerModelPerDay", "1000", Some("1000 tokens/day")),
            ("GenerateContentOutputTokensPerModelPerMinute", "1000", None),
            ("SomethingPerHour", "7", Some("7/h")),
            ("RequestsPerSecond", "3", Some("3/s")),
            ("GenerateRequestsPerMinutePerProjectPerModel-FreeTier", "0", None),
            ("GenerateRequestsPerMinutePerProjectPerModel-FreeTier", "ten", None),
            ("GenerateRequestsPerMinutePerProjectPerModel-FreeTier", "-3", None),
            ("unnamed quota", "10", None),
        ];
        for (quota_id, value, expected) in cases {
            assert_eq!(taught(quota_id, value).as_deref(), expected, "{quota_id} = {value}");
        }
    }
}
