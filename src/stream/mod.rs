//! What the send path needs to relay an upstream's stream: where its server-sent events end, and the
//! error shape the caller's clients understand. Pure: no sockets, no database, no clock, so each part
//! is table-tested on its own.
//!
//! - `sse`: where upstream server-sent events end, so [`Jongler::send`](crate::Jongler::send) can
//!   hold the first event, then forward the upstream's bytes verbatim while watching for an error or
//!   the end of the answer. Internal to the crate.
//! - [`dialect`]: which error shape a route's clients understand ([`Dialect`], the dialect of
//!   [`Outgoing::stream`](crate::Outgoing::stream)), whether its stream ends can be judged, the
//!   in-stream error event that ends a broken stream, and the error bodies and retry headers of a
//!   gateway speaking that shape.
//!
//! Dependencies run one way: `sse` uses `dialect`; neither reaches into the pool or the coordinator.

pub mod dialect;
pub(crate) mod sse;

pub use dialect::{Dialect, MESSAGE_PREFIX};

/// The gateway's door checks belong to `apijongler serve` (the binary's `cli::serve`), not to the
/// library: a library user cannot reach them, so they can change with the gateway.
///
/// ```compile_fail
/// use api_jongler::gateway::credentials::GatewayToken;
/// ```
/// ```compile_fail
/// use api_jongler::gateway::origin::AllowedOrigins;
/// ```
/// ```compile_fail
/// use api_jongler::gateway::headers::upstream_request_headers;
/// ```
/// What the send path needs is library API: the dialect of a stream, and the path check.
/// ```
/// use api_jongler::upstream_url::upstream_url;
/// use api_jongler::{Dialect, stream::MESSAGE_PREFIX};
/// let event = Dialect::Google.stream_error_event(http::StatusCode::SERVICE_UNAVAILABLE, "no key").unwrap();
/// assert!(String::from_utf8_lossy(&event).contains(MESSAGE_PREFIX));
/// assert!(Dialect::Plain.stream_error_event(http::StatusCode::SERVICE_UNAVAILABLE, "no key").is_none());
/// assert!(upstream_url("https://example.test/v1", "/models/m:generate").is_ok());
/// assert!(upstream_url("https://example.test/v1", "/models/x/../m:generate").is_err());
/// ```
#[cfg(doctest)]
pub struct DoorChecksAreNotLibraryApi;
