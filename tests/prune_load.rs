//! The README's measurement of retention under load (ignored: it takes about a minute, and its figures
//! are read, not asserted, since a loaded 2-core machine decides them):
//!
//! `cargo test --release --test prune_load -- --ignored --nocapture`
//!
//! A database with 1,000,000 history rows older than 30 days; 16 worker processes claim and release
//! keys for 20 s, once alone and once while `apijongler db prune --older-than 30d` runs in another
//! process. It prints each run's claim latencies (p50, p99, p99.9, max) and the prune's figures.

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{Sandbox, wait_success};

const WORKERS: usize = 16;
const KEYS: usize = 32;
const ROWS: i64 = 1_000_000;
/// Long enough for the prune to end within the run on a 2-core machine.
const RUN_MS: i64 = 20_000;

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// 16 workers cycling keys for [`RUN_MS`] from `start`; their claim latencies, in µs, sorted.
fn workers(sandbox: &Sandbox, start: i64) -> Vec<Child> {
    (0..WORKERS)
        .map(|_| {
            sandbox
                .worker("bench")
                // The workers must not prune themselves: only the measured prune does.
                .env("APIJONGLER_RETENTION", "forever")
                .args(["--start-at-ms", &start.to_string(), "--duration-ms", &RUN_MS.to_string()])
                .args(["--hold-max-us", "1000", "--latencies"])
                .stdout(Stdio::piped())
                .spawn()
                .expect("start a worker")
        })
        .collect()
}

fn latencies(children: Vec<Child>) -> Vec<u64> {
    let mut all: Vec<u64> = children
        .into_iter()
        .flat_map(|child| {
            let out = wait_success(child);
            let line = out.lines().find_map(|line| line.strip_prefix("latencies_us ")).unwrap_or_default().to_owned();
            line.split_whitespace().map(|n| n.parse::<u64>().expect("µs")).collect::<Vec<_>>()
        })
        .collect();
    all.sort_unstable();
    all
}

fn summary(name: &str, sorted: &[u64]) -> String {
    let at = |q: f64| sorted[((sorted.len() as f64 - 1.0) * q) as usize] as f64 / 1000.0;
    format!(
        "{name}: {} claims, p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms",
        sorted.len(),
        at(0.5),
        at(0.99),
        at(0.999),
        at(1.0)
    )
}

#[test]
#[ignore = "a measurement for the README: cargo test --release --test prune_load -- --ignored --nocapture"]
fn prune_a_million_rows_while_16_processes_claim() {
    let sandbox = Sandbox::new("bench", KEYS);
    // The keys in the database, and its schema.
    drop(sandbox.coordinator(sandbox.options()));
    let old = now_ms() - 40 * 86_400_000;
    let filled = Instant::now();
    sandbox
        .sql()
        .batch(&format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {ROWS})
             INSERT INTO history (at, connector, key_name, fingerprint, from_state, to_state, reason, event, lease)
             SELECT {old} + i, 'bench', 'key' || (i % {KEYS}), 'ffffffff', 'vacant', 'locked', 'claimed', 'claimed', i FROM n;"
        ))
        .expect("a million old rows");
    eprintln!("filled {ROWS} history rows in {:?}", filled.elapsed());

    let start = now_ms() + 1_000;
    let alone = latencies(workers(&sandbox, start));

    let start = now_ms() + 1_000;
    let children = workers(&sandbox, start);
    std::thread::sleep(Duration::from_millis(u64::try_from(start - now_ms() + 500).unwrap_or(0)));
    let pruning = Instant::now();
    let prune = sandbox.apijongler().args(["--json", "db", "prune", "--older-than", "30d"]).output().expect("prune");
    let took = pruning.elapsed();
    assert!(prune.status.success(), "{}", String::from_utf8_lossy(&prune.stderr));
    let with_prune = latencies(children);
    let report: serde_json::Value = serde_json::from_slice(&prune.stdout).expect("json");
    assert_eq!(report["history"].as_i64(), Some(ROWS), "{report}");

    eprintln!("{}", summary("claims alone           ", &alone));
    eprintln!("{}", summary("claims during the prune", &with_prune));
    eprintln!(
        "prune: {} rows in {:.1} s, {} batches, the longest held the write lock {} ms{}",
        report["history"],
        took.as_secs_f64(),
        report["batches"],
        report["longest_batch_ms"],
        if took.as_millis() as i64 > RUN_MS { " (it outlasted the workers' run)" } else { "" }
    );
    let worst = |sorted: &[u64]| *sorted.last().expect("claims") as i64;
    eprintln!("max claim latency, during minus alone: {:.1} ms", (worst(&with_prune) - worst(&alone)) as f64 / 1000.0);
}
