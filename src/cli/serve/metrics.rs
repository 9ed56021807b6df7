//! The gateway's Prometheus metrics (`GET /metrics`, OpenMetrics text by `prometheus-client`).
//!
//! - `apijongler_gateway_requests_total{connector, model, outcome}`: requests that reached a
//!   connector; `outcome` is the upstream's status class (`2xx`, `4xx`, `5xx`) or the gateway's own
//!   answer (`no_key`: 429, `unreachable`: 502, `unavailable`: 503, `failed`: 500). `model` is empty
//!   when the request names none.
//! - `apijongler_gateway_refused_total{reason}`: requests refused at the door (`host`, `origin`,
//!   `token`, `route`, `path`, `body`).
//! - `apijongler_keys{connector, state}`: keys by state (vacant, locked, lockdown, error), read from
//!   the database at each scrape, so every process's use of the pool shows, not only this one's. They
//!   count the pool view `status --json` prints (`pool::view`), a key's state as a request that names
//!   no model sees it; retired keys are in no state.
//! - `apijongler_keys_locked_down{connector, model}`: keys with a lockdown of that one model in force
//!   on their quota scopes (whatever their state; retired keys left out), read at each scrape as the
//!   key states are. Such a key is vacant in `apijongler_keys` (it still serves other models), so a
//!   pool locked down for one model shows here; a lockdown of every model shows as `state="lockdown"`.
//!   A model whose lockdowns ended leaves the family at the next scrape.
//! - `apijongler_limit{connector, scope, model, limit, source}` and
//!   `apijongler_limit_used{...}`: each limit in use (declared in the keyring, or learned from a 429's
//!   `quotaValue`: `source`), its count and how much its window holds now (requests, or input tokens), for
//!   each quota scope and model that reserved within its window; read at each scrape. A scope and
//!   model whose windows emptied leave the families.
//! - `apijongler_gateway_claim_wait_seconds{connector}` and
//!   `apijongler_gateway_upstream_seconds{connector}`: histograms of the time spent waiting for keys
//!   and of the last attempt's upstream latency (for a stream: to its first event).
//!
//! No label ever holds a key's secret, a query string or a body.

use std::sync::Mutex;

use api_jongler::holder::Holder;
use api_jongler::pool::view::{self, PoolView, Sources};
use api_jongler::pool::{LimitUsage, Source};
use api_jongler::{Coordinator, Exchange, KeyState};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The content type of the text `render` returns.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What a request the pool could not answer came to: the pool's word for it (its label).
use api_jongler::pool::outcome::Unanswered;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    connector: String,
    model: String,
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    connector: String,
    state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelKeyLabels {
    connector: String,
    model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    connector: String,
    scope: String,
    model: String,
    limit: String,
    source: String,
}

impl LimitLabels {
    fn of(usage: &LimitUsage) -> Self {
        let source = match usage.source {
            Source::Declared => "declared",
            Source::Learned { .. } => "learned",
        };
        Self {
            connector: usage.connector.clone(),
            scope: usage.scope.clone(),
            model: usage.model.clone(),
            limit: usage.limit.to_string(),
            source: source.to_owned(),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectorLabels {
    connector: String,
}

type Histograms = Family<ConnectorLabels, Histogram, fn() -> Histogram>;

/// The registry and the handles to update it.
#[derive(Debug)]
pub struct Metrics {
    /// Locked for a whole scrape, so two scrapes never interleave their key-state updates.
    registry: tokio::sync::Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    keys: Family<KeyLabels, Gauge>,
    locked_down: Family<ModelKeyLabels, Gauge>,
    limit: Family<LimitLabels, Gauge>,
    limit_used: Family<LimitLabels, Gauge>,
    claim_wait: Histograms,
    upstream: Histograms,
    /// The last scrape's failure to read key states, logged once per change.
    key_state_problem: Mutex<Option<String>>,
    /// The model names used as labels so far.
    models: Mutex<std::collections::HashSet<String>>,
}

/// The most distinct model names the request counter is labelled with.
const MAX_MODELS: usize = 100;

fn claim_wait_histogram() -> Histogram {
    Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0])
}

fn upstream_histogram() -> Histogram {
    Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0])
}

impl Metrics {
    /// An empty registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let refused = Family::<RefusedLabels, Counter>::default();
        let keys = Family::<KeyLabels, Gauge>::default();
        let locked_down = Family::<ModelKeyLabels, Gauge>::default();
        let limit = Family::<LimitLabels, Gauge>::default();
        let limit_used = Family::<LimitLabels, Gauge>::default();
        let claim_wait: Histograms = Family::new_with_constructor(claim_wait_histogram);
        let upstream: Histograms = Family::new_with_constructor(upstream_histogram);
        registry.register(
            "apijongler_gateway_requests",
            "Requests that reached a connector, by model and outcome (status class or the gateway's own error)",
            requests.clone(),
        );
        registry.register("apijongler_gateway_refused", "Requests refused before any key was claimed", refused.clone());
        registry.register("apijongler_keys", "Keys by state, read from the database at each scrape", keys.clone());
        registry.register(
            "apijongler_keys_locked_down",
            "Keys with a lockdown of one model in force, by model, read from the database at each scrape",
            locked_down.clone(),
        );
        registry.register("apijongler_limit", "Each limit in use (declared or learned): its count", limit.clone());
        registry.register(
            "apijongler_limit_used",
            "How much each limit's window holds now (requests, or input tokens), read at each scrape",
            limit_used.clone(),
        );
        registry.register(
            "apijongler_gateway_claim_wait_seconds",
            "Time a request waited for free keys, over all its attempts",
            claim_wait.clone(),
        );
        registry.register(
            "apijongler_gateway_upstream_seconds",
            "Upstream latency of a request's last attempt (a stream: to its first event)",
            upstream.clone(),
        );
        Self {
            registry: tokio::sync::Mutex::new(registry),
            requests,
            refused,
            keys,
            locked_down,
            limit,
            limit_used,
            claim_wait,
            upstream,
            key_state_problem: Mutex::new(None),
            models: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// A request answered by the upstream.
    pub fn answered(&self, connector: &str, exchange: &Exchange) {
        let outcome = format!("{}xx", exchange.status / 100);
        self.count(connector, exchange.model.as_deref(), outcome);
        let labels = ConnectorLabels { connector: connector.to_owned() };
        self.claim_wait.get_or_create(&labels).observe(exchange.timings.claiming.as_secs_f64());
        self.upstream.get_or_create(&labels).observe(exchange.timings.upstream.as_secs_f64());
    }

    /// A request the pool could not answer.
    pub fn failed(&self, connector: &str, model: Option<&str>, outcome: Unanswered) {
        self.count(connector, model, outcome.to_string());
    }

    /// A request refused at the door.
    pub fn refused(&self, reason: &str) {
        self.refused.get_or_create(&RefusedLabels { reason: reason.to_owned() }).inc();
    }

    fn count(&self, connector: &str, model: Option<&str>, outcome: String) {
        let model = self.model_label(model.unwrap_or_default());
        let labels = RequestLabels { connector: connector.to_owned(), model, outcome };
        self.requests.get_or_create(&labels).inc();
    }

    /// The model as a label: clients name models freely, so past [`MAX_MODELS`] distinct names, new
    /// ones are counted as `other` and the number of series stays bounded.
    fn model_label(&self, model: &str) -> String {
        let mut seen = self.models.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.contains(model) || seen.len() < MAX_MODELS && seen.insert(model.to_owned()) {
            model.to_owned()
        } else {
            "other".to_owned()
        }
    }

    /// The text exposition, with the key states of `connectors` read now.
    pub async fn render(&self, coordinator: &Coordinator, connectors: &[String]) -> String {
        let registry = self.registry.lock().await;
        let (coordinator, names) = (coordinator.clone(), connectors.to_vec());
        let read = tokio::task::spawn_blocking(move || {
            names
                .into_iter()
                .map(|name| key_view(&coordinator, &name).map(|view| (name, view)))
                .collect::<api_jongler::Result<Vec<_>>>()
        })
        .await
        .unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()));
        let problem = match read {
            Ok(views) => {
                // Only the models locked down now: one whose lockdowns ended leaves the family.
                self.locked_down.clear();
                self.limit.clear();
                self.limit_used.clear();
                for (connector, view) in views {
                    for usage in &view.limits {
                        let labels = LimitLabels::of(usage);
                        self.limit.get_or_create(&labels).set(i64::try_from(usage.limit.count).unwrap_or(i64::MAX));
                        self.limit_used.get_or_create(&labels).set(i64::try_from(usage.used).unwrap_or(i64::MAX));
                    }
                    for (model, keys) in view.locked_down_by_model(&connector) {
                        let labels = ModelKeyLabels { connector: connector.clone(), model };
                        self.locked_down.get_or_create(&labels).set(i64::try_from(keys).unwrap_or(i64::MAX));
                    }
                    for state in KeyState::ALL {
                        let labels = KeyLabels { connector: connector.clone(), state: state.to_string() };
                        let keys = view.count(&connector, state);
                        self.keys.get_or_create(&labels).set(i64::try_from(keys).unwrap_or(i64::MAX));
                    }
                }
                None
            }
            // The last values stay; the scrape still answers.
            Err(error) => Some(error.to_string()),
        };
        let mut last = self.key_state_problem.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(problem) = &problem
            && last.as_ref() != Some(problem)
        {
            tracing::warn!(problem = %problem, "metrics: cannot read key states");
        }
        *last = problem;
        drop(last);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("writing to a String cannot fail");
        text
    }
}

/// The pool of `connector` as a request that names no model sees it now, with its limits in use: the
/// view `status --json` prints, which the key gauges count by state (retired keys in none).
fn key_view(coordinator: &Coordinator, connector: &str) -> api_jongler::Result<PoolView> {
    let keys = coordinator.store().keys(Some(connector))?;
    let lockdowns = coordinator.store().lockdowns(Some(connector))?;
    let sources = Sources {
        keys: &keys,
        lockdowns: &lockdowns,
        keyring: None,
        connector: Some(connector),
        model: None,
        now: coordinator.now_ms(),
    };
    Ok(view::pool(&sources, &Holder::liveness).with_limits(coordinator.limits_in_use(connector)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_labels_stay_bounded_whatever_clients_name() {
        let metrics = Metrics::new();
        for index in 0..MAX_MODELS {
            assert_eq!(metrics.model_label(&format!("m{index}")), format!("m{index}"));
        }
        assert_eq!(metrics.model_label("one-too-many"), "other");
        assert_eq!(metrics.model_label("m7"), "m7", "names already seen keep their label");
    }
}
