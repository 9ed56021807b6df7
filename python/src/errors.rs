//! The library's errors as the seed's Python exceptions: `ValueError` and `FileNotFoundError` for
//! configuration, `RuntimeError` for everything at request time (the seed's README catches it when every
//! key is used up), with the library's message, which never holds a secret.

use std::error::Error as _;

use api_jongler::Error;
use pyo3::PyErr;
use pyo3::exceptions::{PyFileNotFoundError, PyRuntimeError, PyValueError};

pyo3::create_exception!(
    api_jongler,
    NoKeyAvailableError,
    PyRuntimeError,
    "No key of the connector could be claimed within the wait: each is held, in lockdown or in error. A RuntimeError, as the seed raised."
);

/// `error` and its causes, the way the command line prints them (`{:#}` of anyhow).
fn chain(error: &Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The Python exception for `error`.
pub fn to_py(error: Error) -> PyErr {
    let text = chain(&error);
    match error {
        // The seed's words first: its users test `"No API keys available" in str(e)`.
        Error::NoKeyAvailable(_) => NoKeyAvailableError::new_err(format!("No API keys available: {text}")),
        Error::Transport { .. } | Error::Stream { .. } => PyRuntimeError::new_err(format!("Request failed: {text}")),
        Error::ConfigMissing { .. } | Error::UnknownConnector { .. } => PyFileNotFoundError::new_err(text),
        Error::ConfigNotSet
        | Error::NoKeyringSection { .. }
        | Error::NoKeysConfigured { .. }
        | Error::KeyringLine { .. }
        | Error::ConnectorFile { .. }
        | Error::ConnectorField { .. }
        | Error::DuplicateConnector { .. }
        | Error::InvalidEnv { .. }
        | Error::InvalidRequest { .. } => PyValueError::new_err(text),
        _ => PyRuntimeError::new_err(text),
    }
}
