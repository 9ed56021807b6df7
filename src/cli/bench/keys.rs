//! `apijongler bench keys`: P worker processes doing claim+release cycles on K keys, next to the raw
//! SQLite reference (the same P processes doing the bare two-transaction cycle), in one run.
//!
//! A shared machine's load drifts over seconds, so one reference measured once and compared with
//! configurations measured a minute later says more about the drift than about apijongler. Each
//! round measures the reference and then every K at that P; the table shows the median over rounds,
//! and "vs raw" is the median of each round's ratio to the reference measured just before it.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use api_jongler::{Clock, Coordinator, CoordinatorOptions, Keyring, SystemClock};

use super::percentile;
use crate::cli::Global;

#[derive(Debug, clap::Args)]
pub struct KeysArgs {
    /// Process counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    processes: Vec<u32>,
    /// Key counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "4,64,10000")]
    keys: Vec<u32>,
    /// Seconds each configuration runs, per round.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Rounds per process count; each measures the reference, then every key count.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
}

/// What one configuration measured in one round.
struct Measured {
    cycles_per_second: f64,
    latencies_us: Vec<u128>,
}

/// One configuration over all rounds: median throughput, latency percentiles over every claim, and
/// the median of its per-round ratios to the reference.
struct Summary {
    cycles_per_second: f64,
    p50_us: u128,
    p99_us: u128,
    p999_us: u128,
    share_of_raw: Option<f64>,
}

impl Summary {
    fn of(rounds: &[Measured], raw: Option<&[Measured]>) -> Self {
        let mut latencies: Vec<u128> = rounds.iter().flat_map(|round| round.latencies_us.iter().copied()).collect();
        latencies.sort_unstable();
        let share_of_raw = raw.map(|raw| {
            median(rounds.iter().zip(raw).map(|(measured, raw)| measured.cycles_per_second / raw.cycles_per_second))
        });
        Summary {
            cycles_per_second: median(rounds.iter().map(|round| round.cycles_per_second)),
            p50_us: percentile(&latencies, 0.50),
            p99_us: percentile(&latencies, 0.99),
            p999_us: percentile(&latencies, 0.999),
            share_of_raw,
        }
    }
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_unstable_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

pub fn run(global: &Global, args: &KeysArgs) -> anyhow::Result<ExitCode> {
    let duration = Duration::from_secs_f64(args.seconds);
    let mut report = String::new();
    writeln!(
        report,
        "apijongler bench keys: claim+release cycles, {} s per configuration, median of {} rounds",
        args.seconds, args.rounds
    )?;
    writeln!(
        report,
        "{:>4} {:>6} {:>12} {:>10} {:>10} {:>10} {:>9}",
        "P", "K", "cycles/s", "p50 ms", "p99 ms", "p99.9 ms", "vs raw"
    )?;
    // Progress on stderr as each process count finishes; the whole table on stdout at the end.
    let progress = |text: &str| {
        if !global.quiet {
            eprint!("{text}");
        }
    };
    progress(&report);
    for &processes in &args.processes {
        let mut raw = Vec::new();
        let mut by_keys: Vec<Vec<Measured>> = args.keys.iter().map(|_| Vec::new()).collect();
        for _ in 0..args.rounds {
            raw.push(measure(processes, None, duration)?);
            for (rounds, &keys) in by_keys.iter_mut().zip(&args.keys) {
                rounds.push(measure(processes, Some(keys), duration)?);
            }
        }
        let mut lines = row(processes, "raw", &Summary::of(&raw, None));
        for (rounds, &keys) in by_keys.iter().zip(&args.keys) {
            lines.push_str(&row(processes, &keys.to_string(), &Summary::of(rounds, Some(&raw))));
        }
        progress(&lines);
        report.push_str(&lines);
    }
    // The table goes to stdout once complete, so `apijongler bench > figures.txt` captures it alone.
    print!("{report}");
    Ok(ExitCode::SUCCESS)
}

fn row(processes: u32, keys: &str, summary: &Summary) -> String {
    let share = summary.share_of_raw.map_or_else(String::new, |share| format!("{:.0} %", 100.0 * share));
    format!(
        "{processes:>4} {keys:>6} {:>12.0} {:>10.2} {:>10.2} {:>10.2} {share:>9}\n",
        summary.cycles_per_second,
        summary.p50_us as f64 / 1000.0,
        summary.p99_us as f64 / 1000.0,
        summary.p999_us as f64 / 1000.0
    )
}

/// Runs `processes` workers for `duration` on a fresh database with `keys` keys (`None`: the raw
/// reference, on 64 rows).
fn measure(processes: u32, keys: Option<u32>, duration: Duration) -> anyhow::Result<Measured> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("bench.db");
    prepare(dir.path(), &db, keys.unwrap_or(64))?;
    let exe = std::env::current_exe()?;
    let start_at = SystemClock.now_ms() + 500 + i64::from(processes) * 30;
    let children = (0..processes)
        .map(|_| {
            let mut command = Command::new(&exe);
            command
                .args(["--quiet", "worker", "--latencies"])
                .arg("--db")
                .arg(&db)
                .args(["--start-at-ms", &start_at.to_string(), "--duration-ms", &duration.as_millis().to_string()])
                .env_remove("APIJONGLER_CONFIG")
                .stdout(Stdio::piped());
            if keys.is_none() {
                command.arg("--raw");
            }
            command.spawn().context("spawning a bench worker")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    let mut cycles = 0u64;
    let mut latencies = Vec::new();
    for child in children {
        let output = child.wait_with_output()?;
        if !output.status.success() {
            bail!("a bench worker failed: {}", output.status);
        }
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            if let Some(count) = line.strip_prefix("cycles ") {
                cycles += count.parse::<u64>()?;
            } else if let Some(values) = line.strip_prefix("latencies_us ") {
                for value in values.split_whitespace() {
                    latencies.push(value.parse::<u128>()?);
                }
            }
        }
    }
    Ok(Measured { cycles_per_second: cycles as f64 / duration.as_secs_f64(), latencies_us: latencies })
}

/// A keyring of `keys` fake keys in connector `bench`, synced into a fresh database.
fn prepare(dir: &Path, db: &Path, keys: u32) -> anyhow::Result<()> {
    let mut ini = String::from("[bench]\n");
    for index in 0..keys {
        writeln!(ini, "key{index:05} = fake-bench-secret-{index}")?;
    }
    let keyring = Keyring::parse(&dir.join("bench.ini"), &ini)?;
    let coordinator = Coordinator::open(CoordinatorOptions { db_path: Some(db.to_owned()), ..Default::default() })?;
    coordinator.sync(&keyring)?;
    Ok(())
}
