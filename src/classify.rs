//! An upstream answer, turned into the key's fate and the caller's next step: the policy table of
//! `shared/reference/upstream-errors.md` as one pure function.
//!
//! The key is blamed only when the key is at fault: a rate limit locks it down until exactly when the
//! provider says it frees (a daily quota until the next midnight in America/Los_Angeles, whatever
//! `retryDelay` claims), a bad key goes to error, and everything that is the provider's or the
//! request's problem (overload, 5xx, a location refusal, a bad request) leaves the key vacant.
//!
//! A 403 or 404 about a resource ([`resource`]: a file, cached content, batch or tuned model that is
//! missing, expired or another project's) is the request's fault: the key goes back vacant and the
//! caller gets the answer. Only the answer's words tell it from a 403 about the key (leaked, disabled
//! service), so an answer that also blames the key (`API_KEY_*`, `SERVICE_DISABLED`) is never one.
//!
//! Bodies are read in Gemini's envelope, in Hugging Face's flat form, and in the one-element array
//! Gemini's OpenAI-compatible layer wraps its envelope in (`[{"error": {...}}]`), read like the bare one.
//!
//! A lockdown is only as wide as the quota that ran out: Gemini meters per project and per model, so a
//! `QuotaFailure` that names a model locks that model for the key's quota group (and the requested
//! name too, when it was an alias), a quota per project without a model locks the whole group, Hugging
//! Face's 402 (credits) locks the whole group, and a 429 without details (shared capacity) locks only
//! the requested model of that key.
//!
//! Every lockdown lasts at least [`MIN_LOCKDOWN`] and at most two days, whatever the hint says: a
//! "retry now" must not turn one request into a burst of attempts.

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::header::HeaderMap;
use serde_json::Value;

use crate::connector::Policy;
pub use crate::pool::limit::next_pacific_midnight;
use crate::pool::{Fate, Lockdown, Reach, Taught};

/// What a lockdown for a quota of 0 says.
const ZERO_QUOTA: &str = "quota is 0: the model is not available on this key's tier";

/// The longest delay an answer may impose through `Retry-After` and friends: longer is taken as absurd
/// and clamped.
const MAX_HINT: Duration = Duration::from_secs(48 * 3600);

/// The shortest lockdown, whatever the answer's hint says (`Retry-After: 0`, `retryDelay: "0s"`, a date
/// in the past). A key that comes back at once is claimed again at once: one request with a wait then
/// spends its whole retry budget on a few keys in a fraction of a second, and every waiting worker
/// joins in. A second bounds that to one attempt per key per second, while a provider that really frees
/// the key in under a second loses at most that second of one key.
pub const MIN_LOCKDOWN: Duration = Duration::from_secs(1);

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
    /// What happens to the key, as the store takes it: a lockdown or an error carries the answer's
    /// status and the Google Cloud project the answer revealed (`consumer: projects/NNN`).
    pub key: Fate,
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
    /// The model the request named, if any.
    pub model: Option<&'a str>,
    /// The connector can tell a request's model (its file has a model rule). When it cannot, every
    /// claim is for no model, so a lockdown of one model would never stop one: it covers every model.
    pub names_models: bool,
}

/// The verdict on an answer with `status`, `headers` and `body`.
pub fn classify(status: u16, headers: &HeaderMap, body: &str, context: &Context<'_>) -> Verdict {
    let error = UpstreamError::parse(body);
    let policy = context.policy;
    let release = Fate::Release { success: false };
    // Every fate that blames the key carries the answer's status and the project it revealed.
    let (http_status, project) = (Some(status), error.consumer_project.clone());
    let bad_key = |summary: &str| Fate::Error { reason: error.reason(summary), http_status, project: project.clone() };
    let lockdown = |lockdown: Lockdown| Fate::Lockdown(Lockdown { http_status, project: project.clone(), ..lockdown });
    let verdict = |key, next| Verdict { key, next };

    if (200..300).contains(&status) {
        return verdict(Fate::Release { success: true }, Next::Return);
    }
    // Before the rate limits: a connector may still list 403 there, and a missing file is no quota.
    if error.resource(status).is_some() {
        return verdict(release, Next::Return);
    }
    if policy.rate_limit_statuses.contains(&status) {
        return verdict(lockdown(rate_limit_lockdown(status, headers, &error, context)), Next::OtherKey);
    }
    match status {
        401 => verdict(bad_key("401 invalid credentials"), Next::OtherKey),
        403 => verdict(bad_key("403 permission denied"), Next::OtherKey),
        400 if error.is_bad_key() => verdict(bad_key("400 invalid API key"), Next::OtherKey),
        400 if error.is_location() => verdict(release, if context.via_tor { Next::NewCircuit } else { Next::Return }),
        402 => {
            let until_ms = context.now_ms + millis(Duration::from_secs(policy.credits_lockdown_secs));
            let reason = error.reason("402 credits used up");
            verdict(lockdown(lockdown_of(until_ms, reason, Reach::Group, Vec::new(), None)), Next::OtherKey)
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

/// A per-project resource that an answer is about: the request named a file, cached content, batch
/// or tuned model that does not exist, expired, or belongs to another project's keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Resource {
    /// What it is.
    pub kind: ResourceKind,
    /// Its full name (`files/abc`), when the answer gives it and it is sane.
    pub name: Option<String>,
}

/// The kinds of resources a Google Cloud project owns: the project of the key that created one is the
/// only one that may use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    /// An upload, `files/…` (deleted after 48 h).
    File,
    /// Cached content, `cachedContents/…`.
    CachedContent,
    /// A batch job, `batches/…`.
    Batch,
    /// A tuned model, `tunedModels/…`.
    TunedModel,
}

impl ResourceKind {
    /// Every kind, in the order answers are searched for them.
    pub const ALL: [ResourceKind; 4] = [Self::File, Self::CachedContent, Self::Batch, Self::TunedModel];

    /// The collection its names start with: `files`, `cachedContents`, `batches`, `tunedModels`.
    pub fn collection(self) -> &'static str {
        match self {
            Self::File => "files",
            Self::CachedContent => "cachedContents",
            Self::Batch => "batches",
            Self::TunedModel => "tunedModels",
        }
    }

    /// How a message names one in words (lowercase): `file`, `cachedcontent`, ...
    fn words(self) -> &'static [&'static str] {
        match self {
            Self::File => &["file"],
            Self::CachedContent => &["cachedcontent", "cached content"],
            Self::Batch => &["batch"],
            Self::TunedModel => &["tunedmodel", "tuned model"],
        }
    }
}

/// The resource an answer with `status` and `body` is about, if it is a 403 or 404 that names one
/// (`You do not have permission to access the File abc or it may not exist.`): such an answer is the
/// request's fault, and [`classify`] releases the key and returns it. `None` for any other answer, and
/// for one that blames the key (an invalid key, a disabled service) whatever it names.
pub fn resource(status: u16, body: &str) -> Option<Resource> {
    UpstreamError::parse(body).resource(status)
}

/// The verdict when no answer came: a timeout or a connection error is never the key's fault.
pub fn transport_failure(context: &Context<'_>) -> Verdict {
    let after = Duration::from_millis(context.policy.backoff_ms).saturating_mul(1 << context.retries.min(16));
    Verdict { key: Fate::Release { success: false }, next: Next::Backoff { after } }
}

/// The verdict when the request may have reached the upstream but no usable answer came back (a
/// timeout after it was sent, a connection broken after it, an answer too large to hold): never the
/// key's fault (a long generation is not a bad key), and not sent again, since the upstream may have
/// generated and billed it (the caller decides whether a timeout may be retried, see `exchange`).
pub fn unanswered() -> Verdict {
    Verdict { key: Fate::Release { success: false }, next: Next::Return }
}

/// What an answer says, as the words two answers are compared by (`exchange::suspicion`): its status
/// and the upstream's canonical status, reason and message, not its other fields (ids, timestamps).
/// Kept in memory only: nothing here is logged or stored.
///
/// Words that carry a digit or a `*` are left out: a request id, a timestamp, the masked key an
/// OpenAI-compatible server names (`Incorrect API key provided: sk-****abcd`) differ from key to key
/// and from answer to answer while the answer is the same.
pub fn answer_words(status: u16, body: &str) -> String {
    let error = UpstreamError::parse(body);
    let words: Vec<&str> =
        [error.status.as_deref(), error.reason.as_deref(), error.message.as_deref()].into_iter().flatten().collect();
    let text = if words.is_empty() { body.trim().chars().take(500).collect::<String>() } else { words.join(" | ") };
    let kept: Vec<&str> =
        text.split_whitespace().filter(|word| !word.chars().any(|c| c.is_ascii_digit() || c == '*')).collect();
    format!("{status} {}", kept.join(" "))
}

/// The lockdown a rate limit calls for (its status and project are the caller's to add).
fn rate_limit_lockdown(status: u16, headers: &HeaderMap, error: &UpstreamError, context: &Context<'_>) -> Lockdown {
    let now = context.now_ms;
    let policy = context.policy;
    let requested: Vec<String> = context.model.map(str::to_owned).into_iter().collect();
    let hints = [
        error.retry_delay.map(|delay| (delay, "RetryInfo.retryDelay")),
        retry_after(headers, now).map(|delay| (delay, "Retry-After")),
        error.retry_in.map(|delay| (delay, "'Please retry in'")),
        huggingface_reset(headers).map(|delay| (delay, "ratelimit t=")),
    ];
    let hint = hints
        .into_iter()
        .flatten()
        .max_by_key(|(delay, _)| *delay)
        .map(|(delay, source)| (delay.clamp(MIN_LOCKDOWN, MAX_HINT), source));
    let default_wait = Duration::from_secs(policy.default_lockdown_secs).max(MIN_LOCKDOWN);

    let zero_wait = Duration::from_secs(policy.zero_quota_lockdown_secs);
    if error.violations.is_empty() && error.zero_quota {
        let reason = error.reason(&format!("{status} {ZERO_QUOTA}"));
        return lockdown_of(now + millis(zero_wait), reason, Reach::Group, requested, None);
    }
    // A quota the provider metered per project (and per model when it names one).
    if let Some(first) = error.violations.first() {
        let (mut until_ms, mut worst, mut worst_kind) = (i64::MIN, first, "");
        let (mut models, mut every_model, mut taught) = (Vec::new(), false, Vec::new());
        for violation in &error.violations {
            let (ends, kind) = if violation.is_daily() {
                (next_pacific_midnight(now), "daily quota, resets at midnight Pacific")
            } else if violation.is_zero() || error.zero_quota {
                (now + millis(zero_wait), ZERO_QUOTA)
            } else {
                (now + millis(hint.map_or(default_wait, |(delay, _)| delay)), "rate limit")
            };
            if ends > until_ms {
                (until_ms, worst, worst_kind) = (ends, violation, kind);
            }
            match &violation.model {
                Some(model) => models.push(model.clone()),
                None if violation.is_per_project_only() => every_model = true,
                None => models.extend(requested.iter().cloned()),
            }
            taught.extend(violation.taught(context.model));
        }
        // The requested name may be an alias (gemini-flash-latest) of the model the quota names: lock both.
        if !models.is_empty() {
            models.extend(requested.iter().cloned());
        }
        models.sort();
        models.dedup();
        // A request that names no model (listing models) still locks the model the quota names; only
        // where the connector can tell no model at all would that lockdown never stop a claim.
        if every_model || !context.names_models {
            models.clear();
        }
        let wait = match hint {
            _ if worst_kind != "rate limit" => String::new(),
            Some((delay, source)) => format!(", {source} {:.1} s", delay.as_secs_f64()),
            None => format!(", lockdown {} s", default_wait.as_secs()),
        };
        let reason = error.reason(&format!("{status} {worst_kind}{wait} ({})", worst.quota_id));
        // Where the connector tells no model, no claim names one to pace. The requested name may be an
        // alias of the model the quota names: its claims are paced by the lesson too.
        if !context.names_models {
            taught.clear();
        } else if let Some(requested) = context.model {
            let aliases: Vec<Taught> = taught
                .iter()
                .filter(|lesson| lesson.model != requested)
                .map(|lesson| Taught { model: requested.to_owned(), ..lesson.clone() })
                .collect();
            taught.extend(aliases);
        }
        let lockdown = lockdown_of(until_ms, reason, Reach::Group, models, Some(worst.quota_id.clone()));
        return Lockdown { taught, ..lockdown };
    }
    // A per-project rate limit in an ErrorInfo (the older regional quota): the whole group, for every
    // model unless the quota is per model.
    if error.reason.as_deref() == Some("RATE_LIMIT_EXCEEDED")
        && let Some(limit) = &error.quota_limit
    {
        let delay = hint.map_or(default_wait, |(delay, _)| delay);
        let models = if limit.contains("PerModel") && context.names_models { requested } else { Vec::new() };
        let reason = error.reason(&format!("{status} project rate limit, lockdown {:.1} s", delay.as_secs_f64()));
        return lockdown_of(now + millis(delay), reason, Reach::Group, models, Some(limit.clone()));
    }
    // No details: shared capacity, or a limit of this key alone. Only the requested model of this key.
    if let Some((delay, source)) = hint {
        let reason = error.reason(&format!("{status} rate limit, {source} {:.1} s", delay.as_secs_f64()));
        return lockdown_of(now + millis(delay), reason, Reach::Key, requested, None);
    }
    let cap = Duration::from_secs(policy.max_lockdown_secs);
    let escalated = default_wait.saturating_mul(1u32 << context.lockdown_count.clamp(0, 20)).min(cap);
    let reason = error.reason(&format!(
        "{status} rate limit without a hint, lockdown {} s (lockdown #{} in a row)",
        escalated.as_secs(),
        context.lockdown_count + 1
    ));
    lockdown_of(now + millis(escalated), reason, Reach::Key, requested, None)
}

fn lockdown_of(until: i64, reason: String, reach: Reach, models: Vec<String>, quota_id: Option<String>) -> Lockdown {
    Lockdown { until, reason, http_status: None, reach, models, quota_id, project: None, taught: Vec::new() }
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

/// The JSON object of an answer: the body itself, or the first element of the one-element array
/// Gemini's OpenAI-compatible layer wraps its envelope in. `None` when the body is neither.
fn envelope(body: &str) -> Option<Value> {
    match serde_json::from_str::<Value>(body).ok()? {
        Value::Array(elements) => elements.into_iter().next().filter(Value::is_object),
        object @ Value::Object(_) => Some(object),
        _ => None,
    }
}

/// The HTTP status an error envelope carries in `error.code` (`{"error":{"code":429,...}}`, bare or in
/// the OpenAI layer's array), if it is an error status: how an in-band error event of a stream is judged.
pub fn envelope_status(body: &str) -> Option<u16> {
    envelope(body)?["error"]["code"]
        .as_u64()
        .and_then(|code| u16::try_from(code).ok())
        .filter(|code| (400..600).contains(code))
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
    /// The violated quotas of a `QuotaFailure`.
    violations: Vec<Violation>,
    /// `limit: 0` in the message (the model is not on this tier), with or without a `QuotaFailure`.
    zero_quota: bool,
    /// `ErrorInfo.metadata.quota_limit` (the older per-project, per-region quota).
    quota_limit: Option<String>,
    /// The project number in `ErrorInfo.metadata.consumer` (`projects/NNN`) or the message.
    consumer_project: Option<String>,
    retry_delay: Option<Duration>,
    retry_in: Option<Duration>,
    /// Hugging Face `estimated_time` of a loading model.
    estimated_time: Option<Duration>,
}

impl UpstreamError {
    fn parse(body: &str) -> Self {
        let Some(json) = envelope(body) else { return Self::default() };
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
        parsed.status = error["status"].as_str().filter(|status| sane(status)).map(str::to_owned);
        parsed.message = error["message"].as_str().map(str::to_owned);
        for detail in error["details"].as_array().into_iter().flatten() {
            let kind = detail["@type"].as_str().unwrap_or_default();
            if kind.ends_with("google.rpc.RetryInfo") {
                parsed.retry_delay = detail["retryDelay"].as_str().and_then(protobuf_duration);
            } else if kind.ends_with("google.rpc.ErrorInfo") {
                parsed.reason = detail["reason"].as_str().filter(|reason| sane(reason)).map(str::to_owned);
                let metadata = &detail["metadata"];
                parsed.quota_limit = metadata["quota_limit"].as_str().filter(|limit| sane(limit)).map(str::to_owned);
                parsed.consumer_project = metadata["consumer"].as_str().and_then(project_number);
            } else if kind.ends_with("google.rpc.QuotaFailure") {
                for violation in detail["violations"].as_array().into_iter().flatten() {
                    let quota_id = violation["quotaId"].as_str().filter(|id| sane(id)).unwrap_or("unnamed quota");
                    parsed.violations.push(Violation {
                        quota_id: quota_id.to_owned(),
                        model: violation["quotaDimensions"]["model"]
                            .as_str()
                            .map(|model| model.strip_prefix("models/").unwrap_or(model))
                            .filter(|model| sane(model))
                            .map(str::to_owned),
                        value: violation["quotaValue"].as_str().map(str::to_owned),
                    });
                }
            }
        }
        if let Some(message) = &parsed.message {
            parsed.zero_quota |= message.contains("limit: 0");
            if parsed.consumer_project.is_none() {
                parsed.consumer_project = message
                    .split_once("project_number:")
                    .or_else(|| message.split_once("in project "))
                    .and_then(|(_, rest)| project_number(rest));
            }
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

    /// The resource a 403 or 404 is about: the message names one (`files/abc`, `the File abc`,
    /// `CachedContent`, `batches/…`, `tuned model`), and, for a 403, says it is missing or not this
    /// project's (`may not exist`, `not found`, `permission`). Never for an answer that blames the key.
    fn resource(&self, status: u16) -> Option<Resource> {
        if !matches!(status, 403 | 404) || self.is_bad_key() || self.reason.as_deref().is_some_and(blames_the_key) {
            return None;
        }
        let message = self.message.as_deref()?;
        let lower = message.to_ascii_lowercase();
        if status == 403
            && !["may not exist", "not found", "does not exist", "permission"].iter().any(|p| lower.contains(p))
        {
            return None;
        }
        // A full name first (`files/abc`), then a kind in words (`the File abc`).
        let by_name = ResourceKind::ALL.into_iter().find_map(|kind| {
            let at = lower.find(&format!("{}/", kind.collection().to_ascii_lowercase()))?;
            let id = resource_id(&message[at + kind.collection().len() + 1..])?;
            Some(Resource { kind, name: Some(format!("{}/{id}", kind.collection())) })
        });
        by_name.or_else(|| {
            ResourceKind::ALL.into_iter().find_map(|kind| {
                let (at, word) = kind.words().iter().find_map(|word| Some((find_word(&lower, word)?, word)))?;
                // `the File abc or ...`: the word after the kind is its id, unless it is a plain word.
                let after = message[at + word.len()..].trim_start();
                let name =
                    resource_id(after).filter(|id| !is_english(id)).map(|id| format!("{}/{id}", kind.collection()));
                Some(Resource { kind, name })
            })
        })
    }

    /// `summary`, followed by the upstream's canonical status and reason where it gave them.
    fn reason(&self, summary: &str) -> String {
        let extra: Vec<&str> = [self.status.as_deref(), self.reason.as_deref()].into_iter().flatten().collect();
        if extra.is_empty() { summary.to_owned() } else { format!("{summary} ({})", extra.join(", ")) }
    }
}

/// One violated quota of a `QuotaFailure`.
#[derive(Debug)]
struct Violation {
    /// e.g. `GenerateRequestsPerDayPerProjectPerModel-FreeTier`.
    quota_id: String,
    /// `quotaDimensions.model`, without a `models/` prefix.
    model: Option<String>,
    /// `quotaValue`, the limit.
    value: Option<String>,
}

impl Violation {
    fn is_daily(&self) -> bool {
        crate::pool::learned::is_daily_quota(&self.quota_id)
    }

    fn is_zero(&self) -> bool {
        self.value.as_deref() == Some("0")
    }

    /// The limit it states (`quotaValue`), for the model it names or, for a quota per model naming
    /// none, the `requested` one; none for a quota of the whole project.
    fn taught(&self, requested: Option<&str>) -> Option<Taught> {
        let model = self.model.as_deref().or(requested.filter(|_| self.quota_id.contains("PerModel")))?;
        Taught::from_quota(&self.quota_id, self.value.as_deref()?, model)
    }

    /// A quota of the whole project, whatever the model (no `PerModel` and no model dimension).
    fn is_per_project_only(&self) -> bool {
        self.model.is_none() && self.quota_id.contains("PerProject") && !self.quota_id.contains("PerModel")
    }
}

/// The digits of a project number at the start of `text` or after `projects/` (`projects/411082643095`,
/// `411082643095 before it ...`), if there are some.
fn project_number(text: &str) -> Option<String> {
    let text = text.trim_start_matches('\'').trim_start();
    let digits = text.strip_prefix("projects/").unwrap_or(text);
    let number: String = digits.chars().take_while(char::is_ascii_digit).collect();
    (!number.is_empty() && number.len() <= 20).then_some(number)
}

/// An `ErrorInfo.reason` that says the key or its project is at fault, whatever else the answer names.
fn blames_the_key(reason: &str) -> bool {
    reason.starts_with("API_KEY") || reason.starts_with("CONSUMER") || reason == "SERVICE_DISABLED"
}

/// The id at the start of `text` (`abc` of `abc or it may not exist`), if it is one a name may hold.
fn resource_id(text: &str) -> Option<&str> {
    let end = text.find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_')).unwrap_or(text.len());
    let id = &text[..end];
    (!id.is_empty() && id.len() <= 100).then_some(id)
}

/// Where `word` starts in `text` as a whole word (not inside `profile` or `batches`).
fn find_word(text: &str, word: &str) -> Option<usize> {
    text.match_indices(word).map(|(at, _)| at).find(|&at| {
        let before = text[..at].chars().next_back().is_none_or(|c| !c.is_ascii_alphanumeric());
        let after = text[at + word.len()..].chars().next().is_none_or(|c| !c.is_ascii_alphanumeric());
        before && after
    })
}

/// The small words that follow a kind in a message and are not its id (`File or`, `batch not found`).
fn is_english(word: &str) -> bool {
    ["or", "not", "is", "was", "does", "may", "has", "in", "of", "for", "and", "with"]
        .contains(&word.to_ascii_lowercase().as_str())
}

/// A name from an answer fit to be stored and shown: short, and only characters quota ids and model
/// names use.
fn sane(text: &str) -> bool {
    !text.is_empty() && text.len() <= 200 && text.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:/@+".contains(c))
}

#[cfg(test)]
mod tests;
