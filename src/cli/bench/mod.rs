//! `apijongler bench`: the measurements the README quotes. `bench keys` measures the coordinator
//! against the bare cycle on its database (SQLite, or the PostgreSQL server `--db` names); `bench requests` measures the request layer against a plain HTTP client and its
//! goodput under a quota; `bench sync` measures what the keyring's size costs a sync and a command;
//! `bench gateway` measures what `apijongler serve` adds and how close it gets to the coordinator's ceiling.

mod gateway;
pub(super) mod keys;
mod requests;
pub(super) mod scratch;
mod sync;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::Global;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, clap::Subcommand)]
enum What {
    /// P processes doing claim+release cycles on K keys, next to the bare cycle on SQLite (or on the
    /// PostgreSQL server a `--db postgres://` URL names, in throwaway databases it creates and drops).
    Keys(keys::KeysArgs),
    /// Latency added over a plain HTTP client, and goodput under a per-key quota.
    Requests(requests::RequestsArgs),
    /// Keyring syncs and whole commands with 10, 10,000 and 100,000 keys.
    Sync(sync::SyncArgs),
    /// Latency `apijongler serve` adds, and its throughput next to the coordinator's ceiling.
    Gateway(gateway::GatewayArgs),
}

pub fn run(global: &Global, args: &BenchArgs) -> anyhow::Result<ExitCode> {
    match &args.what {
        What::Keys(keys) => keys::run(global, keys),
        What::Requests(requests) => requests::run(requests),
        What::Sync(sync) => sync::run(sync),
        What::Gateway(gateway) => gateway::run(gateway),
    }
}

/// The value at fraction `p` (0..=1) of sorted `values`.
fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    sorted.get(((sorted.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or_default()
}

/// Writes, in `dir`, a keyring of `keys` fake keys for connector `name` and a connector file pointing
/// `name` at the loopback mock on `port`; returns the keyring's path and the connectors directory.
fn mock_setup(dir: &Path, name: &str, keys: usize, port: u16) -> anyhow::Result<(PathBuf, PathBuf)> {
    let keyring = dir.join("keys.ini");
    let mut ini = format!("[{name}]\n");
    for index in 0..keys {
        writeln!(ini, "key{index:06} = fake-bench-secret-{index}")?;
    }
    std::fs::write(&keyring, ini)?;
    let connectors = dir.join("connectors");
    std::fs::create_dir_all(&connectors)?;
    let connector = serde_json::json!({
        "name": name, "host": "127.0.0.1", "port": port, "protocol": "http",
        "api_key_header": api_jongler::mock::KEY_HEADER, "api_key_prefix": "",
        "model": {"path_markers": ["models", "tunedModels"], "path_segments": 1, "body_field": "model"}
    });
    std::fs::write(connectors.join(format!("{name}.json")), connector.to_string())?;
    Ok((keyring, connectors))
}
