//! Which key an attempt uses: the one held per connection while it still serves the request's
//! model (and the project of the resource it names, if any), else a fresh claim (of that project's
//! keys only, when the request is pinned: see `affinity`); confirmed when its trust ran out; checked
//! against the keyring this process loaded; put in the connector's header, marked sensitive.

use std::time::{Duration, Instant};

use reqwest::header::{HeaderName, HeaderValue};
use secrecy::ExposeSecret;

use super::Upstream;
use super::budget::RetryBudget;
use crate::error::{Error, Result};
use crate::lease::Lease;
use crate::offload::short_blocking;
use crate::resource::Owner;
use crate::store::ClaimFor;

/// The keys a request puts aside.
#[derive(Debug, Clone, Copy)]
pub(super) struct Aside<'a> {
    /// Keys it tried. Without a wait, each key is tried once per request (the seed's rule); with one,
    /// a key put in lockdown by this request may be tried again once its deadline has passed.
    pub(super) tried: &'a [String],
    /// Keys whose answer it suspects (`suspicion`): never claimed again by this request.
    pub(super) suspected: &'a [String],
}

impl Aside<'_> {
    /// The keys a claim that may wait `wait` skips.
    fn for_claim(&self, wait: Duration) -> &[String] {
        if wait.is_zero() { self.tried } else { self.suspected }
    }
}

impl Upstream {
    /// A free key at once if there is one (in place: no hand-off), else a place in the process's
    /// queue of waiters, which holds no thread while it waits.
    pub(crate) async fn claim(&self, request: ClaimFor<'_>, wait: Duration) -> Result<Lease> {
        self.coordinator.claim_async(request, wait).await
    }

    /// [`claim`](Self::claim) of a key of `pin`'s quota scope only (a request naming a resource it
    /// owns); when none of them can come back (all in error or retired), the error says which resource
    /// and key, at once.
    async fn claim_pinned(&self, request: ClaimFor<'_>, wait: Duration, pin: &Owner) -> Result<Lease> {
        let request = ClaimFor { pin: Some(pin.quota_scope.as_str()), ..request };
        match self.coordinator.claim_async(request, wait).await {
            Err(Error::NoKeyAvailable(unavailable)) => Err(self
                .owner_unavailable(pin, &unavailable.availability)
                .unwrap_or(Error::NoKeyAvailable(unavailable))),
            claimed => claimed,
        }
    }

    /// The key for the next attempt (see `lease_for_attempt`), confirmed if its trust ran out: a lease
    /// claimed (or held) before this process was stopped, or the database locked, for longer than it is
    /// trusted is confirmed with one conditional write, and given up for another claim if it was lost.
    pub(super) async fn next_lease(
        &self,
        slot: &mut Option<Lease>,
        (model, pin, tokens): (Option<&str>, Option<&Owner>, u64),
        aside: Aside<'_>,
        started: Instant,
        wait: Duration,
        budget: &mut RetryBudget,
    ) -> Result<Option<Lease>> {
        loop {
            let Some(lease) = self.lease_for_attempt(slot, (model, pin, tokens), aside, started, wait).await? else {
                return Ok(None);
            };
            if lease.is_valid() {
                return Ok(Some(lease));
            }
            let (lease, renewed) = short_blocking(move || {
                let renewed = lease.renew().unwrap_or(false);
                Ok((lease, renewed))
            })
            .await?;
            if renewed {
                return Ok(Some(lease));
            }
            // The key may be someone else's by now. Give it up and claim again.
            tracing::warn!(key = %lease.key_name(), "lease no longer trusted before sending; claiming again");
            if !budget.untrusted_claim() {
                return Err(Error::LeaseLost {
                    connector: self.connector.name.clone(),
                    key: lease.key_name().to_owned(),
                    lease: lease.token(),
                });
            }
        }
    }

    /// The key to use for the next attempt: none for keyless connectors, the held one per connection
    /// while it is valid, else a fresh claim that waits what is left of the caller's wait.
    pub(super) async fn lease_for_attempt(
        &self,
        slot: &mut Option<Lease>,
        (model, pin, tokens): (Option<&str>, Option<&Owner>, u64),
        aside: Aside<'_>,
        started: Instant,
        wait: Duration,
    ) -> Result<Option<Lease>> {
        if self.keyring.is_none() {
            return Ok(None);
        }
        if let Some(lease) = slot.take() {
            // A key kept across requests may since have been locked down for this request's model (by
            // its group): give it back and claim one free for the model.
            let coordinator = self.coordinator.clone();
            let model = model.map(str::to_owned);
            let scope = pin.map(|pin| pin.quota_scope.clone());
            let (lease, usable) = short_blocking(move || {
                let now = coordinator.now_ms();
                let locked = match &model {
                    Some(model) => {
                        coordinator.store().is_locked_down_for(lease.id(), model, now)?
                            // Limits bind a kept key's requests as they bind claims: no room, another key.
                            || !coordinator.backend().reserve_held(
                                (lease.connector(), lease.id(), lease.token()),
                                model,
                                tokens,
                                now,
                            )?
                    }
                    None => false,
                };
                // A request naming another project's resource needs a key of that project.
                let foreign = match &scope {
                    Some(scope) => !coordinator
                        .store()
                        .keys(Some(lease.connector()))?
                        .iter()
                        .any(|key| key.key_name == lease.key_name() && key.quota_scope.to_string() == *scope),
                    None => false,
                };
                if locked || foreign {
                    lease.release()?;
                    return Ok((None, false));
                }
                Ok((Some(lease), true))
            })
            .await?;
            if usable {
                // Its trust is checked (and renewed if it can be) by the caller, like a fresh claim's.
                return Ok(lease);
            }
        }
        let remaining = wait.saturating_sub(started.elapsed());
        let exclude = aside.for_claim(wait);
        let request = ClaimFor { tokens, ..ClaimFor::new(&self.connector.name, model, exclude) };
        match pin {
            Some(pin) => self.claim_pinned(request, remaining, pin).await.map(Some),
            None => self.claim(request, remaining).await.map(Some),
        }
    }

    /// The secret this process would send for `lease` is the one the database row was synced with;
    /// otherwise another keyring synced the database since this process loaded its own, and sending
    /// would go out without a key or with an old one (and put a good key in error).
    pub(super) fn check_secret(&self, lease: Option<&Lease>) -> Result<()> {
        let (Some(lease), Some(keyring)) = (lease, &self.keyring) else { return Ok(()) };
        let connector = &self.connector.name;
        let problem = match keyring.key(connector, lease.key_name()) {
            Some(key) if key.fingerprint().as_str() == lease.fingerprint() => return Ok(()),
            Some(_) => "has another secret for it",
            None => "has no such key",
        };
        Err(Error::KeyringDiffers {
            connector: connector.clone(),
            key: lease.key_name().to_owned(),
            path: keyring.path().to_owned(),
            problem,
        })
    }

    /// The connector's key header with `lease`'s secret, marked sensitive.
    pub(super) fn key_header(&self, lease: Option<&Lease>) -> Option<(HeaderName, HeaderValue)> {
        let (lease, keyring) = (lease?, self.keyring.as_ref()?);
        let key = keyring.key(&self.connector.name, lease.key_name())?;
        let (header, prefix) = self.connector.key_header();
        let name = HeaderName::from_bytes(header.as_bytes()).ok()?;
        let mut value = HeaderValue::from_str(&format!("{prefix}{}", key.secret().expose_secret())).ok()?;
        value.set_sensitive(true);
        Some((name, value))
    }
}
