//! What a connector's claims pace by, and how full each window is: the keyring's declared limits
//! ([`Limits`]) and the limits the provider's answers taught ([`LearnedLimit`]), both binding a quota
//! scope and a model; a claim reserves against every one of them.

use std::sync::Arc;

use serde::Serialize;

use crate::pool::learned::LearnedLimit;
use crate::pool::limit::{Limit, Limits, Measure};
use crate::pool::scope::Scope;

/// Where a limit comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The keyring declares it.
    Declared,
    /// A 429 stated it (`quotaValue` of quota `quota_id`); forgotten at `until` (unix ms).
    Learned {
        /// The provider's quota id.
        quota_id: String,
        /// When it is forgotten.
        until: i64,
    },
}

/// Everything the claims of one connector pace by.
#[derive(Debug, Clone, Default)]
pub struct Pacing {
    /// The keyring's `[CONNECTOR limits]` sections.
    pub declared: Arc<Limits>,
    /// The limits learned from answers and not yet forgotten (when they were read).
    pub learned: Vec<LearnedLimit>,
}

impl Pacing {
    /// Whether nothing paces the connector's claims (a claim then does nothing more than without the
    /// feature).
    pub fn is_empty(&self) -> bool {
        self.declared.is_empty() && self.learned.is_empty()
    }

    /// The limits a request for `model` meets on a key of quota scope `scope` at `now`: the declared
    /// ones of the scope's group (see [`Limits::binding`]), then the learned ones of the scope and model
    /// not yet forgotten.
    pub fn binding(&self, scope: &str, model: &str, now: i64) -> Vec<(Limit, Source)> {
        let group = match scope.parse::<Scope>() {
            Ok(Scope::Group(group)) => Some(group),
            _ => None,
        };
        let declared = self.declared.binding(group.as_deref(), model).iter().map(|limit| (*limit, Source::Declared));
        let learned = self
            .learned
            .iter()
            .filter(|learned| learned.scope == scope && learned.model == model && learned.until > now)
            .map(|learned| {
                (learned.limit, Source::Learned { quota_id: learned.quota_id.clone(), until: learned.until })
            });
        declared.chain(learned).collect()
    }

    /// Whether a token limit is among these (declared for any group and model, or learned).
    pub fn paces_tokens(&self) -> bool {
        let learned = self.learned.iter().map(|learned| learned.limit);
        self.declared.all().chain(learned).any(|limit| limit.measure == Measure::Tokens)
    }

    /// How far back from `now` the longest window of all these limits counts, in ms.
    pub fn longest_reach(&self, now: i64) -> i64 {
        let learned = self.learned.iter().map(|learned| now - learned.limit.window.counted_from(now));
        learned.fold(self.declared.longest_reach(now), i64::max)
    }
}

/// One limit of a (quota scope, model) and how full its window is: what `status`, `why`, `status
/// --json`, the metrics and the dashboard show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitUsage {
    /// Connector.
    pub connector: String,
    /// The quota scope it binds.
    pub scope: String,
    /// The model it binds.
    pub model: String,
    /// The limit.
    pub limit: Limit,
    /// Declared or learned.
    pub source: Source,
    /// How much of it the window holds now: requests, or input tokens.
    pub used: u64,
    /// Until when claims of the scope for the model are paced (a full window), if they are now.
    pub paced_until: Option<i64>,
}

impl LimitUsage {
    /// `9/10 this minute (10/min, declared)`.
    pub fn said(&self) -> String {
        let tokens = if self.limit.measure == Measure::Tokens { " tokens" } else { "" };
        let source = match &self.source {
            Source::Declared => "declared".to_owned(),
            Source::Learned { quota_id, .. } => format!("learned from {quota_id}"),
        };
        format!("{}/{}{tokens} {} ({}, {source})", self.used, self.limit.count, self.limit.window.said(), self.limit)
    }
}

impl Serialize for LimitUsage {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Shape<'a> {
            connector: &'a str,
            scope: &'a str,
            model: &'a str,
            limit: String,
            measure: &'static str,
            count: u64,
            window: String,
            used: u64,
            source: &'static str,
            quota_id: Option<&'a str>,
            learned_until: Option<i64>,
            paced_until: Option<i64>,
        }
        let (source, quota_id, learned_until) = match &self.source {
            Source::Declared => ("declared", None, None),
            Source::Learned { quota_id, until } => ("learned", Some(quota_id.as_str()), Some(*until)),
        };
        Shape {
            connector: &self.connector,
            scope: &self.scope,
            model: &self.model,
            limit: self.limit.to_string(),
            measure: match self.limit.measure {
                Measure::Requests => "requests",
                Measure::Tokens => "tokens",
            },
            count: self.limit.count,
            window: self.limit.window.to_string(),
            used: self.used,
            source,
            quota_id,
            learned_until,
            paced_until: self.paced_until,
        }
        .serialize(serializer)
    }
}
