//! The real `apijongler` binary, each subcommand and the seed's forms, with a temporary database and
//! keyring and an empty environment: outputs (JSON parsed and checked), messages and exit codes.

mod common;

use std::process::Output;

use api_jongler::mock::{MockConfig, MockUpstream};
use common::Sandbox;
use serde_json::Value;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

const GEMINI: &str = "generativelanguage.googleapis.com";
const ENDPOINT: &str = "/v1beta/models/gemini-2.5-flash:generateContent";

/// A sandbox whose Gemini connector points at 127.0.0.1:`port` over HTTP.
fn sandbox(keys: usize, port: u16) -> Sandbox {
    let sandbox = Sandbox::new(GEMINI, keys);
    sandbox.point_connector(GEMINI, "127.0.0.1", port, serde_json::json!({"backoff_ms": 5, "retries": 1}));
    sandbox
}

/// Runs the binary (off the async threads) with the sandbox's environment and connector directory.
async fn run(sandbox: &Sandbox, args: &[&str]) -> Output {
    let mut command = sandbox.apijongler();
    command.env("APIJONGLER_CONNECTORS", sandbox.connectors_dir()).args(args);
    tokio::task::spawn_blocking(move || command.output()).await.expect("join").expect("run apijongler")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
fn assert_exit(output: &Output, code: i32) {
    assert_eq!(output.status.code(), Some(code), "stdout: {}\nstderr: {}", text(&output.stdout), text(&output.stderr));
}

fn json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", text(&output.stdout)))
}

/// The error message of a failed command: one line on stderr that starts with `apijongler:`.
#[track_caller]
fn one_line_error(output: &Output) -> String {
    let stderr = text(&output.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|line| line.starts_with("apijongler:")).collect();
    assert_eq!(lines.len(), 1, "one error line: {stderr}");
    lines[0].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_form_prints_the_body_on_stdout_and_the_status_on_stderr() {
    let mock = MockUpstream::start(MockConfig::default()).await.expect("mock");
    let sandbox = sandbox(2, mock.port());
    let output = run(&sandbox, &[GEMINI, "POST", ENDPOINT, r#"{"contents":[]}"#, "--pretty"]).await;
    assert_exit(&output, 0);
    let body = json(&output);
    assert_eq!(body["candidates"][0]["finishReason"], "STOP");
    assert!(text(&output.stdout).contains("\n  "), "indented by --pretty");
    assert!(text(&output.stderr).contains("Status Code: 200"), "{}", text(&output.stderr));

    let output = run(&sandbox, &["--json", GEMINI, "post", ENDPOINT, "{}"]).await;
    assert_exit(&output, 0);
    let record = json(&output);
    assert_eq!((record["status"].as_u64(), record["attempts"].as_u64()), (Some(200), Some(1)));
    assert!(record["key"].as_str().is_some_and(|key| key.starts_with("key")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_exit_code_comes_from_a_real_situation() {
    // 3: the upstream answered non-2xx (the body still goes to stdout).
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(404)
                .set_body_raw(r#"{"error":{"code":404,"status":"NOT_FOUND"}}"#, "application/json"),
        )
        .mount(&server)
        .await;
    let missing = sandbox(1, server.address().port());
    let output = run(&missing, &[GEMINI, "POST", "/v1beta/models/nope:generateContent", "{}"]).await;
    assert_exit(&output, 3);
    assert!(text(&output.stdout).contains("NOT_FOUND"));
    assert!(one_line_error(&output).contains("answered 404"));

    // 4: no key free within --wait (the only key is held by someone alive: this test process).
    let mock = MockUpstream::start(MockConfig::default()).await.expect("mock");
    let busy = sandbox(1, mock.port());
    let coordinator = busy.coordinator(busy.options());
    let held = coordinator.claim(GEMINI, &[], std::time::Duration::ZERO).expect("hold the key");
    let output = run(&busy, &[GEMINI, "POST", ENDPOINT, "{}", "--wait", "300ms"]).await;
    assert_exit(&output, 4);
    let message = one_line_error(&output);
    assert!(message.contains("1 locked") && message.contains("wait longer"), "{message}");
    held.release().expect("release");

    // 5: configuration (no keyring; an unknown connector).
    let output = run(&busy, &["--config", "/nonexistent/keys.ini", GEMINI, "POST", ENDPOINT, "{}"]).await;
    assert_exit(&output, 5);
    assert!(one_line_error(&output).contains("/nonexistent/keys.ini"));
    let output = run(&busy, &["gemini", "POST", ENDPOINT, "{}"]).await;
    assert_exit(&output, 5);
    let message = one_line_error(&output);
    assert!(message.contains("unknown connector 'gemini'") && message.contains(GEMINI), "{message}");

    // 6: the database path holds something that is not a database (a file check: a PostgreSQL
    // database has no path, and the directory made here would be named after its URL).
    if !common::sqlite_only("the database file holds something else") {
        let foreign = sandbox(1, mock.port());
        std::fs::create_dir_all(foreign.db.parent().expect("parent")).expect("mkdir");
        std::fs::write(&foreign.db, "not a database ".repeat(100)).expect("write");
        let output = run(&foreign, &["status"]).await;
        assert_exit(&output, 6);
        assert!(one_line_error(&output).contains("not an apijongler database"));
    }

    // 7: no answer (nothing listens on the port).
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let unreachable = sandbox(1, port);
    let output = run(&unreachable, &[GEMINI, "POST", ENDPOINT, "{}"]).await;
    assert_exit(&output, 7);
    assert!(one_line_error(&output).contains("no answer"));

    // 2: usage.
    let output = run(&busy, &[GEMINI, "POST"]).await;
    assert_exit(&output, 2);
    assert!(one_line_error(&output).contains("endpoint are required"));
    let output = run(&busy, &[GEMINI, "POST", ENDPOINT, "{not json"]).await;
    assert_exit(&output, 2);
    assert!(one_line_error(&output).contains("BODY is not valid JSON"));
    let output = run(&busy, &["why", GEMINI, "key9"]).await;
    assert_exit(&output, 2);
    assert!(one_line_error(&output).contains("its keys are: key0"));
    let output = run(&busy, &["history", "--since", "yesterday"]).await;
    assert_exit(&output, 2);
    assert!(one_line_error(&output).contains("--since 'yesterday' is not a duration"));
    let output = run(&busy, &[GEMINI, "POST", ENDPOINT, "{}", "--wait", "forever"]).await;
    assert_exit(&output, 2);
    assert!(one_line_error(&output).contains("write it like 30s"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_history_and_why_explain_the_keys() {
    let bad = format!("fake-secret-{GEMINI}-1-do-not-use");
    let mock = MockUpstream::start(MockConfig { bad_keys: [bad].into(), ..MockConfig::default() }).await.expect("mock");
    let sandbox = sandbox(3, mock.port());
    for _ in 0..3 {
        assert_exit(&run(&sandbox, &[GEMINI, "POST", ENDPOINT, "{}"]).await, 0);
    }

    let output = run(&sandbox, &["status", GEMINI, "--json"]).await;
    assert_exit(&output, 0);
    let rows = json(&output);
    let rows = rows.as_array().expect("array");
    assert_eq!(rows.len(), 3);
    let key1 = rows.iter().find(|row| row["key"] == "key1").expect("key1");
    assert_eq!(key1["state"], "error");
    assert_eq!(key1["http_status"], 400);
    assert!(rows.iter().all(|row| row["fingerprint"].as_str().is_some_and(|f| f.len() == 8)));
    let table = run(&sandbox, &["status"]).await;
    assert_exit(&table, 0);
    assert!(text(&table.stdout).contains("invalid API key"), "{}", text(&table.stdout));

    let output = run(&sandbox, &["history", "--key", "key1", "--since", "1h", "--json"]).await;
    assert_exit(&output, 0);
    let history = json(&output);
    let history = history.as_array().expect("array");
    assert_eq!((history[0]["event"].as_str(), history[0]["to"].as_str()), (Some("errored"), Some("error")), "newest");
    assert_eq!(history.last().expect("oldest")["event"], "added");
    let limited = json(&run(&sandbox, &["history", "--limit", "2", "--json"]).await);
    assert_eq!(limited.as_array().map(Vec::len), Some(2));
    // The table shows the event too: `errored` is no state and no reason, only an event.
    let table = text(&run(&sandbox, &["history", "--key", "key1"]).await.stdout);
    assert!(table.contains("event") && table.contains("errored"), "{table}");

    let output = run(&sandbox, &["why", GEMINI, "key1"]).await;
    assert_exit(&output, 0);
    let why = text(&output.stdout);
    assert!(why.contains("is in error") && why.contains("apijongler cleanup"), "{why}");
    let output = run(&sandbox, &["why", GEMINI, "key0"]).await;
    assert!(text(&output.stdout).contains("is vacant"), "{}", text(&output.stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_in_both_forms_reports_what_it_changed() {
    let bad = format!("fake-secret-{GEMINI}-0-do-not-use");
    let mock = MockUpstream::start(MockConfig { bad_keys: [bad].into(), ..MockConfig::default() }).await.expect("mock");
    let sandbox = sandbox(2, mock.port());
    assert_exit(&run(&sandbox, &[GEMINI, "POST", ENDPOINT, "{}"]).await, 0);

    let output = run(&sandbox, &["cleanup", GEMINI, "--json"]).await;
    assert_exit(&output, 0);
    let changed = json(&output);
    assert_eq!(changed[0]["key"], "key0");
    assert_eq!((changed[0]["from"].as_str(), changed[0]["to"].as_str()), (Some("error"), Some("vacant")));

    assert_exit(&run(&sandbox, &[GEMINI, "POST", ENDPOINT, "{}"]).await, 0);
    let output = run(&sandbox, &["--cleanup", GEMINI]).await;
    assert_exit(&output, 0);
    assert!(text(&output.stdout).contains("key0: error -> vacant"), "{}", text(&output.stdout));
    let output = run(&sandbox, &["--cleanup-all"]).await;
    assert_exit(&output, 0);
    assert!(text(&output.stdout).contains("Cleanup completed: 0 keys changed"), "{}", text(&output.stdout));
    assert_exit(&run(&sandbox, &["cleanup"]).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connectors_db_version_and_completions() {
    let sandbox = sandbox(1, 9);
    let output = run(&sandbox, &["connectors", "--json"]).await;
    assert_exit(&output, 0);
    let connectors = json(&output);
    let gemini = connectors.as_array().expect("array").iter().find(|c| c["name"] == GEMINI).expect("gemini");
    assert_eq!(gemini["base_url"], "http://127.0.0.1:9", "the user's file overrides the shipped one");
    assert!(gemini["origin"].as_str().is_some_and(|o| o.ends_with(&format!("{GEMINI}.json"))));
    let hf = connectors.as_array().expect("array").iter().find(|c| c["name"] == "router.huggingface.co").expect("hf");
    assert_eq!((hf["key"].as_str(), hf["origin"].as_str()), (Some("Authorization: Bearer <key>"), Some("built in")));

    let output = run(&sandbox, &["db", "--path"]).await;
    assert_exit(&output, 0);
    assert_eq!(text(&output.stdout).trim(), sandbox.db.display().to_string());
    let output = run(&sandbox, &["db", "--json"]).await;
    assert_eq!(json(&output)["schema_version"], api_jongler::store::SCHEMA_VERSION);
    let output = run(&sandbox, &["db"]).await;
    assert!(text(&output.stdout).contains("SELECT"), "example queries");

    let output = run(&sandbox, &["--version"]).await;
    assert_exit(&output, 0);
    assert!(text(&output.stdout).starts_with("apijongler "));
    let output = run(&sandbox, &["completions", "bash"]).await;
    assert_exit(&output, 0);
    assert!(text(&output.stdout).contains("_apijongler"));
}

/// `worker` is plumbing for `bench` and the multi-process tests: help hides it, and so must the
/// completions, which clap_complete fills with hidden subcommands too.
#[test]
fn the_hidden_worker_is_in_neither_help_nor_completions() {
    let sandbox = Sandbox::new(GEMINI, 1);
    let names_worker = |line: &str| line.split(|c: char| !c.is_ascii_alphanumeric()).any(|word| word == "worker");
    let shells = ["bash", "zsh", "fish", "elvish", "powershell"];
    let completions = shells.map(|shell| vec!["completions", shell]);
    for args in [vec!["help"], vec!["--help"]].into_iter().chain(completions) {
        let output = sandbox.apijongler().args(&args).output().expect("run apijongler");
        assert_exit(&output, 0);
        let stdout = text(&output.stdout);
        assert!(stdout.contains("bench"), "{args:?} lists the visible subcommands: {stdout}");
        let offending: Vec<&str> = stdout.lines().filter(|line| names_worker(line)).collect();
        assert!(offending.is_empty(), "{args:?} offers `worker`:\n{}", offending.join("\n"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_and_its_summary_matches_the_history_it_wrote() {
    let sandbox = Sandbox::new(GEMINI, 1);
    let output = run(&sandbox, &["demo", "--quick", "--json"]).await;
    assert_exit(&output, 0);
    let summary = json(&output);
    assert_eq!(summary["succeeded"], summary["requests"], "every request got through");
    assert_eq!(summary["requests_before_deadline"], 0);
    assert_eq!(summary["keys_blamed_for_overloads"], 0);
    assert_eq!(summary["bad_keys"], serde_json::json!(["key2"]));
    let db = summary["database"].as_str().expect("database path");
    let connection = rusqlite::Connection::open(db).expect("open the demo's database");
    let count = |sql: &str| -> i64 { connection.query_row(sql, [], |row| row.get(0)).expect(sql) };
    assert_eq!(count("SELECT count(*) FROM requests"), summary["attempts"].as_i64().expect("attempts"));
    assert_eq!(
        count("SELECT count(*) FROM requests WHERE outcome = 'success'"),
        summary["succeeded"].as_i64().expect("ok")
    );
    assert_eq!(
        count("SELECT count(*) FROM history WHERE event = 'locked_down'"),
        summary["lockdowns"].as_i64().expect("n")
    );
    assert_eq!(count("SELECT count(*) FROM requests WHERE status = 429"), summary["rate_limited"].as_i64().expect("n"));
    assert!(summary["rate_limited"].as_i64().expect("n") > 0, "the quota was reached");
    assert!(summary["lockdowns"].as_i64().expect("n") > 0, "each 429 locked a model down");
    assert_eq!(count("SELECT count(*) FROM requests WHERE key_name = 'key2'"), 1, "the bad key was used once");
    assert_eq!(count("SELECT count(*) FROM keys WHERE state = 'error'"), 1);
    assert!(summary["overloads"].as_i64().expect("n") > 0, "some 503s happened");
    drop(connection);
    std::fs::remove_dir_all(std::path::Path::new(db).parent().expect("demo dir")).expect("remove the demo's files");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_benchmarks_run() {
    // Only that they run and print their tables: their figures are for the README, not for assertions.
    let sandbox = Sandbox::new(GEMINI, 1);
    let keys = ["-q", "bench", "keys", "--processes", "2", "--keys", "4", "--locked-keys", "10", "--seconds", "0.3"];
    let output = run(&sandbox, &keys).await;
    assert_exit(&output, 0);
    let table = text(&output.stdout);
    assert!(table.contains(" raw ") && table.contains(" 10* ") && table.lines().count() == 6, "{table}");
    let output = run(
        &sandbox,
        &["bench", "requests", "--requests", "20", "--keys", "2", "--quota", "2", "--window", "0.3", "--windows", "2"],
    )
    .await;
    assert_exit(&output, 0);
    assert!(text(&output.stdout).contains("goodput"), "{}", text(&output.stdout));
}

/// A JSON body of more than `bytes` bytes, like a request with an inline image.
fn large_body(bytes: usize) -> String {
    let data: String = (0..bytes).map(|index| char::from(b'A' + (index % 26) as u8)).collect();
    format!(
        r#"{{"contents":[{{"parts":[{{"inline_data":{{"mime_type":"image/png","data":"{data}"}}}},{{"text":"What is this?"}}]}}]}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_from_a_file_or_standard_input_reaches_the_upstream_byte_for_byte() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(r#"{"candidates":[]}"#, "application/json"))
        .mount(&server)
        .await;
    let sandbox = sandbox(1, server.address().port());
    let body = large_body(1_500_000);
    let file = sandbox.dir.path().join("request.json");
    std::fs::write(&file, &body).expect("write body");

    let at_file = format!("@{}", file.display());
    assert_exit(&run(&sandbox, &[GEMINI, "POST", ENDPOINT, &at_file]).await, 0);
    let mut command = sandbox.apijongler();
    command.env("APIJONGLER_CONNECTORS", sandbox.connectors_dir()).args([GEMINI, "POST", ENDPOINT, "-"]);
    command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let stdin_body = body.clone();
    let output = tokio::task::spawn_blocking(move || {
        let mut child = command.spawn().expect("spawn");
        let mut stdin = child.stdin.take().expect("stdin");
        let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, stdin_body.as_bytes()));
        let output = child.wait_with_output().expect("wait");
        writer.join().expect("writer").expect("write stdin");
        output
    })
    .await
    .expect("join");
    assert_exit(&output, 0);

    let received = server.received_requests().await.expect("recorded");
    assert_eq!(received.len(), 2);
    for request in &received {
        assert!(
            request.body == body.as_bytes(),
            "the upstream got {} bytes, not the {} sent",
            request.body.len(),
            body.len()
        );
    }

    let missing = sandbox.dir.path().join("nowhere.json");
    let output = run(&sandbox, &[GEMINI, "POST", ENDPOINT, &format!("@{}", missing.display())]).await;
    assert_exit(&output, 2);
    let message = one_line_error(&output);
    assert!(message.contains(&missing.display().to_string()), "{message}");
    assert_eq!(server.received_requests().await.expect("recorded").len(), 2, "nothing sent without a body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_too_long_for_a_clock_is_a_usage_error_not_a_panic() {
    let mock = MockUpstream::start(MockConfig::default()).await.expect("mock");
    let busy = sandbox(1, mock.port());
    let coordinator = busy.coordinator(busy.options());
    // Every key held, so that a request would have to wait.
    let held = coordinator.claim(GEMINI, &[], std::time::Duration::ZERO).expect("hold the key");
    let output = run(&busy, &[GEMINI, "POST", ENDPOINT, "{}", "--wait", "500000000000y"]).await;
    assert_exit(&output, 2);
    let message = one_line_error(&output);
    assert!(message.contains("500000000000y") && message.contains("1y"), "{message}");
    assert!(!text(&output.stderr).contains("panicked"), "{}", text(&output.stderr));
    let mut command = busy.apijongler();
    command.env("APIJONGLER_CONNECTORS", busy.connectors_dir()).env("APIJONGLER_WAIT", "500000000000y");
    let output = tokio::task::spawn_blocking(move || command.args([GEMINI, "POST", ENDPOINT, "{}"]).output())
        .await
        .expect("join")
        .expect("run");
    assert_exit(&output, 2);
    assert!(one_line_error(&output).contains("APIJONGLER_WAIT"));
    held.release().expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sync_benchmark_runs() {
    // Only that it runs and prints a row per key count: its figures are for the README.
    let sandbox = Sandbox::new(GEMINI, 1);
    let output = run(&sandbox, &["bench", "sync", "--keys", "10,200", "--runs", "1"]).await;
    assert_exit(&output, 0);
    let table = text(&output.stdout);
    assert!(table.lines().count() == 4 && table.contains("\n     200 "), "{table}");
}

/// The recipes `apijongler db` prints, as (title, statement): each block of its output that starts with
/// a `-- ` line.
fn recipes(db_output: &str) -> Vec<(String, String)> {
    db_output
        .split("\n\n")
        .filter_map(|block| {
            let (title, sql) = block.trim().split_once('\n')?;
            Some((title.strip_prefix("-- ")?.to_owned(), sql.trim().to_owned()))
        })
        .collect()
}

/// Issue 8: a key's lockdowns are per model and per quota group. Keys key0 and key1 share group
/// my-project; gemini-2.5-pro is locked down for the group until the Pacific midnight, and key0 alone is
/// locked down for every model. `status`, `why`, `history` and the `db` recipes must all say so, and
/// `why` must agree with what the claim itself does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockdowns_by_model_and_group_in_status_why_history_and_db() {
    let mock = MockUpstream::start(MockConfig::default()).await.expect("mock");
    let sandbox = sandbox(2, mock.port());
    for _ in 0..2 {
        assert_exit(&run(&sandbox, &[GEMINI, "POST", ENDPOINT, "{}"]).await, 0);
    }
    // The groups and lockdowns go in after the requests, whose keyring sync would redo the groups.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64;
    let midnight = api_jongler::classify::next_pacific_midnight(now);
    let daily = "GenerateRequestsPerDayPerProjectPerModel-FreeTier";
    let connection = sandbox.sqlite();
    connection
        .execute_batch(
            "UPDATE keys SET quota_group = 'my-project';
             UPDATE keys SET project_learned = CASE key_name WHEN 'key0' THEN '111' ELSE '222' END;",
        )
        .expect("groups");
    let mut insert = connection
        .prepare(
            "INSERT INTO lockdowns (connector, scope, model, until, quota_id, reason, http_status, set_by_key, set_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 429, 'key0', ?7)",
        )
        .expect("prepare");
    for (scope, model, until, quota) in [
        ("group:my-project", "gemini-2.5-pro", midnight, Some(daily)),
        ("key:key0", "*", now + 600_000, None),
        ("group:my-project", "gemini-2.0-flash", now - 1_000, None),
    ] {
        let reason = format!("429 test lockdown of {model}");
        insert.execute(rusqlite::params![GEMINI, scope, model, until, quota, reason, now - 60_000]).expect("insert");
    }
    drop(insert);
    drop(connection);

    // status --json: each key's lockdowns in force, by model, with its group.
    let output = run(&sandbox, &["status", GEMINI, "--json"]).await;
    assert_exit(&output, 0);
    let rows = json(&output);
    let key = |name: &str| rows.as_array().expect("array").iter().find(|row| row["key"] == name).cloned().expect(name);
    let key1 = key("key1");
    assert_eq!(
        (key1["quota_group"].as_str(), key1["quota_scope"].as_str()),
        (Some("my-project"), Some("group:my-project"))
    );
    assert_eq!(key1["project_learned"], "222");
    assert_eq!(key1["state"], "vacant", "a lockdown of one model leaves the key's state alone");
    let models = |row: &Value| -> Vec<String> {
        row["lockdowns"]
            .as_array()
            .expect("lockdowns")
            .iter()
            .map(|l| l["model"].as_str().expect("model").to_owned())
            .collect()
    };
    assert_eq!(models(&key1), ["gemini-2.5-pro"], "only lockdowns in force: {key1}");
    let pro = &key1["lockdowns"][0];
    assert_eq!((pro["until"].as_i64(), pro["quota_id"].as_str()), (Some(midnight), Some(daily)));
    assert_eq!(
        (pro["scope"].as_str(), pro["set_by_key"].as_str(), pro["http_status"].as_u64()),
        (Some("group:my-project"), Some("key0"), Some(429))
    );
    assert_eq!(models(&key("key0")), ["*", "gemini-2.5-pro"], "its own lockdowns and its group's");

    // The table: group, models with deadlines, each lockdown's reason once; the conflicting projects warned of.
    let output = run(&sandbox, &["status", GEMINI]).await;
    assert_exit(&output, 0);
    let table = text(&output.stdout);
    let row = |key: &str| table.lines().find(|line| line.contains(&format!(" {key} "))).unwrap_or_default();
    assert!(row("key1").contains(" my-project ") && row("key1").contains("gemini-2.5-pro until 00:00 PT"), "{table}");
    assert!(table.contains("every model until") && table.contains("429 test lockdown of gemini-2.5-pro"), "{table}");
    assert!(!table.contains("gemini-2.0-flash"), "an expired lockdown is not shown: {table}");
    let stderr = text(&output.stderr);
    assert!(stderr.contains("group 'my-project'") && stderr.contains("may be wrong"), "{stderr}");

    // why --model: locked for pro (the group's lockdown, until midnight), free for flash.
    let output = run(&sandbox, &["why", GEMINI, "key1", "--model", "gemini-2.5-pro"]).await;
    assert_exit(&output, 0);
    let why = text(&output.stdout);
    assert!(why.contains("gemini-2.5-pro is locked down for group my-project until 00:00 PT"), "{why}");
    assert!(why.contains("set by key0's 429") && why.contains("quota group is my-project"), "{why}");
    assert!(why.contains("A request for gemini-2.5-pro does not take key1 before 00:00 PT"), "{why}");
    let output = run(&sandbox, &["why", GEMINI, "key1", "--model", "gemini-2.5-flash"]).await;
    assert!(text(&output.stdout).contains("A request for gemini-2.5-flash takes key1 now"), "{}", text(&output.stdout));
    let verdict = |key: &'static str, model: Option<&'static str>| {
        let sandbox = &sandbox;
        async move {
            let mut args = vec!["why", GEMINI, key, "--json"];
            args.extend(model.iter().flat_map(|model| ["--model", model]));
            let answer = json(&run(sandbox, &args).await);
            (answer["claimable_now"].as_bool().expect("claimable_now"), answer["claimable_at"].as_i64())
        }
    };
    let answer = json(&run(&sandbox, &["why", GEMINI, "key1", "--json"]).await);
    assert_eq!(models(&answer), ["gemini-2.5-pro"], "only lockdowns in force: {answer}");
    assert_eq!(verdict("key1", Some("gemini-2.5-pro")).await, (false, Some(midnight)));
    assert!(verdict("key1", Some("gemini-2.5-flash")).await.0);
    assert!(verdict("key1", None).await.0, "no lockdown of every model on key1");
    assert_eq!(
        verdict("key0", Some("gemini-2.5-flash")).await,
        (false, Some(now + 600_000)),
        "key0 alone: every model"
    );
    assert_eq!(verdict("key0", Some("gemini-2.5-pro")).await, (false, Some(midnight)), "the later of the two");
    let output = run(&sandbox, &["why", GEMINI, "key0"]).await;
    let why = text(&output.stdout);
    assert!(why.contains("every model is locked down for this key alone"), "{why}");
    assert!(why.contains("A request that names no model does not take key0 before"), "{why}");

    // The claim agrees: no key for pro, key1 for flash.
    let coordinator = api_jongler::Coordinator::open(sandbox.options()).expect("open");
    let pro = coordinator.claim_for(GEMINI, Some("gemini-2.5-pro"), &[], std::time::Duration::ZERO);
    assert!(pro.is_err(), "both keys of the group are locked down for pro");
    let flash = coordinator.claim_for(GEMINI, Some("gemini-2.5-flash"), &[], std::time::Duration::ZERO).expect("flash");
    assert_eq!(flash.key_name(), "key1");
    flash.release().expect("release");

    // history: every row says which model and quota scope it was about.
    let output = run(&sandbox, &["history", "--json"]).await;
    assert_exit(&output, 0);
    let history = json(&output);
    let history = history.as_array().expect("array");
    assert!(history.iter().all(|row| row.get("model").is_some() && row.get("quota_scope").is_some()), "{history:?}");
    let claims: Vec<&Value> = history.iter().filter(|row| row["event"] == "claimed").collect();
    assert!(claims.len() >= 3 && claims.iter().all(|row| row["model"] == "gemini-2.5-flash"), "{claims:?}");
    assert_eq!(claims[0]["quota_scope"], "group:my-project", "the claim through the group");
    let table = text(&run(&sandbox, &["history"]).await.stdout);
    assert!(table.contains("gemini-2.5-flash") && table.contains("group:my-project"), "{table}");

    // db: every recipe runs; those about models and lockdowns find the rows above.
    let output = run(&sandbox, &["db"]).await;
    assert_exit(&output, 0);
    let recipes = recipes(&text(&output.stdout));
    assert!(recipes.len() >= 7, "{recipes:?}");
    let connection = sandbox.sqlite();
    let mut found = std::collections::HashMap::new();
    for (title, sql) in &recipes {
        let mut statement = connection.prepare(sql).unwrap_or_else(|e| panic!("{title}: {e}\n{sql}"));
        let columns = statement.column_count();
        let rows: Vec<Vec<String>> = statement
            .query_map([], |row| {
                (0..columns)
                    .map(|i| {
                        Ok(match row.get_ref(i)? {
                            rusqlite::types::ValueRef::Text(text) => String::from_utf8_lossy(text).into_owned(),
                            other => format!("{other:?}"),
                        })
                    })
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .and_then(Iterator::collect)
            .unwrap_or_else(|e| panic!("{title}: {e}\n{sql}"));
        found.insert(title.clone(), rows);
    }
    let rows = |prefix: &str| -> &Vec<Vec<String>> {
        found
            .iter()
            .find(|(title, _)| title.starts_with(prefix))
            .map(|(_, rows)| rows)
            .unwrap_or_else(|| panic!("{prefix}"))
    };
    let per_model = rows("Requests per key and model today");
    assert!(per_model.iter().any(|row| row.iter().any(|cell| cell.contains("gemini-2.5-flash"))), "{per_model:?}");
    assert_eq!(rows("Lockdowns in force").len(), 2, "the expired one is not in force");
    assert_eq!(rows("The keys each lockdown in force stops").len(), 3, "pro for both keys, every model for key0");
    assert!(rows("Keys locked down for every model").is_empty(), "no key's state is lockdown");
    // The README lists the same recipes.
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    for (title, sql) in &recipes {
        assert!(readme.contains(&format!("-- {title}\n{sql}")), "README lacks the recipe '{title}'");
    }
}

/// Issue 14: one JSON shape of a key. `why --json` prints the very object `status --json` prints for
/// the same key (same fields, same values), with only its `verdict` and `explanation` around it: for
/// a held key, a key in error, keys under a group's lockdown of one model and a key's own lockdown of
/// every model, a key whose secret the keyring changed, and a retired key the keyring lists again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_why_print_one_json_shape_of_a_key() {
    let sandbox = Sandbox::new(GEMINI, 5);
    // No heartbeat lands between the two commands, so the held key reads the same in both.
    let hour = std::time::Duration::from_secs(3600);
    let options =
        api_jongler::CoordinatorOptions { heartbeat_interval: hour, stale_after: 3 * hour, ..sandbox.options() };
    let coordinator = sandbox.coordinator(options);
    let held = coordinator.claim(GEMINI, &[], std::time::Duration::ZERO).expect("claim");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64;
    let connection = sandbox.sql();
    let others = format!("key_name <> '{}'", held.key_name());
    connection
        .batch(&format!(
            "UPDATE keys SET quota_group = 'g', uses = 7, last_used_at = {now} WHERE {others};
             UPDATE keys SET state = 'error', reason = '400 invalid API key', http_status = 400
               WHERE {others} AND key_name = (SELECT min(key_name) FROM keys WHERE {others});
             UPDATE keys SET fingerprint = '00000000' WHERE key_name = 'key3' AND {others};
             UPDATE keys SET retired_at = {now} WHERE key_name = 'key4' AND {others};
             INSERT INTO lockdowns (connector, scope, model, until, quota_id, reason, http_status, set_by_key, set_at)
             VALUES ('{GEMINI}', 'group:g', 'gemini-2.5-pro', {}, 'daily', '429 daily', 429, 'key2', {now}),
                    ('{GEMINI}', 'key:key2', '*', {}, NULL, '429 shared', 429, 'key2', {now});",
            now + 3_600_000,
            now + 600_000
        ))
        .expect("set up the keys");
    drop(connection);

    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64;
    let status = run(&sandbox, &["status", GEMINI, "--json"]).await;
    assert_exit(&status, 0);
    let rows = json(&status);
    let rows = rows.as_array().expect("array");
    assert_eq!(rows.len(), 5, "{rows:?}");
    let mut states = Vec::new();
    for row in rows {
        let name = row["key"].as_str().expect("key");
        let output = run(&sandbox, &["why", GEMINI, name, "--json"]).await;
        assert_exit(&output, 0);
        let after =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64;
        let mut why = json(&output);
        let object = why.as_object_mut().expect("object");
        for around in ["verdict", "explanation"] {
            assert!(object.remove(around).is_some_and(|text| text.is_string()), "why --json has a {around}: {row}");
        }
        // A key claimable now is claimable "now", read by each command at its own moment.
        let mut row = row.clone();
        for answer in [&mut row, &mut why] {
            if answer["claimable_now"] == true {
                let at = answer["claimable_at"].as_i64().expect("claimable_at");
                assert!((before..=after).contains(&at), "claimable_at is the moment of reading: {answer}");
                answer["claimable_at"] = Value::Null;
            }
        }
        assert_eq!(why, row, "why --json and status --json differ for {name}");
        states.push((name.to_owned(), row["state"].as_str().unwrap_or_default().to_owned(), row["keyring"].clone()));
    }
    // The cases above are all there.
    let held_row = rows.iter().find(|row| row["key"] == held.key_name()).expect("held");
    assert_eq!((held_row["state"].as_str(), held_row["holder"]["liveness"].as_str()), (Some("locked"), Some("alive")));
    assert!(states.iter().any(|(_, state, _)| state == "error"), "{states:?}");
    let key2 = rows.iter().find(|row| row["key"] == "key2").expect("key2");
    assert_eq!(key2["lockdowns"].as_array().map(Vec::len), Some(2), "{key2}");
    assert_eq!((key2["state"].as_str(), key2["claimable_at"].as_i64()), (Some("lockdown"), Some(now + 600_000)));
    let key4 = rows.iter().find(|row| row["key"] == "key4").expect("key4");
    assert_eq!((key4["state"].as_str(), key4["keyring"].as_str()), (Some("retired"), Some("back in the keyring")));
    held.release().expect("release");
}
