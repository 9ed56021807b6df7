//! Exit codes, one table for the whole command.

/// Something went wrong that has no more specific code.
pub const FAILURE: u8 = 1;
/// A worker's lease was lost while it held the key (reaped or cleaned up).
pub const LEASE_LOST: u8 = 3;
