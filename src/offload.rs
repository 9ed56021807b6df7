//! Blocking work (the store's calls) from async code, without blocking the runtime's threads for
//! longer than the work itself.

use crate::error::Result;

/// Runs blocking coordinator work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()))
}

/// Runs short database work that never waits for another request of ours (it may wait for another
/// process's write lock, which never waits for us): in place on a multi-threaded runtime, sparing the
/// hand-off to the blocking pool and back; on a current-thread runtime, which cannot, on that pool.
pub(crate) async fn short_blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    if tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
        return tokio::task::block_in_place(work);
    }
    blocking(work).await
}
