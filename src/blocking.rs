//! [`Jongler`] for callers without an async runtime: each call runs on a small runtime of its own.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::coordinator::KeyStates;
use crate::error::{Error, Result};
use crate::jongler::{Jongler, JonglerBuilder, Response};
use crate::pool::Transition;

/// A blocking [`Jongler`]. Do not use it from inside an async runtime (use [`Jongler`] there).
#[derive(Debug)]
pub struct BlockingJongler {
    /// Shared only to be leaked in a forked child (see the `Drop`).
    runtime: Arc<tokio::runtime::Runtime>,
    jongler: Jongler,
}

impl Drop for BlockingJongler {
    /// In a forked child the runtime is never dropped: its shutdown would wait for the parent's
    /// threads, which the child does not have.
    fn drop(&mut self) {
        if self.jongler.coordinator().inner.alive_here().is_err() {
            std::mem::forget(Arc::clone(&self.runtime));
        }
    }
}

impl BlockingJongler {
    /// Connects with `builder`'s options.
    pub fn connect(builder: JonglerBuilder) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(4)
            .thread_keep_alive(Duration::from_secs(10))
            .enable_all()
            .build()
            .map_err(|error| Error::InvalidRequest { problem: format!("cannot start a runtime: {error}") })?;
        let jongler = runtime.block_on(builder.connect())?;
        Ok(Self { runtime: Arc::new(runtime), jongler })
    }

    /// Runs `call` on this wrapper's runtime, whose threads exist only in the process that created it
    /// (a forked child gets [`Error::ForkedChild`] rather than a wait for them).
    fn run<T>(&self, call: impl Future<Output = Result<T>>) -> Result<T> {
        self.jongler.coordinator().inner.alive_here()?;
        self.runtime.block_on(call)
    }

    /// The async handle, for what this wrapper does not cover.
    pub fn jongler(&self) -> &Jongler {
        &self.jongler
    }

    /// See [`Jongler::request`].
    pub fn request(&self, method: &str, endpoint: &str, body: &str) -> Result<Response> {
        self.run(self.jongler.request(method, endpoint, body))
    }

    /// See [`Jongler::request_json`].
    pub fn request_json(&self, endpoint: &str, body: &Value) -> Result<Value> {
        self.run(self.jongler.request_json(endpoint, body))
    }

    /// See [`Jongler::key_states`].
    pub fn key_states(&self) -> Result<KeyStates> {
        self.run(self.jongler.key_states())
    }

    /// See [`Jongler::available_keys`].
    pub fn available_keys(&self) -> Result<Vec<String>> {
        self.run(self.jongler.available_keys())
    }

    /// See [`Jongler::cleanup`].
    pub fn cleanup(&self, all: bool) -> Result<Vec<Transition>> {
        self.run(self.jongler.cleanup(all))
    }

    /// See [`Jongler::disconnect`].
    pub fn disconnect(&self) -> Result<()> {
        self.run(self.jongler.disconnect())
    }
}
