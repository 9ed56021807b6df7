//! Judgement through real HTTP: `apijongler serve` in front of the loopback mock answering as Gemini
//! does, for answers that are not a key's fault (a request naming a missing or foreign file, the
//! OpenAI-compatible layer's array-wrapped errors) and for the summaries of per-model lockdowns. After
//! each scenario the number of keys in `error` is exactly the number of keys at fault, and the client
//! got the upstream's answer.

mod common;

use std::time::Duration;

use api_jongler::mock::{MockConfig, MockUpstream, ModelQuota, StreamFault, file_403};
use common::Sandbox;
use common::gateway::{GEMINI, Gateway, client, eventually};

/// The connector every test serves (Gemini's name, pointed at the mock).
const C: &str = GEMINI;
const PRO: &str = "gemini-2.5-pro";
const FLASH: &str = "gemini-2.5-flash";
const CHAT: &str = "/v1beta/openai/chat/completions";

// The bodies the classification unit tests judge too.
#[allow(dead_code)]
mod bodies {
    include!("fixtures/judgement_bodies.rs");
}

fn secret(index: usize) -> String {
    format!("fake-secret-{C}-{index}-do-not-use")
}

/// A sandbox with `keys` keys of [`C`] pointed at `port`, in one declared quota group when `group`.
fn sandbox(keys: usize, port: u16, group: bool) -> Sandbox {
    let mut ini = format!("[{C}]\n");
    for index in 0..keys {
        ini.push_str(&format!("key{index} = {}\n", secret(index)));
    }
    if group {
        ini.push_str(&format!("[{C} groups]\n"));
        for index in 0..keys {
            ini.push_str(&format!("key{index} = project-p\n"));
        }
    }
    let sandbox = Sandbox::with_keyring(&ini);
    sandbox.point_connector(C, "127.0.0.1", port, serde_json::json!({ "backoff_ms": 5, "timeout_secs": 10.0 }));
    sandbox
}

/// The keys in `error`, by name.
fn in_error(sandbox: &Sandbox) -> Vec<String> {
    sandbox.states().into_iter().filter(|(_, state)| state == "error").map(|(name, _)| name).collect()
}

/// A `generateContent` request for `model` naming the file `files/{file}`.
fn with_file(file: &str) -> String {
    serde_json::json!({"contents": [{"parts": [
        {"text": "Describe it."},
        {"file_data": {"mime_type": "application/pdf", "file_uri": format!("https://generativelanguage.googleapis.com/v1beta/files/{file}")}},
    ]}]})
    .to_string()
}

fn chat(model: &str, stream: bool) -> String {
    serde_json::json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}).to_string()
}

/// All of one (project, model) bucket of every secret mapped to `project`.
fn one_project(keys: usize, project: &str) -> std::collections::HashMap<String, String> {
    (0..keys).map(|index| (secret(index), project.to_owned())).collect()
}

/// Item 1: a request naming a file that expired or belongs to another project gets Gemini's 403 as it
/// came, on its first key, and no key is blamed; request after request, the pool stays whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_naming_a_missing_file_gets_its_403_and_no_key_goes_to_error() {
    assert_eq!(file_403("abc"), bodies::GEMINI_403_FILE, "the mock answers with the real body");
    let config = MockConfig { files_forbidden: true, openai_error_arrays: true, ..MockConfig::default() };
    let upstream = MockUpstream::start(config).await.unwrap();
    let sandbox = sandbox(4, upstream.port(), false);
    let gateway = Gateway::start(&sandbox, &[], &[]);
    let http = client();
    let generate = gateway.url(&format!("/{C}/v1beta/models/{FLASH}:generateContent"));
    for round in 0..6 {
        let response = http.post(&generate).body(with_file("abc-123")).send().await.unwrap();
        assert_eq!(response.status(), 403, "round {round}");
        assert_eq!(response.headers()["x-apijongler-attempts"], "1", "not tried on another key");
        assert_eq!(response.text().await.unwrap(), file_403("abc-123"), "the upstream's words, as they came");
        assert_eq!(in_error(&sandbox), Vec::<String>::new(), "round {round}");
    }
    // The same through the OpenAI-compatible layer, whose error comes in an array.
    let body = serde_json::json!({"model": FLASH, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Describe it."},
        {"type": "file", "file": {"file_id": "files/abc-123"}},
    ]}]});
    let response = http.post(gateway.url(&format!("/{C}{CHAT}"))).body(body.to_string()).send().await.unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(response.text().await.unwrap(), format!("[{}]", file_403("abc-123")));
    assert_eq!(in_error(&sandbox), Vec::<String>::new());
    // Every key is still good for a request that names no file.
    let response = http.post(&generate).body(r#"{"contents":[]}"#).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.stats().0, 8, "one attempt per request: 7 file requests and the last one");
    assert_eq!(sandbox.count("SELECT count(*) FROM keys WHERE state = 'vacant'"), 4);
}

/// Item 5: the OpenAI layer's array-wrapped per-day 429 locks down the quota it names (the model, for
/// the whole group) until the day ends, so no key of the group is tried again for it that day; no key
/// goes to error, and other models still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_layers_array_wrapped_429_locks_down_the_quota_it_names() {
    let config = MockConfig {
        openai_error_arrays: true,
        projects: one_project(3, "p"),
        model_quotas: vec![ModelQuota { model: PRO.into(), per_day: Some(1), ..ModelQuota::default() }],
        ..MockConfig::default()
    };
    let upstream = MockUpstream::start(config).await.unwrap();
    let sandbox = sandbox(3, upstream.port(), true);
    let gateway = Gateway::start(&sandbox, &["--wait", "0"], &[]);
    let http = client();
    let url = gateway.url(&format!("/{C}{CHAT}"));
    let first = http.post(&url).body(chat(PRO, false)).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert!(first.text().await.unwrap().contains("chat.completion"));
    let second = http.post(&url).body(chat(PRO, false)).send().await.unwrap();
    assert_eq!(second.status(), 429, "the group's daily quota of {PRO} is spent");
    let bucket = upstream.model_stats().remove(&("p".to_owned(), PRO.to_owned())).expect("bucket");
    assert_eq!(
        (bucket.rate_limited, bucket.after_429),
        (1, 0),
        "the array's QuotaFailure locked the whole group for {PRO}: no sibling was tried after it"
    );
    assert_eq!(in_error(&sandbox), Vec::<String>::new());
    let quota_id: String = sandbox
        .sql()
        .value("SELECT quota_id FROM lockdowns WHERE model = ?1", &[&PRO])
        .expect("one lockdown of the model");
    assert_eq!(quota_id, api_jongler::mock::PER_DAY_QUOTA_ID);
    // The quota was the model's: another model is served by the same keys, with the upstream's answer.
    let other = http.post(&url).body(chat(FLASH, false)).send().await.unwrap();
    assert_eq!(other.status(), 200);
    assert!(other.text().await.unwrap().contains("chat.completion"));
    assert_eq!(in_error(&sandbox), Vec::<String>::new());
}

/// Item 5: a bad key answered in the OpenAI layer's array leaves the rotation (exactly that key is in
/// error), and the request is answered by another key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_key_in_the_openai_layers_array_leaves_the_rotation() {
    let config =
        MockConfig { openai_error_arrays: true, bad_keys: [secret(1)].into_iter().collect(), ..MockConfig::default() };
    let upstream = MockUpstream::start(config).await.unwrap();
    let sandbox = sandbox(3, upstream.port(), false);
    let gateway = Gateway::start(&sandbox, &[], &[]);
    let http = client();
    // Keys are taken least recently used first: within three requests the bad one is tried.
    for _ in 0..3 {
        let response = http.post(gateway.url(&format!("/{C}{CHAT}"))).body(chat(FLASH, false)).send().await.unwrap();
        assert_eq!(response.status(), 200, "answered by a good key");
        assert!(response.text().await.unwrap().contains("chat.completion"));
    }
    assert_eq!(upstream.stats().1[&secret(1)].invalid, 1, "the bad key was tried once");
    assert_eq!(in_error(&sandbox), ["key1"], "exactly the key at fault");
}

/// Item 5: an array-wrapped error as a stream's first event is judged like the answer it stands for
/// (a 429: the key locked down, the request retried on another key), not streamed as data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_array_wrapped_error_as_a_streams_first_event_is_judged_like_the_answer() {
    let config = MockConfig {
        openai_error_arrays: true,
        stream_faults: vec![StreamFault::ErrorAsFirstEvent(429)],
        ..MockConfig::default()
    };
    let upstream = MockUpstream::start(config).await.unwrap();
    let sandbox = sandbox(2, upstream.port(), false);
    let gateway = Gateway::start(&sandbox, &[], &[]);
    let response = client().post(gateway.url(&format!("/{C}{CHAT}"))).body(chat(FLASH, true)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-apijongler-attempts"], "2", "retried on the other key");
    let text = response.text().await.unwrap();
    assert!(text.contains("[DONE]") && !text.contains("\"error\""), "a clean stream from the other key: {text}");
    assert_eq!(in_error(&sandbox), Vec::<String>::new());
    eventually(Duration::from_secs(10), "the stream's key settled", || {
        sandbox.count("SELECT count(*) FROM lockdowns WHERE model = 'gemini-2.5-flash'") == 1
            && sandbox.count("SELECT count(*) FROM keys WHERE state = 'locked'") == 0
    })
    .await;
}

/// Item 7: with every key locked down for one model, every summary says so: `/metrics` counts them by
/// model, the library's `key_states` lists each key's locked models with their end, and `why --model`
/// takes Gemini's full name `models/x` for `x`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockdowns_of_one_model_show_in_every_summary() {
    let config = MockConfig {
        projects: one_project(4, "p"),
        model_quotas: vec![ModelQuota { model: PRO.into(), per_day: Some(1), ..ModelQuota::default() }],
        ..MockConfig::default()
    };
    let upstream = MockUpstream::start(config).await.unwrap();
    let sandbox = sandbox(4, upstream.port(), true);
    let gateway = Gateway::start(&sandbox, &["--wait", "0"], &[]);
    let http = client();
    let url = gateway.url(&format!("/{C}/v1beta/models/{PRO}:generateContent"));
    assert_eq!(http.post(&url).body("{}").send().await.unwrap().status(), 200);
    assert_eq!(http.post(&url).body("{}").send().await.unwrap().status(), 429);
    assert_eq!(in_error(&sandbox), Vec::<String>::new());

    let text = http.get(gateway.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for line in [
        format!(r#"apijongler_keys_locked_down{{connector="{C}",model="{PRO}"}} 4"#),
        format!(r#"apijongler_keys{{connector="{C}",state="vacant"}} 4"#),
        format!(r#"apijongler_keys{{connector="{C}",state="error"}} 0"#),
    ] {
        assert!(text.lines().any(|got| got == line), "missing {line} in\n{text}");
    }

    let coordinator = sandbox.coordinator(sandbox.options());
    let states = coordinator.key_states(C).unwrap();
    assert_eq!(states.vacant.len(), 4, "vacant for a request that names no model");
    assert_eq!(states.locked_down_models.len(), 4, "{states:?}");
    let now = coordinator.now_ms();
    for (key, models) in &states.locked_down_models {
        let until = models.get(PRO).copied().unwrap_or_else(|| panic!("{key}: {models:?}"));
        assert!(until > now, "{key}: until {until}, now {now}");
    }
    for name in [PRO.to_owned(), format!("models/{PRO}")] {
        let for_pro = coordinator.key_states_for(C, Some(&name)).unwrap();
        assert_eq!(for_pro.lockdown.len(), 4, "a request for {name}: {for_pro:?}");
    }

    let claimed = coordinator.claim_for(C, Some(&format!("models/{PRO}")), &[], Duration::ZERO);
    assert!(claimed.is_err(), "a claim for models/{PRO} is one for {PRO}: {claimed:?}");

    let why = sandbox.apijongler().args(["why", C, "key2", "--model", &format!("models/{PRO}")]).output().unwrap();
    let said = String::from_utf8_lossy(&why.stdout);
    assert!(why.status.success(), "{said}{}", String::from_utf8_lossy(&why.stderr));
    assert!(said.contains(&format!("A request for {PRO} does not take key2 before")), "{said}");
}
