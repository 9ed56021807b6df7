//! An upstream answer, turned into the key's fate and the caller's next step: the policy table of
//! `shared/reference/upstream-errors.md` as one pure function.
//!
//! The key is blamed only when the key is at fault: a rate limit locks it down until exactly when the
//! provider says it frees (a daily quota until the next midnight in America/Los_Angeles, whatever
//! `retryDelay` claims), a bad key goes to error, and everything that is the provider's or the
//! request's problem (overload, 5xx, a location refusal, a bad request) leaves the key vacant.

use std::time::Duration;

use chrono::{DateTime, Days, TimeZone, Utc};
use chrono_tz::America::Los_Angeles;
use reqwest::header::HeaderMap;
use serde_json::Value;

use crate::connector::Policy;

/// The longest delay an answer may impose through `Retry-After` and friends: longer is taken as absurd
/// and clamped.
const MAX_HINT: Duration = Duration::from_secs(48 * 3600);

/// What happens to the key that was used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyFate {
    /// Back to vacant; `success` resets the key's escalating lockdown.
    Release {
        /// The answer was a success.
        success: bool,
    },
    /// Rate-limited until `until_ms`.
    Lockdown {
        /// Deadline, unix ms.
        until_ms: i64,
        /// Why, for the history.
        reason: String,
    },
    /// Permanently bad.
    Error {
        /// Why, for the history.
        reason: String,
    },
}

/// What the caller does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Return this answer.
    Return,
    /// Retry at once on another key.
    OtherKey,
    /// Retry after `after`, on any key, if the retry budget allows; else return this answer.
    Backoff {
        /// How long to wait first.
        after: Duration,
    },
    /// Through Tor: retry on a new circuit (if the budget allows); without Tor this is `Return`.
    NewCircuit,
}

/// The key's fate and the caller's next step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// What happens to the key.
    pub key: KeyFate,
    /// What the caller does next.
    pub next: Next,
}

/// What is known around an answer.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// Now, unix ms.
    pub now_ms: i64,
    /// The connector's policy.
    pub policy: &'a Policy,
    /// The key's consecutive lockdowns before this answer.
    pub lockdown_count: i64,
    /// How many backoff retries this request already made.
    pub retries: u32,
    /// The request went through Tor.
    pub via_tor: bool,
}

/// The verdict on an answer with `status`, `headers` and `body`.
pub fn classify(status: u16, headers: &HeaderMap, body: &str, context: &Context<'_>) -> Verdict {
    let error = UpstreamError::parse(body);
    let policy = context.policy;
    let release = KeyFate::Release { success: false };
    let verdict = |key, next| Verdict { key, next };

    if (200..300).contains(&status) {
        return verdict(KeyFate::Release { success: true }, Next::Return);
    }
    if policy.rate_limit_statuses.contains(&status) {
        return verdict(rate_limit_lockdown(status, headers, &error, context), Next::OtherKey);
    }
    match status {
        401 => verdict(KeyFate::Error { reason: error.reason("401 invalid credentials") }, Next::OtherKey),
        403 => verdict(KeyFate::Error { reason: error.reason("403 permission denied") }, Next::OtherKey),
        400 if error.is_bad_key() => {
            verdict(KeyFate::Error { reason: error.reason("400 invalid API key") }, Next::OtherKey)
        }
        400 if error.is_location() => verdict(release, if context.via_tor { Next::NewCircuit } else { Next::Return }),
        402 => {
            let until_ms = context.now_ms + millis(Duration::from_secs(policy.credits_lockdown_secs));
            verdict(KeyFate::Lockdown { until_ms, reason: error.reason("402 credits used up") }, Next::OtherKey)
        }
        500 | 502 | 503 | 504 => {
            let doubling = Duration::from_millis(policy.backoff_ms).saturating_mul(1 << context.retries.min(16));
            // A loading Hugging Face model says how long it needs; honour it (the caller's budget caps it).
            let after = error.estimated_time.map_or(doubling, |estimate| estimate.max(doubling));
            verdict(release, Next::Backoff { after })
        }
        _ => verdict(release, Next::Return),
    }
}

/// The verdict when no answer came: a timeout or a connection error is never the key's fault.
pub fn transport_failure(context: &Context<'_>) -> Verdict {
    let after = Duration::from_millis(context.policy.backoff_ms).saturating_mul(1 << context.retries.min(16));
    Verdict { key: KeyFate::Release { success: false }, next: Next::Backoff { after } }
}

fn rate_limit_lockdown(status: u16, headers: &HeaderMap, error: &UpstreamError, context: &Context<'_>) -> KeyFate {
    let now = context.now_ms;
    let policy = context.policy;
    let cap = Duration::from_secs(policy.max_lockdown_secs);
    if let Some(quota) = &error.daily_quota {
        return KeyFate::Lockdown {
            until_ms: next_pacific_midnight(now),
            reason: format!("{status} daily quota {quota}, resets at midnight Pacific"),
        };
    }
    if error.zero_quota {
        return KeyFate::Lockdown {
            until_ms: now + millis(Duration::from_secs(policy.zero_quota_lockdown_secs)),
            reason: format!("{status} quota is 0: the model is not available on this key's tier"),
        };
    }
    let hints = [
        error.retry_delay.map(|delay| (delay, "RetryInfo.retryDelay")),
        retry_after(headers, now).map(|delay| (delay, "Retry-After")),
        error.retry_in.map(|delay| (delay, "'Please retry in'")),
        huggingface_reset(headers).map(|delay| (delay, "ratelimit t=")),
    ];
    if let Some((delay, source)) = hints.into_iter().flatten().max_by_key(|(delay, _)| *delay) {
        let delay = delay.min(MAX_HINT);
        return KeyFate::Lockdown {
            until_ms: now + millis(delay),
            reason: error.reason(&format!("{status} rate limit, {source} {:.1} s", delay.as_secs_f64())),
        };
    }
    let escalated = Duration::from_secs(policy.default_lockdown_secs)
        .saturating_mul(1u32 << context.lockdown_count.clamp(0, 20))
        .min(cap);
    KeyFate::Lockdown {
        until_ms: now + millis(escalated),
        reason: error.reason(&format!(
            "{status} rate limit without a hint, lockdown {} s (lockdown #{} in a row)",
            escalated.as_secs(),
            context.lockdown_count + 1
        )),
    }
}

/// The next midnight in America/Los_Angeles after `now_ms`, as unix ms (daylight saving included:
/// midnight always exists there, the clocks change at 2 am).
pub fn next_pacific_midnight(now_ms: i64) -> i64 {
    let now = DateTime::from_timestamp_millis(now_ms).unwrap_or_default().with_timezone(&Los_Angeles);
    let tomorrow = now.date_naive().checked_add_days(Days::new(1)).unwrap_or(now.date_naive());
    let midnight = tomorrow.and_hms_opt(0, 0, 0).unwrap_or_default();
    Los_Angeles.from_local_datetime(&midnight).earliest().map_or(now_ms + 86_400_000, |t| t.timestamp_millis())
}

/// `Retry-After` as delay-seconds or an HTTP-date (RFC 9110).
fn retry_after(headers: &HeaderMap, now_ms: i64) -> Option<Duration> {
    let value = headers.get("retry-after")?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds.min(1e9)));
    }
    let date = DateTime::parse_from_rfc2822(value).ok()?.with_timezone(&Utc);
    Some(Duration::from_millis(u64::try_from(date.timestamp_millis() - now_ms).unwrap_or(0)))
}

/// Hugging Face's `ratelimit: "api";r=0;t=55`: `t` is the seconds until the window resets.
fn huggingface_reset(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("ratelimit")?.to_str().ok()?;
    let seconds = value.split(';').find_map(|part| part.trim().strip_prefix("t="))?.trim().parse::<f64>().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds.min(1e9)))
}

/// A protobuf duration such as `26s`, `45.837906927s` or `0.5s`.
fn protobuf_duration(text: &str) -> Option<Duration> {
    let seconds = text.trim().strip_suffix('s')?.parse::<f64>().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds.min(1e9)))
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// What an error body says, in Gemini's envelope or Hugging Face's flat form.
#[derive(Debug, Default)]
struct UpstreamError {
    /// `error.status` (Gemini) such as `RESOURCE_EXHAUSTED`.
    status: Option<String>,
    /// `error.message` (Gemini) or `error` (Hugging Face).
    message: Option<String>,
    /// `ErrorInfo.reason` such as `API_KEY_INVALID`.
    reason: Option<String>,
    /// A violated per-day quotaId.
    daily_quota: Option<String>,
    /// A violated quota with value 0, or `limit: 0` in the message.
    zero_quota: bool,
    retry_delay: Option<Duration>,
    retry_in: Option<Duration>,
    /// Hugging Face `estimated_time` of a loading model.
    estimated_time: Option<Duration>,
}

impl UpstreamError {
    fn parse(body: &str) -> Self {
        let Ok(json) = serde_json::from_str::<Value>(body) else { return Self::default() };
        let mut parsed = Self {
            estimated_time: json["estimated_time"]
                .as_f64()
                .filter(|seconds| seconds.is_finite() && *seconds >= 0.0)
                .map(|seconds| Duration::from_secs_f64(seconds.min(3600.0))),
            ..Self::default()
        };
        let error = &json["error"];
        if let Some(flat) = error.as_str() {
            parsed.message = Some(flat.to_owned());
            return parsed;
        }
        parsed.status = error["status"].as_str().map(str::to_owned);
        parsed.message = error["message"].as_str().map(str::to_owned);
        for detail in error["details"].as_array().into_iter().flatten() {
            let kind = detail["@type"].as_str().unwrap_or_default();
            if kind.ends_with("google.rpc.RetryInfo") {
                parsed.retry_delay = detail["retryDelay"].as_str().and_then(protobuf_duration);
            } else if kind.ends_with("google.rpc.ErrorInfo") {
                parsed.reason = detail["reason"].as_str().map(str::to_owned);
            } else if kind.ends_with("google.rpc.QuotaFailure") {
                for violation in detail["violations"].as_array().into_iter().flatten() {
                    let quota_id = violation["quotaId"].as_str().unwrap_or_default();
                    if quota_id.contains("PerDay") || quota_id.contains("Daily") {
                        parsed.daily_quota = Some(quota_id.to_owned());
                    }
                    if violation["quotaValue"].as_str() == Some("0") {
                        parsed.zero_quota = true;
                    }
                }
            }
        }
        if let Some(message) = &parsed.message {
            parsed.zero_quota |= message.contains("limit: 0");
            parsed.retry_in = message
                .split_once("retry in ")
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .and_then(|delay| protobuf_duration(delay.trim_end_matches('.')));
        }
        parsed
    }

    fn is_bad_key(&self) -> bool {
        self.reason.as_deref() == Some("API_KEY_INVALID")
            || self
                .message
                .as_deref()
                .is_some_and(|m| m.starts_with("API key not valid") || m.starts_with("API key expired"))
    }

    fn is_location(&self) -> bool {
        self.status.as_deref() == Some("FAILED_PRECONDITION")
            && self.message.as_deref().is_some_and(|m| m.contains("location is not supported"))
    }

    /// `summary`, followed by the upstream's canonical status and reason where it gave them.
    fn reason(&self, summary: &str) -> String {
        let extra: Vec<&str> = [self.status.as_deref(), self.reason.as_deref()].into_iter().flatten().collect();
        if extra.is_empty() { summary.to_owned() } else { format!("{summary} ({})", extra.join(", ")) }
    }
}

#[cfg(test)]
mod tests;
