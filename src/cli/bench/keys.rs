//! `apijongler bench keys`: P worker processes doing claim+release cycles on K keys, next to the raw
//! SQLite reference (the same P processes doing the bare two-transaction cycle), in one run.

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
    /// Seconds each configuration runs.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
}

/// What one configuration measured.
struct Measured {
    cycles_per_second: f64,
    p50_us: u128,
    p99_us: u128,
    p999_us: u128,
}

pub fn run(global: &Global, args: &KeysArgs) -> anyhow::Result<ExitCode> {
    let duration = Duration::from_secs_f64(args.seconds);
    let mut report = String::new();
    writeln!(report, "apijongler bench keys: claim+release cycles, {} s per configuration", args.seconds)?;
    writeln!(
        report,
        "{:>4} {:>6} {:>12} {:>10} {:>10} {:>10} {:>9}",
        "P", "K", "cycles/s", "p50 ms", "p99 ms", "p99.9 ms", "vs raw"
    )?;
    // Progress on stderr as each configuration finishes; the whole table on stdout at the end.
    let progress = |text: &str| {
        if !global.quiet {
            eprint!("{text}");
        }
    };
    progress(&report);
    for &processes in &args.processes {
        let raw = measure(processes, None, duration)?;
        let line = row(processes, "raw", &raw, None);
        progress(&line);
        report.push_str(&line);
        for &keys in &args.keys {
            let measured = measure(processes, Some(keys), duration)?;
            let line = row(processes, &keys.to_string(), &measured, Some(raw.cycles_per_second));
            progress(&line);
            report.push_str(&line);
        }
    }
    // The table goes to stdout once complete, so `apijongler bench > figures.txt` captures it alone.
    print!("{report}");
    Ok(ExitCode::SUCCESS)
}

fn row(processes: u32, keys: &str, measured: &Measured, raw: Option<f64>) -> String {
    let share = raw.map_or_else(String::new, |raw| format!("{:.0} %", 100.0 * measured.cycles_per_second / raw));
    format!(
        "{processes:>4} {keys:>6} {:>12.0} {:>10.2} {:>10.2} {:>10.2} {share:>9}\n",
        measured.cycles_per_second,
        measured.p50_us as f64 / 1000.0,
        measured.p99_us as f64 / 1000.0,
        measured.p999_us as f64 / 1000.0
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
    latencies.sort_unstable();
    Ok(Measured {
        cycles_per_second: cycles as f64 / duration.as_secs_f64(),
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
        p999_us: percentile(&latencies, 0.999),
    })
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
