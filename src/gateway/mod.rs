//! Pure building blocks of `apijongler serve`, the local HTTP gateway: no sockets, no database, no
//! clock, so each is table-tested on its own.
//!
//! - [`sse`]: where upstream server-sent events end, so the gateway can hold the first event, then
//!   forward the upstream's bytes verbatim while watching for an error or the end of the answer.
//! - [`dialect`]: which error shape a route's clients understand, and the gateway's own error bodies,
//!   in-stream error events and retry headers in that shape.
//! - [`credentials`]: the client's credential taken out of all four slots, the gateway token checked in
//!   constant time, and the `Host` check against DNS rebinding.
//! - [`headers`]: which request and response headers cross the gateway, and the rewrite of
//!   `x-goog-upload-url` so resumable uploads come back through the gateway.
//! - [`origin`]: which web pages may use the gateway (`Origin`, `Sec-Fetch-Site`, `--allow-origin`),
//!   CORS preflights answered at the door, and the CORS headers of an allowed page's answers.
//! - [`path`]: the upstream URL of a request only when it is byte for byte the path and query given
//!   (no `\`, no dot segments, nothing the URL parser would change); `Jongler::send` checks it too.
//!
//! Dependencies run one way: `headers` uses `credentials`, `sse` uses `dialect`; none of them reaches
//! into the coordinator.
#![doc(hidden)]

pub mod credentials;
pub mod dialect;
pub mod headers;
pub mod origin;
pub mod path;
pub mod sse;
