//! `apijongler bench gateway`: what `apijongler serve` adds over calling the upstream directly, and how
//! close it gets to the coordinator's ceiling.
//!
//! - Latency: the same loopback mock (no latency of its own) called directly and through a gateway
//!   process, with one reqwest client, interleaved request by request so both see the same machine, at
//!   1 connection and at 64; the added p50 and p99 are the differences.
//! - Throughput: 64 connections through 64 keys for a few seconds, next to the claim+release rate of one
//!   `bench keys` worker measured in the same run (the gateway does one claim and one release per
//!   request, so that rate is its ceiling).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use api_jongler::mock::{MockConfig, MockUpstream};

use super::{keys, mock_setup, percentile};

const CONNECTOR: &str = "generativelanguage.googleapis.com";
const ENDPOINT: &str = "/v1beta/models/gemini-2.5-flash:generateContent";
const BODY: &str = r#"{"contents":[{"parts":[{"text":"Say hello."}]}]}"#;

#[derive(Debug, clap::Args)]
pub struct GatewayArgs {
    /// Requests per connection in the latency measurement.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Seconds of the throughput measurement.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Connections (and keys) of the throughput measurement.
    #[arg(long, default_value_t = 64)]
    connections: usize,
}

pub fn run(args: &GatewayArgs) -> anyhow::Result<ExitCode> {
    // The mock runs on a runtime of its own, standing in for the far side of a network.
    let upstream = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let mock =
        upstream.block_on(MockUpstream::start(MockConfig { latency: Duration::ZERO, ..MockConfig::default() }))?;
    let dir = tempfile::tempdir()?;
    let (keyring, connectors) = mock_setup(dir.path(), CONNECTOR, args.connections.max(1), mock.port())?;
    let mut gateway = Gateway::start(&keyring, &connectors, &dir.path().join("gateway.db"))?;
    let clients = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let direct = format!("{}{ENDPOINT}", mock.url());
    let through = format!("http://{}/{CONNECTOR}{ENDPOINT}", gateway.address);
    let mut report = String::new();
    writeln!(report, "apijongler bench gateway: a loopback mock with no latency, called directly and through `serve`")?;
    writeln!(
        report,
        "{:>11} {:>10} {:>10} {:>14} {:>14} {:>8}",
        "connections", "direct p50", "direct p99", "added p50", "added p99", "errors"
    )?;
    for connections in [1, args.connections] {
        let (direct_ms, through_ms, errors) =
            clients.block_on(latencies(&direct, &through, connections, args.requests))?;
        writeln!(
            report,
            "{connections:>11} {:>7.3} ms {:>7.3} ms {:>11.3} ms {:>11.3} ms {errors:>8}",
            percentile(&direct_ms, 0.5),
            percentile(&direct_ms, 0.99),
            percentile(&through_ms, 0.5) - percentile(&direct_ms, 0.5),
            percentile(&through_ms, 0.99) - percentile(&direct_ms, 0.99),
        )?;
    }
    let duration = Duration::from_secs_f64(args.seconds);
    let (served, errors) = clients.block_on(throughput(&through, args.connections, duration))?;
    let ceiling = keys::claim_release_rate(1, 64, Duration::from_secs(2))?;
    let rate = served as f64 / duration.as_secs_f64();
    writeln!(
        report,
        "throughput: {rate:.0} requests/s through {} keys from {} connections ({errors} errors); one process's \
         claim+release ceiling: {ceiling:.0} cycles/s; {:.0} % of it",
        args.connections,
        args.connections,
        100.0 * rate / ceiling
    )?;
    gateway.stop();
    print!("{report}");
    Ok(ExitCode::SUCCESS)
}

/// Per-request latencies in ms, direct and through the gateway, interleaved, from `connections` tasks;
/// and how many requests did not answer 200.
async fn latencies(
    direct: &str,
    through: &str,
    connections: usize,
    requests: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>, u64)> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(connections * 2).build()?;
    let errors = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (client, direct, through, errors) =
                (client.clone(), direct.to_owned(), through.to_owned(), errors.clone());
            tokio::spawn(async move {
                let (mut to_mock, mut to_gateway) = (Vec::new(), Vec::new());
                for _ in 0..requests / connections.max(1) {
                    for (url, into) in [(&direct, &mut to_mock), (&through, &mut to_gateway)] {
                        let started = Instant::now();
                        let ok = post(&client, url).await;
                        into.push(started.elapsed().as_secs_f64() * 1000.0);
                        if !ok {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                (to_mock, to_gateway)
            })
        })
        .collect();
    let (mut direct_ms, mut through_ms) = (Vec::new(), Vec::new());
    for task in tasks {
        let (to_mock, to_gateway) = task.await?;
        direct_ms.extend(to_mock);
        through_ms.extend(to_gateway);
    }
    direct_ms.sort_unstable_by(f64::total_cmp);
    through_ms.sort_unstable_by(f64::total_cmp);
    Ok((direct_ms, through_ms, errors.load(Ordering::Relaxed)))
}

/// Requests served with 200 through the gateway by `connections` tasks in `duration`, and the others.
async fn throughput(through: &str, connections: usize, duration: Duration) -> anyhow::Result<(u64, u64)> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(connections * 2).build()?;
    let (served, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let end = Instant::now() + duration;
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (client, through, served, errors) =
                (client.clone(), through.to_owned(), served.clone(), errors.clone());
            tokio::spawn(async move {
                while Instant::now() < end {
                    let counter = if post(&client, &through).await { &served } else { &errors };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await?;
    }
    Ok((served.load(Ordering::Relaxed), errors.load(Ordering::Relaxed)))
}

/// POSTs the bench body with a placeholder key; true for a 200 whose body was read.
async fn post(client: &reqwest::Client, url: &str) -> bool {
    let sent = client
        .post(url)
        .header("x-goog-api-key", "placeholder-not-a-key")
        .header("content-type", "application/json")
        .body(BODY)
        .send()
        .await;
    match sent {
        Ok(response) if response.status() == 200 => response.bytes().await.is_ok(),
        _ => false,
    }
}

/// An `apijongler serve` child process on a free loopback port.
struct Gateway {
    child: Child,
    address: String,
}

impl Gateway {
    fn start(keyring: &std::path::Path, connectors: &std::path::Path, db: &std::path::Path) -> anyhow::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["--quiet", "serve", "--listen", "127.0.0.1:0", "--wait", "60s"])
            .env("APIJONGLER_CONFIG", keyring)
            .env("APIJONGLER_CONNECTORS", connectors)
            .env("APIJONGLER_DB", db)
            .env_remove("APIJONGLER_GATEWAY_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting `apijongler serve`")?;
        let stderr = child.stderr.take().context("the gateway's stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let address = loop {
            let Some(line) = lines.next() else { bail!("`apijongler serve` exited before listening") };
            if let Some(url) = line?.split("listening on http://").nth(1) {
                break url.trim().to_owned();
            }
        };
        // Keep draining its stderr so it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Ok(Self { child, address })
    }

    fn stop(&mut self) {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(0)).expect("a child pid"),
            rustix::process::Signal::TERM,
        );
        let _ = self.child.wait();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
