//! What the send path needs to relay an upstream's stream: where its server-sent events end, and the
//! error shape the caller's clients understand. Pure: no sockets, no database, no clock, so each part
//! is table-tested on its own.
//!
//! - `sse`: where upstream server-sent events end, so [`Jongler::send`](crate::Jongler::send) can
//!   hold the first event, then forward the upstream's bytes verbatim while watching for an error or
//!   the end of the answer. Internal to the crate.
//! - [`dialect`]: which error shape a route's clients understand ([`Dialect`], the dialect of
//!   [`Outgoing::stream`](crate::Outgoing::stream)), the in-stream error event that ends a broken
//!   stream, and the error bodies and retry headers of a gateway speaking that shape.
//!
//! Dependencies run one way: `sse` uses `dialect`; neither reaches into the pool or the coordinator.

pub mod dialect;
pub(crate) mod sse;

pub use dialect::{Dialect, MESSAGE_PREFIX};
