//! `apijongler bench requests`: what the request layer costs and what it gets out of a quota.
//!
//! - Overhead: the same loopback mock answered through a plain reqwest client and through the library
//!   (each scope), interleaved request by request so both see the same machine; the added median and
//!   p99 are the differences.
//! - Goodput: tasks sending requests as fast as they can through K keys with a per-key quota, for
//!   several quota windows; successes per second as a share of what the quota allows.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use api_jongler::mock::{KEY_HEADER, MockConfig, MockUpstream};
use api_jongler::{Jongler, LeaseScope};

use super::percentile;

const CONNECTOR: &str = "generativelanguage.googleapis.com";
const ENDPOINT: &str = "/v1beta/models/gemini-2.5-flash:generateContent";

#[derive(Debug, clap::Args)]
pub struct RequestsArgs {
    /// Requests per client in the overhead measurement.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Keys in the goodput measurement.
    #[arg(long, default_value_t = 4)]
    keys: usize,
    /// Successful requests each key may make per quota window.
    #[arg(long, default_value_t = 5)]
    quota: u32,
    /// The quota window, seconds.
    #[arg(long, default_value_t = 2.0)]
    window: f64,
    /// Quota windows the goodput measurement runs.
    #[arg(long, default_value_t = 5)]
    windows: u32,
}

pub fn run(args: &RequestsArgs) -> anyhow::Result<ExitCode> {
    // The mock upstream runs on a runtime of its own, standing in for the far side of a network: the
    // clients measured do not share their threads with it.
    let upstream = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let instant =
        upstream.block_on(MockUpstream::start(MockConfig { latency: Duration::ZERO, ..MockConfig::default() }))?;
    let window = Duration::from_secs_f64(args.window);
    let quota = MockConfig { quota: Some(args.quota), window, ..MockConfig::default() };
    let quota = upstream.block_on(MockUpstream::start(quota))?;
    let clients = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let report = clients.block_on(async {
        let mut report = String::new();
        overhead(args, &instant, &mut report).await?;
        goodput(args, &quota, &mut report).await?;
        anyhow::Ok(report)
    })?;
    print!("{report}");
    Ok(ExitCode::SUCCESS)
}

/// A temporary keyring, database and connector file pointing at `mock`.
fn sandbox(dir: &Path, keys: usize, mock: &MockUpstream) -> anyhow::Result<api_jongler::JonglerBuilder> {
    let (keyring, connectors) = super::mock_setup(dir, CONNECTOR, keys, mock.port())?;
    Ok(Jongler::builder(CONNECTOR)
        .keyring(keyring)
        .database(dir.join("bench.db"))
        .connectors_dir(connectors)
        .wait(Duration::from_secs(60)))
}

async fn overhead(args: &RequestsArgs, mock: &MockUpstream, report: &mut String) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let per_request = sandbox(dir.path(), 4, mock)?.connect().await?;
    let per_connection = sandbox(dir.path(), 4, mock)?.scope(LeaseScope::PerConnection).connect().await?;
    let plain = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(60)).build()?;
    let url = format!("{}{ENDPOINT}", mock.url());
    let mut times: [Vec<u128>; 3] = Default::default();
    for round in 0..args.requests + 100 {
        let started = Instant::now();
        let answer = plain.post(&url).header(KEY_HEADER, "fake-bench-secret-0").body("{}").send().await?;
        anyhow::ensure!(answer.status().is_success(), "the mock answered {}", answer.status());
        answer.text().await?;
        let plain_us = started.elapsed().as_micros();
        let mut through = [0u128; 2];
        for (index, jongler) in [&per_request, &per_connection].into_iter().enumerate() {
            let started = Instant::now();
            let response = jongler.request("POST", ENDPOINT, "{}").await?;
            anyhow::ensure!(response.is_success(), "the mock answered {}", response.status);
            through[index] = started.elapsed().as_micros();
        }
        // The first requests warm up connections and caches; they are not measured.
        if round >= 100 {
            times[0].push(plain_us);
            times[1].push(through[0]);
            times[2].push(through[1]);
        }
    }
    per_connection.disconnect().await?;
    for series in &mut times {
        series.sort_unstable();
    }
    let ms = |us: u128| us as f64 / 1000.0;
    writeln!(
        report,
        "apijongler bench requests: overhead over plain reqwest, {} requests each, loopback mock",
        args.requests
    )?;
    writeln!(
        report,
        "{:<26} {:>10} {:>10} {:>14} {:>14}",
        "client", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms"
    )?;
    let (plain_p50, plain_p99) = (percentile(&times[0], 0.5), percentile(&times[0], 0.99));
    for (name, series) in
        [("plain reqwest", &times[0]), ("jongler, per request", &times[1]), ("jongler, per connection", &times[2])]
    {
        let (p50, p99) = (percentile(series, 0.5), percentile(series, 0.99));
        writeln!(
            report,
            "{name:<26} {:>10.3} {:>10.3} {:>14.3} {:>14.3}",
            ms(p50),
            ms(p99),
            ms(p50) - ms(plain_p50),
            ms(p99) - ms(plain_p99)
        )?;
    }
    Ok(())
}

async fn goodput(args: &RequestsArgs, mock: &MockUpstream, report: &mut String) -> anyhow::Result<()> {
    let window = Duration::from_secs_f64(args.window);
    let dir = tempfile::tempdir()?;
    let jongler = sandbox(dir.path(), args.keys, mock)?.connect().await?;
    let run_for = window * args.windows;
    let started = Instant::now();
    let succeeded = Arc::new(AtomicU64::new(0));
    // Twice as many senders as keys: every key always has someone waiting for it.
    let tasks: Vec<_> = (0..args.keys * 2)
        .map(|_| {
            let (jongler, succeeded) = (jongler.clone(), Arc::clone(&succeeded));
            tokio::spawn(async move {
                while started.elapsed() < run_for {
                    match jongler.request("POST", ENDPOINT, "{}").await {
                        Ok(response) if response.is_success() && started.elapsed() <= run_for => {
                            succeeded.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        // A wait running past the end of the measurement is not a failure of it.
                        Err(_) if started.elapsed() >= run_for => {}
                        Err(error) => return Err(error),
                    }
                }
                Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let (_, per_key) = mock.stats();
    let allowed = args.keys as f64 * f64::from(args.quota) * f64::from(args.windows);
    let ok = succeeded.load(Ordering::Relaxed) as f64;
    let worst_429s = per_key.values().map(|stats| stats.rate_limited).max().unwrap_or(0);
    let early: u64 = per_key.values().map(|stats| stats.before_deadline).sum();
    writeln!(
        report,
        "\napijongler bench requests: goodput, {} keys x {} requests per {:.1} s window, {} windows, 20 ms latency",
        args.keys, args.quota, args.window, args.windows
    )?;
    writeln!(
        report,
        "{ok:.0} successful requests of {allowed:.0} allowed: {:.1} % goodput ({:.2} requests/s); \
         at most {worst_429s} 429s on one key in {} windows; {early} requests before a deadline",
        100.0 * ok / allowed,
        ok / run_for.as_secs_f64(),
        args.windows
    )?;
    Ok(())
}
