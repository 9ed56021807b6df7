//! `apijongler worker` (hidden): one process cycling claim, hold, release, for `bench` and for the
//! multi-process tests. It speaks on stdout in plain lines the parent parses:
//! `claimed KEY LEASE` (with `--report`), `lost KEY LEASE`, and at the end `cycles N` and, with
//! `--latencies`, `latencies_us L1 L2 ...`.
//!
//! `--raw` runs the benchmark's reference instead: the bare cycle the database itself can do, with
//! none of the coordinator's logic (see `reference`).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use api_jongler::{Clock, Coordinator, CoordinatorOptions, Error, Keyring, SystemClock};

use super::Global;
use super::exit;

mod reference;

#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// The connector whose keys to cycle.
    #[arg(long, default_value = "bench")]
    connector: String,
    /// Stop after this many cycles (default: run until killed or `--duration-ms` ends).
    #[arg(long)]
    cycles: Option<u64>,
    /// Start cycling at this unix time in ms (lets many workers start together).
    #[arg(long)]
    start_at_ms: Option<i64>,
    /// Stop cycling this long after the start.
    #[arg(long)]
    duration_ms: Option<u64>,
    /// Hold each key a random time up to this many microseconds.
    #[arg(long, default_value_t = 0)]
    hold_max_us: u64,
    /// Hold each key exactly this long (overrides `--hold-max-us`).
    #[arg(long)]
    hold_ms: Option<u64>,
    /// How long a claim may wait for a free key.
    #[arg(long, default_value_t = 60_000)]
    wait_ms: u64,
    #[arg(long, default_value_t = 5_000)]
    heartbeat_ms: u64,
    #[arg(long, default_value_t = 30_000)]
    stale_ms: u64,
    #[arg(long, default_value_t = 1_000)]
    reap_ms: u64,
    /// Claim keys for this model (keys locked down for it are skipped).
    #[arg(long)]
    model: Option<String>,
    /// Print a line for every claim.
    #[arg(long)]
    report: bool,
    /// Print every claim latency at the end.
    #[arg(long)]
    latencies: bool,
    /// Run the raw reference cycle on the database's keys instead of the coordinator (SQLite, or
    /// PostgreSQL for a postgres:// URL).
    #[arg(long)]
    raw: bool,
    /// With `--raw` on PostgreSQL: each of the reference's two statements also writes the key's
    /// history row, as apijongler's do (SQLite's reference always does).
    #[arg(long, requires = "raw")]
    raw_history: bool,
    /// Send this many requests through the request layer (per-request leases) instead of cycling keys.
    #[arg(long)]
    requests: Option<u64>,
    /// The endpoint those requests go to.
    #[arg(long, default_value = "/v1beta/models/gemini-2.5-flash:generateContent")]
    endpoint: String,
    /// Fault: this process stops itself (SIGSTOP) right after its first claim, as a debugger or a
    /// paused VM would, and goes on when continued (see `StopAfterClaim`).
    #[arg(long)]
    pub stop_after_claim: bool,
    /// Fault: this process's wall clock is this many ms ahead (negative: behind), as after an NTP step.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    clock_offset_ms: i64,
}

/// A wall clock stepped by a fixed offset; the boot clock is the system's (no step can move it).
#[derive(Debug)]
struct SteppedClock(i64);

impl Clock for SteppedClock {
    fn now_ms(&self) -> i64 {
        SystemClock.now_ms().saturating_add(self.0)
    }

    fn boot_ms(&self) -> i64 {
        SystemClock.boot_ms()
    }
}

/// A tracing layer that stops this process with SIGSTOP right after its first claim commits (the
/// coordinator logs "key claimed" then), the fault of a holder paused between its claim and its send.
#[derive(Debug, Default)]
pub struct StopAfterClaim(std::sync::atomic::AtomicBool);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for StopAfterClaim {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct IsClaim(bool);
        impl tracing::field::Visit for IsClaim {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" && format!("{value:?}") == "key claimed" {
                    self.0 = true;
                }
            }
        }
        let mut claim = IsClaim(false);
        event.record(&mut claim);
        if claim.0 && !self.0.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::STOP);
        }
    }
}

pub fn run(global: &Global, args: &WorkerArgs) -> anyhow::Result<ExitCode> {
    let db = global.db.clone().context("the worker needs --db")?;
    if args.raw {
        return reference::run(&db, args);
    }
    if let Some(requests) = args.requests {
        return send_requests(global, &db, requests, args);
    }
    let options = CoordinatorOptions {
        db_path: Some(db),
        heartbeat_interval: Duration::from_millis(args.heartbeat_ms),
        stale_after: Duration::from_millis(args.stale_ms),
        reap_interval: Duration::from_millis(args.reap_ms),
        ..CoordinatorOptions::default()
    };
    let coordinator = Coordinator::open(options)?;
    if let Some(config) = &global.config {
        coordinator.sync(&Keyring::load(config)?)?;
    }
    wait_for_start(args.start_at_ms);

    let started = Instant::now();
    let end = args.duration_ms.map(|ms| started + Duration::from_millis(ms));
    let mut stdout = std::io::stdout().lock();
    let mut latencies = Vec::new();
    let mut cycles = 0u64;
    let mut lost = false;
    while args.cycles.is_none_or(|limit| cycles < limit) && end.is_none_or(|end| Instant::now() < end) {
        let asked = Instant::now();
        let wait = Duration::from_millis(args.wait_ms);
        let lease = coordinator.claim_for(&args.connector, args.model.as_deref(), &[], wait)?;
        if args.latencies {
            latencies.push(asked.elapsed().as_micros());
        }
        if args.report {
            writeln!(stdout, "claimed {} {}", lease.key_name(), lease.token())?;
            stdout.flush()?;
        }
        let hold = match args.hold_ms {
            Some(ms) => Duration::from_millis(ms),
            None if args.hold_max_us > 0 => Duration::from_micros(fastrand::u64(0..=args.hold_max_us)),
            None => Duration::ZERO,
        };
        if !hold.is_zero() {
            std::thread::sleep(hold);
        }
        let (key, token) = (lease.key_name().to_owned(), lease.token());
        match lease.release() {
            Ok(()) => cycles += 1,
            Err(Error::LeaseLost { .. }) => {
                writeln!(stdout, "lost {key} {token}")?;
                lost = true;
                break;
            }
            Err(error) => return Err(error.into()),
        }
    }
    summarize(&mut stdout, cycles, args.latencies.then_some(&latencies[..]))?;
    Ok(if lost { ExitCode::from(exit::LEASE_LOST) } else { ExitCode::SUCCESS })
}

/// Sends `requests` requests one after the other, printing `answered STATUS KEY` for each (with
/// `--report`) and `requests N` at the end. Any request that does not end in a 2xx fails the worker.
fn send_requests(global: &Global, db: &Path, requests: u64, args: &WorkerArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut builder = api_jongler::Jongler::builder(&args.connector)
            .database(db)
            .wait(Duration::from_millis(args.wait_ms))
            .coordinator(CoordinatorOptions {
                heartbeat_interval: Duration::from_millis(args.heartbeat_ms),
                stale_after: Duration::from_millis(args.stale_ms),
                reap_interval: Duration::from_millis(args.reap_ms),
                clock: std::sync::Arc::new(SteppedClock(args.clock_offset_ms)),
                ..CoordinatorOptions::default()
            });
        if let Some(config) = &global.config {
            builder = builder.keyring(config);
        }
        let jongler = builder.connect().await?;
        wait_for_start(args.start_at_ms);
        let mut stdout = std::io::stdout().lock();
        for _ in 0..requests {
            let response = jongler.request("POST", &args.endpoint, "{}").await?;
            if args.report {
                writeln!(stdout, "answered {} {}", response.status, response.key_name.as_deref().unwrap_or("-"))?;
                stdout.flush()?;
            }
            anyhow::ensure!(response.is_success(), "the upstream answered {}: {}", response.status, response.body);
            anyhow::ensure!(
                response.bookkeeping == api_jongler::Bookkeeping::Recorded,
                "answered, but {:?}",
                response.bookkeeping
            );
        }
        writeln!(stdout, "requests {requests}")?;
        Ok(ExitCode::SUCCESS)
    })
}

fn wait_for_start(start_at_ms: Option<i64>) {
    if let Some(start) = start_at_ms {
        let ahead = start - SystemClock.now_ms();
        if ahead > 0 {
            std::thread::sleep(Duration::from_millis(ahead.unsigned_abs()));
        }
    }
}

/// The closing lines the parent parses: `cycles N` and, if asked for, `latencies_us L1 L2 ...`.
fn summarize(out: &mut impl Write, cycles: u64, latencies: Option<&[u128]>) -> std::io::Result<()> {
    writeln!(out, "cycles {cycles}")?;
    if let Some(latencies) = latencies {
        let joined: Vec<String> = latencies.iter().map(u128::to_string).collect();
        writeln!(out, "latencies_us {}", joined.join(" "))?;
    }
    Ok(())
}
