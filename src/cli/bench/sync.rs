//! `apijongler bench sync`: what a keyring of K keys costs, for K = 10, 10,000 and 100,000.
//!
//! - sync: `Coordinator::sync` alone, the first time (every key inserted, under the write lock) and
//!   again with nothing to change (one read, no write lock). Each first sync runs on a fresh database.
//! - command: a whole `apijongler CONNECTOR POST ENDPOINT {}` process (start, keyring, database, sync,
//!   claim, the request to a loopback mock with no latency, release), first on a fresh database and
//!   then again on the same one. The difference between K rows is what the keyring's size costs a
//!   command.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use api_jongler::mock::{MockConfig, MockUpstream};
use api_jongler::{Coordinator, CoordinatorOptions, Keyring};

use super::percentile;

// Not `bench`: a connector named like a subcommand would be taken for it.
const CONNECTOR: &str = "mock";

#[derive(Debug, clap::Args)]
pub struct SyncArgs {
    /// Key counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "10,10000,100000")]
    keys: Vec<u32>,
    /// Runs of each measurement; the table shows their median.
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

/// The medians for one key count.
struct Measured {
    sync_first: Duration,
    sync_noop: Duration,
    command_first: Duration,
    command_noop: Duration,
}

pub fn run(args: &SyncArgs) -> anyhow::Result<ExitCode> {
    ensure!(args.runs > 0, "--runs must be at least 1");
    // The mock runs on a runtime of its own; the commands measured are separate processes.
    let upstream = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let mock =
        upstream.block_on(MockUpstream::start(MockConfig { latency: Duration::ZERO, ..MockConfig::default() }))?;
    let mut report = String::new();
    writeln!(report, "apijongler bench sync: median of {} runs, ms", args.runs)?;
    writeln!(
        report,
        "{:>8} {:>12} {:>12} {:>15} {:>15} {:>16}",
        "keys", "sync first", "sync no-op", "command first", "command no-op", "no-op vs first K"
    )?;
    let mut baseline: Option<Duration> = None;
    for &keys in &args.keys {
        let dir = tempfile::tempdir()?;
        let measured = measure(dir.path(), keys, args.runs, &mock)?;
        let base = *baseline.get_or_insert(measured.command_noop);
        let added = measured.command_noop.as_secs_f64() - base.as_secs_f64();
        writeln!(
            report,
            "{keys:>8} {:>12.1} {:>12.1} {:>15.1} {:>15.1} {:>+16.1}",
            ms(measured.sync_first),
            ms(measured.sync_noop),
            ms(measured.command_first),
            ms(measured.command_noop),
            added * 1000.0
        )?;
    }
    print!("{report}");
    Ok(ExitCode::SUCCESS)
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn measure(dir: &Path, keys: u32, runs: usize, mock: &MockUpstream) -> anyhow::Result<Measured> {
    let (keyring_path, connectors) = super::mock_setup(dir, CONNECTOR, usize::try_from(keys)?, mock.port())?;
    let keyring = Keyring::load(&keyring_path)?;

    let (mut sync_first, mut sync_noop) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let options = CoordinatorOptions { db_path: Some(dir.join(format!("sync-{run}.db"))), ..Default::default() };
        let coordinator = Coordinator::open(options)?;
        let started = Instant::now();
        let report = coordinator.sync(&keyring)?;
        sync_first.push(started.elapsed());
        ensure!(report.added.len() == keys as usize, "the first sync added {} keys of {keys}", report.added.len());
        let started = Instant::now();
        let report = coordinator.sync(&keyring)?;
        sync_noop.push(started.elapsed());
        ensure!(report.is_empty(), "the second sync changed something");
    }

    let (mut command_first, mut command_noop) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let db = dir.join(format!("command-{run}.db"));
        command_first.push(time_command(&keyring_path, &db, &connectors)?);
        command_noop.push(time_command(&keyring_path, &db, &connectors)?);
    }
    let median = |mut values: Vec<Duration>| {
        values.sort_unstable();
        percentile(&values, 0.5)
    };
    Ok(Measured {
        sync_first: median(sync_first),
        sync_noop: median(sync_noop),
        command_first: median(command_first),
        command_noop: median(command_noop),
    })
}

/// One request through the real command, timed from spawn to exit.
fn time_command(keyring: &Path, db: &Path, connectors: &Path) -> anyhow::Result<Duration> {
    let mut command = Command::new(std::env::current_exe()?);
    command
        .env_clear()
        .arg("--quiet")
        .arg("--config")
        .arg(keyring)
        .arg("--db")
        .arg(db)
        .arg("--connectors")
        .arg(connectors)
        .args([CONNECTOR, "POST", "/v1beta/models/m:generateContent", "{}", "--wait", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let output = command.output().context("running apijongler")?;
    let elapsed = started.elapsed();
    ensure!(output.status.success(), "the command failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok(elapsed)
}
