//! `api_jongler._native.Jongler`: one connection to an API through the shared key pool, as the seed's
//! `APIJongler` is (the Python class wraps it), and `cleanup`, the seed's static `cleanUp`.

use std::path::PathBuf;
use std::time::Duration;

use api_jongler::{Coordinator, CoordinatorOptions, Jongler, LeaseScope, Response};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::errors::to_py;
use crate::runtime::{Task, block_on, spawn};

/// A duration given in seconds, as Python code gives them.
fn seconds(name: &str, value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| PyValueError::new_err(format!("{name}={value} is not a number of seconds (0 or more)")))
}

/// A connection to one API through the shared key pool.
#[pyclass(frozen, module = "api_jongler._native", name = "Jongler")]
pub struct NativeJongler {
    jongler: Jongler,
}

impl Drop for NativeJongler {
    /// In a forked child nothing of the parent's instance is dropped: its HTTP connections are
    /// registered with the parent's runtime and its key is the parent's.
    fn drop(&mut self) {
        if self.jongler.check_process().is_err() {
            std::mem::forget(self.jongler.clone());
        }
    }
}

impl NativeJongler {
    /// The library handle, for a task, after checking that this process may use it.
    pub fn library(&self) -> PyResult<Jongler> {
        self.jongler.check_process().map_err(to_py)?;
        Ok(self.jongler.clone())
    }
}

/// The seed's `(text, status)`.
fn text_and_status(response: Response) -> (String, u16) {
    (response.body, response.status)
}

#[pymethods]
impl NativeJongler {
    /// Loads the connector and keyring, opens the database and (per connection) claims a key.
    #[new]
    #[pyo3(signature = (connector, *, tor=false, config=None, db=None, connectors_dir=None, wait=0.0, timeout=None, per_connection=false))]
    #[allow(clippy::too_many_arguments)] // Python's keyword arguments, each optional.
    fn new(
        py: Python<'_>,
        connector: String,
        tor: bool,
        config: Option<PathBuf>,
        db: Option<PathBuf>,
        connectors_dir: Option<PathBuf>,
        wait: f64,
        timeout: Option<f64>,
        per_connection: bool,
    ) -> PyResult<Self> {
        let mut builder = Jongler::builder(connector).tor(tor).wait(seconds("wait", wait)?);
        if let Some(path) = config {
            builder = builder.keyring(path);
        }
        if let Some(path) = db {
            builder = builder.database(path);
        }
        if let Some(dir) = connectors_dir {
            builder = builder.connectors_dir(dir);
        }
        if let Some(timeout) = timeout {
            builder = builder.timeout(seconds("timeout", timeout)?);
        }
        if per_connection {
            builder = builder.scope(LeaseScope::PerConnection);
        }
        let jongler = block_on(py, builder.connect())?.map_err(to_py)?;
        Ok(Self { jongler })
    }

    /// The connector's name.
    #[getter]
    fn connector(&self) -> String {
        self.jongler.connector().name.clone()
    }

    /// Sends `body` to `endpoint` with `method`; returns `(text, status)` whatever the status.
    fn request(&self, py: Python<'_>, method: String, endpoint: String, body: String) -> PyResult<(String, u16)> {
        let jongler = self.library()?;
        let response = block_on(py, async move { jongler.request(&method, &endpoint, &body).await })?;
        response.map(text_and_status).map_err(to_py)
    }

    /// `request` for asyncio: calls `done(True, (text, status))` or `done(False, exception)`.
    fn request_async(&self, method: String, endpoint: String, body: String, done: Py<PyAny>) -> PyResult<Task> {
        let jongler = self.library()?;
        spawn(
            async move { jongler.request(&method, &endpoint, &body).await },
            |py, outcome| {
                let (text, status) = outcome.map(text_and_status).map_err(to_py)?;
                Ok(PyTuple::new(py, [text.into_pyobject(py)?.into_any(), status.into_pyobject(py)?.into_any()])?
                    .into_any()
                    .unbind())
            },
            done,
        )
    }

    /// Key names by state: `(vacant, locked, lockdown, error)`.
    #[allow(clippy::type_complexity)] // A tuple Python unpacks.
    fn key_states(&self, py: Python<'_>) -> PyResult<(Vec<String>, Vec<String>, Vec<String>, Vec<String>)> {
        let jongler = self.library()?;
        let states = block_on(py, async move { jongler.key_states().await })?.map_err(to_py)?;
        let list = |names: std::collections::BTreeSet<String>| names.into_iter().collect();
        Ok((list(states.vacant), list(states.locked), list(states.lockdown), list(states.error)))
    }

    /// The keys that could be claimed now, as `(name, fingerprint)`: never a secret.
    fn available_keys(&self, py: Python<'_>) -> PyResult<Vec<(String, String)>> {
        let jongler = self.library()?;
        let (coordinator, connector) = (jongler.coordinator().clone(), jongler.connector().name.clone());
        let names = block_on(py, async move { jongler.available_keys().await })?.map_err(to_py)?;
        let records = py.detach(move || coordinator.store().keys(Some(&connector))).map_err(to_py)?;
        Ok(records
            .into_iter()
            .filter(|record| names.contains(&record.key_name))
            .map(|record| (record.key_name, record.fingerprint))
            .collect())
    }

    /// Releases the key held per connection, if any.
    fn disconnect(&self, py: Python<'_>) -> PyResult<()> {
        let jongler = self.library()?;
        block_on(py, async move { jongler.disconnect().await })?.map_err(to_py)
    }
}

/// The seed's `APIJongler.cleanUp(connector)`: that connector's (or every connector's) lockdown and
/// error keys back to vacant, dead holders' locks freed; live holders keep their keys. Returns how many
/// keys changed state.
#[pyfunction]
#[pyo3(signature = (connector=None, *, db=None))]
pub fn cleanup(py: Python<'_>, connector: Option<String>, db: Option<PathBuf>) -> PyResult<usize> {
    let changed = py.detach(move || {
        let coordinator = Coordinator::open(CoordinatorOptions { db_path: db, ..CoordinatorOptions::default() })?;
        coordinator.cleanup(connector.as_deref(), false)
    });
    changed.map(|transitions| transitions.len()).map_err(to_py)
}
