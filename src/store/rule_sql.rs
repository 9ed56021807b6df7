//! The pool's rules (`crate::pool::rule`) in SQL: each written once here, as a fragment every statement
//! that needs it is built from, so that the claim, the availability count, the lease end and the rest
//! can never disagree on which lockdowns bind a key.
//!
//! A fragment names the key it is about by [`KeyCols`]: the columns of a `keys` row under an alias, or
//! parameters standing for them (so a statement about one known key still walks the lockdowns' primary
//! key `(connector, scope, model)`). `q` is always the alias (or the name) of the `lockdowns` table.

use crate::pool::{KeyState, ModelScope};

/// SQL expressions for a key's connector, quota scope and name.
#[derive(Debug, Clone)]
pub(in crate::store) struct KeyCols {
    connector: String,
    quota_scope: String,
    key_name: String,
}

impl KeyCols {
    /// The columns of the `keys` row aliased (or named) `k`.
    pub(in crate::store) fn row(k: &str) -> Self {
        Self {
            connector: format!("{k}.connector"),
            quota_scope: format!("{k}.quota_scope"),
            key_name: format!("{k}.key_name"),
        }
    }

    /// Parameters (or any expressions) standing for the key's columns.
    pub(in crate::store) fn given(connector: &str, quota_scope: &str, key_name: &str) -> Self {
        Self { connector: connector.to_owned(), quota_scope: quota_scope.to_owned(), key_name: key_name.to_owned() }
    }
}

/// The scope of the key alone (`key:NAME`), as `crate::pool::Scope::Key` displays it.
pub(in crate::store) fn own_scope(key_name: &str) -> String {
    format!("'key:' || {key_name}")
}

/// `q` is a lockdown of one of the key's scopes: its quota scope, or the key alone.
pub(in crate::store) fn on_scopes_of(q: &str, key: &KeyCols) -> String {
    format!(
        "{q}.connector = {connector} AND {q}.scope IN ({quota_scope}, {own})",
        connector = key.connector,
        quota_scope = key.quota_scope,
        own = own_scope(&key.key_name)
    )
}

/// `q` covers a request for the model `model` (an expression; NULL: a request naming no model, which
/// only a lockdown of every model covers).
pub(in crate::store) fn covers(q: &str, model: &str) -> String {
    let every = ModelScope::EVERY;
    format!("{q}.model IN (coalesce({model}, '{every}'), '{every}')")
}

/// `q` covers every model.
pub(in crate::store) fn every_model(q: &str) -> String {
    format!("{q}.model = '{}'", ModelScope::EVERY)
}

/// `q` is in force at `now`.
pub(in crate::store) fn in_force(q: &str, now: &str) -> String {
    format!("{q}.until > {now}")
}

/// A lockdown in force keeps the key from serving `model` at `now`: the one rule of per-model quotas
/// (`crate::pool::rule::binds`).
pub(in crate::store) fn locked_down_for(key: &KeyCols, model: &str, now: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM lockdowns q WHERE {scopes} AND {covers} AND {in_force})",
        scopes = on_scopes_of("q", key),
        covers = covers("q", model),
        in_force = in_force("q", now)
    )
}

/// The latest deadline among the lockdowns of every model in force on the key (NULL: none).
pub(in crate::store) fn whole_lockdown_end(key: &KeyCols, now: &str) -> String {
    format!("(SELECT max(q.until) FROM lockdowns q WHERE {})", whole_lockdowns_in_force(key, now))
}

/// `q` is a lockdown of every model in force at `now` on one of the key's scopes.
pub(in crate::store) fn whole_lockdowns_in_force(key: &KeyCols, now: &str) -> String {
    format!("{} AND {} AND {}", on_scopes_of("q", key), every_model("q"), in_force("q", now))
}

/// The latest deadline among the lockdowns of exactly `model` in force on the key (NULL: none).
pub(in crate::store) fn model_lockdown_end(key: &KeyCols, model: &str, now: &str) -> String {
    format!(
        "(SELECT max(q.until) FROM lockdowns q WHERE {scopes} AND q.model = {model} AND {in_force})",
        scopes = on_scopes_of("q", key),
        in_force = in_force("q", now)
    )
}

/// The end of the latest lockdown ever recorded on the key's scopes (0: none): a key's place in the claim
/// order is never before it.
pub(in crate::store) fn latest_lockdown_end(key: &KeyCols) -> String {
    format!("coalesce((SELECT max(q.until) FROM lockdowns q WHERE {}), 0)", on_scopes_of("q", key))
}

/// The key row `k` holds no lease and is not in error: vacant, or in a lockdown of its own (the
/// condition of the claim's partial indexes, written as they are, so the planner uses them).
pub(in crate::store) fn unheld(k: &str) -> String {
    format!("{k}.state IN ('{}', '{}')", KeyState::Vacant, KeyState::Lockdown)
}

/// The deadline of the key row `k`'s own lockdown of every model, while it is in force at `now` (NULL:
/// none) (`crate::pool::rule::own_lockdown_end`).
pub(in crate::store) fn own_lockdown_end(k: &str, now: &str) -> String {
    format!("CASE WHEN {k}.state = '{}' AND {k}.lockdown_until > {now} THEN {k}.lockdown_until END", KeyState::Lockdown)
}

/// The key row `k` could be claimed at `now` as far as its own state goes: in the keyring, and vacant or
/// in a whole-key lockdown whose deadline passed (`KeyRecord::effective_state`).
pub(in crate::store) fn claimable_state(k: &str, now: &str) -> String {
    format!(
        "{unheld} AND {k}.retired_at IS NULL AND ({k}.state = '{vacant}' OR {k}.lockdown_until <= {now})",
        unheld = unheld(k),
        vacant = KeyState::Vacant
    )
}

/// The key row `k` could serve `model` at `now`: claimable, and no lockdown in force keeps it from the
/// model (`crate::pool::rule::claimable`).
pub(in crate::store) fn free_for(k: &str, model: &str, now: &str) -> String {
    format!("{} AND NOT {}", claimable_state(k, now), locked_down_for(&KeyCols::row(k), model, now))
}
