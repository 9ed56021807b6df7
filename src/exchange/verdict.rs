//! The verdict on an attempt and its bookkeeping: what `classify` makes of the answer (or of its
//! absence), the outcome recorded for it, and the key settled by it with the attempt recorded, in one
//! transaction when the lease ends.

use super::attempt::{Answer, NoAnswer};
use super::{LeaseScope, Upstream};
use crate::classify::{self, Context, Next, Verdict};
use crate::error::{Error, Result};
use crate::lease::Lease;
use crate::offload::short_blocking;
use crate::pool::outcome::{Judged, Outcome};
use crate::pool::{Attempt, Fate};

impl Upstream {
    /// What `classify` knows around an answer to a request for `model` with `lease`'s key, after
    /// `retries` backoff retries.
    pub(super) fn context<'a>(&'a self, model: Option<&'a str>, lease: Option<&Lease>, retries: u32) -> Context<'a> {
        Context {
            now_ms: self.coordinator.now_ms(),
            policy: &self.connector.policy,
            lockdown_count: lease.map_or(0, Lease::lockdown_count),
            retries,
            via_tor: self.tor.is_some(),
            model,
            names_models: self.connector.names_models(),
        }
    }

    /// The verdict on an answer (or on its absence).
    pub(super) fn judge(
        &self,
        answer: &std::result::Result<Answer, NoAnswer>,
        model: Option<&str>,
        lease: Option<&Lease>,
        backoffs: u32,
        replay: bool,
    ) -> Verdict {
        let context = self.context(model, lease, backoffs);
        match answer {
            Ok(Answer::Whole { status, headers, body }) => {
                classify::classify(*status, headers, &String::from_utf8_lossy(body), &context)
            }
            Ok(Answer::Stream { status, headers, .. }) => classify::classify(*status, headers, "", &context),
            // Not the key's fault, and nothing was processed upstream: another key may take it.
            Err(NoAnswer::LeaseLost { .. }) => Verdict { key: Fate::Release { success: false }, next: Next::OtherKey },
            // The same answer would be as large from any key.
            Err(NoAnswer::TooLarge(_)) => classify::unanswered(),
            Err(no_answer) if no_answer.may_have_reached() && !replay => classify::unanswered(),
            Err(_) => classify::transport_failure(&context),
        }
    }

    /// Applies the verdict to the key and records the attempt (in one transaction when the lease ends).
    pub(super) async fn settle(
        &self,
        slot: &mut Option<Lease>,
        lease: Option<Lease>,
        verdict: &Verdict,
        attempt: Attempt,
        model: Option<&str>,
    ) -> Result<()> {
        let Some(mut lease) = lease else {
            let coordinator = self.coordinator.clone();
            return short_blocking(move || coordinator.backend().record_attempt(&attempt)).await;
        };
        let fate = verdict.key.clone();
        // A key the verdict puts aside (a suspect's) is not kept for the connection's next request.
        let keep = self.scope == LeaseScope::PerConnection
            && matches!(fate, Fate::Release { .. })
            && verdict.next != Next::OtherKey;
        let coordinator = self.coordinator.clone();
        let model = model.map(str::to_owned);
        let settled = short_blocking(move || {
            if keep {
                coordinator.backend().record_attempt(&attempt)?;
                if matches!(fate, Fate::Release { success: true }) {
                    lease.reset_escalation(model.as_deref())?;
                }
                Ok(Some(lease))
            } else {
                lease.finish(&fate, Some(&attempt)).map(|()| None)
            }
        })
        .await;
        match settled {
            Ok(kept) => {
                *slot = kept;
                Ok(())
            }
            // The key was reaped or cleaned up under us: its new state is not ours to touch. The caller
            // hears of it through the response.
            Err(error @ Error::LeaseLost { .. }) => {
                tracing::warn!(error = %error, "lease lost during a request");
                Err(error)
            }
            Err(error) => Err(error),
        }
    }
}

/// What an attempt came to, for the `requests` table.
pub(super) fn describe(verdict: &Verdict, answer: &std::result::Result<Answer, NoAnswer>) -> Outcome {
    match answer {
        Err(NoAnswer::Transport(error)) if error.is_timeout() => Outcome::Timeout,
        Err(NoAnswer::Transport(_)) => Outcome::ConnectionError,
        Err(NoAnswer::Late(_)) => Outcome::Timeout,
        Err(NoAnswer::Stream(_)) => Outcome::StreamFailed,
        Err(NoAnswer::LeaseLost { .. }) => Outcome::NotSent,
        Err(NoAnswer::TooLarge(_)) => Outcome::TooLarge,
        Ok(_) => Outcome::Answered(judged(verdict)),
    }
}

/// What an answer that came was judged to be.
pub(super) fn judged(verdict: &Verdict) -> Judged {
    match &verdict.key {
        Fate::Release { success: true } => Judged::Success,
        Fate::Lockdown(_) => Judged::RateLimited,
        Fate::Error { .. } => Judged::BadKey,
        Fate::Release { success: false } => match verdict.next {
            Next::Backoff { .. } => Judged::ProviderError,
            Next::NewCircuit => Judged::LocationRefused,
            _ => Judged::ClientError,
        },
    }
}
