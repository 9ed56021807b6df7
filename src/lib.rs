//! apijongler lets many worker processes on one machine share a pool of API keys, with no key ever
//! used by two processes at once.
//!
//! The protocol, in short:
//! - Key states are rows of one WAL-mode SQLite database shared by every process of the user
//!   ([`Store`]); the secrets stay in the keyring file ([`Keyring`]) and in memory, never in the database.
//! - A key is vacant, locked (held by a live process), in lockdown (rate-limited until a deadline) or
//!   in error (bad until cleaned up). Every transition appends a row to the `history` table in the
//!   same transaction.
//! - The pool's words (key states, quota scopes, fates, history events, outcomes) and its rules are
//!   types and functions of [`pool`], written once; every backend of the store (SQLite here, behind
//!   the store's seam) applies the same rules. [`Store`] reads the pool; only a [`Coordinator`] and
//!   its [`Lease`]s write it.
//! - [`Coordinator::claim`] takes the least recently used claimable key with one
//!   `UPDATE ... RETURNING` in a `BEGIN IMMEDIATE` transaction, incrementing the key's lease token.
//!   Every later write by the holder is fenced by that token: if it changed nothing, the lease was lost
//!   and the holder must stop using the key.
//! - Holders heartbeat exactly the leases they hold. A holder this process's OS can see (same host,
//!   boot and pid namespace) is judged by the OS: dead (pid gone or reused) frees its keys at once,
//!   running keeps them whatever its heartbeat's age, stopped frees them once its heartbeat is stale.
//!   Only holders the OS cannot see are judged by heartbeat age, on `CLOCK_BOOTTIME`. A holder checks
//!   that its lease is still trusted right before every send.
//! - A lockdown is as wide as the quota that ran out: one model (or every model) of the key alone or of
//!   its quota group (keys sharing one Google Cloud project or account, declared in the keyring).
//!   [`Coordinator::claim_for`] skips keys locked down for the request's model; they still serve
//!   others.
//! - When no key is free, waiters poll with reads, back off with jitter and wake at the earliest
//!   lockdown deadline that matters for their model, so scarce keys never turn into a storm of write
//!   attempts.
//! - [`Jongler::send`] is the one path a request takes through the pool (the CLI, the library and the
//!   `apijongler serve` gateway share it): bytes and headers in, a whole answer or a relayed stream out.
//!
//! ```no_run
//! use std::time::Duration;
//! use api_jongler::{Coordinator, CoordinatorOptions, Keyring};
//!
//! # fn main() -> api_jongler::Result<()> {
//! let keyring = Keyring::from_env()?; // APIJONGLER_CONFIG
//! let coordinator = Coordinator::open(CoordinatorOptions::default())?; // APIJONGLER_DB or ~/.local/state
//! coordinator.sync(&keyring)?;
//! let lease = coordinator.claim("generativelanguage.googleapis.com", &[], Duration::from_secs(30))?;
//! let key = keyring.key(lease.connector(), lease.key_name()).expect("synced from this keyring");
//! // ... send the request with key.secret() ...
//! lease.release()?;
//! # Ok(())
//! # }
//! ```

mod blocking;
pub mod classify;
/// The README's Rust examples, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub mod clock;
pub mod connector;
mod coordinator;
mod error;
mod exchange;
pub mod family;
mod fork_guard;
mod gate;
pub mod holder;
mod jongler;
pub mod keyring;
mod lease;
mod offload;
// Test and demo support, not API: the loopback Gemini of `apijongler demo`, `apijongler bench` and the
// tests in tests/ (which drive the binary, so they build with `cli` as well). Hidden from the docs and
// built only with the `cli` feature, so a library user neither sees it nor builds a hyper server.
#[cfg(feature = "cli")]
#[doc(hidden)]
pub mod mock;
pub mod model;
pub mod pool;
mod reaper;
pub mod resource;
pub mod retention;
pub mod store;
pub mod stream;
pub mod tokens;
mod trust;
pub mod upstream_url;

pub use blocking::BlockingJongler;
pub use clock::{Clock, ManualClock, SystemClock};
pub use connector::{Connector, Connectors};
pub use coordinator::{Coordinator, CoordinatorOptions, KeyStates};
pub use error::{Cause, Error, Result};
pub use exchange::{Bookkeeping, Exchange, ExchangeBody, LeaseScope, Outgoing, StreamingBody, Timings};
pub use family::ApiFamily;
pub use jongler::{Jongler, JonglerBuilder, Response};
pub use keyring::{ApiKey, Keyring, KeyringProblem};
pub use lease::Lease;
pub use pool::Unavailable;
pub use pool::{Availability, KeyState};
pub use store::Store;
pub use stream::Dialect;
