//! Configuration mistakes, through the real binary: a keyring, a connector file or an environment
//! variable that apijongler cannot use stops the command with exit code 5 and one line that names the
//! file, line, field or variable to fix, before anything is claimed or sent, and never shows a secret.

mod common;

use std::process::{Command, Output};

use common::Sandbox;
use wiremock::{Mock, MockServer, ResponseTemplate};

const CONFIG: i32 = 5;
const GEMINI: &str = "generativelanguage.googleapis.com";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn output(command: &mut Command) -> Output {
    command.output().expect("run apijongler")
}

#[track_caller]
fn assert_exit(output: &Output, code: i32) {
    assert_eq!(output.status.code(), Some(code), "stdout: {}\nstderr: {}", text(&output.stdout), text(&output.stderr));
}

/// The one `apijongler: ...` line of a failed command; nothing else on stderr, nothing on stdout.
#[track_caller]
fn the_error(output: &Output) -> String {
    let stderr = text(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines.len() == 1 && lines[0].starts_with("apijongler: "), "one error line: {stderr}");
    assert!(output.stdout.is_empty(), "stdout: {}", text(&output.stdout));
    lines[0].to_owned()
}

/// Fails if `secret` appears anywhere in what the command printed or in the database.
#[track_caller]
fn assert_never_shown(sandbox: &Sandbox, output: &Output, secret: &str) {
    for stream in [&output.stdout, &output.stderr] {
        assert!(!text(stream).contains(secret), "{secret} shown: {}", text(stream));
    }
    if sandbox.db.exists() {
        let bytes = std::fs::read(&sandbox.db).expect("read db");
        assert!(!String::from_utf8_lossy(&bytes).contains(secret), "{secret} in the database");
    }
}

/// `cleanup --all` on a keyring holding `ini`: a command that loads, checks and syncs the keyring.
fn sync_with(ini: &str) -> (Sandbox, Output) {
    let sandbox = Sandbox::with_keyring(ini);
    let output = output(sandbox.apijongler().args(["--json", "cleanup", "--all"]));
    (sandbox, output)
}

#[test]
fn a_secret_pasted_without_a_name_never_becomes_a_key_name() {
    // rust-ini joined the bare line to the next key's name: the secret became a key name, stored and shown.
    let (sandbox, output) = sync_with("[gemini]\nkey0 = fake-secret-0\nfake-secret-1\nkey1 = fake-secret-2\n");
    assert_exit(&output, CONFIG);
    let message = the_error(&output);
    assert!(message.contains("keys.ini:3:") && message.contains("[gemini]"), "{message}");
    assert!(message.contains("`name = secret`"), "says how to fix it: {message}");
    assert_never_shown(&sandbox, &output, "fake-secret");
    // `status` shows the database even so, with the same message as a warning.
    let status = self::output(sandbox.apijongler().arg("status"));
    assert_exit(&status, 0);
    assert!(text(&status.stderr).contains("keys.ini:3:"), "{}", text(&status.stderr));
    assert_never_shown(&sandbox, &status, "fake-secret");
}

#[test]
fn a_bare_secret_before_the_first_section_is_not_echoed() {
    for ini in ["fake-secret-9\n[gemini]\nk = fake-secret-1\n", "fake-secret-9"] {
        let (sandbox, output) = sync_with(ini);
        assert_exit(&output, CONFIG);
        let message = the_error(&output);
        assert!(message.contains("keys.ini:1:") && message.contains("before the first [connector]"), "{message}");
        assert_never_shown(&sandbox, &output, "fake-secret");
    }
}

#[test]
fn keyring_mistakes_are_explained_in_plain_words_with_file_and_line() {
    let cases = [
        ("[gemini]\nk = fake-secret-1\n[broken\n", "keys.ini:3:", "closing `]`"),
        ("[gemini]\nk = fake-secret-1\n= fake-secret-2\n", "keys.ini:3:", "no name"),
        (
            "[gemini]\nk = fake-secret-1\nk = fake-secret-2\n",
            "keys.ini:3:",
            "key 'k' appears twice in [gemini] (first on line 2)",
        ),
        ("[gemini]\nk =\n", "keys.ini:2:", "key 'k' in [gemini] has an empty secret"),
        ("[gemini]\nmy key = fake-secret-1\n", "keys.ini:2:", "1 to 64"),
        ("[gemini]\nk = fake-secret-1\nfake-secret-2", "keys.ini:3:", "[gemini]"),
    ];
    for (ini, place, words) in cases {
        let (sandbox, output) = sync_with(ini);
        assert_exit(&output, CONFIG);
        let message = the_error(&output);
        assert!(message.contains(place) && message.contains(words), "{ini:?}: {message}");
        for jargon in ["expecting", "EOF", "Some(", "None"] {
            assert!(!message.contains(jargon), "{ini:?}: parser jargon in {message}");
        }
        assert_never_shown(&sandbox, &output, "fake-secret");
    }
}

#[test]
fn quota_group_mistakes_name_file_line_and_section_and_never_show_the_label() {
    let keys = "[gemini]\nk1 = fake-secret-1\nk2 = fake-secret-2\n";
    let cases = [
        (format!("{keys}[hf groups]\nk1 = fake-label-1\n"), "keys.ini:4:", "[hf groups]", "no [hf] section"),
        (format!("{keys}[gemini groups]\nk9 = fake-label-1\n"), "keys.ini:5:", "[gemini groups]", "'k9'"),
        (
            format!("[gemini groups]\nk1 = fake-label-1\n{keys}[gemini groups]\nk1 = fake-label-1\n"),
            "keys.ini:7:",
            "[gemini groups]",
            "key 'k1' appears twice in [gemini groups] (first on line 2)",
        ),
        (format!("{keys}[gemini groups]\nk1 = fake label\n"), "keys.ini:5:", "[gemini groups]", "1 to 128"),
        (format!("{keys}[gemini groups]\nk1 = fake-secret-2\n"), "keys.ini:5:", "[gemini groups]", "never a secret"),
        (format!("{keys}[gemini groups]\nfake-label-1\n"), "keys.ini:5:", "[gemini groups]", "neither"),
    ];
    for (ini, place, section, words) in cases {
        let (sandbox, output) = sync_with(&ini);
        assert_exit(&output, CONFIG);
        let message = the_error(&output);
        assert!(message.contains(place) && message.contains(section) && message.contains(words), "{ini:?}: {message}");
        for shown in ["fake-label", "fake label"] {
            assert_never_shown(&sandbox, &output, shown);
        }
        assert_never_shown(&sandbox, &output, "fake-secret");
    }
    // The same keys with a well-formed groups section are synced.
    let (_sandbox, output) = sync_with(&format!("{keys}[gemini groups]\nk1 = fake-label-1\n"));
    assert_exit(&output, 0);
}

#[test]
fn a_secret_that_cannot_be_a_header_value_is_refused_by_name_and_line() {
    let (sandbox, output) = sync_with("[gemini]\nk0 = fake-secret-0\nk1 = fake-se\u{1}cret-1\n");
    assert_exit(&output, CONFIG);
    let message = the_error(&output);
    assert!(message.contains("keys.ini:3:") && message.contains("key 'k1' in [gemini]"), "{message}");
    assert_never_shown(&sandbox, &output, "fake-se");
}

#[test]
fn a_utf8_bom_at_the_start_of_the_keyring_is_accepted() {
    let (sandbox, output) = sync_with("\u{feff}[gemini]\nk0 = fake-secret-0\n");
    assert_exit(&output, 0);
    let status = self::output(sandbox.apijongler().args(["--json", "status"]));
    assert_exit(&status, 0);
    let keys: serde_json::Value = serde_json::from_slice(&status.stdout).expect("JSON");
    assert_eq!(keys[0]["connector"], "gemini", "{keys}");
    assert_eq!(keys[0]["key"], "k0", "{keys}");
}

/// `apijongler connectors` with one file `file` holding `json` in the sandbox's connector directory.
fn connectors_with(files: &[(&str, serde_json::Value)]) -> (Sandbox, Output) {
    let sandbox = Sandbox::new("gemini", 1);
    let dir = sandbox.connectors_dir();
    std::fs::create_dir_all(&dir).expect("mkdir");
    for (file, json) in files {
        std::fs::write(dir.join(file), json.to_string()).expect("write connector");
    }
    let output = output(sandbox.apijongler().env("APIJONGLER_CONNECTORS", &dir).arg("connectors"));
    (sandbox, output)
}

#[test]
fn a_connector_that_cannot_work_is_refused_at_load_naming_file_and_field() {
    use serde_json::json;
    let cases = [
        (json!({"host": "h", "api_key_header": "x-goog-api-key "}), "api_key_header"),
        (json!({"host": "h", "api_key_header": "x goog"}), "api_key_header"),
        (json!({"host": "h", "api_key_header": ""}), "api_key_header"),
        (json!({"host": "h", "api_key_prefix": "Bearer\n"}), "api_key_prefix"),
        (json!({"host": ""}), "host"),
        (json!({"host": "exa mple.com"}), "host"),
        (json!({"host": "example.com/v1"}), "host"),
        (json!({"host": "https://example.com"}), "host"),
        (json!({"host": "example.com:8080"}), "host"),
        (json!({"host": "h", "port": 0}), "port"),
        (json!({"host": "h", "base_path": "v1"}), "base_path"),
        (json!({"host": "h", "policy": {"timeout_secs": 0}}), "policy.timeout_secs"),
        (json!({"host": "h", "policy": {"timeout_secs": -1.5}}), "policy.timeout_secs"),
    ];
    for (json, field) in cases {
        let (_sandbox, output) = connectors_with(&[("broken.json", json.clone())]);
        assert_exit(&output, CONFIG);
        let message = the_error(&output);
        assert!(message.contains("broken.json") && message.contains(&format!("`{field}`")), "{json}: {message}");
    }
    let (_sandbox, output) = connectors_with(&[("fine.json", json!({"host": "h", "base_path": "/v1", "port": 8443}))]);
    assert_exit(&output, 0);
}

#[test]
fn two_connector_files_with_one_name_are_refused_naming_both() {
    use serde_json::json;
    let (_sandbox, output) = connectors_with(&[
        ("a.json", json!({"name": "mine", "host": "a.example"})),
        ("b.json", json!({"name": "mine", "host": "b.example"})),
    ]);
    assert_exit(&output, CONFIG);
    let message = the_error(&output);
    assert!(message.contains("a.json") && message.contains("b.json") && message.contains("'mine'"), "{message}");
    // A file named after the connector of another file's `name` is the same connector too.
    let (_sandbox, output) = connectors_with(&[
        ("a.json", json!({"name": "b", "host": "a.example"})),
        ("b.json", json!({"host": "b.example"})),
    ]);
    assert_exit(&output, CONFIG);
}

/// A connector pointing at `server` with `fields` merged in, and one key.
fn request_through(server: &MockServer, fields: serde_json::Value) -> (Sandbox, Command) {
    let sandbox = Sandbox::with_keyring("[mine]\nk0 = fake-secret-0\n");
    let dir = sandbox.connectors_dir();
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mut connector = serde_json::json!({
        "name": "mine", "host": "127.0.0.1", "port": server.address().port(), "protocol": "http",
        "policy": {"retries": 0}
    });
    connector.as_object_mut().expect("object").extend(fields.as_object().expect("object").clone());
    std::fs::write(dir.join("mine.json"), connector.to_string()).expect("write connector");
    let mut command = sandbox.apijongler();
    command.env("APIJONGLER_CONNECTORS", &dir).args(["mine", "GET", "/ping"]);
    (sandbox, command)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_key_header_stops_the_request_before_it_goes_out_without_a_key() {
    let server = MockServer::start().await;
    Mock::given(wiremock::matchers::any()).respond_with(ResponseTemplate::new(200)).mount(&server).await;
    for fields in
        [serde_json::json!({"api_key_header": "x-api-key "}), serde_json::json!({"api_key_prefix": "Bearer\r\n"})]
    {
        let (_sandbox, mut command) = request_through(&server, fields.clone());
        let output = tokio::task::spawn_blocking(move || output(&mut command)).await.expect("join");
        assert_exit(&output, CONFIG);
        assert!(the_error(&output).contains("mine.json"), "{fields}");
    }
    let received = server.received_requests().await.expect("recording");
    assert!(received.is_empty(), "{} request(s) went out without a key", received.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apijongler_timeout_is_seconds_or_a_duration_and_nothing_else() {
    let server = MockServer::start().await;
    Mock::given(wiremock::matchers::any()).respond_with(ResponseTemplate::new(200)).mount(&server).await;
    for bad in ["abc", "0", "0s", "-1", "NaN", "inf", "1e400", "5 minutes please"] {
        let (sandbox, _) = connectors_with(&[]);
        let listed = output(sandbox.apijongler().env("APIJONGLER_TIMEOUT", bad).arg("connectors"));
        assert_exit(&listed, CONFIG);
        let message = the_error(&listed);
        assert!(message.contains("APIJONGLER_TIMEOUT") && message.contains("2m"), "{bad}: {message}");

        let (_sandbox, mut command) = request_through(&server, serde_json::json!({}));
        command.env("APIJONGLER_TIMEOUT", bad);
        let sent = tokio::task::spawn_blocking(move || output(&mut command)).await.expect("join");
        assert_exit(&sent, CONFIG);
        assert!(the_error(&sent).contains("APIJONGLER_TIMEOUT"), "{bad}");
    }
    assert!(server.received_requests().await.expect("recording").is_empty(), "sent with a bad timeout");
    for good in ["", "30", "1.5", "0.5s", "2m", "1h 30m"] {
        let (_sandbox, mut command) = request_through(&server, serde_json::json!({}));
        command.env("APIJONGLER_TIMEOUT", good);
        let sent = tokio::task::spawn_blocking(move || output(&mut command)).await.expect("join");
        assert_exit(&sent, 0);
    }
}

#[test]
fn empty_environment_variables_mean_unset() {
    let sandbox = Sandbox::new("gemini", 1);
    let state = sandbox.dir.path().join("xdg-state");
    let listed = output(
        sandbox
            .apijongler()
            .env("APIJONGLER_DB", "")
            .env("APIJONGLER_CONFIG", "")
            .env("APIJONGLER_CONNECTORS", "")
            .env("XDG_STATE_HOME", &state)
            .args(["--json", "status"]),
    );
    assert_exit(&listed, 0);
    assert!(state.join("apijongler/apijongler.db").exists(), "the default database was used");
    assert!(!sandbox.db.exists());

    let connectors = output(sandbox.apijongler().env("APIJONGLER_CONNECTORS", "").arg("connectors"));
    assert_exit(&connectors, 0);
    assert!(text(&connectors.stdout).contains("httpbin.org"));

    // Without a keyring, a request says the variable is not set (not a clap error about --config).
    let request = output(sandbox.apijongler().env("APIJONGLER_CONFIG", "").args([GEMINI, "GET", "/"]));
    assert_exit(&request, CONFIG);
    assert!(the_error(&request).contains("APIJONGLER_CONFIG is not set"), "{}", text(&request.stderr));

    // An empty value given on the command line is still a usage error.
    let explicit = output(sandbox.apijongler().args(["--db", "", "status"]));
    assert_exit(&explicit, 2);
    assert!(text(&explicit.stderr).contains("--db"), "{}", text(&explicit.stderr));
}

#[test]
fn logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    let sandbox = Sandbox::new("gemini", 1);
    // -v: the migration and sync are logged at info; stderr is a pipe here.
    let logged = output(sandbox.apijongler().args(["-v", "status"]));
    assert_exit(&logged, 0);
    let stderr = text(&logged.stderr);
    assert!(stderr.contains("INFO"), "something was logged: {stderr}");
    assert!(!stderr.contains("\x1b["), "ANSI codes on a pipe: {stderr:?}");
}

#[test]
fn a_bad_api_family_is_refused_naming_file_field_and_the_allowed_words() {
    use serde_json::json;
    for api in [json!("gemeni"), json!("Gemini "), json!(""), json!(7)] {
        let (_sandbox, output) = connectors_with(&[("proxy.json", json!({"host": "h", "api": api}))]);
        assert_exit(&output, CONFIG);
        let message = the_error(&output);
        assert!(message.contains("proxy.json") && message.contains("`api`"), "{api}: {message}");
        for word in ["\"gemini\"", "\"openai\"", "\"huggingface\"", "\"plain\""] {
            assert!(message.contains(word), "{api}: {message} lists {word}");
        }
    }
    for api in ["gemini", "openai", "huggingface", "plain"] {
        let (_sandbox, output) = connectors_with(&[("proxy.json", json!({"host": "h", "api": api}))]);
        assert_exit(&output, 0);
    }
}

/// `apijongler --json connectors` with `files` in the connector directory: the row of `name`.
fn listed(files: &[(&str, serde_json::Value)], name: &str) -> serde_json::Value {
    let sandbox = Sandbox::new("gemini", 1);
    let dir = sandbox.connectors_dir();
    std::fs::create_dir_all(&dir).expect("mkdir");
    for (file, json) in files {
        std::fs::write(dir.join(file), json.to_string()).expect("write connector");
    }
    let listed = output(sandbox.apijongler().env("APIJONGLER_CONNECTORS", &dir).args(["--json", "connectors"]));
    assert_exit(&listed, 0);
    let rows: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("JSON");
    rows.as_array().expect("rows").iter().find(|row| row["name"] == name).expect("listed").clone()
}

/// A user file named like a shipped connector changes only the fields it gives: pointed elsewhere, the
/// shipped Gemini connector keeps its key header and its API family (so its model rule and streams).
#[test]
fn a_user_file_named_like_a_shipped_connector_merges_onto_it() {
    use serde_json::json;
    let pointed = json!({"name": GEMINI, "host": "127.0.0.1", "port": 8080, "protocol": "http"});
    let gemini = listed(&[("mine.json", pointed)], GEMINI);
    assert_eq!(gemini["base_url"], "http://127.0.0.1:8080", "{gemini}");
    assert_eq!(gemini["key"], "x-goog-api-key: <key>", "the shipped header is kept: {gemini}");
    assert_eq!(gemini["api"], "gemini", "{gemini}");
    let origin = gemini["origin"].as_str().expect("origin");
    assert!(origin.contains("mine.json") && origin.contains("built in"), "says it merged: {gemini}");
    // A field the user gives wins over the shipped file's.
    let renamed = json!({"name": GEMINI, "api_key_header": "x-proxy-key", "api": "plain"});
    let gemini = listed(&[("mine.json", renamed)], GEMINI);
    assert_eq!(gemini["base_url"], "https://generativelanguage.googleapis.com", "{gemini}");
    assert_eq!(gemini["key"], "x-proxy-key: <key>", "{gemini}");
    assert_eq!(gemini["api"], "plain", "{gemini}");
    // A connector of the user's own has no shipped one to merge onto; without `api` it infers per request.
    let own = listed(&[("proxy.json", json!({"host": "127.0.0.1"}))], "proxy");
    assert_eq!(own["api"], serde_json::Value::Null, "{own}");
}
