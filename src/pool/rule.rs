//! The one rule of per-model quotas, in Rust: a key serves a request for a model unless a lockdown in
//! force on one of its scopes covers that model (or every model). The store's SQL states the same rule
//! once (its `locked_down_for` fragment); the agreement test (`tests/agreement.rs`) holds the two
//! together over random pools.

use super::{KeyRecord, KeyState, LockdownRecord, Scope};

/// Whether `lockdown` keeps `key` from serving a request for `model` (`None`: a request that names no
/// model) at `now`: it is in force, set on the key's quota scope or on the key alone, and covers the
/// model.
pub fn binds(lockdown: &LockdownRecord, key: &KeyRecord, model: Option<&str>, now: i64) -> bool {
    in_force_on(lockdown, key, now) && lockdown.model.covers(model)
}

/// Whether `lockdown` is in force at `now` on one of `key`'s scopes (its quota scope, or the key alone),
/// whatever models it covers.
pub fn in_force_on(lockdown: &LockdownRecord, key: &KeyRecord, now: i64) -> bool {
    lockdown.connector == key.connector
        && in_force(lockdown, now)
        && (lockdown.scope == key.quota_scope || lockdown.scope == Scope::Key(key.key_name.clone()))
}

/// Whether `lockdown` is in force at `now`: its deadline is ahead (at the deadline it is over).
pub fn in_force(lockdown: &LockdownRecord, now: i64) -> bool {
    lockdown.until > now
}

/// The lockdowns among `lockdowns` that keep `key` from serving `model` at `now`.
pub fn binding<'a>(
    lockdowns: &'a [LockdownRecord],
    key: &'a KeyRecord,
    model: Option<&'a str>,
    now: i64,
) -> impl Iterator<Item = &'a LockdownRecord> + 'a {
    lockdowns.iter().filter(move |lockdown| binds(lockdown, key, model, now))
}

/// The state of `key` as a request for `model` sees it at `now`: a lockdown whose deadline passed is
/// vacant, and a vacant key bound by a lockdown in force is in lockdown, as the claim would skip it.
pub fn state_for(key: &KeyRecord, lockdowns: &[LockdownRecord], model: Option<&str>, now: i64) -> KeyState {
    match key.effective_state(now) {
        KeyState::Vacant if binding(lockdowns, key, model, now).next().is_some() => KeyState::Lockdown,
        state => state,
    }
}

/// Whether a claim for `model` at `now` could take `key`: in the keyring, and vacant as the request
/// sees it.
pub fn claimable(key: &KeyRecord, lockdowns: &[LockdownRecord], model: Option<&str>, now: i64) -> bool {
    key.retired_at.is_none() && state_for(key, lockdowns, model, now) == KeyState::Vacant
}

/// When `key` could next serve `model`, if it is kept from it only by lockdowns (its own whole-key
/// deadline, or lockdowns of its scopes): the latest of their deadlines. `None` when it is free now, or
/// held, or in error, or retired.
pub fn free_at(key: &KeyRecord, lockdowns: &[LockdownRecord], model: Option<&str>, now: i64) -> Option<i64> {
    if key.retired_at.is_some() || claimable(key, lockdowns, model, now) {
        return None;
    }
    let own = match (key.effective_state(now), key.lockdown_until) {
        (KeyState::Lockdown, Some(_)) => own_lockdown_end(key, now),
        (KeyState::Vacant, _) => None,
        _ => return None,
    };
    own.into_iter().chain(binding(lockdowns, key, model, now).map(|lockdown| lockdown.until)).max()
}

/// The deadline of the key's own lockdown of every model (its row's `lockdown_until`), while it is in
/// force at `now`: the lockdown a database from before per-model lockdowns records on the key alone.
pub fn own_lockdown_end(key: &KeyRecord, now: i64) -> Option<i64> {
    // In force exactly while the stored lockdown is (`effective_state`: until its deadline).
    key.lockdown_until.filter(|_| key.effective_state(now) == KeyState::Lockdown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::ModelScope;
    use crate::pool::fixtures::{lockdown, record as key};

    #[test]
    fn a_lockdown_binds_its_scopes_models_while_in_force() {
        let grouped = key("k1", Scope::Group("g".into()));
        let pro = ModelScope::One("pro".into());
        let group_pro = lockdown(Scope::Group("g".into()), pro.clone(), 100);
        assert!(binds(&group_pro, &grouped, Some("pro"), 99));
        assert!(!binds(&group_pro, &grouped, Some("pro"), 100), "expired at its deadline");
        assert!(!binds(&group_pro, &grouped, Some("flash"), 0), "another model");
        assert!(!binds(&group_pro, &grouped, None, 0), "a request naming no model");
        assert!(binds(&lockdown(Scope::Key("k1".into()), ModelScope::Every, 100), &grouped, None, 0), "the key alone");
        assert!(!binds(&lockdown(Scope::Key("k2".into()), ModelScope::Every, 100), &grouped, None, 0));
        assert!(!binds(&lockdown(Scope::Group("h".into()), ModelScope::Every, 100), &grouped, None, 0));
        let mut elsewhere = group_pro.clone();
        elsewhere.connector = "d".into();
        assert!(!binds(&elsewhere, &grouped, Some("pro"), 0), "another connector");
    }

    #[test]
    fn state_and_free_time_follow_the_binding_lockdowns() {
        let mut k = key("k1", Scope::Key("k1".into()));
        let all = [lockdown(Scope::Key("k1".into()), ModelScope::One("pro".into()), 100)];
        assert_eq!(state_for(&k, &all, Some("pro"), 50), KeyState::Lockdown);
        assert_eq!(free_at(&k, &all, Some("pro"), 50), Some(100));
        assert!(claimable(&k, &all, Some("flash"), 50));
        assert_eq!(free_at(&k, &all, Some("flash"), 50), None);
        k.state = KeyState::Lockdown;
        k.lockdown_until = Some(200);
        assert_eq!(free_at(&k, &all, Some("pro"), 50), Some(200));
        assert_eq!(own_lockdown_end(&k, 199), Some(200));
        assert_eq!(own_lockdown_end(&k, 200), None, "over at its deadline");
        assert!(in_force(&all[0], 99) && !in_force(&all[0], 100));
        assert!(claimable(&k, &all, Some("pro"), 200));
        k.retired_at = Some(1);
        assert!(!claimable(&k, &all, Some("pro"), 300));
        k.retired_at = None;
        k.state = KeyState::Locked;
        assert_eq!(free_at(&k, &all, Some("pro"), 50), None);
    }
}
