//! The terminal side of "see the pool": `status` one line per key at a fixed width, `status --watch`
//! redrawing when another process changes the pool, `usage` equal to what the mock saw, and retention
//! (`db prune`, `APIJONGLER_RETENTION`) deleting only rows past it.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::process::{Output, Stdio};
use std::time::Duration;

use api_jongler::mock::{MockConfig, MockUpstream};
use common::Sandbox;
use serde_json::Value;

const GEMINI: &str = "generativelanguage.googleapis.com";
const ENDPOINT: &str = "/v1beta/models/gemini-2.5-flash:generateContent";
/// A body with some text: its token estimate is above zero, so its answer's count is recorded.
const BODY: &str = r#"{"contents":[{"parts":[{"text":"How many keys does a pool need for a day of requests?"}]}]}"#;
const LONG_KEY: &str = "a-rather-long-key-name-that-a-team-might-use";

fn run(sandbox: &Sandbox, envs: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = sandbox.apijongler();
    command.env("APIJONGLER_CONNECTORS", sandbox.connectors_dir()).envs(envs.iter().copied()).args(args);
    command.output().expect("run apijongler")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn ok(output: &Output) -> String {
    assert!(output.status.success(), "stdout: {}\nstderr: {}", text(&output.stdout), text(&output.stderr));
    text(&output.stdout)
}

/// Six keys of Gemini (whose connector name alone is 33 columns), one in error with a long reason, one
/// locked down for a model by its group, one held by this process, one with a long name.
fn busy_pool() -> (Sandbox, api_jongler::Coordinator, api_jongler::Lease) {
    let mut ini = format!("[{GEMINI}]\n");
    for index in 0..5 {
        ini.push_str(&format!("key{index} = fake-secret-{index}-do-not-use\n"));
    }
    ini.push_str(&format!(
        "{LONG_KEY} = fake-secret-long-do-not-use\n[{GEMINI} groups]\nkey2 = my-project\nkey3 = my-project\n\
         [{GEMINI} limits]\ngemini-2.5-flash = 10/min, 250000 tokens/min, 250/day\n"
    ));
    let sandbox = Sandbox::with_keyring(&ini);
    let coordinator = sandbox.coordinator(sandbox.options());
    let lease = coordinator.claim(GEMINI, &[], Duration::from_secs(5)).expect("claim a key");
    // A reservation, so that `status` has limits in use to show (their lines must fit the width too).
    let flash = coordinator.claim_for(GEMINI, Some("gemini-2.5-flash"), &[], Duration::ZERO).expect("room");
    flash.release().expect("release");
    let now = coordinator.now_ms();
    let until = now + 3_600_000;
    sandbox
        .sql()
        .batch(&format!(
            "UPDATE keys SET state = 'error', http_status = 400,
                    reason = '400 API key not valid. Please pass a valid API key. (INVALID_ARGUMENT, API_KEY_INVALID)'
              WHERE key_name = 'key1';
             INSERT INTO lockdowns (connector, scope, model, until, quota_id, reason, http_status, set_by_key, set_at)
             VALUES ('{GEMINI}', 'group:my-project', 'gemini-2.5-pro', {until},
                     'GenerateRequestsPerDayPerProjectPerModel-FreeTier',
                     '429 You exceeded your current quota, please check your plan and billing details.', 429, 'key2', {now});"
        ))
        .expect("set the pool up");
    (sandbox, coordinator, lease)
}

#[test]
fn status_is_one_line_per_key_within_the_terminals_width() {
    let (sandbox, _coordinator, lease) = busy_pool();
    let names: Vec<String> = (0..5).map(|i| format!("key{i}")).chain([LONG_KEY.to_owned()]).collect();
    for width in [100, 80] {
        let columns = width.to_string();
        let out = ok(&run(&sandbox, &[("COLUMNS", &columns)], &["status"]));
        for line in out.lines() {
            assert!(line.chars().count() <= width, "a line wider than {width}: {line:?} in\n{out}");
        }
        // The table: one line per key. A long name is cut in the middle, so it keeps its start and its
        // end (two names must never look alike by their start alone).
        let table: Vec<&str> = out.lines().take_while(|line| !line.starts_with("Lockdowns")).collect();
        for name in &names {
            let (start, end): (String, String) =
                (name.chars().take(6).collect(), name.chars().skip(name.len().saturating_sub(6)).collect());
            let lines = table
                .iter()
                .filter_map(|line| line.split_whitespace().next())
                .filter(|first| first.starts_with(&start) && first.ends_with(&end))
                .count();
            assert_eq!(lines, 1, "{name} at {width} columns:\n{out}");
        }
        let row =
            |name: &str| *table.iter().find(|line| line.trim_start().starts_with(&format!("{name} "))).expect(name);
        assert!(row("key1").contains(" error "), "{out}");
        assert!(row("key2").contains("gemini-2.5-pro"), "{out}");
        assert!(row(lease.key_name()).contains(&format!("pid {}", std::process::id())), "the holder: {out}");
        assert!(out.contains("API key not valid"), "a key in error says why below the table: {out}");
        let words = out.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(words.contains("gemini-2.5-flash: 1/10 this minute (10/min, declared)"), "the limits in use: {out}");
    }
    // The details stay one flag away.
    let long = ok(&run(&sandbox, &[("COLUMNS", "100")], &["status", "--long"]));
    assert!(long.contains("last reason") && long.lines().any(|line| line.chars().count() > 100), "{long}");
}

#[test]
fn status_watch_redraws_when_another_process_changes_the_pool() {
    let (sandbox, _coordinator, _lease) = busy_pool();
    let mut child = common::KillOnDrop(
        sandbox
            .apijongler()
            .args(["status", "--watch"])
            .env("COLUMNS", "100")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start status --watch"),
    );
    let mut stdout = child.stdout.take().expect("stdout");
    let (sender, frames) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut buffer = [0; 8192];
        while let Ok(read) = stdout.read(&mut buffer) {
            if read == 0 || sender.send(String::from_utf8_lossy(&buffer[..read]).into_owned()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let wait_for = |what: &str, seen: &mut String| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !seen.contains(what) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            seen.push_str(&frames.recv_timeout(left).unwrap_or_else(|_| panic!("no {what:?} in: {seen}")));
        }
    };
    wait_for("Ctrl-C to stop", &mut seen);
    assert!(seen.starts_with("\x1b[H\x1b[2J"), "each frame is drawn from the top of a cleared screen");
    seen.clear();
    // Another process (a user's sqlite3) puts key4 in error.
    let status = std::process::Command::new("sqlite3")
        .arg(&sandbox.db)
        .arg("UPDATE keys SET state = 'error', reason = 'watched-change' WHERE key_name = 'key4';")
        .status()
        .expect("sqlite3");
    assert!(status.success());
    wait_for("watched-change", &mut seen);
}

/// The mock's keys are its secrets; the pool names them key0.. in keyring order.
fn key_of(secret: &str) -> String {
    let index = secret.trim_start_matches(&format!("fake-secret-{GEMINI}-")).trim_end_matches("-do-not-use");
    format!("key{index}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_equals_what_the_mock_saw() {
    let bad = format!("fake-secret-{GEMINI}-2-do-not-use");
    let config = MockConfig {
        quota: Some(3),
        window: Duration::from_secs(3600),
        bad_keys: [bad].into(),
        overload_every: Some(4),
        ..MockConfig::default()
    };
    let mock = MockUpstream::start(config).await.expect("mock");
    // A token limit far from binding, so that the answers' token counts are read and recorded.
    let mut ini = format!("[{GEMINI}]\n");
    for index in 0..3 {
        ini.push_str(&format!("key{index} = fake-secret-{GEMINI}-{index}-do-not-use\n"));
    }
    ini.push_str(&format!("[{GEMINI} limits]\ngemini-2.5-flash = 1000000 tokens/min\n"));
    let sandbox = Sandbox::with_keyring(&ini);
    sandbox.point_connector(GEMINI, "127.0.0.1", mock.port(), serde_json::json!({"backoff_ms": 1, "retries": 1}));
    for _ in 0..10 {
        // Some end with no key left (their keys in lockdown or error): every attempt still counts.
        let mut command = sandbox.apijongler();
        command
            .env("APIJONGLER_CONNECTORS", sandbox.connectors_dir())
            .args([GEMINI, "POST", ENDPOINT, BODY, "--wait", "0"]);
        tokio::task::spawn_blocking(move || command.output()).await.expect("join").expect("run");
    }
    let (total, seen) = mock.stats();
    assert!(total >= 10, "{total}");
    let answer: Value =
        serde_json::from_str(&ok(&run(&sandbox, &[], &["usage", "--json", "--by", "key"]))).expect("json");
    let rows: HashMap<String, &Value> = answer["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|row| (row["key"].as_str().expect("key").to_owned(), row))
        .collect();
    let mut counted = 0;
    for (secret, stats) in &seen {
        let row = rows.get(&key_of(secret)).unwrap_or_else(|| panic!("no usage row for {}: {answer}", key_of(secret)));
        let figures = |name: &str| row[name].as_u64().expect(name);
        assert_eq!(figures("successes"), stats.ok, "{}: {answer}", key_of(secret));
        assert_eq!(figures("rate_limited"), stats.rate_limited, "{}: {answer}", key_of(secret));
        assert_eq!(figures("errors"), stats.invalid + stats.overloaded, "{}: {answer}", key_of(secret));
        assert_eq!(figures("requests"), stats.ok + stats.rate_limited + stats.invalid + stats.overloaded);
        counted += figures("requests");
        // The mock's every success says `promptTokenCount: 5`; its errors say none.
        assert_eq!(row["tokens"].as_u64(), (stats.ok > 0).then_some(5 * stats.ok), "{}: {answer}", key_of(secret));
    }
    assert_eq!(counted, total, "every request the mock saw, once");
    assert!(seen.values().any(|stats| stats.rate_limited > 0) && seen.values().any(|stats| stats.invalid > 0));
    // Per model and per group: the same total; the table says the same in words.
    for by in ["model", "group"] {
        let answer: Value =
            serde_json::from_str(&ok(&run(&sandbox, &[], &["usage", "--json", "--by", by]))).expect("json");
        let sum: u64 =
            answer["rows"].as_array().expect("rows").iter().map(|row| row["requests"].as_u64().expect("n")).sum();
        assert_eq!(sum, total, "--by {by}: {answer}");
    }
    let table = ok(&run(&sandbox, &[], &["usage", "--by", "model"]));
    assert!(table.contains("gemini-2.5-flash") && table.contains("429"), "{table}");
    let nothing = ok(&run(&sandbox, &[], &["usage", "--since", "1ms"]));
    assert!(nothing.contains("No requests"), "{nothing}");
    let refused = run(&sandbox, &[], &["usage", "--by", "keys"]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("--by keys"), "{}", text(&refused.stderr));
}

/// Rows `days` old: history and requests, as an old database has them.
fn age_rows(sandbox: &Sandbox, count: usize, days: i64) {
    let at = now_ms() - days * 86_400_000;
    sandbox
        .sql()
        .batch(&format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count})
             INSERT INTO history (at, connector, key_name, fingerprint, from_state, to_state, reason, event)
             SELECT {at} + i, '{GEMINI}', 'key0', 'ffffffff', 'vacant', 'locked', 'old', 'claimed' FROM n;
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count})
             INSERT INTO requests (at, connector, key_name, method, endpoint, status, latency_ms, outcome)
             SELECT {at} + i, '{GEMINI}', 'key0', 'POST', '/x', 200, 1, 'success' FROM n;"
        ))
        .expect("old rows");
}

#[test]
fn prune_deletes_only_rows_past_the_cutoff_and_retention_applies_itself() {
    let sandbox = Sandbox::new(GEMINI, 2);
    assert!(run(&sandbox, &[], &["cleanup", "--all"]).status.success());
    let fresh = sandbox.count("SELECT count(*) FROM history");
    age_rows(&sandbox, 1200, 40);
    age_rows(&sandbox, 7, 10);
    let out: Value = serde_json::from_str(&ok(&run(&sandbox, &[], &["--json", "db", "prune", "--older-than", "30d"])))
        .expect("json");
    assert_eq!((out["history"].as_u64(), out["requests"].as_u64()), (Some(1200), Some(1200)), "{out}");
    assert!(out["batches"].as_u64().expect("batches") >= 6, "in batches of at most 500 rows: {out}");
    assert_eq!(sandbox.count("SELECT count(*) FROM history"), fresh + 7, "newer rows are kept");
    assert_eq!(sandbox.count("SELECT count(*) FROM requests"), 7);
    let refused = run(&sandbox, &[], &["db", "prune", "--older-than", "soon"]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));

    // Automatic: a process that uses the keyring prunes past APIJONGLER_RETENTION (here 5 days)...
    let kept = [("APIJONGLER_RETENTION", "forever")];
    assert!(run(&sandbox, &kept, &["cleanup", "--all"]).status.success());
    assert_eq!(sandbox.count("SELECT count(*) FROM requests"), 7, "forever keeps every row");
    // Rows less than a day past retention wait for the day's prune (so that not every process of a
    // pool in steady use prunes): the 10-day-old rows under 228 h (9.5 days) stay. A prune of 7 rows
    // would have run inline, before the process exited.
    assert!(run(&sandbox, &[("APIJONGLER_RETENTION", "228h")], &["cleanup", "--all"]).status.success());
    assert_eq!(sandbox.count("SELECT count(*) FROM requests"), 7, "less than a day past retention");
    assert!(run(&sandbox, &[("APIJONGLER_RETENTION", "5d")], &["cleanup", "--all"]).status.success());
    common::wait_until(Duration::from_secs(30), "the retention thread's prune", || {
        sandbox.count("SELECT count(*) FROM requests") == 0
    });
    assert_eq!(sandbox.count("SELECT count(*) FROM history WHERE reason = 'old'"), 0);
    let bad = run(&sandbox, &[("APIJONGLER_RETENTION", "0")], &["status"]);
    assert_eq!(bad.status.code(), Some(5), "a bad setting is a configuration error: {}", text(&bad.stderr));
    assert!(text(&bad.stderr).contains("APIJONGLER_RETENTION"), "{}", text(&bad.stderr));
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}
