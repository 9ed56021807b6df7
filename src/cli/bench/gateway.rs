//! `apijongler bench gateway`: what `apijongler serve` adds over calling the upstream directly, how
//! close it gets to the coordinator's ceiling, and how it waits when keys or the database are scarce.
//!
//! - Latency: the same loopback mock (no latency of its own) called directly and through a gateway
//!   process, with one reqwest client, at 1 connection and at 64. Each connection sends its gateway
//!   requests back to back, in blocks alternating with blocks of direct requests (so both see the same
//!   machine): a direct request between two gateway requests would give the gateway's background work
//!   (checkpoints, the batcher's wake-ups) time to finish unseen, and hide the tail.
//! - Throughput: 64 connections through 64 keys for a few seconds, next to the claim+release rate of one
//!   `bench keys` worker measured in the same run (the gateway does one claim and one release per
//!   request, so that rate is its ceiling).
//! - Scarce keys: 64 connections through 4 keys, next to the rate of one connection (waiting must not
//!   cost more than it lets through).
//! - Claim waits: 64 connections through 4 keys with a 50 ms upstream; the p99 wait for a key next to a
//!   first-come queue's, (connections / keys) x upstream latency.
//! - An external lock: a real `sqlite3` holds `BEGIN IMMEDIATE` on the gateway's database while 64
//!   connections ask with `--wait 5s`; how long until every client had its answer.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use api_jongler::mock::{MockConfig, MockUpstream};

use super::{keys, mock_setup, percentile};

const CONNECTOR: &str = "generativelanguage.googleapis.com";
const ENDPOINT: &str = "/v1beta/models/gemini-2.5-flash:generateContent";
const BODY: &str = r#"{"contents":[{"parts":[{"text":"Say hello."}]}]}"#;

/// Requests each connection sends to one side before switching to the other in the latency
/// measurement.
const BLOCK: usize = 50;

/// The gateway's `--wait` in the external-lock measurement, and the target for every client's answer.
const LOCKED_WAIT: &str = "5s";
const LOCKED_TARGET: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct GatewayArgs {
    /// Requests per connection in the latency measurement.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Seconds of each throughput and claim-wait measurement.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Connections (and keys) of the throughput measurement; connections of the scarce-key, claim-wait
    /// and external-lock measurements.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Keys of the scarce-key and claim-wait measurements.
    #[arg(long, default_value_t = 4)]
    scarce_keys: usize,
    /// The upstream's latency in the claim-wait measurement, in ms.
    #[arg(long, default_value_t = 50)]
    upstream_ms: u64,
    /// How long the external `sqlite3` holds the write lock, in seconds (0: skip that measurement).
    #[arg(long, default_value_t = 60.0)]
    lock_seconds: f64,
}

pub fn run(args: &GatewayArgs) -> anyhow::Result<ExitCode> {
    // The mocks run on a runtime of their own, standing in for the far side of a network.
    let upstream = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let clients = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let connections = args.connections.max(1);
    let duration = Duration::from_secs_f64(args.seconds);
    let mut report = String::new();

    let rig = Rig::start(&upstream, connections, Duration::ZERO, "60s")?;
    writeln!(
        report,
        "apijongler bench gateway: a loopback mock with no latency, called directly and through `serve`, \
         {BLOCK} requests back to back on each side in turn"
    )?;
    writeln!(
        report,
        "{:>11} {:>10} {:>10} {:>14} {:>14} {:>8}",
        "connections", "direct p50", "direct p99", "added p50", "added p99", "errors"
    )?;
    for count in [1, connections] {
        let (direct_ms, through_ms, errors) =
            clients.block_on(latencies(&rig.direct, &rig.through, count, args.requests))?;
        writeln!(
            report,
            "{count:>11} {:>7.3} ms {:>7.3} ms {:>11.3} ms {:>11.3} ms {errors:>8}",
            percentile(&direct_ms, 0.5),
            percentile(&direct_ms, 0.99),
            percentile(&through_ms, 0.5) - percentile(&direct_ms, 0.5),
            percentile(&through_ms, 0.99) - percentile(&direct_ms, 0.99),
        )?;
    }
    eprint!("{report}");

    let (served, errors) = clients.block_on(throughput(&rig.through, connections, duration))?;
    let (alone, _) = clients.block_on(throughput(&rig.through, 1, duration))?;
    drop(rig);
    let ceiling = keys::claim_release_rate(1, 64, Duration::from_secs(2))?;
    let rate = served as f64 / duration.as_secs_f64();
    let alone = alone as f64 / duration.as_secs_f64();
    let line = format!(
        "throughput: {rate:.0} requests/s through {connections} keys from {connections} connections ({errors} \
         errors); one process's claim+release ceiling: {ceiling:.0} cycles/s; {:.0} % of it (target: at least 60 %)\n",
        100.0 * rate / ceiling
    );
    eprint!("{line}");
    report.push_str(&line);

    let keys = args.scarce_keys.max(1);
    let rig = Rig::start(&upstream, keys, Duration::ZERO, "60s")?;
    let (served, errors) = clients.block_on(throughput(&rig.through, connections, duration))?;
    drop(rig);
    let scarce = served as f64 / duration.as_secs_f64();
    let line = format!(
        "scarce keys: {scarce:.0} requests/s through {keys} keys from {connections} connections ({errors} errors), \
         next to {alone:.0} requests/s from one connection: {:.0} % of it (target: at least 100 %)\n",
        100.0 * scarce / alone
    );
    eprint!("{line}");
    report.push_str(&line);

    let latency = Duration::from_millis(args.upstream_ms);
    let rig = Rig::start(&upstream, keys, latency, "60s")?;
    let (mut waits_ms, errors) = clients.block_on(claim_waits(&rig.through, connections, duration, latency))?;
    drop(rig);
    waits_ms.sort_unstable_by(f64::total_cmp);
    let queue_ms = connections as f64 / keys as f64 * latency.as_secs_f64() * 1000.0;
    let p99 = percentile(&waits_ms, 0.99);
    let line = format!(
        "claim waits: {connections} connections through {keys} keys, {} ms upstream, {} requests ({errors} errors): \
         p50 {:.0} ms, p99 {p99:.0} ms, max {:.0} ms; a first-come queue's: {queue_ms:.0} ms; p99 {:.2}x it \
         (target: at most 1.5x)\n",
        args.upstream_ms,
        waits_ms.len(),
        percentile(&waits_ms, 0.5),
        percentile(&waits_ms, 1.0),
        p99 / queue_ms
    );
    eprint!("{line}");
    report.push_str(&line);

    if args.lock_seconds > 0.0 {
        let hold = Duration::from_secs_f64(args.lock_seconds);
        let rig = Rig::start(&upstream, keys, Duration::ZERO, LOCKED_WAIT)?;
        // One request first, so the gateway has opened the database and synced before the lock.
        clients.block_on(send(&reqwest::Client::new(), &rig.through));
        let shell = SqliteShell::lock(&rig.db)?;
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(hold);
            shell.release()
        });
        let (last, statuses) = clients.block_on(under_lock(&rig.through, connections, hold + LOCKED_TARGET * 3))?;
        releaser.join().map_err(|_| anyhow::anyhow!("the thread holding `sqlite3` panicked"))??;
        drop(rig);
        let statuses = statuses.iter().map(|(status, count)| format!("{count} x {status}")).collect::<Vec<_>>();
        let line = format!(
            "external lock: `sqlite3` holds BEGIN IMMEDIATE for {:.0} s; {connections} connections with --wait \
             {LOCKED_WAIT}: every client had its answer after {:.1} s ({}) (target: at most {} s)\n",
            hold.as_secs_f64(),
            last.as_secs_f64(),
            statuses.join(", "),
            LOCKED_TARGET.as_secs()
        );
        eprint!("{line}");
        report.push_str(&line);
    }
    print!("{report}");
    Ok(ExitCode::SUCCESS)
}

/// Per-request latencies in ms, direct and through the gateway, from `connections` tasks each sending
/// [`BLOCK`] requests to one side back to back, then to the other; and how many did not answer 200.
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
                let mut left = requests / connections.max(1);
                while left > 0 {
                    let block = left.min(BLOCK);
                    left -= block;
                    for (url, into) in [(&direct, &mut to_mock), (&through, &mut to_gateway)] {
                        for _ in 0..block {
                            let started = Instant::now();
                            let ok = post(&client, url).await;
                            into.push(started.elapsed().as_secs_f64() * 1000.0);
                            if !ok {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
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

/// The wait for a key of each request served with 200 by `connections` tasks in `duration` (its time
/// to answer less the upstream's `latency`), in ms; and how many requests did not answer 200.
async fn claim_waits(
    through: &str,
    connections: usize,
    duration: Duration,
    latency: Duration,
) -> anyhow::Result<(Vec<f64>, u64)> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(connections * 2).build()?;
    let errors = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + duration;
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (client, through, errors) = (client.clone(), through.to_owned(), errors.clone());
            tokio::spawn(async move {
                let mut waits = Vec::new();
                while Instant::now() < end {
                    let started = Instant::now();
                    if post(&client, &through).await {
                        waits.push(started.elapsed().saturating_sub(latency).as_secs_f64() * 1000.0);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                waits
            })
        })
        .collect();
    let mut waits = Vec::new();
    for task in tasks {
        waits.extend(task.await?);
    }
    Ok((waits, errors.load(Ordering::Relaxed)))
}

/// One request from each of `connections` connections at once; the time until the last answered (or
/// gave up after `limit`), and how many answered each status ("no answer" for none).
async fn under_lock(
    through: &str,
    connections: usize,
    limit: Duration,
) -> anyhow::Result<(Duration, BTreeMap<String, usize>)> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(connections * 2).timeout(limit).build()?;
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (client, through) = (client.clone(), through.to_owned());
            tokio::spawn(async move {
                let status = send(&client, &through).await;
                (started.elapsed(), status.map_or_else(|| "no answer".to_owned(), |status| status.to_string()))
            })
        })
        .collect();
    let (mut last, mut statuses) = (Duration::ZERO, BTreeMap::new());
    for task in tasks {
        let (elapsed, status) = task.await?;
        last = last.max(elapsed);
        *statuses.entry(status).or_insert(0) += 1;
    }
    Ok((last, statuses))
}

/// POSTs the bench body with a placeholder key; true for a 200 whose body was read.
async fn post(client: &reqwest::Client, url: &str) -> bool {
    send(client, url).await == Some(200)
}

/// POSTs the bench body with a placeholder key; the status, once the body was read (`None`: no answer).
async fn send(client: &reqwest::Client, url: &str) -> Option<u16> {
    let response = client
        .post(url)
        .header("x-goog-api-key", "placeholder-not-a-key")
        .header("content-type", "application/json")
        .body(BODY)
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    response.bytes().await.ok().map(|_| status)
}

/// A mock upstream with `latency`, and a gateway with `keys` keys pointing at it, in a directory of their
/// own.
struct Rig {
    // Field order is drop order: the gateway stops before its directory goes.
    gateway: Gateway,
    _mock: MockUpstream,
    _dir: tempfile::TempDir,
    db: PathBuf,
    direct: String,
    through: String,
}

impl Rig {
    fn start(upstream: &tokio::runtime::Runtime, keys: usize, latency: Duration, wait: &str) -> anyhow::Result<Self> {
        let mock = upstream.block_on(MockUpstream::start(MockConfig { latency, ..MockConfig::default() }))?;
        let dir = tempfile::tempdir()?;
        let (keyring, connectors) = mock_setup(dir.path(), CONNECTOR, keys, mock.port())?;
        let db = dir.path().join("gateway.db");
        let gateway = Gateway::start(&keyring, &connectors, &db, wait)?;
        let (direct, through) =
            (format!("{}{ENDPOINT}", mock.url()), format!("http://{}/{CONNECTOR}{ENDPOINT}", gateway.address));
        Ok(Self { gateway, _mock: mock, _dir: dir, db, direct, through })
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.gateway.stop();
    }
}

/// An `apijongler serve` child process on a free loopback port.
struct Gateway {
    child: Child,
    address: String,
}

impl Gateway {
    fn start(keyring: &Path, connectors: &Path, db: &Path, wait: &str) -> anyhow::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["--quiet", "serve", "--listen", "127.0.0.1:0", "--wait", wait])
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

/// A user's `sqlite3` shell holding the write lock (`BEGIN IMMEDIATE`) until `release`.
struct SqliteShell {
    child: Child,
    stdin: ChildStdin,
}

impl SqliteShell {
    fn lock(db: &Path) -> anyhow::Result<Self> {
        let mut child = Command::new("sqlite3")
            .arg(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting `sqlite3` (the external-lock measurement needs it; --lock-seconds 0 skips it)")?;
        let mut stdin = child.stdin.take().context("sqlite3's stdin")?;
        writeln!(stdin, ".timeout 10000\nBEGIN IMMEDIATE;\nSELECT 'locked';")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("sqlite3's stdout")?).read_line(&mut line)?;
        if line.trim() != "locked" {
            bail!("`sqlite3` did not take the write lock");
        }
        Ok(Self { child, stdin })
    }

    fn release(mut self) -> anyhow::Result<()> {
        writeln!(self.stdin, "COMMIT;\n.quit")?;
        drop(self.stdin);
        self.child.wait()?;
        Ok(())
    }
}
