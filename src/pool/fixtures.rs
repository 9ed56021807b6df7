//! Records for the pool's unit tests: a vacant key and a lockdown in force, to adjust with struct
//! update syntax.

use super::{KeyRecord, KeyState, LockdownRecord, ModelScope, Scope};

/// The moment the fixtures' times are around, unix ms.
pub(crate) const NOW: i64 = 1_000_000;

/// A vacant key of connector `c`, in the keyring, never used, whose lockdowns go to `scope`.
pub(crate) fn record(name: &str, scope: Scope) -> KeyRecord {
    KeyRecord {
        connector: "c".into(),
        key_name: name.into(),
        fingerprint: format!("fp-{name}"),
        state: KeyState::Vacant,
        retired_at: None,
        lease: 3,
        holder: None,
        locked_at: None,
        heartbeat_at: None,
        lockdown_until: None,
        reason: None,
        http_status: None,
        lockdown_count: 0,
        uses: 0,
        last_used_at: 0,
        quota_group: None,
        project_learned: None,
        quota_scope: scope,
    }
}

/// A lockdown of `scope` for `model` until `until`, set by `k0` just before [`NOW`].
pub(crate) fn lockdown(scope: Scope, model: ModelScope, until: i64) -> LockdownRecord {
    LockdownRecord {
        connector: "c".into(),
        scope,
        model,
        until,
        quota_id: None,
        reason: "429".into(),
        http_status: Some(429),
        set_by_key: "k0".into(),
        set_at: NOW - 1,
        strikes: 1,
    }
}
