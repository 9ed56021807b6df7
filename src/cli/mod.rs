//! The command line. One file per subcommand; this module holds the arguments they share and the
//! dispatch. The seed's form (`apijongler CONNECTOR METHOD ENDPOINT [BODY]`, `--cleanup`,
//! `--cleanup-all`) keeps working beside the subcommands.

mod bench;
mod cleanup;
mod columns;
mod connectors;
mod dashboard;
mod db;
mod demo;
pub mod exit;
mod history;
mod output;
mod request;
mod serve;
mod signals;
mod status;
mod sync;
mod usage;
mod why;
mod worker;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use api_jongler::{Coordinator, CoordinatorOptions, Keyring};
use clap::builder::TypedValueParser;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Share a pool of API keys (Gemini, Hugging Face, ...) between many processes on one machine.
///
/// Send a request through the pool:  apijongler CONNECTOR METHOD ENDPOINT [BODY]
#[derive(Debug, Parser)]
#[command(name = "apijongler", version, about, subcommand_precedence_over_arg = true)]
pub struct Args {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    request: request::RequestArgs,
    /// Seed form of `cleanup CONNECTOR`.
    #[arg(long, value_name = "CONNECTOR", conflicts_with = "cleanup_all")]
    cleanup: Option<String>,
    /// Seed form of `cleanup --all`.
    #[arg(long)]
    cleanup_all: bool,
}

/// Options every subcommand takes.
///
/// An empty `APIJONGLER_CONFIG`, `APIJONGLER_DB` or `APIJONGLER_CONNECTORS` means unset, as in the
/// library; an empty `--config`, `--db` or `--connectors` on the command line is a usage error.
#[derive(Debug)]
pub struct Global {
    /// The keyring INI file.
    pub config: Option<PathBuf>,
    /// The database: a file path or a `postgres://` URL (a URL of another scheme is refused here).
    pub db: Option<PathBuf>,
    /// A directory of connector JSON files.
    pub connectors: Option<PathBuf>,
    /// Print data as JSON (and nothing else on stdout).
    pub json: bool,
    /// More log output.
    pub verbose: u8,
    /// Only errors.
    pub quiet: bool,
    /// Log level (seed option).
    pub log_level: Option<tracing::Level>,
}

/// [`Global`] as clap parses it: path values may be empty, which [`Global`] turns into "unset".
#[derive(Debug, clap::Args)]
struct GlobalArgs {
    /// The keyring INI file.
    #[arg(long, global = true, env = "APIJONGLER_CONFIG", value_name = "PATH", value_parser = any_path())]
    config: Option<PathBuf>,
    /// The database: an SQLite file, or a postgres:// URL [default: $XDG_STATE_HOME/apijongler/apijongler.db].
    #[arg(long, global = true, env = "APIJONGLER_DB", value_name = "PATH|URL", value_parser = any_path())]
    db: Option<PathBuf>,
    /// A directory of connector JSON files that add to or override the shipped ones.
    #[arg(long, global = true, env = "APIJONGLER_CONNECTORS", value_name = "DIR", value_parser = any_path())]
    connectors: Option<PathBuf>,
    /// Print data as JSON (and nothing else on stdout).
    #[arg(long, global = true)]
    json: bool,
    /// More log output (-v: info, -vv: debug, -vvv: trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Log level (seed option): error, warn, info, debug, trace; APIJONGLER_LOG wins over it.
    #[arg(long, global = true, value_name = "LEVEL", ignore_case = true)]
    log_level: Option<tracing::Level>,
}

/// A path, empty allowed (clap's own path parser refuses an empty one, even from the environment).
fn any_path() -> impl TypedValueParser<Value = PathBuf> {
    clap::builder::OsStringValueParser::new().map(PathBuf::from)
}

impl Global {
    fn from_args(matches: &clap::ArgMatches, args: GlobalArgs) -> Result<Self, clap::Error> {
        let path = |id: &str, value: Option<PathBuf>| -> Result<Option<PathBuf>, clap::Error> {
            match value {
                Some(path) if path.as_os_str().is_empty() => {
                    if matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
                        let message = format!("--{id} needs a path; leave it out for the default\n");
                        return Err(clap::Error::raw(clap::error::ErrorKind::InvalidValue, message));
                    }
                    Ok(None)
                }
                other => Ok(other),
            }
        };
        let db = path("db", args.db)?;
        if let Some(value) = &db {
            // Refused here, not when the pool opens, so the message names where the value came from.
            let given_by = match matches.value_source("db") {
                Some(clap::parser::ValueSource::CommandLine) => "--db",
                _ => api_jongler::store::DB_ENV,
            };
            if let Err(error) = api_jongler::store::Location::parse(value.as_os_str(), given_by) {
                return Err(clap::Error::raw(clap::error::ErrorKind::InvalidValue, format!("{error}\n")));
            }
        }
        Ok(Self {
            config: path("config", args.config)?,
            db,
            connectors: path("connectors", args.connectors)?,
            json: args.json,
            verbose: args.verbose,
            quiet: args.quiet,
            log_level: args.log_level,
        })
    }
}

impl FromArgMatches for Global {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        Self::from_args(matches, GlobalArgs::from_arg_matches(matches)?)
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl clap::Args for Global {
    fn group_id() -> Option<clap::Id> {
        GlobalArgs::group_id()
    }

    fn augment_args(command: clap::Command) -> clap::Command {
        GlobalArgs::augment_args(command)
    }

    fn augment_args_for_update(command: clap::Command) -> clap::Command {
        GlobalArgs::augment_args_for_update(command)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Keys per connector: quota group, state, holder, lockdowns by model, last reason, uses.
    Status(status::StatusArgs),
    /// Lockdown and error keys back to vacant, dead holders' locks freed (live ones kept unless --force).
    Cleanup(cleanup::CleanupArgs),
    /// The state transitions, newest first.
    History(history::HistoryArgs),
    /// Sync the keyring now; --as-truth: also retire keys and replace secrets on a shared store.
    Sync(sync::SyncArgs),
    /// One key's state and lockdowns, explained (--model: would a request for it take the key).
    Why(why::WhyArgs),
    /// The known connectors, where each comes from, and how its key is sent.
    Connectors,
    /// The database path, schema version and example queries; `db prune` deletes old rows.
    Db(db::DbArgs),
    /// Requests, successes, 429s and errors per key, model or quota group over a span.
    Usage(usage::UsageArgs),
    /// The whole thing on a built-in mock upstream: no keys, no network, well under a minute.
    Demo(demo::DemoArgs),
    /// Shell completions.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// The dashboard alone: a read-only live web page of the pool at http://ADDR/__apijongler/ui/.
    Dashboard(dashboard::DashboardArgs),
    /// A local HTTP gateway for SDKs: http://ADDR/{connector}/{upstream path} through the pool.
    Serve(serve::ServeArgs),
    /// Measure the coordinator and the request layer on this machine.
    Bench(bench::BenchArgs),
    /// One worker process of `bench` and of the multi-process tests (not for direct use).
    #[command(hide = true)]
    Worker(worker::WorkerArgs),
}

/// Runs the parsed command.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let global = &args.global;
    if let Some(connector) = &args.cleanup {
        return cleanup::seed(global, Some(connector));
    }
    if args.cleanup_all {
        return cleanup::seed(global, None);
    }
    match args.command {
        Some(Command::Status(status)) => status::run(global, &status),
        Some(Command::Cleanup(cleanup)) => cleanup::run(global, &cleanup),
        Some(Command::History(history)) => history::run(global, &history),
        Some(Command::Sync(sync)) => sync::run(global, &sync),
        Some(Command::Why(why)) => why::run(global, &why),
        Some(Command::Connectors) => connectors::run(global),
        Some(Command::Db(db)) => db::run(global, &db),
        Some(Command::Usage(usage)) => usage::run(global, &usage),
        Some(Command::Demo(demo)) => demo::run(global, &demo),
        Some(Command::Completions { shell }) => {
            clap_complete::generate(shell, &mut completion_command(), "apijongler", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Serve(serve)) => serve::run(global, &serve),
        Some(Command::Dashboard(dashboard)) => dashboard::run(global, &dashboard),
        Some(Command::Bench(bench)) => bench::run(global, &bench),
        Some(Command::Worker(worker)) => worker::run(global, &worker),
        None => request::run(global, &args.request),
    }
}

/// The command line as `completions` describes it: without the hidden subcommands (`worker`), which
/// clap_complete would offer (it leaves out hidden values only). clap cannot remove a subcommand, so
/// the root is put back together from `Args`'s own arguments and its visible subcommands; the scripts
/// differ from those of `Args::command()` by the hidden subcommands alone.
fn completion_command() -> clap::Command {
    use clap::builder::Resettable;
    let full = Args::command();
    clap::Command::new("apijongler")
        .version(env!("CARGO_PKG_VERSION"))
        .about(Resettable::from(full.get_about().cloned()))
        .long_about(Resettable::from(full.get_long_about().cloned()))
        .args(full.get_arguments().cloned())
        .groups(full.get_groups().cloned())
        .subcommands(full.get_subcommands().filter(|command| !command.is_hide_set()).cloned())
}

/// Logs go to stderr. `APIJONGLER_LOG` (a tracing filter) wins over `--log-level`, which wins over
/// `-v`/`-q`; by default only warnings and errors are shown. Colours only on a terminal, without
/// `NO_COLOR`: a log file or a pipe gets plain text.
pub fn init_logging(args: &Args) {
    let global = &args.global;
    let level = match (global.log_level, global.quiet, global.verbose) {
        (Some(level), _, _) => level.as_str().to_ascii_lowercase(),
        (None, true, _) => "error".to_owned(),
        (None, false, 0) => "warn".to_owned(),
        (None, false, 1) => "info".to_owned(),
        (None, false, 2) => "debug".to_owned(),
        (None, false, _) => "trace".to_owned(),
    };
    let filter = EnvFilter::try_from_env("APIJONGLER_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let colour = wants_colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref());
    let output = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(colour).with_filter(filter);
    // The worker's fault injection sees every event; other commands pay nothing for it.
    let stop_after_claim = match &args.command {
        Some(Command::Worker(worker)) if worker.stop_after_claim => Some(worker::StopAfterClaim::default()),
        _ => None,
    };
    tracing_subscriber::registry().with(output).with(stop_after_claim).init();
}

/// Colours only on a terminal, and not when `NO_COLOR` is set to anything but empty (no-color.org).
fn wants_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(std::ffi::OsStr::is_empty)
}

/// The coordinator on the configured database, for the commands that only read it (`status`, `why`,
/// `history`, `db`): it never syncs a keyring, so they write no row whatever keyring they are given.
fn open(global: &Global) -> api_jongler::Result<Coordinator> {
    Coordinator::open(CoordinatorOptions { db_path: global.db.clone(), ..CoordinatorOptions::default() })
}

/// The coordinator, synced with the configured keyring first (if any), for commands that change key
/// states (`cleanup`). The sync touches only the connectors the keyring has a section for.
fn open_synced(global: &Global) -> api_jongler::Result<Coordinator> {
    let coordinator = open(global)?;
    if let Some(path) = &global.config {
        coordinator.sync(&Keyring::load(path)?)?;
    }
    Ok(coordinator)
}

/// The configured keyring for a read-only command to compare with the database: `None` without one,
/// and `None` with a warning when it cannot be read (the database is still worth showing).
fn keyring_to_compare(global: &Global) -> Option<Keyring> {
    let path = global.config.as_ref()?;
    Keyring::load(path)
        .inspect_err(|error| {
            if !global.quiet {
                eprintln!("apijongler: warning: {error}; showing the database alone");
            }
        })
        .ok()
}

/// `30s`, `2m`, `1h30m`, `0`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|error| format!("'{text}' is not a duration ({error}); write it like 30s, 2m, 1h30m or 0"))
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(wants_colour(true, None));
        assert!(wants_colour(true, Some(OsStr::new(""))), "an empty NO_COLOR is unset");
        assert!(!wants_colour(true, Some(OsStr::new("1"))));
        assert!(!wants_colour(false, None));
    }

    #[test]
    fn global_options_parse_before_and_after_the_subcommand() {
        for argv in [
            &["apijongler", "--db", "/x.db", "--json", "-vv", "status"][..],
            &["apijongler", "status", "--db", "/x.db", "--json", "-vv"],
        ] {
            let args = Args::try_parse_from(argv).expect("parses");
            assert_eq!(args.global.db.as_deref(), Some(std::path::Path::new("/x.db")), "{argv:?}");
            assert!(args.global.json && args.global.verbose == 2, "{argv:?}");
        }
        Args::command().debug_assert();
    }
}
