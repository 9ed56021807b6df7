//! How a lease ends: the one fate of a key after an upstream answer, as `classify` decides it and as
//! the store applies it.
//!
//! Invariants: a fate carries everything the store needs and nothing it must look up again: the
//! upstream status behind it and the Google Cloud project the answer revealed (`consumer:
//! projects/NNN`) travel inside the fate, so no conversion between the verdict and the store can drop
//! them.

/// How a lease ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Back to vacant (or to lockdown, while a lockdown of every model covers the key's scope); after a
    /// success the strikes of the attempt's model start again at 0.
    Release {
        /// The key's last answer was a success.
        success: bool,
    },
    /// Rate-limited: one model or every model, of the key alone or of its whole quota group.
    Lockdown(Lockdown),
    /// Permanently bad until cleanup or a new secret.
    Error {
        /// Why.
        reason: String,
        /// The upstream status behind it.
        http_status: Option<u16>,
        /// The Google Cloud project number the answer revealed (`consumer: projects/NNN`), if any.
        project: Option<String>,
    },
}

/// Whose quota a lockdown is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// The key alone (shared capacity, a hint-less 429): scope `key:NAME`.
    Key,
    /// Every key of the key's quota group (a quota metered per project or account).
    Group,
}

/// A lockdown to record: what it covers, until when, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lockdown {
    /// Deadline, unix ms.
    pub until: i64,
    /// Why, for `status`, `why` and the history.
    pub reason: String,
    /// The upstream status behind it.
    pub http_status: Option<u16>,
    /// The key alone, or its whole quota group.
    pub reach: Reach,
    /// The models it covers; empty: every model.
    pub models: Vec<String>,
    /// The provider's quota, e.g. `GenerateRequestsPerDayPerProjectPerModel-FreeTier`.
    pub quota_id: Option<String>,
    /// The Google Cloud project number the answer revealed, if any (learned for ungrouped keys).
    pub project: Option<String>,
    /// The limits the answer stated (`QuotaFailure.quotaValue`), which the lockdown's scope paces by
    /// until the provider's next midnight.
    pub taught: Vec<crate::pool::Taught>,
}

impl Lockdown {
    /// A lockdown of every model of this key alone (the seed's lockdown).
    pub fn whole_key(until: i64, reason: impl Into<String>, http_status: Option<u16>) -> Self {
        Self {
            until,
            reason: reason.into(),
            http_status,
            reach: Reach::Key,
            models: Vec::new(),
            quota_id: None,
            project: None,
            taught: Vec::new(),
        }
    }
}

impl Fate {
    /// The Google Cloud project number the answer revealed, if any (learned for the key).
    pub fn project(&self) -> Option<&str> {
        match self {
            Fate::Lockdown(lockdown) => lockdown.project.as_deref(),
            Fate::Error { project, .. } => project.as_deref(),
            Fate::Release { .. } => None,
        }
    }
}
