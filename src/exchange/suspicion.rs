//! Suspicion: an answer that blames a key's credentials (a 401, a 403, an invalid key) is the key's
//! fault only once the request is seen to work otherwise. One misconfiguration (a connector that sends
//! the key in the wrong header, as a Python api-jongler connector without `api_key_header` does to
//! Gemini) gets that answer from every key, and must not put every key in error.
//!
//! The first such answer of a request makes its key a suspect: not put in error, and the request goes
//! on to another key. The request keeps the suspect's lease meanwhile (so other requests do not spend an
//! attempt on it), but only while another key comes within [`HOLD`]: past it, the suspect is released
//! and the request waits as usual (many requests each holding a suspect must not wait for one another).
//! Then:
//! - the same answer (status, canonical status, reason and message, less the words with a digit or a
//!   `*`: request ids, masked keys) from a second key: the request or the configuration may be at fault,
//!   or two keys are. One more key is tried, only if one is free at once: the same answer again (or no
//!   key free) stops the request with that answer and no key in error; an answer past its credentials
//!   puts both in error (two dead keys side by side in the claim order must not fail every request that
//!   reaches them);
//! - an answer that got past the credentials on another key (any answer below 500 that does not blame
//!   the credentials: a success, a 429, a bad request): the suspect's answer was its own, and it goes
//!   to error: through its lease if still held, else fenced by the lease it was released from (not if
//!   someone claimed it since);
//! - another answer blaming another key's credentials: two keys, two different faults. The first
//!   is confirmed, the second becomes the suspect;
//! - no answer or a 5xx: nothing is learned. The suspect is kept through the backoff that follows if
//!   that pause is within [`HOLD`] (the next key may still tell, and meanwhile no other request spends
//!   an attempt on it), and released before a longer pause;
//! - the end of the request: the suspect is released.
//!
//! An answer that names the key's project (`consumer: projects/N`: SERVICE_DISABLED, CONSUMER_*) is
//! never a suspect's: the upstream read the key, so it is no misconfiguration, and it confirms a suspect
//! like any answer past the credentials.
//!
//! When no other key can be claimed (a pool of one, or all others in error), the caller gets the
//! suspect's answer, the upstream's own words, rather than "no key available".

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::HeaderMap;

use super::attempt::Answer;
use super::verdict::describe;
use super::{Progress, Tried, Upstream};
use crate::classify::{Next, Verdict, answer_words};
use crate::lease::Lease;
use crate::offload::short_blocking;
use crate::pool::Fate;

/// How long a request keeps a suspect's lease while it waits for another key.
pub(super) const HOLD: Duration = Duration::from_secs(2);

/// The key an answer blamed, until the request confirms or clears it.
#[derive(Debug)]
pub(super) struct Suspect {
    pub(super) key: String,
    pub(super) id: i64,
    /// The lease it was suspected under (the fence once it is released).
    pub(super) token: i64,
    /// Its lease, while the request keeps it.
    pub(super) held: Option<Lease>,
    /// The error it would have been put in, with the answer's reason.
    pub(super) fate: Fate,
    /// What the answer said (`classify::answer_words`), to compare the next key's answer with.
    words: String,
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

impl Suspect {
    /// The suspect's answer, for the caller when no other key can be had.
    pub(super) fn answer(&self) -> Answer {
        Answer::Whole { status: self.status, headers: self.headers.clone(), body: self.body.clone() }
    }

    /// The fate the key is put in once its answer is confirmed as its own.
    pub(super) fn confirmed_fate(&self) -> Fate {
        match &self.fate {
            Fate::Error { reason, http_status, project } => Fate::Error {
                reason: format!("{reason}; confirmed: another key answered the same request"),
                http_status: *http_status,
                project: project.clone(),
            },
            fate => fate.clone(),
        }
    }
}

/// What one request learned about the credentials of the keys it tried.
#[derive(Debug, Default)]
pub(super) struct Suspicion {
    suspect: Option<Suspect>,
    /// A second key that gave the suspect's very answer, released: one more key, if one is free at
    /// once, tells a configuration every key fails from two bad keys.
    echo: Option<Suspect>,
    /// Every key this request suspected: it never claims them again.
    suspected: Vec<String>,
}

/// What weighing an attempt decided.
#[derive(Debug)]
pub(super) enum Weighed {
    /// Nothing to do beyond the attempt's own verdict.
    Nothing,
    /// These suspects' answers were their own: put them in error.
    Confirmed(Vec<Suspect>),
    /// The same answer came from the suspect and from this attempt's key: the request stops with it.
    SameAnswer,
}

impl Suspicion {
    /// The key under suspicion, if any.
    pub(super) fn suspect(&self) -> Option<&Suspect> {
        self.suspect.as_ref()
    }

    /// Whether a second key gave the suspect's answer: the next key is tried only if free at once.
    pub(super) fn echoed(&self) -> bool {
        self.echo.is_some()
    }

    /// Whether the request keeps a suspect's lease.
    pub(super) fn holds(&self) -> bool {
        self.suspect.as_ref().is_some_and(|suspect| suspect.held.is_some())
    }

    /// The suspect's lease, given up (no other key came within [`HOLD`], or the request ends).
    pub(super) fn let_go(&mut self) -> Option<Lease> {
        self.suspect.as_mut().and_then(|suspect| suspect.held.take())
    }

    /// Every key this request suspected.
    pub(super) fn suspected(&self) -> &[String] {
        &self.suspected
    }

    /// An answer with `status` that got past the credentials: a suspect's answer, below 500, was its own.
    fn weigh_past_credentials(&mut self, status: u16) -> Weighed {
        if status >= 500 || self.suspect.is_none() {
            return Weighed::Nothing;
        }
        Weighed::Confirmed(self.suspect.take().into_iter().chain(self.echo.take()).collect())
    }

    /// Weighs one attempt against what the request learned so far, changing its verdict where an
    /// answer blamed a key that is not yet known to be at fault (see the module's rules).
    pub(super) fn weigh(&mut self, tried: &mut Tried) -> Weighed {
        let Ok(answer) = &tried.answer else { return Weighed::Nothing };
        let status = answer.status();
        // An answer that names the key's project (`consumer: projects/N`: SERVICE_DISABLED, CONSUMER_*)
        // got past the credentials: the upstream read the key and found its project at fault, which no
        // misconfiguration of the request can cause. Its verdict stands.
        if matches!(&tried.verdict.key, Fate::Error { project: Some(_), .. }) {
            return self.weigh_past_credentials(status);
        }
        let blames_credentials = matches!(tried.verdict.key, Fate::Error { .. });
        if !blames_credentials {
            return self.weigh_past_credentials(status);
        }
        let (Some(lease), Answer::Whole { headers, body, .. }) = (&tried.lease, answer) else {
            return Weighed::Nothing;
        };
        let suspect = Suspect {
            key: lease.key_name().to_owned(),
            id: lease.id(),
            token: lease.token(),
            held: None,
            fate: tried.verdict.key.clone(),
            words: answer_words(status, &String::from_utf8_lossy(body)),
            status,
            headers: headers.clone(),
            body: body.clone(),
        };
        let released = Fate::Release { success: false };
        if !self.suspected.contains(&suspect.key) {
            self.suspected.push(suspect.key.clone());
        }
        match self.suspect.take() {
            Some(first) if first.key != suspect.key && first.words == suspect.words => {
                self.suspect = Some(first);
                // The second key's same answer: one more key, if free at once (its lease is released
                // by this verdict). The third: the request stops.
                let next = if self.echo.is_none() { Next::OtherKey } else { Next::Return };
                if next == Next::OtherKey {
                    self.echo = Some(suspect);
                }
                tried.verdict = Verdict { key: released, next: next.clone() };
                tried.attempt.outcome = describe(&tried.verdict, &tried.answer);
                if next == Next::Return { Weighed::SameAnswer } else { Weighed::Nothing }
            }
            first => {
                tried.verdict = Verdict { key: released, next: Next::OtherKey };
                let suspect = Suspect { held: tried.lease.take(), ..suspect };
                // Another key's different refusal: the earlier ones are the keys' own. The same key again
                // (a pool with nothing else to try) is just suspected under its new lease.
                let confirmed: Vec<Suspect> =
                    first.filter(|first| first.key != suspect.key).into_iter().chain(self.echo.take()).collect();
                self.suspect = Some(suspect);
                if confirmed.is_empty() { Weighed::Nothing } else { Weighed::Confirmed(confirmed) }
            }
        }
    }
}

impl Upstream {
    /// Puts a confirmed suspect in error, or releases the suspect of a request that stops with the
    /// same answer from another key (see the module's rules).
    pub(super) async fn act_on(&self, weighed: Weighed, request: &mut Progress) {
        let connector = self.connector.name.clone();
        match weighed {
            Weighed::Nothing => {}
            Weighed::SameAnswer => {
                let first = request.suspicion.suspect().map(|suspect| suspect.key.clone()).unwrap_or_default();
                tracing::warn!(
                    connector = %connector, first = %first, key = ?request.key_name,
                    "the same answer came from two keys for one request: the request or the connector's \
                     configuration is at fault, so no key was put in error"
                );
                self.let_go(request).await;
            }
            Weighed::Confirmed(suspects) => {
                for mut suspect in suspects {
                    let fate = suspect.confirmed_fate();
                    let (id, token, held) = (suspect.id, suspect.token, suspect.held.take());
                    let coordinator = self.coordinator.clone();
                    let confirmed = short_blocking(move || match held {
                        Some(lease) => lease.finish(&fate, None).map(|()| true),
                        None => coordinator.confirm_error(id, token, &fate),
                    })
                    .await;
                    match confirmed {
                        Ok(true) => tracing::warn!(
                            connector = %connector, key = %suspect.key,
                            "key put in error: another key answered the request its answer refused"
                        ),
                        Ok(false) => {}
                        // The request itself is fine; the key is free, and will be suspected again.
                        Err(error) => tracing::warn!(
                            connector = %connector, key = %suspect.key, error = %error, "putting a key in error failed"
                        ),
                    }
                }
            }
        }
    }

    /// Releases the suspect's lease, if the request keeps it (its fate stays open: nothing learned).
    pub(super) async fn let_go(&self, request: &mut Progress) {
        let Some(lease) = request.suspicion.let_go() else { return };
        let key = lease.key_name().to_owned();
        if let Err(error) = short_blocking(move || lease.release()).await {
            tracing::warn!(connector = %self.connector.name, key = %key, error = %error, "releasing a suspect failed");
        }
    }
}
#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::coordinator::{Coordinator, CoordinatorOptions};
    use crate::keyring::Keyring;
    use crate::pool::{Fate, KeyState};

    fn bad_key() -> Fate {
        Fate::Error { reason: "401 invalid credentials".into(), http_status: Some(401), project: None }
    }

    fn state(coordinator: &Coordinator) -> KeyState {
        coordinator.store().keys(Some("c")).expect("keys")[0].state
    }

    #[test]
    fn a_confirmed_suspect_goes_to_error_only_under_the_lease_it_was_released_from() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = CoordinatorOptions { db_path: Some(dir.path().join("pool.db")), ..CoordinatorOptions::default() };
        let coordinator = Coordinator::open(options).expect("open");
        let keyring = Keyring::parse(&dir.path().join("keys.ini"), "[c]\nkey0 = fake-secret-0\n").expect("keyring");
        coordinator.sync(&keyring).expect("sync");
        let claim = || coordinator.claim_for("c", None, &[], Duration::ZERO).expect("claim");

        let suspect = claim();
        let (id, suspected) = (suspect.id(), suspect.token());
        suspect.release().expect("release");
        // Someone else claimed it since: its fate is theirs to judge.
        let other = claim();
        assert!(!coordinator.confirm_error(id, suspected, &bad_key()).expect("confirm"), "fenced by the lease");
        let held = other.token();
        // Held: never put in error under its holder.
        assert!(!coordinator.confirm_error(id, held, &bad_key()).expect("confirm"), "held by its holder");
        assert_eq!(state(&coordinator), KeyState::Locked);
        other.release().expect("release");
        assert!(coordinator.confirm_error(id, held, &bad_key()).expect("confirm"), "released and not claimed since");
        assert_eq!(state(&coordinator), KeyState::Error);
        // Already in error: nothing written twice.
        assert!(!coordinator.confirm_error(id, held, &bad_key()).expect("confirm"));
        let history = coordinator.store().history(&Default::default()).expect("history");
        let errored: Vec<_> = history.iter().filter(|row| row.to_state == "error").collect();
        assert_eq!(errored.len(), 1, "{history:#?}");
        assert_eq!(errored[0].event, crate::pool::HistoryEvent::Errored);
        assert_eq!(errored[0].lease, Some(held));
    }
}
