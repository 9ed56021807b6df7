//! How full each window of the limits in use is: one computation for `status`, `why`, `status --json`,
//! the metrics and the dashboard, over any backend.

use std::collections::BTreeSet;

use super::Backend;
use crate::error::Result;
use crate::pool::{LimitUsage, LockdownRecord, ModelScope, Pacing};

/// Every limit of `pacing` that binds (`scope`, `model`) at `now`, with its window's usage and, when
/// pacing has (scope, model) locked down, until when.
pub(super) fn of(
    backend: &dyn Backend,
    pacing: &Pacing,
    (connector, scope, model): (&str, &str, &str),
    now: i64,
) -> Result<Vec<LimitUsage>> {
    let lockdowns = backend.lockdowns(Some(connector))?;
    usage(backend, pacing, &lockdowns, (connector, scope, model), now)
}

/// [`of`] for every (scope, model) of `connector` that reserved within `pacing`'s longest window or
/// learned a limit, by scope and model.
pub(super) fn in_use(backend: &dyn Backend, pacing: &Pacing, connector: &str, now: i64) -> Result<Vec<LimitUsage>> {
    if pacing.is_empty() {
        return Ok(Vec::new());
    }
    let mut pairs: BTreeSet<(String, String)> =
        backend.reserved_models(connector, now - pacing.longest_reach(now))?.into_iter().collect();
    pairs.extend(pacing.learned.iter().map(|learned| (learned.scope.clone(), learned.model.clone())));
    let lockdowns = backend.lockdowns(Some(connector))?;
    let mut all = Vec::new();
    for (scope, model) in pairs {
        all.extend(usage(backend, pacing, &lockdowns, (connector, &scope, &model), now)?);
    }
    Ok(all)
}

fn usage(
    backend: &dyn Backend,
    pacing: &Pacing,
    lockdowns: &[LockdownRecord],
    (connector, scope, model): (&str, &str, &str),
    now: i64,
) -> Result<Vec<LimitUsage>> {
    let paced_until = lockdowns
        .iter()
        .filter(|lockdown| lockdown.is_paced() && lockdown.until > now && lockdown.scope.to_string() == scope)
        .find(|lockdown| lockdown.model == ModelScope::One(model.to_owned()))
        .map(|lockdown| lockdown.until);
    pacing
        .binding(scope, model, now)
        .into_iter()
        .map(|(limit, source)| {
            let used = backend.used_since((connector, scope, model), limit.measure, limit.window.counted_from(now))?;
            Ok(LimitUsage {
                connector: connector.to_owned(),
                scope: scope.to_owned(),
                model: model.to_owned(),
                limit,
                source,
                used,
                paced_until,
            })
        })
        .collect()
}
