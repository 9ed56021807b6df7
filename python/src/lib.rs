//! The native half of the Python package `apijongler`, imported as `api_jongler._native`; the Python
//! half (`api_jongler/__init__.py`) gives it the seed's class, names and return shapes.
//!
//! Invariants:
//! - Every call that may wait (for a key, for the upstream, for the database) releases the GIL, and a
//!   blocking one checks for signals while it waits: Ctrl-C drops the request, which gives its key back.
//! - Calls run on one tokio runtime per process (`runtime`); an instance created before a `fork()`
//!   refuses to run in the child, where that runtime's threads do not exist; the library's own fork
//!   handlers keep any SQLite lock from being inherited locked.
//! - Nothing returned to Python holds a secret: keys are named by name and fingerprint.
//! - The library's `tracing` events reach Python's `logging`, under the logger `api_jongler.…`.

use pyo3::prelude::*;

mod errors;
mod jongler;
mod logging;
mod mock;
mod runtime;

/// The module `api_jongler._native`.
#[pymodule(name = "_native")]
fn native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = module.py();
    logging::install(py)?;
    module.add_class::<jongler::NativeJongler>()?;
    module.add_class::<runtime::Task>()?;
    module.add_class::<mock::MockUpstream>()?;
    module.add_function(wrap_pyfunction!(jongler::cleanup, module)?)?;
    module.add_function(wrap_pyfunction!(logging::reset_logging, module)?)?;
    module.add_function(wrap_pyfunction!(mock::bench_library, module)?)?;

    module.add("NoKeyAvailableError", py.get_type::<errors::NoKeyAvailableError>())?;
    module.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
