//! `apijongler demo`: the main job on a built-in mock upstream, with no keys and no network.
//!
//! A mock Gemini on 127.0.0.1 (per-key quota answered with Gemini's real 429 bodies, one bad key, an
//! occasional 503), a temporary keyring and database, and several workers sending requests through the
//! real library at once. Progress on stderr; a summary at the end, computed from the database it
//! wrote (which is kept, so its history can be looked at with `sqlite3`).

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use api_jongler::mock::{KEY_HEADER, MockConfig, MockUpstream};
use api_jongler::pool::HistoryEvent;
use api_jongler::pool::outcome::{Judged, Outcome};
use api_jongler::{Jongler, Store};
use serde_json::json;

use super::Global;

const CONNECTOR: &str = "generativelanguage.googleapis.com";
const ENDPOINT: &str = "/v1beta/models/gemini-2.5-flash:generateContent";
const KEYS: usize = 4;
const BAD_KEY: usize = 2;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// A shorter run (a few seconds), as the test suite uses.
    #[arg(long)]
    quick: bool,
}

/// What the demo asks for, per size.
struct Plan {
    workers: usize,
    requests_per_worker: usize,
    quota: u32,
    window: Duration,
}

pub fn run(global: &Global, args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let plan = if args.quick {
        Plan { workers: 4, requests_per_worker: 6, quota: 3, window: Duration::from_millis(700) }
    } else {
        Plan { workers: 6, requests_per_worker: 15, quota: 4, window: Duration::from_secs(2) }
    };
    let dir = tempfile::Builder::new().prefix("apijongler-demo-").tempdir()?.keep();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(demo(global, &plan, &dir))
}

async fn demo(global: &Global, plan: &Plan, dir: &Path) -> anyhow::Result<ExitCode> {
    let secret = |index: usize| format!("demo-fake-key-{index}-not-a-real-secret");
    let mock = MockUpstream::start(MockConfig {
        quota: Some(plan.quota),
        window: plan.window,
        latency: Duration::from_millis(20),
        bad_keys: [secret(BAD_KEY)].into(),
        overload_every: Some(9),
        ..MockConfig::default()
    })
    .await?;
    let mut ini = format!("[{CONNECTOR}]\n");
    for index in 0..KEYS {
        writeln!(ini, "key{index} = {}", secret(index))?;
    }
    std::fs::write(dir.join("keys.ini"), ini)?;
    std::fs::create_dir_all(dir.join("connectors"))?;
    let connector = json!({
        "name": CONNECTOR, "host": "127.0.0.1", "port": mock.port(), "protocol": "http",
        "api_key_header": KEY_HEADER, "api_key_prefix": "", "policy": {"backoff_ms": 50, "retries": 6},
        "model": {"path_markers": ["models", "tunedModels"], "path_segments": 1, "body_field": "model"}
    });
    std::fs::write(dir.join("connectors/gemini.json"), connector.to_string())?;
    let db = dir.join("apijongler.db");
    let jongler = Jongler::builder(CONNECTOR)
        .keyring(dir.join("keys.ini"))
        .database(&db)
        .connectors_dir(dir.join("connectors"))
        .wait(Duration::from_secs(60))
        .connect()
        .await?;

    let total = plan.workers * plan.requests_per_worker;
    if !global.quiet {
        eprintln!(
            "apijongler demo: {} workers send {total} requests through {KEYS} keys to a mock Gemini on {}",
            plan.workers,
            mock.url()
        );
        eprintln!(
            "  each key may make {} requests per {:.1} s; key{BAD_KEY} is invalid; every 9th request is a 503",
            plan.quota,
            plan.window.as_secs_f64()
        );
    }
    let started = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..plan.workers)
        .map(|_| {
            let (jongler, done, count) = (jongler.clone(), Arc::clone(&done), plan.requests_per_worker);
            tokio::spawn(async move {
                for _ in 0..count {
                    let response =
                        jongler.request("POST", ENDPOINT, r#"{"contents":[{"parts":[{"text":"hi"}]}]}"#).await?;
                    anyhow::ensure!(response.is_success(), "the mock answered {}", response.status);
                    done.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    let progress = progress(&jongler, &done, total, global.quiet);
    let mut failures = Vec::new();
    for worker in workers {
        if let Err(error) = worker.await? {
            failures.push(error.to_string());
        }
    }
    progress.abort();
    if !global.quiet && std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K");
    }
    let elapsed = started.elapsed();
    let summary = summarize(jongler.coordinator().store(), &mock, &db, total, elapsed)?;
    let mut stdout = std::io::stdout().lock();
    if global.json {
        writeln!(stdout, "{}", serde_json::to_string_pretty(&summary)?)?;
    } else {
        write_summary(&mut stdout, &summary, &db)?;
    }
    anyhow::ensure!(failures.is_empty(), "some requests failed: {}", failures.join("; "));
    Ok(ExitCode::SUCCESS)
}

/// Redraws one line on stderr (or prints a line a second when stderr is not a terminal).
fn progress(jongler: &Jongler, done: &Arc<AtomicU64>, total: usize, quiet: bool) -> tokio::task::JoinHandle<()> {
    let (jongler, done) = (jongler.clone(), Arc::clone(done));
    tokio::spawn(async move {
        if quiet {
            return;
        }
        let terminal = std::io::stderr().is_terminal();
        let period = if terminal { Duration::from_millis(200) } else { Duration::from_secs(1) };
        let mut ticker = tokio::time::interval(period);
        loop {
            ticker.tick().await;
            let Ok(states) = jongler.key_states().await else { continue };
            let line = format!(
                "requests {}/{total} done | keys: {} vacant, {} locked, {} in lockdown, {} in error",
                done.load(Ordering::Relaxed),
                states.vacant.len(),
                states.locked.len(),
                states.lockdown.len(),
                states.error.len()
            );
            if terminal {
                eprint!("\r\x1b[2K{line}");
            } else {
                eprintln!("{line}");
            }
        }
    })
}

/// The figures, read back from the database the demo wrote and from what the mock saw.
fn summarize(
    store: &Store,
    mock: &MockUpstream,
    db: &Path,
    total: usize,
    elapsed: Duration,
) -> anyhow::Result<serde_json::Value> {
    let attempts = store.attempts(Some(CONNECTOR))?;
    let history = store.history(&api_jongler::pool::HistoryQuery::default())?;
    let count = |outcome: Outcome| attempts.iter().filter(|a| a.outcome == outcome).count();
    // Per event, not per state: a lockdown of one model leaves its key vacant.
    let lockdowns: Vec<_> = history.iter().filter(|t| t.event == HistoryEvent::LockedDown).collect();
    let errors: Vec<_> =
        history.iter().filter(|t| t.event == HistoryEvent::Errored).map(|t| t.key_name.clone()).collect();
    let (_, per_key) = mock.stats();
    let early: u64 = per_key.values().map(|stats| stats.before_deadline).sum();
    let blamed_for_overload = history
        .iter()
        .filter(|t| {
            t.http_status == Some(503)
                && matches!(t.event, HistoryEvent::LockedDown | HistoryEvent::ScopeLockedDown | HistoryEvent::Errored)
        })
        .count();
    Ok(json!({
        "requests": total,
        "succeeded": count(Outcome::SUCCESS),
        "attempts": attempts.len(),
        "rate_limited": count(Outcome::Answered(Judged::RateLimited)),
        "lockdowns": lockdowns.len(),
        "requests_before_deadline": early,
        "bad_keys": errors,
        "bad_key_attempts": count(Outcome::Answered(Judged::BadKey)),
        "overloads": count(Outcome::Answered(Judged::ProviderError)),
        "keys_blamed_for_overloads": blamed_for_overload,
        "seconds": elapsed.as_secs_f64(),
        "database": db.display().to_string(),
    }))
}

fn write_summary(out: &mut impl Write, s: &serde_json::Value, db: &Path) -> std::io::Result<()> {
    writeln!(
        out,
        "\napijongler demo: {} requests in {:.1} s",
        s["requests"],
        s["seconds"].as_f64().unwrap_or_default()
    )?;
    writeln!(
        out,
        "  succeeded:       {} of {} ({} upstream attempts in all)",
        s["succeeded"], s["requests"], s["attempts"]
    )?;
    writeln!(
        out,
        "  rate limits:     {} answers 429, each a lockdown until the deadline the upstream gave ({} lockdowns); {} requests reached a key before its deadline",
        s["rate_limited"], s["lockdowns"], s["requests_before_deadline"]
    )?;
    let bad: Vec<&str> = s["bad_keys"].as_array().into_iter().flatten().filter_map(|key| key.as_str()).collect();
    writeln!(
        out,
        "  bad key:         {} put in error after {} request(s), never used again",
        bad.join(", "),
        s["bad_key_attempts"]
    )?;
    writeln!(
        out,
        "  overloads:       {} answers 503, retried with backoff; keys blamed for them: {}",
        s["overloads"], s["keys_blamed_for_overloads"]
    )?;
    let db = db.display();
    writeln!(out, "\nThe history it wrote is in {db}; look at it with:")?;
    writeln!(
        out,
        "  sqlite3 {db} \"SELECT datetime(at/1000,'unixepoch','localtime'), key_name, from_state, to_state, reason FROM history ORDER BY id\""
    )?;
    writeln!(out, "  sqlite3 {db} \"SELECT key_name, outcome, count(*) FROM requests GROUP BY 1, 2\"")?;
    writeln!(out, "  APIJONGLER_DB={db} apijongler status")?;
    Ok(())
}
