//! This host's wall clock read as the shared store's server's: on a store several hosts share, a
//! coordinator whose clock reads the wall writes every time corrected by the offset between the two,
//! measured when it opens and again at most once a minute while it claims. A host whose clock is
//! minutes off (or steps while it runs) then writes the same deadlines as every other host.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::clock::{Clock, ServerAligned};
use crate::error::Result;
use crate::store::Backend;

/// An offset this small is taken as none: it is the measurement's own noise (a round trip) or a clock
/// NTP keeps in step, and correcting by it would only make the processes of one host disagree.
const TOLERANCE_MS: i64 = 1_000;

/// How often the offset is measured again.
const REMEASURE: Duration = Duration::from_secs(60);

/// The corrected clock and when its offset was measured.
#[derive(Debug)]
pub(super) struct ServerTime {
    clock: Arc<ServerAligned>,
    measured: Mutex<Instant>,
}

impl ServerTime {
    /// `clock` corrected to `backend`'s server, if the store has a clock of its own and `clock` reads
    /// this host's wall (a test's clock is taken as given).
    pub(super) fn of(backend: &dyn Backend, clock: &Arc<dyn Clock>) -> Result<Option<Self>> {
        if !clock.reads_the_wall() {
            return Ok(None);
        }
        let Some(offset) = backend.server_clock_offset(&**clock)? else { return Ok(None) };
        let offset = worth_correcting(offset);
        report(backend, 0, offset);
        Ok(Some(Self {
            clock: Arc::new(ServerAligned::new(Arc::clone(clock), offset)),
            measured: Mutex::new(Instant::now()),
        }))
    }

    /// The corrected clock.
    pub(super) fn clock(&self) -> Arc<dyn Clock> {
        Arc::clone(&self.clock) as Arc<dyn Clock>
    }

    /// Measures the offset again if the last measurement is a minute old. A failure keeps the last
    /// offset: the claim that asked goes on.
    pub(super) fn remeasure_if_due(&self, backend: &dyn Backend) {
        {
            let mut measured = self.measured.lock().unwrap_or_else(PoisonError::into_inner);
            if measured.elapsed() < REMEASURE {
                return;
            }
            *measured = Instant::now();
        }
        match backend.server_clock_offset(self.clock.uncorrected()) {
            // A new offset within the tolerance of the one in use is the measurement's noise: kept, so
            // that this host's time does not jitter by milliseconds each minute.
            Ok(Some(offset)) if (offset - self.clock.offset_ms()).abs() > TOLERANCE_MS => {
                let offset = worth_correcting(offset);
                report(backend, self.clock.offset_ms(), offset);
                self.clock.set_offset(offset);
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "measuring the database server's clock failed; the last offset stays"),
        }
    }
}

/// `offset`, or none if it is within the tolerance.
fn worth_correcting(offset: i64) -> i64 {
    if offset.abs() > TOLERANCE_MS { offset } else { 0 }
}

/// Says in the log when the offset corrected for changes from `was` to `now`.
fn report(backend: &dyn Backend, was: i64, now: i64) {
    if was != now {
        tracing::warn!(
            server = %backend.path().display(), offset_ms = now,
            "this host's clock is off the database server's (offset_ms: the server's ahead of this host's): apijongler \
             writes the server's time to the shared pool; synchronise this host's clock (NTP) all the same"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::worth_correcting;

    #[test]
    fn an_offset_within_a_second_is_taken_as_none() {
        assert_eq!(worth_correcting(1_000), 0);
        assert_eq!(worth_correcting(-1_000), 0);
        assert_eq!(worth_correcting(1_001), 1_001);
        assert_eq!(worth_correcting(-300_000), -300_000);
    }
}
