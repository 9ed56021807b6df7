//! `apijongler bench keys`: P worker processes doing claim+release cycles on K keys, next to the raw
//! reference (the same P processes doing the bare cycle with none of apijongler's logic), in one run.
//! On SQLite (the default) the reference is two bare write transactions; with `--db postgres://...`
//! the configurations run on that server, each in a throwaway database (see `scratch`), and the
//! reference is the bare `FOR UPDATE SKIP LOCKED` claim and its release, two statements (see `worker`).
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
use api_jongler::pool::{Fate, Lockdown};
use api_jongler::{Clock, Coordinator, CoordinatorOptions, Keyring, SystemClock};

use super::percentile;
use super::scratch::Server;
use crate::cli::Global;

#[derive(Debug, clap::Args)]
pub struct KeysArgs {
    /// Process counts to measure [default: 1,4,16,64; on PostgreSQL 1,16,64].
    #[arg(long, value_delimiter = ',')]
    processes: Option<Vec<u32>>,
    /// Key counts to measure [default: 4,64,10000; on PostgreSQL 64,10000].
    #[arg(long, value_delimiter = ',')]
    keys: Option<Vec<u32>>,
    /// Seconds each configuration runs, per round.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Rounds per process count; each measures the reference, then every key count.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Key counts also measured with `--locked-percent` of their keys locked down for the model the
    /// workers claim for (rows marked `*`); given with no value, none [default: 10000; on PostgreSQL 64].
    #[arg(long, value_delimiter = ',', num_args = 0..)]
    locked_keys: Option<Vec<u32>>,
    /// The share of keys locked down for the model in the `*` rows.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u32).range(0..=100))]
    locked_percent: u32,
    /// Declared limits for every key (a `[bench limits]` line's value, such as `1000000/min`): each
    /// claim then reserves against them. Compare a run with and one without for the cost of pacing.
    #[arg(long)]
    limits: Option<String>,
}

/// What is measured unless the arguments say: process counts, key counts, key counts with lockdowns.
type Defaults = (&'static [u32], &'static [u32], &'static [u32]);
const SQLITE_DEFAULTS: Defaults = (&[1, 4, 16, 64], &[4, 64, 10_000], &[10_000]);
/// On PostgreSQL, the process counts the README quotes, and smaller pools with lockdowns: putting 9,000
/// keys in lockdown one claim and one lockdown at a time, for every configuration, takes minutes there.
const POSTGRES_DEFAULTS: Defaults = (&[1, 16, 64], &[64, 10_000], &[64]);

/// The model every bench worker claims for, so that the rows with and without lockdowns run the same
/// claim statement.
const MODEL: &str = "gemini-2.5-pro";

/// One pool to measure: its key count and how many of its keys are locked down for [`MODEL`].
#[derive(Debug, Clone, Copy)]
pub(in crate::cli) struct Pool {
    pub(in crate::cli) keys: u32,
    pub(in crate::cli) locked: u32,
}

impl Pool {
    fn label(self) -> String {
        if self.locked == 0 { self.keys.to_string() } else { format!("{}*", self.keys) }
    }
}

/// What a configuration runs.
#[derive(Debug, Clone, Copy)]
enum Subject {
    /// The bare cycle (`worker --raw`) on 64 keys: the reference.
    Bare,
    /// The bare cycle writing the history rows apijongler's writes (`worker --raw --raw-history`), on
    /// 64 keys: PostgreSQL's only (SQLite's bare cycle writes them already). Between it and the bare
    /// cycle is the cost of the audit trail; between it and apijongler's, the coordinator's.
    BareRecorded,
    /// apijongler's cycle on `Pool`.
    Coordinator(Pool),
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
    let server = Server::of(global)?;
    let defaults = match server {
        Server::Sqlite => SQLITE_DEFAULTS,
        Server::Postgres(_) => POSTGRES_DEFAULTS,
    };
    let processes = args.processes.clone().unwrap_or_else(|| defaults.0.to_vec());
    let keys = args.keys.clone().unwrap_or_else(|| defaults.1.to_vec());
    let locked_keys = args.locked_keys.clone().unwrap_or_else(|| defaults.2.to_vec());
    let pools: Vec<Pool> = keys
        .iter()
        .map(|&keys| Pool { keys, locked: 0 })
        .chain(locked_keys.iter().map(|&keys| Pool { keys, locked: keys * args.locked_percent / 100 }))
        .collect();
    let mut report = String::new();
    writeln!(
        report,
        "apijongler bench keys: claim+release cycles, {} s per configuration, median of {} rounds",
        args.seconds, args.rounds
    )?;
    if let Server::Postgres(postgres) = &server {
        writeln!(report, "({postgres})")?;
        writeln!(
            report,
            "(raw+h: the bare cycle, each statement also writing the key's history row as apijongler's do)"
        )?;
    }
    if let Some(limits) = &args.limits {
        writeln!(report, "(every key of every pool limited to {limits} for every model: each claim reserves)")?;
    }
    if !locked_keys.is_empty() {
        writeln!(
            report,
            "(K* rows: {} % of the K keys locked down for {MODEL}, the model every worker claims for)",
            args.locked_percent
        )?;
    }
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
    for &processes in &processes {
        let (mut raw, mut recorded) = (Vec::new(), Vec::new());
        let mut by_pool: Vec<Vec<Measured>> = pools.iter().map(|_| Vec::new()).collect();
        for _ in 0..args.rounds {
            raw.push(measure(&server, processes, Subject::Bare, duration, None)?);
            if let Server::Postgres(_) = server {
                recorded.push(measure(&server, processes, Subject::BareRecorded, duration, None)?);
            }
            for (rounds, &pool) in by_pool.iter_mut().zip(&pools) {
                rounds.push(measure(&server, processes, Subject::Coordinator(pool), duration, args.limits.as_deref())?);
            }
        }
        let mut lines = row(processes, "raw", &Summary::of(&raw, None));
        if !recorded.is_empty() {
            lines.push_str(&row(processes, "raw+h", &Summary::of(&recorded, Some(&raw))));
        }
        for (rounds, &pool) in by_pool.iter().zip(&pools) {
            lines.push_str(&row(processes, &pool.label(), &Summary::of(rounds, Some(&raw))));
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

/// The claim+release cycles per second of `processes` workers on `keys` keys (for `bench gateway`'s
/// ceiling).
pub(super) fn claim_release_rate(processes: u32, keys: u32, duration: Duration) -> anyhow::Result<f64> {
    Ok(measure(&Server::Sqlite, processes, Subject::Coordinator(Pool { keys, locked: 0 }), duration, None)?
        .cycles_per_second)
}

/// Runs `processes` workers of `subject` for `duration` on a fresh store on `server`, every key limited
/// to `limits` for every model if given.
fn measure(
    server: &Server,
    processes: u32,
    subject: Subject,
    duration: Duration,
    limits: Option<&str>,
) -> anyhow::Result<Measured> {
    let scratch = server.scratch()?;
    let db = scratch.db();
    let pool = match subject {
        Subject::Bare | Subject::BareRecorded => Pool { keys: 64, locked: 0 },
        Subject::Coordinator(pool) => pool,
    };
    let keyring = prepare(scratch.dir(), db, pool, limits)?;
    let exe = std::env::current_exe()?;
    // Every worker opens its store before the common start: a PostgreSQL connection and its schema
    // check take longer than opening a file, and 64 of them share 2 cores.
    let per_process = match server {
        Server::Sqlite => 30,
        Server::Postgres(_) => 60,
    };
    let start_at = SystemClock.now_ms() + 500 + i64::from(processes) * per_process;
    let children = (0..processes)
        .map(|_| {
            let mut command = Command::new(&exe);
            command
                .args(["--quiet", "worker", "--latencies", "--model", MODEL])
                .arg("--db")
                .arg(db)
                .args(["--start-at-ms", &start_at.to_string(), "--duration-ms", &duration.as_millis().to_string()])
                .env_remove("APIJONGLER_CONFIG")
                .stdout(Stdio::piped());
            match subject {
                Subject::Bare => command.arg("--raw"),
                Subject::BareRecorded => command.args(["--raw", "--raw-history"]),
                // The worker syncs the keyring, and with it the limits its claims reserve against.
                Subject::Coordinator(_) if limits.is_some() => command.arg("--config").arg(&keyring),
                Subject::Coordinator(_) => &mut command,
            };
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

/// A keyring of `pool.keys` fake keys in connector `bench` (every key limited to `limits` for every
/// model if given), written to a file whose path it returns and synced into a fresh database, and the
/// `pool.locked` least recently used of them locked down for [`MODEL`] for an hour, each as a 429
/// would (so their place in the claim order is the one such a lockdown gives them).
pub(in crate::cli) fn prepare(
    dir: &Path,
    db: &Path,
    pool: Pool,
    limits: Option<&str>,
) -> anyhow::Result<std::path::PathBuf> {
    let mut ini = String::from("[bench]\n");
    for index in 0..pool.keys {
        writeln!(ini, "key{index:05} = fake-bench-secret-{index}")?;
    }
    if let Some(limits) = limits {
        writeln!(ini, "[bench limits]\n* = {limits}")?;
    }
    let path = dir.join("bench.ini");
    std::fs::write(&path, &ini)?;
    let keyring = Keyring::parse(&path, &ini)?;
    let coordinator = Coordinator::open(CoordinatorOptions { db_path: Some(db.to_owned()), ..Default::default() })?;
    coordinator.sync(&keyring)?;
    let until = SystemClock.now_ms() + 3_600_000;
    for _ in 0..pool.locked {
        let lease = coordinator.claim_for("bench", Some(MODEL), &[], Duration::ZERO)?;
        let lockdown = Lockdown {
            models: vec![MODEL.to_owned()],
            ..Lockdown::whole_key(until, "bench: per-day quota of the model", Some(429))
        };
        lease.finish(&Fate::Lockdown(lockdown), None)?;
    }
    Ok(path)
}
