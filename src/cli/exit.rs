//! Exit codes, one table for the whole command (the README reproduces it).
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | an unexpected failure (a bug, or the system refusing something) |
//! | 2 | usage: bad arguments, bad `--since`, a body that is not JSON, a database URL of a scheme apijongler does not speak |
//! | 3 | the upstream answered, with a non-2xx status |
//! | 4 | no key became free within `--wait` |
//! | 5 | configuration: keyring, connector files, environment variables |
//! | 6 | database: cannot be created, not SQLite, too new, failing |
//! | 7 | network: no answer from the upstream (timeouts, refused connections) |
//! | 8 | a key's lease was lost during the request (cleanup --force, or the process was stopped); the answer, if one came, is on stdout |
//! | 9 | the answer is on stdout, but the database could not record it (disk full, file removed, locked too long) |
//! | 130 | interrupted by SIGINT: the request was cancelled and its key released |
//! | 143 | ended by SIGTERM: the request was cancelled and its key released |

use api_jongler::Error;

/// An unexpected failure.
pub const FAILURE: u8 = 1;
/// Bad arguments (clap uses 2 as well).
pub const USAGE: u8 = 2;
/// The upstream answered non-2xx.
pub const UPSTREAM: u8 = 3;
/// No key became free in time.
pub const NO_KEY: u8 = 4;
/// Configuration error.
pub const CONFIG: u8 = 5;
/// Database error.
pub const DATABASE: u8 = 6;
/// No answer from the upstream.
pub const NETWORK: u8 = 7;
/// A lease was lost.
pub const LEASE_LOST: u8 = 8;
/// The answer came but could not be recorded.
pub const NOT_RECORDED: u8 = 9;
/// SIGINT (128 + 2, as shells report it).
pub const INTERRUPTED: u8 = 130;
/// SIGTERM (128 + 15).
pub const TERMINATED: u8 = 143;

/// A usage error found after parsing (bad `--since`, a body that is not JSON, an unknown key).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// The exit code for an error that ended the command.
pub fn code_for(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<Usage>().is_some() {
        return USAGE;
    }
    let Some(error) = error.downcast_ref::<Error>() else { return FAILURE };
    match error {
        Error::ConfigNotSet
        | Error::ConfigMissing { .. }
        | Error::ConfigRead { .. }
        | Error::NoKeyringSection { .. }
        | Error::NoKeysConfigured { .. }
        | Error::UnknownConnector { .. }
        | Error::ConnectorFile { .. }
        | Error::ConnectorsDir { .. }
        | Error::KeyringLine { .. }
        | Error::ConnectorField { .. }
        | Error::DuplicateConnector { .. }
        | Error::InvalidEnv { .. }
        | Error::KeyringDiffers { .. }
        | Error::NoDatabaseLocation => CONFIG,
        Error::DatabaseCreate { .. }
        | Error::NotADatabase { .. }
        | Error::SchemaTooNew { .. }
        | Error::ForeignDatabase { .. }
        | Error::DatabaseLocked { .. }
        | Error::DatabaseReplaced { .. }
        | Error::Database { .. }
        | Error::DatabaseUnreachable { .. } => DATABASE,
        Error::NoKeyAvailable(_) | Error::ResourceOwnerUnavailable { .. } => NO_KEY,
        Error::Transport { .. } | Error::Stream { .. } => NETWORK,
        Error::Upstream { .. } => UPSTREAM,
        Error::LeaseLost { .. } => LEASE_LOST,
        Error::InvalidRequest { .. } | Error::UnsupportedDatabaseUrl { .. } => USAGE,
        _ => FAILURE,
    }
}
