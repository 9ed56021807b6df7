//! Queries for `psql` (to be ported from `store/sqlite/examples.rs`).

/// Queries worth keeping at hand in `psql`.
pub(super) fn example_queries() -> String {
    String::new()
}
