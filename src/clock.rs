//! The two clocks apijongler reads, behind a trait so tests can move time by hand.
//!
//! - Wall-clock unix milliseconds, for what users read and for deadlines that are calendar times
//!   (a lockdown "until 10:00").
//! - Milliseconds on `CLOCK_BOOTTIME`, for ages: heartbeats and the trust a holder puts in its lease.
//!   It cannot step (NTP, a resumed VM, a user's `date -s`), counts time spent suspended, and is shared
//!   by every process of one boot, so an age written by one process means the same to every other.
//!
//! Every timestamp the database holds comes from here (never from SQLite's own clock), which is what
//! lets a test put a key in lockdown "until 10:00" and then say "it is now 10:00" without sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of wall-clock time in unix milliseconds.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time, unix milliseconds.
    fn now_ms(&self) -> i64;

    /// Milliseconds since boot on a clock that never steps and that every process of this boot
    /// shares (`CLOCK_BOOTTIME`): the clock of heartbeats and lease trust.
    fn boot_ms(&self) -> i64;

    /// Whether [`now_ms`](Self::now_ms) reads this host's wall clock as it is, which a store several
    /// hosts share corrects to its server's time. A test's clock says no and is taken as given.
    fn reads_the_wall(&self) -> bool {
        false
    }
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
    }

    fn boot_ms(&self) -> i64 {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        now.tv_sec.saturating_mul(1000).saturating_add(now.tv_nsec / 1_000_000)
    }

    fn reads_the_wall(&self) -> bool {
        true
    }
}

/// A wall clock read as a database server's: `clock`'s time plus the offset last measured between the
/// two. What one host writes to a store several hosts share (lockdown deadlines, pacing windows, the
/// order keys were used in) then means the same to every host, however far its own clock is off. Its
/// boot clock is `clock`'s: ages never depend on the offset.
#[derive(Debug)]
pub(crate) struct ServerAligned {
    clock: std::sync::Arc<dyn Clock>,
    offset_ms: AtomicI64,
}

impl ServerAligned {
    /// `clock`, read `offset_ms` later.
    pub(crate) fn new(clock: std::sync::Arc<dyn Clock>, offset_ms: i64) -> Self {
        Self { clock, offset_ms: AtomicI64::new(offset_ms) }
    }

    /// The offset added to `clock`'s time.
    pub(crate) fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::SeqCst)
    }

    /// The offset measured now.
    pub(crate) fn set_offset(&self, offset_ms: i64) {
        self.offset_ms.store(offset_ms, Ordering::SeqCst);
    }

    /// The clock underneath, uncorrected: what a new measurement is taken against.
    pub(crate) fn uncorrected(&self) -> &dyn Clock {
        &*self.clock
    }
}

impl Clock for ServerAligned {
    fn now_ms(&self) -> i64 {
        self.clock.now_ms().saturating_add(self.offset_ms())
    }

    fn boot_ms(&self) -> i64 {
        self.clock.boot_ms()
    }
}

/// A clock that only moves when told to: for tests of deadlines and ages. Both of its clocks read
/// the same counter.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock standing at `now_ms`.
    pub fn new(now_ms: i64) -> Self {
        Self(AtomicI64::new(now_ms))
    }

    /// Moves the clock to `now_ms`.
    pub fn set(&self, now_ms: i64) {
        self.0.store(now_ms, Ordering::SeqCst);
    }

    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }

    fn boot_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}
