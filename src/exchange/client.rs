//! The HTTP client of a jongler: through Tor with fresh SOCKS credentials when asked (a new client is
//! a new circuit), and transport errors without their URL.

use std::sync::PoisonError;
use std::time::Duration;

use super::Upstream;
use crate::error::{Error, Result};

/// The environment variable overriding the Tor SOCKS proxy.
pub const TOR_PROXY_ENV: &str = "APIJONGLER_TOR_PROXY";

impl Upstream {
    /// The current HTTP client (a new one after each new Tor circuit).
    pub(crate) fn client(&self) -> reqwest::Client {
        self.client.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Fresh SOCKS credentials: Tor isolates streams by credentials, so this is a new circuit (and exit).
    pub(crate) fn new_circuit(&self) -> Result<()> {
        let client = build_client(self.tor.as_deref(), self.timeout)?;
        *self.client.lock().unwrap_or_else(PoisonError::into_inner) = client;
        tracing::info!(connector = %self.connector.name, "new Tor circuit");
        Ok(())
    }
}

/// An HTTP client, through `tor_proxy` with fresh random credentials if given.
pub(crate) fn build_client(tor_proxy: Option<&str>, timeout: Duration) -> Result<reqwest::Client> {
    // No total timeout: a stream may last long. Each whole answer gets its own (see `exchange`); reads
    // of a stream get this one each.
    let mut builder = reqwest::Client::builder().connect_timeout(timeout).read_timeout(timeout).no_proxy();
    if let Some(proxy) = tor_proxy {
        let isolated = proxy.replacen("://", &format!("://apijongler-{:016x}:circuit@", fastrand::u64(..)), 1);
        let proxy = reqwest::Proxy::all(&isolated).map_err(|_| Error::InvalidRequest {
            problem: format!("'{proxy}' is not a proxy URL (check {TOR_PROXY_ENV})"),
        })?;
        builder = builder.proxy(proxy);
    }
    builder.build().map_err(|error| Error::InvalidRequest { problem: format!("cannot build the HTTP client: {error}") })
}

/// A transport error's text without its URL (which names the upstream host, never a secret, but is
/// noise in a one-line message).
pub(super) fn without_url(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text.replace(&format!(" ({url})"), "").replace(url.as_str(), "");
    }
    text
}
