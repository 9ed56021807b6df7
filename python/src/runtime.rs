//! One tokio runtime per process, and the two ways a Python call waits on it: blocking with the GIL
//! released and signals checked (Ctrl-C drops the call), or through a callback for asyncio.
//!
//! A forked child gets a runtime of its own on first use; the parent's is leaked, never dropped: its
//! shutdown would wait for worker threads that exist only in the parent.

use std::sync::mpsc::{RecvTimeoutError, sync_channel};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use tokio::runtime::Runtime;
use tokio::task::AbortHandle;

/// How often a blocking call wakes to let Python run its signal handlers: the most a Ctrl-C waits.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// The runtime of the process that made it.
static RUNTIME: Mutex<Option<(u32, &'static Runtime)>> = Mutex::new(None);

/// This process's runtime, made on first use (in a forked child: made again).
pub fn runtime() -> PyResult<&'static Runtime> {
    let pid = std::process::id();
    let mut slot = RUNTIME.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((owner, runtime)) = *slot
        && owner == pid
    {
        return Ok(runtime);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .thread_keep_alive(Duration::from_secs(10))
        .thread_name("apijongler")
        .enable_all()
        .build()
        .map_err(|error| PyRuntimeError::new_err(format!("cannot start apijongler's runtime: {error}")))?;
    let runtime: &'static Runtime = Box::leak(Box::new(runtime));
    *slot = Some((pid, runtime));
    Ok(runtime)
}

fn panicked() -> PyErr {
    PyRuntimeError::new_err("an apijongler task ended without an answer (it panicked; see the log)")
}

/// Runs `future` on this process's runtime while the calling thread waits with the GIL released. A
/// signal whose Python handler raises (Ctrl-C's `KeyboardInterrupt`) aborts the future and waits until
/// it is dropped (a request gives its key back then), and the exception is raised.
pub fn block_on<T: Send + 'static>(py: Python<'_>, future: impl Future<Output = T> + Send + 'static) -> PyResult<T> {
    let runtime = runtime()?;
    let (sender, mut receiver) = sync_channel(1);
    let task = runtime.spawn(async move {
        // The receiver is gone only when the caller was interrupted; nobody wants the answer then.
        let _ = sender.send(future.await);
    });
    loop {
        // The receiver is not `Sync`: it goes into the GIL-free closure and comes back.
        let (back, received) = py.detach(move || {
            let received = receiver.recv_timeout(SIGNAL_POLL);
            (receiver, received)
        });
        receiver = back;
        match received {
            Ok(value) => return Ok(value),
            Err(RecvTimeoutError::Disconnected) => return Err(panicked()),
            Err(RecvTimeoutError::Timeout) => {
                if let Err(interrupt) = py.check_signals() {
                    task.abort();
                    py.detach(|| {
                        // Cancelled or finished: either way the future has been dropped.
                        let _ = runtime.block_on(task);
                    });
                    return Err(interrupt);
                }
            }
        }
    }
}

/// A call running for asyncio; `cancel()` drops it (a request gives its key back).
#[pyclass(frozen, module = "api_jongler._native")]
pub struct Task {
    handle: AbortHandle,
}

#[pymethods]
impl Task {
    /// Drops the call; its callback is then never called.
    fn cancel(&self) {
        self.handle.abort();
    }
}

/// Runs `future` on this process's runtime and calls `done(True, value)` or `done(False, exception)`
/// with its outcome, from a runtime thread (the Python side hands it to its event loop).
pub fn spawn<T: Send + 'static>(
    future: impl Future<Output = T> + Send + 'static,
    convert: impl FnOnce(Python<'_>, T) -> PyResult<Py<PyAny>> + Send + 'static,
    done: Py<PyAny>,
) -> PyResult<Task> {
    let task = runtime()?.spawn(async move {
        let outcome = future.await;
        Python::attach(|py| {
            let (ok, value) = match convert(py, outcome) {
                Ok(value) => (true, value),
                Err(error) => (false, error.into_value(py).into_any()),
            };
            if let Err(error) = done.call1(py, (ok, value)) {
                error.write_unraisable(py, None);
            }
        });
    });
    Ok(Task { handle: task.abort_handle() })
}
