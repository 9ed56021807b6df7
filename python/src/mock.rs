//! Test support, not API: the project's loopback mock of Gemini (`api_jongler::mock`) for the package's
//! tests and benchmark, which run it inside the Python process and read what it saw; and the Rust
//! library's side of the overhead benchmark.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use api_jongler::mock::{MockConfig, MockUpstream as Mock};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::errors::to_py;
use crate::jongler::NativeJongler;
use crate::runtime::{block_on, runtime};

/// A loopback imitation of Gemini on 127.0.0.1 (see the Rust `api_jongler::mock`); it stops when dropped.
#[pyclass(frozen, module = "api_jongler._native")]
pub struct MockUpstream {
    mock: Mock,
}

#[pymethods]
impl MockUpstream {
    /// `latency`: seconds per answer (`/slow…` paths take 60 s); `quota`: successful requests per key
    /// per `window` seconds, then Gemini's 429; `bad_keys`: secrets answered 400 `API_KEY_INVALID`.
    #[new]
    #[pyo3(signature = (*, latency=0.0, quota=None, window=60.0, bad_keys=Vec::new()))]
    fn new(latency: f64, quota: Option<u32>, window: f64, bad_keys: Vec<String>) -> PyResult<Self> {
        let config = MockConfig {
            latency: Duration::from_secs_f64(latency),
            quota,
            window: Duration::from_secs_f64(window),
            bad_keys: bad_keys.into_iter().collect(),
            ..MockConfig::default()
        };
        let started = runtime()?.block_on(Mock::start(config));
        let mock = started.map_err(|error| PyRuntimeError::new_err(format!("cannot start the mock: {error}")))?;
        Ok(Self { mock })
    }

    /// The port it listens on.
    #[getter]
    fn port(&self) -> u16 {
        self.mock.port()
    }

    /// Requests seen in all.
    #[getter]
    fn requests(&self) -> u64 {
        self.mock.stats().0
    }

    /// Per secret (the mock is the fake upstream: it sees them), what it answered and the most
    /// requests with that key in flight at once (`max_in_flight`) and now (`in_flight`).
    fn stats(&self) -> HashMap<String, HashMap<&'static str, u64>> {
        let (_, keys) = self.mock.stats();
        keys.into_iter()
            .map(|(secret, stats)| {
                let counts = HashMap::from([
                    ("ok", stats.ok),
                    ("rate_limited", stats.rate_limited),
                    ("invalid", stats.invalid),
                    ("overloaded", stats.overloaded),
                    ("max_in_flight", stats.max_in_flight),
                    ("in_flight", stats.in_flight()),
                ]);
                (secret, counts)
            })
            .collect()
    }
}

/// The Rust library's side of the overhead benchmark: `count` requests through `jongler`'s library
/// handle, one after another in one task, as a Rust program would send them; each one's seconds.
#[pyfunction]
pub fn bench_library(
    py: Python<'_>,
    jongler: &NativeJongler,
    method: String,
    endpoint: String,
    body: String,
    count: usize,
) -> PyResult<Vec<f64>> {
    let jongler = jongler.library()?;
    let timings = block_on(py, async move {
        let mut timings = Vec::with_capacity(count);
        for _ in 0..count {
            let started = Instant::now();
            jongler.request(&method, &endpoint, &body).await?;
            timings.push(started.elapsed().as_secs_f64());
        }
        Ok(timings)
    })?;
    timings.map_err(to_py)
}
