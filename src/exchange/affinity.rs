//! Resource affinity in the send path: a request naming a resource whose owner the database knows is
//! pinned to the owner's quota scope, and a successful answer that created resources records them as
//! its key's (see `crate::resource` and the README, "Resources and affinity").
//!
//! Invariants:
//! - The pin is read once per request, before its first claim; every attempt of the request claims
//!   only keys of that scope, so a retry never carries the resource to another project.
//! - An unknown or expired resource pins nothing: the request goes to any key, as before.
//! - Learning never fails a request: an answer is the caller's even when its resources could not be
//!   recorded (logged; the next request naming them is simply not pinned).
//! - A resumable upload's chunks carry no key: the file the last one creates is recorded as the key's
//!   that started the session (`uploads/<digest of its upload_id>`, recorded from the start answer's
//!   `x-goog-upload-url`).

use super::Upstream;
use super::attempt::Answer;
use super::outgoing::Outgoing;
use crate::error::{Error, Result};
use crate::offload::short_blocking;
use crate::pool::Availability;
use crate::resource::{self, Created, Owner};

/// The header in which Gemini's resumable upload start answers where the chunks go.
const UPLOAD_URL: &str = "x-goog-upload-url";

impl Upstream {
    /// The owner of the first resource `outgoing` names that the database knows (unexpired), to which
    /// its claims are pinned; `None` for a request naming none, and for keyless requests.
    pub(super) async fn pin_for(&self, outgoing: &Outgoing) -> Result<Option<Owner>> {
        if self.keyring.is_none() || outgoing.without_key {
            return Ok(None);
        }
        let names = resource::named_in(&outgoing.path_and_query, &outgoing.body);
        if names.is_empty() {
            return Ok(None);
        }
        let (coordinator, connector) = (self.coordinator.clone(), self.connector.name.clone());
        let owner =
            short_blocking(move || coordinator.store().resource_owner(&connector, &names, coordinator.now_ms()))
                .await?;
        if let Some(owner) = &owner {
            tracing::debug!(
                connector = %self.connector.name, resource = %owner.name, key = %owner.key_name,
                scope = %owner.quota_scope, "request pinned to the resource's owner"
            );
        }
        Ok(owner)
    }

    /// Records the resources a successful answer to `outgoing` created (a POST answered 2xx, whole) as
    /// key `key_name`'s, or for a keyless upload chunk, as the key's that started its session.
    pub(super) async fn learn(&self, outgoing: &Outgoing, key_name: Option<&str>, answer: &Answer) {
        let Answer::Whole { status, headers, body } = answer else { return };
        if !(200..300).contains(status) || outgoing.method != reqwest::Method::POST {
            return;
        }
        let now = self.coordinator.now_ms();
        let mut created = resource::created_in(body, now);
        let session = headers.get(UPLOAD_URL).and_then(|url| url.to_str().ok()).and_then(resource::upload_session);
        if let Some(name) = session {
            created.push(Created { name, expires_at: Some(now + resource::UPLOAD_LIFETIME_MS) });
        }
        if created.is_empty() {
            return;
        }
        let (coordinator, connector) = (self.coordinator.clone(), self.connector.name.clone());
        let key_name = key_name.map(str::to_owned);
        let chunk_of = outgoing.without_key.then(|| resource::upload_session(&outgoing.path_and_query)).flatten();
        let recorded = short_blocking(move || {
            let backend = coordinator.backend();
            let owner = match (key_name, chunk_of) {
                (Some(key), _) => Some(key),
                (None, Some(session)) => {
                    backend.resource_owner(&connector, &[session], now)?.map(|owner| owner.key_name)
                }
                (None, None) => None,
            };
            let Some(owner) = owner else { return Ok(0) };
            backend.record_resources(&connector, &owner, &created, now)
        })
        .await;
        if let Err(error) = recorded {
            tracing::warn!(connector = %self.connector.name, error = %error, "resources created but not recorded");
        }
    }

    /// The error of a request pinned to `owner` when no key of its scope can come back to serve it
    /// (every one in error, or retired); `None` when waiting could help, or when this request put a
    /// usable key of the scope aside itself (a suspect, a key it tried): the scope has a key, and the
    /// request's own answer (the suspect's words) is the caller's.
    pub(super) fn owner_unavailable(&self, owner: &Owner, availability: &Availability) -> Option<Error> {
        if availability.claimable > 0 || availability.tried > 0 || availability.may_free_up() {
            return None;
        }
        let why = match (availability.error, availability.retired) {
            (0, 0) => "it has no key in the keyring".to_owned(),
            (0, retired) => format!("its {retired} key(s) left the keyring"),
            (error, 0) => format!("its {error} key(s) are in error"),
            (error, retired) => format!("{error} key(s) are in error and {retired} left the keyring"),
        };
        Some(Error::ResourceOwnerUnavailable {
            connector: self.connector.name.clone(),
            resource: owner.name.clone(),
            key: owner.key_name.clone(),
            scope: owner.quota_scope.clone(),
            why,
        })
    }
}
