//! The command line. One file per subcommand; this module holds the arguments they share.

mod bench;
pub mod exit;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Share a pool of API keys between many processes on one machine.
#[derive(Debug, Parser)]
#[command(name = "apijongler", version, about)]
pub struct Args {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every subcommand takes.
#[derive(Debug, clap::Args)]
pub struct Global {
    /// The keyring INI file.
    #[arg(long, global = true, env = "APIJONGLER_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// The database file (default: $XDG_STATE_HOME/apijongler/apijongler.db).
    #[arg(long, global = true, env = "APIJONGLER_DB", value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// More log output (-v: debug, -vv: trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure coordinator throughput against raw SQLite on this machine.
    Bench(bench::BenchArgs),
    /// One worker process of `bench` and of the multi-process tests (not for direct use).
    #[command(hide = true)]
    Worker(worker::WorkerArgs),
}

/// Runs the parsed command.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Bench(bench) => bench::run(&args.global, &bench),
        Command::Worker(worker) => worker::run(&args.global, &worker),
    }
}

/// Logs go to stderr; `APIJONGLER_LOG` (a tracing filter) wins over `-v`/`-q`.
pub fn init_logging(global: &Global) {
    let level = match (global.quiet, global.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = EnvFilter::try_from_env("APIJONGLER_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
