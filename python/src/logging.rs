//! The library's `tracing` events as records of Python's `logging`: with no tracing subscriber in the
//! process, `tracing` (feature `log`) emits `log` records, and pyo3-log hands them to the Python logger
//! named after the Rust module (`api_jongler.coordinator`, …), so `logging.basicConfig` shows them.
//!
//! pyo3-log caches each logger's level; the cache is cleared whenever an `APIJongler` is created
//! (`reset_logging`), so a level set before that is honoured.

use std::sync::OnceLock;

use pyo3::prelude::*;
use pyo3_log::{Caching, Logger, ResetHandle};

static RESET: OnceLock<ResetHandle> = OnceLock::new();

/// Installs the bridge once per process (a second import in the same process keeps the first).
pub fn install(py: Python<'_>) -> PyResult<()> {
    if RESET.get().is_some() {
        return Ok(());
    }
    let logger = Logger::new(py, Caching::LoggersAndLevels)?;
    // Another extension may have installed a `log` logger already; then the library's records go there.
    if let Ok(handle) = logger.install() {
        let _ = RESET.set(handle);
    }
    Ok(())
}

/// Forgets the cached Python loggers and levels, so a logging configuration changed since is honoured.
#[pyfunction]
pub fn reset_logging() {
    if let Some(handle) = RESET.get() {
        handle.reset();
    }
}
